"""Write files and folders so that a reader sees the old version or the new one, never half.

Everything is built under a hidden temporary name in the destination's folder (same file
system, so the final ``os.replace`` is atomic) and given ordinary permissions before the
rename: ``mkstemp``/``mkdtemp`` create private (0600/0700) entries, which would otherwise
leak into the user's run directories and caches.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

FILE_MODE = 0o644
DIR_MODE = 0o755


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
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
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build(tmp)
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, DIR_MODE)
            for name in files:
                os.chmod(os.path.join(root, name), FILE_MODE)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
