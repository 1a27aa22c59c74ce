"""Back XLA:CPU's per-step buffers with 2 MiB pages (Linux, glibc >= 2.35, CPU only).

XLA:CPU allocates each executable's temporary buffer (1.7 GB for the benchmark's
transformer step) with malloc on a worker thread and frees it when the step ends.
glibc serves a worker thread from a per-thread arena whose heaps cannot exceed 64 MiB,
so such a block always comes from a fresh mmap and goes back with munmap: every step
the kernel maps it again one 4 KiB page fault at a time (440,000 faults and 0.7-0.8 s
of system time in a 2.6 s step, getrusage in benchmarks/bench_host_memory.py). With
glibc's `glibc.malloc.hugetlb=1` tunable malloc asks for transparent huge pages on
those blocks: 512 times fewer faults, same memory use, the same numbers.

Keeping the block in the heap instead (mallopt: one arena, no mmap, no trim) removes the
faults too, but the heap then fragments and grows by a whole buffer every few dozen
steps (2.7 -> 6.1 GB in 26 steps), so it is not used.

A tunable is read once, when the process starts, hence `reexec_with_huge_pages`: an
entry point calls it first thing, and it restarts the same command line with the
tunable added. It is CPU-only: on TPU and GPU the step's buffers are device memory under
XLA's own allocator. Set GLIBC_TUNABLES=glibc.malloc.hugetlb=0 to opt out.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _cpu_platform(environ: Mapping[str, str]) -> bool:
    """Whether JAX will compute on the CPU, decided without importing it."""
    named = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
    if named:
        return named.split(",")[0].strip().lower() == "cpu"
    # No platform named: JAX takes an accelerator when its plugin is installed.
    if importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("jax_plugins") is not None:
        return False
    from importlib.metadata import entry_points

    return not entry_points(group="jax_plugins")


def _glibc_has_tunable() -> bool:
    lib, version = platform.libc_ver()
    try:
        return lib == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def _thp_available() -> bool:
    """The kernel grants huge pages on request ('always' or 'madvise', not 'never')."""
    try:
        return "[never]" not in _THP_MODE.read_text()
    except OSError:
        return False


def huge_page_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to restart with, or None where the tunable is set already (by us
    or by the user, either way) or cannot help here."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE + "=" in tunables:
        return None
    if not (sys.platform.startswith("linux") and _glibc_has_tunable() and _thp_available()
            and _cpu_platform(environ)):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def reexec_with_huge_pages() -> None:
    """Restart this command line with the tunable set where it helps; returns otherwise.
    Call it before anything else in an entry point's `__main__` block: the process is
    replaced (same pid, stdin/stdout/stderr kept)."""
    env = huge_page_env(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
