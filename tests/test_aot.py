"""Compile-only mode for TPU slices (repo_jax/train/aot.py): topology names, the HLO
collective count, the out-of-memory summary, and, where libtpu is installed
(requirements-tpu.txt), a real XLA:TPU compile of a tiny model."""
from __future__ import annotations

import importlib.util
import json

import pytest

import train as train_cli
from repo_jax.config import ConfigError
from repo_jax.train import aot

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.parametrize("name, grid, chips", [
    ("v5p-64", "v5p:2x4x4", 32),      # accelerator types count TensorCores: 2 per v5p chip
    ("v5p-128", "v5p:4x4x4", 64),
    ("v4-8", "v4:2x2x1", 4),
    ("v5e-16", "v5e:4x4", 16),
    ("v5litepod-16", "v5e:4x4", 16),
    ("v6e-64", "v6e:8x8", 64),
    ("v5p:4x4x8", "v5p:4x4x8", 128),
])
def test_topology_names(name, grid, chips):
    chip, topo, n = aot.parse_topology(name)
    assert (topo, n) == (grid, chips)
    assert chip.hbm_bytes > 0 and chip.peak_flops > 0


@pytest.mark.parametrize("name", ["v5p-63", "v7x-8", "v5p:4x4", "tpu"])
def test_bad_topology_names_say_what_works(name):
    with pytest.raises(ConfigError, match="--topology"):
        aot.parse_topology(name)


def test_collectives_are_counted_by_opcode_not_by_name():
    hlo = """
  %all-gather.1 = bf16[64,128]{1,0} all-gather(bf16[8,128]{1,0} %p), dimensions={0}
  %ars = (f32[4]{0}, f32[4]{0}) all-reduce-start(f32[4]{0} %a), to_apply=%add
  %ard = f32[4]{0} all-reduce-done((f32[4]{0}, f32[4]{0}) %ars)
  %reduce-scatter.2 = f32[8]{0} reduce-scatter(f32[64]{0} %g), dimensions={0}
  %fusion.all-gather = f32[4]{0} fusion(f32[4]{0} %x), kind=kLoop
"""
    assert aot.count_collectives(hlo) == {"all-gather": 1, "all-reduce": 1, "reduce-scatter": 1}


def test_compile_only_without_libtpu_or_topology_is_a_clear_error(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        train_cli.main(["--compile-only"])
    assert "--topology" in capsys.readouterr().err
    assert train_cli.main(["--compile-only", "--topology", "v9-8"]) == 2
    assert "error: --topology 'v9-8'" in capsys.readouterr().err
    if not HAS_LIBTPU:
        assert train_cli.main(["--compile-only", "--topology", "v5p-8"]) == 2
        assert "requirements-tpu.txt" in capsys.readouterr().err


# Dimensions that stay multiples of 128 after a split by 2: TPU pads smaller arrays to
# its (8, 128) tiles, which would blur the 1/4 below.
TINY = {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
        "original_max_position_embeddings": 64, "repo_start_layer": 1}


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -r requirements-tpu.txt)")
def test_tiny_model_compiles_for_a_tpu_slice(tmp_path, capsys):
    """The real XLA:TPU compiler on a 4-chip v5p slice, fsdp x tensor, scanned layers:
    parameters split 4 ways, collectives present, the report written as JSON."""
    out = tmp_path / "report.json"
    args = ["--config", str(tmp_path / "base.yaml"), "--compile-only", "--topology", "v5p-8",
            "--out", str(out), f"model={json.dumps(TINY)}", "mesh.data=1", "mesh.fsdp=2",
            "mesh.tensor=2", "batch_size=4", "data.seq_len=32", "scan_layers=true",
            "model.remat=full", "model.dtype=bfloat16", f"run_dir={tmp_path}"]
    (tmp_path / "base.yaml").write_text("{}\n")
    assert train_cli.main(args) == 0, capsys.readouterr()
    report = json.loads(out.read_text())
    assert "fits" in capsys.readouterr().out
    assert report["chips"] == 4 and report["device_kind"].startswith("TPU v5")
    memory = report["train"]["memory"]
    assert memory["fits"] and 0 < memory["total"] < memory["hbm"]
    assert report["train"]["collectives"].get("all-gather", 0) > 0
    # Parameters + Adam moments (float32, 3 copies) split over fsdp x tensor = 4.
    whole = 3 * 4 * report["params"]
    assert whole / 4 <= memory["arguments"] < whole / 3
    est = report["estimate"]
    assert 0 < est["mfu"] < 1 and est["hardware_flops_per_chip"] >= est["xla_flops_counted_with_loops"]


def test_out_of_memory_message_keeps_xla_totals():
    # libtpu 0.0.42's message for the 1B preset with model.remat=none on v5p:4x4x4.
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (313.91G) exceeds available HBM (95.74G).\n\nStack trace:\n  frame 0\n  frame 1")
    summary = aot.oom_summary(msg)
    assert "313.91G" in summary and "95.74G" in summary and "frame" not in summary
