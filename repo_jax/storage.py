"""Storage faults (disk full, file-size limit, read-only, permission) as one clear line.

Python raises OSError; tensorstore (under Orbax) raises ValueError with a status code and
the OS error number in its text. Both become `StorageError`, naming the path."""
from __future__ import annotations

import errno
import logging
import os
import re
import sys
import warnings
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


class _SaveFaultEchoes(logging.Filter):
    """Log records of a failed save's fault: Orbax's background threads log it with a
    traceback before it is re-raised (and reported once, as StorageError), asyncio logs
    its sibling writes, which fail too, as 'exception was never retrieved', and those
    still running when the process exits fail to schedule their next step."""

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else None
        return e is None or (fault(e) is None and ".orbax-checkpoint-tmp" not in str(e)
                             and not str(e).startswith("cannot schedule new futures after"))


def silence_fault_echoes() -> None:
    """Drop the echoes of a failed save or read (idempotent; other errors pass through):
    the records above, and the completion callbacks of its other tensorstore operations
    that reach Orbax's already closed event loop."""
    # Tensorstore writes of the failed save that never started are garbage-collected
    # unawaited at exit; Python warns about each of them.
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                            category=RuntimeWarning)
    for name in ("absl", "asyncio"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _SaveFaultEchoes) for f in log.filters):
            log.addFilter(_SaveFaultEchoes())
    previous = sys.unraisablehook
    if getattr(previous, "_repo_jax", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook._repo_jax = True
    sys.unraisablehook = hook
