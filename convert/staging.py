"""Write a destination directory all at once: build it in a temporary directory
next to it and rename at the end, so a failure or Ctrl-C leaves nothing behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from repo_jax.hf_format import FormatError


def check_destination(dst: str | os.PathLike, overwrite: bool, *sources: str | os.PathLike) -> Path:
    """Refuse a destination that exists (without `overwrite`), has no parent
    directory, or is one of the sources (replacing it would delete the input)."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FormatError(f"{dst}: already exists; pass --overwrite to replace it or choose "
                          "another destination")
    if not dst.absolute().parent.is_dir():
        raise FormatError(f"{dst.absolute().parent}: no such directory; create it first")
    for src in sources:
        s, d = Path(src).resolve(), dst.resolve()
        if d == s or s in d.parents or d in s.parents:
            raise FormatError(f"{dst}: overlaps the source {src}; choose another destination")
    return dst


@contextmanager
def staged(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `dst` (replacing an
    existing one only with `overwrite`), on any error it is removed."""
    dst = Path(dst).absolute()
    check_destination(dst, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it normal permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.{os.getpid()}.replaced"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    else:
        tmp.rename(dst)
