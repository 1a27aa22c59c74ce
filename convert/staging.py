"""Write a destination directory all at once: build it in a temporary directory
next to it and rename at the end, so a failure or Ctrl-C leaves nothing behind.

The temporary directory is named `.DST.<pid>@<host>.<random>.partial`. A process
killed outright (SIGKILL, power loss) cannot remove it, so the next conversion to
the same DST removes those whose process is gone, and only those: a partial of a
live process, or of another host, is left alone.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from repo_jax.hf_format import FormatError

# pid@host.<mkdtemp's random part>.partial, or pid@host.replaced (an old DST being swapped out)
_LEFTOVER = re.compile(r"(\d+)@([A-Za-z0-9-]+)\.(?:[A-Za-z0-9_]+\.partial|replaced)")
# A tensorstore write error carries the system's errno in its message.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _owner_tag() -> str:
    return f"{os.getpid()}@{_host()}"


def check_destination(dst: str | os.PathLike, overwrite: bool, *sources: str | os.PathLike,
                      replaceable: Callable[[Path], bool] = lambda p: False,
                      kind: str = "model directory") -> Path:
    """Refuse a destination that is not a directory path, exists (without
    `overwrite`), is a non-empty directory other than a `kind` (`replaceable`), has no
    parent directory, or overlaps a source (replacing it would delete the input)."""
    dst = Path(dst)
    if dst.is_symlink():
        raise FormatError(f"{dst}: is a symbolic link; give the directory it points to, or "
                          "another destination")
    if dst.exists() and not dst.is_dir():
        raise FormatError(f"{dst}: exists and is not a directory; choose a directory path")
    if dst.exists() and not overwrite:
        raise FormatError(f"{dst}: already exists; pass --overwrite to replace it or choose "
                          "another destination")
    if dst.exists() and any(dst.iterdir()) and not replaceable(dst):
        found = sorted(p.name for p in dst.iterdir())
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise FormatError(f"{dst}: is not a {kind} (it holds {shown}); --overwrite replaces "
                          f"only a {kind} or an empty directory, so nothing was deleted; "
                          "choose another destination")
    parent = dst.absolute().parent
    if not parent.is_dir():
        what = "not a directory" if parent.exists() else "no such directory"
        raise FormatError(f"{parent}: {what}; create the directory first or choose another "
                          "destination")
    for src in sources:
        s, d = Path(src).resolve(), dst.resolve()
        if d == s or s in d.parents or d in s.parents:
            raise FormatError(f"{dst}: overlaps the source {src}; choose another destination")
    return dst


def remove_stale(dst: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Remove `.DST.<pid>@<host>.*` leftovers whose process, on this host, is gone."""
    removed = []
    prefix = f".{dst.name}."
    for p in dst.parent.iterdir():
        m = _LEFTOVER.fullmatch(p.name[len(prefix):]) if p.name.startswith(prefix) else None
        if not m or m.group(2) != _host() or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        log(f"removed {p}, left by process {m.group(1)}, which is gone")
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _storage_error(e: BaseException, dst: Path, tmp: Path) -> OSError | None:
    """A failure to write into `tmp` (disk full, file-size limit, read-only,
    permission) as an OSError naming `dst`, whether Python or tensorstore raised it.
    Errors reading the source pass through as they are."""
    code = None
    if isinstance(e, OSError) and e.errno is not None:
        if e.filename is None or str(e.filename).startswith(str(tmp)):
            code = e.errno
    elif isinstance(e, ValueError) and not isinstance(e, FormatError):
        m = _OS_ERROR_CODE.search(str(e))
        code = int(m.group(1)) if m and "writ" in str(e).lower() else None
    if code is None:
        return None
    return OSError(code, f"{os.strerror(code)} while writing it; nothing was written", str(dst))


@contextmanager
def staged(dst: str | os.PathLike, overwrite: bool = False,
           log: Callable[[str], None] = print) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `dst` (replacing an
    existing one only with `overwrite`), on any error it is removed. Storage errors
    come out as OSError naming `dst`."""
    dst = Path(dst).absolute()
    remove_stale(dst, log)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{_owner_tag()}.", suffix=".partial",
                                    dir=dst.parent))
    except OSError as e:
        raise OSError(e.errno, f"cannot create a directory there ({e.strerror})",
                      str(dst.parent)) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it normal permissions
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        storage = _storage_error(e, dst, tmp)
        if storage is not None:
            raise storage from None
        raise
    if dst.exists() and not overwrite:  # another process created it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        raise FormatError(f"{dst}: appeared while converting (another conversion?); left it "
                          "as it is and wrote nothing")
    old = dst.parent / f".{dst.name}.{_owner_tag()}.replaced"
    try:
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
    except OSError as e:
        if old.exists() and not dst.exists():
            old.rename(dst)  # put the previous DST back
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno or errno.EIO, f"cannot move the result into place ({e.strerror})",
                      str(dst)) from None
    if old.exists():
        shutil.rmtree(old)
