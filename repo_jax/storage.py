"""Storage faults (disk full, file-size limit, read-only, permission) as one clear line.

Python raises OSError; tensorstore (under Orbax) raises ValueError with a status code and
the OS error number in its text. Both become `StorageError`, naming the path."""
from __future__ import annotations

import errno
import logging
import os
import re
import sys
from contextlib import contextmanager
from typing import Iterator

# tensorstore statuses that mean the storage refused, not that the data is bad.
_STATUSES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "OUT_OF_RANGE", "UNAVAILABLE",
             "FAILED_PRECONDITION")
_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_PATH = re.compile(r'"(/[^"]+)"')


class StorageError(RuntimeError):
    """The run directory cannot be written; the message names the path and the fault."""


def fault(e: BaseException) -> str | None:
    """'<reason> (<ERRNO>): <path>' when `e` is a storage fault, else None."""
    if isinstance(e, OSError) and e.errno is not None:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)}){where}"
    text = str(e)
    code = _OS_CODE.search(text)
    if isinstance(e, ValueError) and code:
        paths = _PATH.findall(text)
        n = int(code.group(1))
        return (f"{os.strerror(n)} ({errno.errorcode.get(n, n)})"
                + (f": {paths[-1]}" if paths else ""))
    if isinstance(e, ValueError) and text.startswith(_STATUSES):
        return text.splitlines()[0][:300]
    return None


@contextmanager
def writing(what: str, fix: str = "free disk space or fix the permissions") -> Iterator[None]:
    """Turn a storage fault raised inside into StorageError: 'cannot write <what>: ...'."""
    try:
        yield
    except (OSError, ValueError) as e:
        reason = fault(e)
        if reason is None:
            raise
        raise StorageError(f"cannot write {what}: {reason}; {fix}") from None


class _OrphanedFaults(logging.Filter):
    """asyncio's 'exception was never retrieved' for the sibling writes of a failed save."""

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else None
        return e is None or fault(e) is None


def silence_save_fault_echoes() -> None:
    """A failed Orbax save leaves its other tensorstore writes failing later: asyncio logs
    each as never retrieved (at exit) and their completion callbacks hit the closed event
    loop. The fault itself is reported once, as StorageError; drop these echoes
    (idempotent; other errors pass through)."""
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrphanedFaults) for f in log.filters):
        log.addFilter(_OrphanedFaults())
    previous = sys.unraisablehook
    if getattr(previous, "_repo_jax", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook._repo_jax = True
    sys.unraisablehook = hook
