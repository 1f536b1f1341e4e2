"""Write files and folders so that a reader sees the old version or the new one, never half.

Everything is built under a hidden temporary name in the destination's folder (same file
system, so the final ``os.replace`` is atomic) and given ordinary permissions before the
rename: ``mkstemp``/``mkdtemp`` create private (0600/0700) entries, which would otherwise
leak into the user's run directories and caches.

Temporary names are ``.NAME.tmp-XXXX`` (``.NAME.tmp-old-XXXX`` for a folder moved aside while
its replacement goes in), so that :func:`remove_leftovers` can tell a killed writer's
debris from anything else in the folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

FILE_MODE = 0o644
DIR_MODE = 0o755

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<old>old-)?[^/]*$")


def _temp_prefix(name: str, old: bool = False) -> str:
    return f".{name}.tmp-{'old-' if old else ''}"


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dst.name), dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_dir_atomic(out_dir: Path, build: Callable[[Path], None]) -> Path:
    """Call ``build(tmp)`` to fill a temporary folder, then swap it in for ``out_dir``.

    An existing ``out_dir`` is moved aside first and deleted only after the new one is in
    place, so a crash at any point leaves either the old or the new folder under the name.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir.name), dir=out_dir.parent))
    try:
        build(tmp)
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, DIR_MODE)
            for name in files:
                os.chmod(os.path.join(root, name), FILE_MODE)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir.name, old=True), dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest existing ancestor (where creating it starts)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def remove_leftovers(folder: Path) -> list[str]:
    """Delete what writers killed mid-write left in ``folder``; returns the names removed.

    Only call this while no other process writes to ``folder`` (e.g. under the run's lock). A
    folder moved aside by :func:`build_dir_atomic` whose replacement never arrived is moved
    back instead: it is the only copy.
    """
    removed = []
    if not Path(folder).is_dir():
        return removed
    for entry in sorted(Path(folder).iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match is None:
            continue
        original = entry / match["name"]
        target = Path(folder) / match["name"]
        if match["old"] and original.exists() and not target.exists():
            os.replace(original, target)
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed
