"""The ``lmdistill`` command: thin subcommands over the library modules.

    lmdistill prepare       text sources -> token shards
    lmdistill init-student  cut a student from a teacher
    lmdistill generate-corpus sample the teacher's own text into a corpus (sequence-level KD)
    lmdistill cache-teacher store the teacher's top-k logits and tail samples over prepared token shards
    lmdistill distill       train a student (or --resume a run)
    lmdistill eval          perplexity of several models under one protocol
    lmdistill generate      continue a prompt (--compare MODEL2: side by side)
    lmdistill bench         size and speed of several models, measured interleaved
    lmdistill report        report.md with plots for a run directory
    lmdistill demo          the whole pipeline on the bundled teacher and corpora
"""

from __future__ import annotations

import errno
import os
import sys

from ..errors import LmdistillError
from ..models.malloc import reuse_freed_memory
from .parser import build_parser, parse_arguments


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 done, 2 bad input, 130 interrupted).

    The tool's own errors (:class:`lmdistill.errors.LmdistillError`) and file-system errors on a
    named path are printed as one line ``lmdistill CMD: error: MESSAGE``; anything else is a bug
    and keeps its traceback. ``LMDISTILL_DEBUG=1`` shows the traceback for every error.
    """
    # Quiet transformers' offline-hub chatter and tokenizers' fork warning before they load (the
    # commands import them lazily). Set here, not on import, so importing this module changes
    # nothing for a program that uses the library.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    try:
        args = parse_arguments(parser, argv)
    except SystemExit as stop:  # --help (0), or a usage error argparse printed as one line (2)
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    from transformers.utils import logging as hf_logging

    # Our own bars show progress; transformers' per-file load/save bars only add noise.
    hf_logging.disable_progress_bar()

    try:
        reuse_freed_memory()  # every command allocates big temporaries (logits, casts): reuse them
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\nlmdistill {args.command}: interrupted", file=sys.stderr)
        return 130
    except LmdistillError as err:
        if os.environ.get("LMDISTILL_DEBUG"):
            raise
        return _error(args.command, str(err))
    except OSError as err:
        message = _os_error_message(err)
        if message is None or os.environ.get("LMDISTILL_DEBUG"):
            raise
        return _error(args.command, message)


def _os_error_message(err: OSError) -> str | None:
    """One line for a file-system error the user can fix, or None for any other OSError (a bug).

    An OSError that names a path (permission denied, not a folder, a read-only or full disk, a
    file vanished) is about the user's files, not our code: the path and the system's reason
    are what they need, and the traceback would only show which of our lines touched it.
    """
    if err.filename is not None:
        path = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else str(err.filename)
        return f"{path}: {err.strerror or err}; check the path, its permissions and the free disk space"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{err.strerror}; free some disk space and run the command again"
    return None


def _error(command: str, message: str) -> int:
    rank = os.environ.get("RANK", "0") if "MASTER_ADDR" in os.environ else "0"  # torchrun: say which process
    where = f" (rank {rank})" if rank != "0" else ""
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"lmdistill {command}{where}: error: {one_line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
