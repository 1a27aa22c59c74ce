"""repo_jax.host_memory: when the entry points restart with 2 MiB pages and jemalloc,
and that XLA's per-call buffers then stop faulting in 4 KiB at a time (huge pages) or
at all (jemalloc)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repo_jax import host_memory

ROOT = Path(__file__).resolve().parents[1]
JEMALLOC = host_memory.jemalloc_library()
_OWN = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", host_memory.OPT_IN)
HUGE = host_memory._huge_pages_apply({}) and sys.platform.startswith("linux")
needs_thp = pytest.mark.skipif(not HUGE, reason="no glibc>=2.35 with transparent huge pages on this host")
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None or not sys.platform.startswith("linux"),
                                    reason="no jemalloc on this host (apt-get install libjemalloc2)")


@pytest.fixture
def no_jemalloc(monkeypatch):
    monkeypatch.setattr(host_memory, "jemalloc_library", lambda: None)


@pytest.fixture
def fake_jemalloc(monkeypatch):
    monkeypatch.setattr(host_memory, "jemalloc_library", lambda: "libjemalloc.so.2")


@pytest.fixture(params=[False, True], ids=["no reporting", "pages reported"])
def reporting(request, monkeypatch):
    """Both kinds of host: one whose balloon reports free pages, and one without."""
    monkeypatch.setattr(host_memory, "free_pages_reported", lambda: request.param)
    return request.param


@pytest.fixture
def not_reporting(monkeypatch):
    monkeypatch.setattr(host_memory, "free_pages_reported", lambda: False)


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the allocator variables, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in _OWN}, **extra}


@needs_thp
def test_env_adds_the_tunable_and_keeps_the_users(no_jemalloc):
    env = host_memory.host_allocator_env({"JAX_PLATFORMS": "cpu", "PATH": "/bin"})
    assert env == {"JAX_PLATFORMS": "cpu", "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = host_memory.host_allocator_env({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def _virtio(root: Path, name: str, device: str, features: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "device").write_text(device + "\n")
    (root / name / "features").write_text(features + "\n")


BITS = "0110010100000000000000000000000010000000"  # a Firecracker balloon: bits 1, 2, 5, 7, 32


def test_free_pages_reported_reads_the_balloons_negotiated_features(tmp_path):
    assert not host_memory.free_pages_reported(tmp_path / "no virtio bus")
    _virtio(tmp_path, "virtio1", "0x0002", BITS)  # a block device: the same bit means something else
    assert not host_memory.free_pages_reported(tmp_path)
    _virtio(tmp_path, "virtio0", "0x0005", BITS[:5] + "0" + BITS[6:])  # balloon without reporting
    assert not host_memory.free_pages_reported(tmp_path)
    _virtio(tmp_path, "virtio4", "0x0005", BITS)
    assert host_memory.free_pages_reported(tmp_path)
    (tmp_path / "virtio4" / "device").write_text("garbage")
    assert not host_memory.free_pages_reported(tmp_path)


def test_jemalloc_by_default_where_free_pages_are_reported(fake_jemalloc, reporting):
    environ = {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}  # only jemalloc to add
    env = host_memory.host_allocator_env(environ)
    assert (env is not None and env["LD_PRELOAD"] == "libjemalloc.so.2"
            and env["MALLOC_CONF"] == host_memory.JEMALLOC_CONF) == reporting, env
    assert host_memory.host_allocator_env({**environ, "REPO_JAX_JEMALLOC": "0"}) is None
    assert host_memory.host_allocator_env({**environ, "REPO_JAX_JEMALLOC": "1"})["LD_PRELOAD"] == "libjemalloc.so.2"


@pytest.mark.parametrize("value", ["yes", "true", " 1"])
def test_a_misspelt_choice_is_refused(monkeypatch, value):
    monkeypatch.setenv("REPO_JAX_JEMALLOC", value)
    monkeypatch.setattr(host_memory.os, "execve", lambda *a: pytest.fail("restarted"))
    with pytest.raises(SystemExit) as exc:
        host_memory.reexec_with_host_allocator()
    assert str(exc.value).startswith(f"error: REPO_JAX_JEMALLOC={value!r}: set it to 1") and "or 0" in str(exc.value)


def test_env_preloads_jemalloc_and_keeps_the_users_preload(fake_jemalloc):
    asked = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "REPO_JAX_JEMALLOC": "1"}  # only jemalloc to add
    env = host_memory.host_allocator_env({"JAX_PLATFORMS": "cpu", **asked})
    assert env == {"JAX_PLATFORMS": "cpu", **asked, "LD_PRELOAD": "libjemalloc.so.2",
                   "MALLOC_CONF": host_memory.JEMALLOC_CONF}
    env = host_memory.host_allocator_env({"JAX_PLATFORMS": "cpu", **asked, "LD_PRELOAD": "/opt/libtrace.so"})
    assert env["LD_PRELOAD"] == "libjemalloc.so.2:/opt/libtrace.so"


@pytest.mark.parametrize("users", [
    {},  # not asked for, on a host that keeps free pages: the default
    {"REPO_JAX_JEMALLOC": "0"},
    {"REPO_JAX_JEMALLOC": "1", "MALLOC_CONF": "narenas:1"},  # the user's own jemalloc settings
    {"REPO_JAX_JEMALLOC": "1", "LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"},  # another allocator
    {"REPO_JAX_JEMALLOC": "1", "LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},  # jemalloc by its own path
])
def test_jemalloc_left_to_the_user(fake_jemalloc, not_reporting, users):
    environ = {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", **users}
    assert host_memory.host_allocator_env(environ) is None


@pytest.mark.parametrize("environ", [
    # restarted already
    {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "REPO_JAX_JEMALLOC": "1",
     "LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": host_memory.JEMALLOC_CONF},
    {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's opt-out
    {"JAX_PLATFORMS": "tpu", "REPO_JAX_JEMALLOC": "1"},
    {"JAX_PLATFORMS": "cuda,cpu", "REPO_JAX_JEMALLOC": "1"},
    {"JAX_PLATFORM_NAME": "tpu", "REPO_JAX_JEMALLOC": "1"},
])
def test_no_restart(fake_jemalloc, not_reporting, environ):
    assert host_memory.host_allocator_env(environ) is None


def test_accelerator_plugin_means_no_restart(fake_jemalloc, monkeypatch):
    real = host_memory.importlib.util.find_spec
    monkeypatch.setattr(host_memory.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else real(name, *a))
    assert host_memory.host_allocator_env({"REPO_JAX_JEMALLOC": "1"}) is None


@pytest.mark.parametrize("asked", [False, True])
def test_jemalloc_asked_for_but_missing_is_said(monkeypatch, capsys, no_jemalloc, reporting, asked):
    """Only an explicit REPO_JAX_JEMALLOC=1 warns; chosen for the host, glibc is the quiet fallback."""
    for key in _OWN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # nothing left to restart for
    if asked:
        monkeypatch.setenv("REPO_JAX_JEMALLOC", "1")

    def no_restart(*args):
        raise AssertionError("restarted")

    monkeypatch.setattr(host_memory.os, "execve", no_restart)
    host_memory.reexec_with_host_allocator()
    err = capsys.readouterr().err
    assert ("REPO_JAX_JEMALLOC=1 but no jemalloc 5" in err and "apt-get install libjemalloc2" in err) == asked, err


@pytest.mark.parametrize("choice", ["0", "1", ""])
def test_reexec_keeps_the_command_line_and_loads_jemalloc_where_chosen(tmp_path, choice):
    """On this host as it is: "" (unset) chooses jemalloc where its balloon reports free pages."""
    asked = choice == "1" or (choice == "" and host_memory.free_pages_reported())
    if not (HUGE or (asked and JEMALLOC)):
        pytest.skip("nothing for host_memory to set on this host")
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from repo_jax.host_memory import reexec_with_host_allocator
        print("before", flush=True)
        reexec_with_host_allocator()
        maps = open("/proc/self/maps").read()
        print(json.dumps({{"argv": sys.argv, "tunables": os.environ.get("GLIBC_TUNABLES"),
                          "preload": os.environ.get("LD_PRELOAD"), "jemalloc_mapped": "libjemalloc" in maps}}))
        sys.exit(3)
    """))
    out = subprocess.run([sys.executable, "-u", str(script), "a b", "--flag"], capture_output=True, text=True,
                         env=_clean_env(JAX_PLATFORMS="cpu", **({"REPO_JAX_JEMALLOC": choice} if choice else {})))
    assert out.returncode == 3, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["before", "before"]  # ran twice: once as started, once restarted
    assert json.loads(lines[2]) == {"argv": [str(script), "a b", "--flag"],
                                    "tunables": "glibc.malloc.hugetlb=1" if HUGE else None,
                                    "preload": JEMALLOC if asked else None,
                                    "jemalloc_mapped": asked and JEMALLOC is not None}


_FAULTS = """
import json, resource, sys
sys.path.insert(0, {root!r})
from repo_jax.host_memory import keep_large_blocks
keep_large_blocks()  # as the entry points do after the restart (a no-op under glibc)
import jax, jax.numpy as jnp
# exp(x) read by a dot and by a transposed slice: one temporary the size of x
f = jax.jit(lambda x, w: jnp.sum(jnp.exp(x) @ w) + jnp.sum(jnp.exp(x).T[:8]))
x, w = jnp.full({shape}, 1e-3, jnp.float32), jnp.ones(({shape}[1], 8), jnp.float32)
f(x, w).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(20):
    f(x, w).block_until_ready()
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"faults": (r1.ru_minflt - r0.ru_minflt) / 20, "rss_warm_kb": r0.ru_maxrss, "rss_kb": r1.ru_maxrss}}))
"""
SMALL = (4096, 4096)  # 64 MiB temporaries
LARGE = (80_000, 1024)  # 312 MiB: host_memory.LARGE_BLOCK and more


def _per_call(shape: tuple[int, int], **env: str) -> dict:
    code = _FAULTS.format(root=str(ROOT), shape=shape)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_clean_env(JAX_PLATFORMS="cpu", **env), check=True)
    return json.loads(out.stdout.splitlines()[-1])


@needs_thp
def test_huge_pages_cut_xla_temp_buffer_faults():
    """XLA's temporaries, allocated and freed on every call: with 4 KiB pages each call
    faults all of them in again (~16k faults per 64 MiB); with the tunable, ~1/512."""
    faults = {value: _per_call(SMALL, GLIBC_TUNABLES=f"glibc.malloc.hugetlb={value}")["faults"] for value in "01"}
    assert faults["0"] > 16_000, faults
    assert faults["1"] < faults["0"] / 10, faults


@needs_jemalloc
def test_jemalloc_keeps_large_xla_temporaries_mapped():
    """Under host_memory's jemalloc settings a freed large temporary is handed back on the
    next call as it is: (almost) no faults, where glibc maps and faults it afresh, and
    where jemalloc's own large-block arena, without `keep_large_blocks`, purges it too;
    and holding on to it does not grow the process over the calls."""
    jemalloc = {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": host_memory.JEMALLOC_CONF}
    glibc = _per_call(LARGE, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    kept = _per_call(LARGE, **jemalloc)
    purged = _per_call(LARGE, **{**jemalloc, "MALLOC_CONF": host_memory.JEMALLOC_CONF + ",narenas:8"})
    block_pages = LARGE[0] * LARGE[1] * 4 // 4096
    assert glibc["faults"] > block_pages * 0.9, glibc
    assert purged["faults"] > block_pages / 512 * 0.9, purged  # 2 MiB pages, faulted afresh
    assert kept["faults"] < 50, kept
    # At most one more block (a call's buffer allocated before the last one's is freed).
    assert kept["rss_kb"] - kept["rss_warm_kb"] < (block_pages * 4 + 64 * 1024), kept
