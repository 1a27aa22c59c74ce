"""Token sources and the deterministic, resumable, host-count independent iterator."""
from __future__ import annotations

import json

import numpy as np
import pytest

from repo_jax import sharding as shd
from repo_jax.config import DataConfig, MeshConfig
from repo_jax.data import BatchLoader, DataError, SampleOrder, open_sources
from repo_jax.data.sources import embedded_documents
from repo_jax.olmo_data import load_tokenizer


def _npy(path, n, dtype, start=0):
    arr = (np.arange(n) + start).astype(dtype)
    arr.tofile(path)
    return arr


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_npy_instances_are_built_per_file_like_olmo(tmp_path, dtype):
    a = _npy(tmp_path / "part-00.npy", 100, dtype)          # 3 instances, 4 tokens dropped
    b = _npy(tmp_path / "part-01.npy", 70, dtype, 1000)     # 2 instances, 6 dropped
    cfg = DataConfig(source="npy", paths=(str(tmp_path / "part-*.npy"),), token_dtype=dtype,
                     seq_len=32, eval_fraction=0.0)
    train, held = open_sources(cfg)
    assert held is None and train.num_instances == 5
    want = np.stack([a[0:32], a[32:64], a[64:96], b[0:32], b[32:64]]).astype(np.int32)
    np.testing.assert_array_equal(train.read(np.arange(5)), want)
    np.testing.assert_array_equal(train.read(np.array([4, 0])), want[[4, 0]])
    # The held-out fraction is the tail of the instance stream.
    train, held = open_sources(DataConfig(**{**cfg.__dict__, "eval_fraction": 0.4}))
    assert (train.num_instances, held.num_instances) == (3, 2)
    np.testing.assert_array_equal(held.read(np.arange(2)), want[3:])


def test_npy_bad_sizes_and_paths_are_clear(tmp_path):
    (tmp_path / "odd.npy").write_bytes(b"1234567")
    with pytest.raises(DataError, match="not a multiple of 4"):
        open_sources(DataConfig(source="npy", paths=(str(tmp_path / "odd.npy"),)))
    with pytest.raises(DataError, match="does not exist"):
        open_sources(DataConfig(source="npy", paths=(str(tmp_path / "missing.npy"),)))


def test_sample_order_is_a_seeded_permutation_per_epoch():
    order = SampleOrder(10, seed=3)
    got = order(np.arange(30))
    for e in range(3):
        assert sorted(got[10 * e:10 * e + 10]) == list(range(10))
    assert not np.array_equal(got[:10], got[10:20])
    # Pure function of (n, seed, sample): any slicing and a fresh object agree.
    np.testing.assert_array_equal(SampleOrder(10, seed=3)(np.arange(17, 23)), got[17:23])
    assert not np.array_equal(SampleOrder(10, seed=4)(np.arange(10)), got[:10])


def test_each_host_reads_its_rows_of_the_same_global_batch(tmp_path):
    _npy(tmp_path / "t.npy", 32 * 50, "uint32")
    train, _ = open_sources(DataConfig(source="npy", paths=(str(tmp_path / "t.npy"),), seq_len=32,
                                       eval_fraction=0.0))
    mesh = shd.make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
    loader = BatchLoader(train, SampleOrder(train.num_instances, 0), 2, 8, shd.batch_sharding(mesh), 10 ** 6)
    full = loader.local(16)
    assert full.shape == (2, 8, 32)
    # The rows are the samples 16..31 of the global order, accumulation-major.
    want = train.read(SampleOrder(train.num_instances, 0)(np.arange(16, 32))).reshape(2, 8, 32)
    np.testing.assert_array_equal(full, want)
    # As if 4 hosts each held 2 rows: the same data, split.
    parts = []
    for lo in range(0, 8, 2):
        loader.lo, loader.hi = lo, lo + 2
        parts.append(loader.local(16))
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
    loader.lo, loader.hi = 0, 8
    batch = loader.to_global(full)
    assert batch.sharding.spec == shd.batch_sharding(mesh).spec
    np.testing.assert_array_equal(np.asarray(batch), full)


def test_text_and_jsonl_are_tokenized_and_packed_with_eos(tmp_path):
    docs = ["The cell is the basic unit of life.", "Water boils at 100 degrees Celsius.",
            "Photosynthesis turns light into chemical energy."]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:2]))
    (tmp_path / "b.txt").write_text(docs[2])
    cfg = DataConfig(source="text", paths=(str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")),
                     text_field="body", seq_len=8, eval_fraction=0.0, eos_token_id=100257)
    train, held = open_sources(cfg)
    tok = load_tokenizer()
    stream = []
    for d in docs:
        stream += tok.encode(d, add_special_tokens=False).ids + [100257]
    n = len(stream) // 8
    assert held is None and train.num_instances == n
    np.testing.assert_array_equal(train.read(np.arange(n)).ravel(), stream[:n * 8])
    with pytest.raises(DataError, match="no 'text' key"):
        open_sources(DataConfig(source="text", paths=(str(tmp_path / "a.jsonl"),)))


def test_tfds_data_source_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = DataConfig(source="tfds", tfds_name="imdb_reviews", tfds_split="train",
                     tfds_eval_split="test", text_field="text", seq_len=16)
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        train, held = open_sources(cfg)
        docs = [r["text"] for r in tfds.data_source("imdb_reviews", split="train")]
    docs = [d.decode() if isinstance(d, bytes) else str(d) for d in docs]
    tok = load_tokenizer()
    stream = []
    for d in docs:
        stream += tok.encode(d, add_special_tokens=False).ids + [cfg.eos_token_id]
    assert train.num_instances == len(stream) // 16 > 0 and held.num_instances > 0
    np.testing.assert_array_equal(train.read(np.arange(train.num_instances)).ravel(),
                                  stream[:train.num_instances * 16])


def test_embedded_default_holds_out_whole_documents():
    docs = embedded_documents()
    assert len(docs) > 5000 and all(isinstance(d, str) and d for d in docs)
    from repo_jax.data.sources import _split_documents

    train, held = _split_documents(docs, 0.05)
    assert len(held) == round(len(docs) * 0.05)
    assert sorted(train + held) == sorted(docs)  # a split of whole documents, none cut
