"""Host allocator settings for XLA:CPU's per-step buffers (Linux, CPU only).

XLA:CPU allocates each executable's temporary buffer (1.7 GB for the benchmark's
transformer step) with malloc on a worker thread and frees it when the step ends.
glibc serves a worker thread from a per-thread arena whose heaps cannot exceed 64 MiB,
so such a block always comes from a fresh mmap and goes back with munmap: every step
the kernel maps it again one 4 KiB page fault at a time (440,000 faults and 0.7-0.8 s
of system time in a 2.6 s step, getrusage in benchmarks/bench_host_memory.py).

Two remedies, both chosen when the process starts:
  * on a VM guest that reports free pages (below), or on request (REPO_JAX_JEMALLOC=1;
    =0 refuses), and where the system has it (Debian/Ubuntu `libjemalloc2`), jemalloc
    preloaded with `JEMALLOC_CONF`: blocks of `LARGE_BLOCK` and more come from an arena
    of their own that `keep_large_blocks` tells never to hand freed pages back to the
    kernel, so the next step gets the same, already mapped and zeroed, buffer: no faults,
    no zeroing. Smaller blocks keep jemalloc's default purging. Elsewhere not the
    default: system time 0.25 -> 0.05 s per step, but 0.95-1.03x the step time and
    1.4 GB more resident memory (README, benchmark notes).
  * by default, glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35): malloc asks for
    transparent huge pages on those blocks, 512 times fewer faults; the kernel still
    zeroes the fresh mapping every step. Set too where jemalloc is preloaded: harmless,
    and glibc's malloc still serves whatever runs before the preload takes effect.

On a VM guest whose balloon device reports free pages to the host (virtio-balloon's
REPORTING feature; Linux reports free blocks of `page_reporting_order`, 2 MiB here, two
seconds after they are freed, and the host drops them), huge pages cost something else:
one step in two or three took 1.5-13 s of system time instead of 0.15-0.4 s for the same
work: the fresh buffer landing on blocks the host must back again (Firecracker guest, 2
cores; a 3 s pause before each step, past the 2 s delay, made every step pay 2.5-2.9 s
of system time against 0.11-0.26 s back to back, default case). With 4 KiB pages the same
steps were steady at 0.7-1.1 s of system time, and with jemalloc keeping the block at
0.0-0.2 s; PyTorch's step under the huge-page tunable took 1.3x its time on glibc's
defaults (benchmarks/bench_train.py). Only jemalloc's way avoids both costs, hence the
default there (`free_pages_reported`: a virtio balloon that negotiated the feature).

Keeping the block in glibc's heap instead (mallopt: one arena, no mmap, no trim) removes
the faults too, but the heap then fragments and grows by a whole buffer every few dozen
steps (2.7 -> 6.1 GB in 26 steps), so it is not used. jemalloc keeping every freed page
grew the same way (2.8 -> 11 GB in 50 steps); the large-block arena alone does not: its
blocks recur at the same sizes every step, so it holds at most the largest set alive at
once (the step's buffer, and one more where the next step starts before the last one's
buffer is freed: +1.4 GB, once, then flat over 40 steps for the benchmark's transformer).

Both are read once, when the process starts, hence `reexec_with_host_allocator`: an
entry point calls it first thing, and it restarts the same command line with the
environment added. It is CPU-only: on TPU and GPU the step's buffers are device memory
under XLA's own allocator. Opt out of huge pages with GLIBC_TUNABLES=glibc.malloc.hugetlb=0;
wherever jemalloc would be chosen, an LD_PRELOAD or MALLOC_CONF of the user's own is kept as it is.
"""
from __future__ import annotations

import ctypes.util
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_IN = "REPO_JAX_JEMALLOC"
# Blocks this large (XLA:CPU's per-executable temporaries; 1.4 GB for the benchmark's
# transformer step) get jemalloc's dedicated "oversize" arena; the rest of the process's
# allocations never reach it. Huge pages for jemalloc's mappings, as glibc's tunable does.
LARGE_BLOCK = 256 << 20
JEMALLOC_CONF = f"thp:always,oversize_threshold:{LARGE_BLOCK}"
_OTHER_MALLOCS = ("jemalloc", "tcmalloc", "mimalloc")
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_VIRTIO_DEVICES = Path("/sys/bus/virtio/devices")
# virtio spec 5.5: device ID 5 is the memory balloon, feature bit 5 its free page reporting.
_BALLOON_DEVICE, _REPORTING_BIT = 0x0005, 5


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


def free_pages_reported(devices: Path = _VIRTIO_DEVICES) -> bool:
    """Whether this Linux guest's balloon device reports free pages to its host (each
    device's sysfs `features` is a string of bits, bit 0 first, as negotiated)."""
    try:
        for device in devices.iterdir():
            if int((device / "device").read_text(), 16) == _BALLOON_DEVICE:
                features = (device / "features").read_text().strip()
                if len(features) > _REPORTING_BIT and features[_REPORTING_BIT] == "1":
                    return True
    except (OSError, ValueError):  # no virtio bus (bare metal, another OS), or unreadable
        return False
    return False


def jemalloc_library() -> str | None:
    """jemalloc 5's shared library as the dynamic loader will find it, or None (an older
    soname has neither `oversize_threshold` nor the decay settings used here)."""
    name = ctypes.util.find_library("jemalloc")
    return name if name is not None and name.endswith(".so.2") else None


def _huge_pages_apply(environ: Mapping[str, str]) -> bool:
    return (TUNABLE + "=" not in environ.get("GLIBC_TUNABLES", "")
            and _glibc_has_tunable() and _thp_available())


def _jemalloc_wanted(environ: Mapping[str, str]) -> bool:
    """REPO_JAX_JEMALLOC=1 or 0 decides; unset, jemalloc where freed pages are reported."""
    choice = environ.get(OPT_IN, "")
    return choice == "1" or (choice == "" and free_pages_reported())


def _jemalloc_applies(environ: Mapping[str, str]) -> bool:
    preload = environ.get("LD_PRELOAD", "")
    return (_jemalloc_wanted(environ) and "MALLOC_CONF" not in environ
            and not any(name in preload for name in _OTHER_MALLOCS))


def host_allocator_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to restart with, or None where there is nothing to add: each
    setting is present already (by us or by the user, either way) or cannot help here."""
    if not (sys.platform.startswith("linux") and _cpu_platform(environ)):
        return None
    env = dict(environ)
    if _huge_pages_apply(environ):
        tunables = environ.get("GLIBC_TUNABLES", "")
        env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    library = jemalloc_library() if _jemalloc_applies(environ) else None
    if library is not None:
        preload = environ.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
        env["MALLOC_CONF"] = JEMALLOC_CONF
    return env if env != dict(environ) else None


def _mallctl_ssize(mallctl, name: str, value: int | None = None) -> int:
    """Read (and with `value`, then write) one ssize_t jemalloc setting."""
    old, size = ctypes.c_ssize_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
    new = None if value is None else ctypes.byref(ctypes.c_ssize_t(value))
    err = mallctl(name.encode(), ctypes.byref(old), ctypes.byref(size), new, 0 if value is None else size.value)
    if err:
        raise OSError(err, f"jemalloc mallctl({name!r}) failed")
    return old.value


def keep_large_blocks() -> bool:
    """In a process under host_memory's jemalloc settings, create the large-block arena
    with purging off, so that it keeps freed pages for the next block; returns whether it
    did. The arena is created on the first large allocation with the defaults of the
    moment, except that jemalloc forces a positive decay time to 0 (purge at once), so:
    defaults to "never purge", one large malloc/free, defaults back. Call it before the
    process allocates a large block (the entry points do, right after the restart)."""
    if os.environ.get("MALLOC_CONF") != JEMALLOC_CONF:
        return False
    libc = ctypes.CDLL(None)
    mallctl = getattr(libc, "mallctl", None)  # exported only when jemalloc is loaded
    if mallctl is None:
        return False
    mallctl.restype = ctypes.c_int
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                        ctypes.c_void_p, ctypes.c_size_t]
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    defaults = {name: _mallctl_ssize(mallctl, name, -1) for name in ("arenas.dirty_decay_ms", "arenas.muzzy_decay_ms")}
    try:
        libc.free(libc.malloc(LARGE_BLOCK))  # never touched: address space, no memory
    finally:
        for name, value in defaults.items():
            _mallctl_ssize(mallctl, name, value)
    return True


def reexec_with_host_allocator() -> None:
    """Restart this command line with the environment above where it helps, or, once
    restarted, set up jemalloc's large-block arena (`keep_large_blocks`). Call it before
    anything else in an entry point's `__main__` block: a restart replaces the process
    (same pid, stdin/stdout/stderr kept)."""
    if os.environ.get(OPT_IN, "") not in ("", "0", "1"):
        sys.exit(f"error: {OPT_IN}={os.environ[OPT_IN]!r}: set it to 1 (jemalloc for XLA's buffers) "
                 "or 0 (glibc), or leave it unset (jemalloc on VMs that report free pages to the host)")
    env = host_allocator_env(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    if not keep_large_blocks() and os.environ.get(OPT_IN) == "1" and _jemalloc_applies(os.environ) \
            and _cpu_platform(os.environ):
        # Asked for and not loaded (checked in the final process only, so said once). Where
        # only this guest chose it, glibc stays as it was before that choice existed, quietly
        # (the README says to install it): no new line on every CPU run's stderr.
        print(f"warning: {OPT_IN}=1 but no jemalloc 5 (libjemalloc.so.2) found; running on glibc's "
              "malloc (Debian/Ubuntu: apt-get install libjemalloc2)", file=sys.stderr, flush=True)
