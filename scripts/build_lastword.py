"""Regenerate lmdistill/evaluate/data/lastword_test.jsonl from lmdistill.evaluate.lastword.

Usage: python scripts/build_lastword.py [--check]

The shipped file must always equal ``to_jsonl(build_lastword())`` with the default arguments
(tests/test_eval_datasets.py checks it); run this after changing the construction or the
bundled corpora. ``--check`` only reports whether the shipped file is up to date (exit 1 if not).
"""

from __future__ import annotations

import argparse
import sys

from lmdistill.evaluate.lastword import build_lastword, lastword_path, to_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the shipped file is stale")
    args = parser.parse_args(argv)
    rows = build_lastword()
    text = to_jsonl(rows)
    path = lastword_path()
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else None
        fresh = current == text
        print(f"{path}: {'up to date' if fresh else 'STALE; run python scripts/build_lastword.py'}")
        return 0 if fresh else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["corpus"]] = counts.get(row["corpus"], 0) + 1
    print(f"wrote {len(rows)} passages ({', '.join(f'{k}: {v}' for k, v in counts.items())}), "
          f"{len(text.encode('utf-8')):,} bytes, to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
