"""repo_jax.host_memory: when the entry points restart with 2 MiB pages, and that XLA's
per-call buffers then stop faulting in 4 KiB at a time."""
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
APPLIES = host_memory.huge_page_env({"JAX_PLATFORMS": "cpu"}) is not None
needs_thp = pytest.mark.skipif(not APPLIES, reason="no glibc>=2.35 with transparent huge pages on this host")


@needs_thp
def test_env_adds_the_tunable_and_keeps_the_users():
    env = host_memory.huge_page_env({"JAX_PLATFORMS": "cpu", "PATH": "/bin"})
    assert env == {"JAX_PLATFORMS": "cpu", "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = host_memory.huge_page_env({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ", [
    {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},  # restarted already
    {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's opt-out
    {"JAX_PLATFORMS": "tpu"},
    {"JAX_PLATFORMS": "cuda,cpu"},
    {"JAX_PLATFORM_NAME": "tpu"},
])
def test_no_restart(environ):
    assert host_memory.huge_page_env(environ) is None


def test_accelerator_plugin_means_no_restart(monkeypatch):
    real = host_memory.importlib.util.find_spec
    monkeypatch.setattr(host_memory.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else real(name, *a))
    assert host_memory.huge_page_env({}) is None


@needs_thp
def test_reexec_keeps_the_command_line(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from repo_jax.host_memory import reexec_with_huge_pages
        print("before", flush=True)
        reexec_with_huge_pages()
        print(json.dumps({{"argv": sys.argv, "tunables": os.environ.get("GLIBC_TUNABLES")}}))
        sys.exit(3)
    """))
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-u", str(script), "a b", "--flag"], capture_output=True, text=True,
                         env={**env, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 3, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["before", "before"]  # ran twice: once as started, once restarted
    assert json.loads(lines[2]) == {"argv": [str(script), "a b", "--flag"], "tunables": "glibc.malloc.hugetlb=1"}


_FAULTS = """
import json, resource, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.exp(x) @ jnp.exp(x.T)))
x = jnp.ones((4096, 4096), jnp.float32) * 1e-3
f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 3))
"""


@needs_thp
def test_huge_pages_cut_xla_temp_buffer_faults():
    """XLA's 64 MiB temporaries, allocated and freed on every call: with 4 KiB pages each
    call faults all of them in again (~16k faults per 64 MiB); with the tunable, ~1/512."""
    faults = {}
    for value in ("0", "1"):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": f"glibc.malloc.hugetlb={value}"}
        out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env, check=True)
        faults[value] = json.loads(out.stdout.splitlines()[-1])
    assert faults["0"] > 16_000, faults
    assert faults["1"] < faults["0"] / 10, faults
