"""get_dataset and GlobalBatchIterator: shapes, shards, errors, global arrays and exact resume."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import seqio
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmops_jax.data import pipeline

LENGTHS = {"targets": 16}


def _dataset(**kw):
    kw.setdefault("global_batch_size", 8)
    return pipeline.get_dataset("synthetic_lm", LENGTHS, seqio.DecoderFeatureConverter(pack=True), **kw)


def test_per_process_batches_and_disjoint_shards():
    shard0 = next(_dataset(shard_index=0, num_shards=2).as_numpy_iterator())
    shard1 = next(_dataset(shard_index=1, num_shards=2).as_numpy_iterator())
    assert len(shard0) == 5
    assert all(v.shape == (4, 16) and v.dtype == np.int32 for v in shard0.values())
    rows0 = {tuple(r) for r in shard0["decoder_target_tokens"]}
    assert rows0.isdisjoint(tuple(r) for r in shard1["decoder_target_tokens"])


def test_unknown_task_names_it_and_lists_builtins():
    with pytest.raises(ValueError, match=r"'no_such_task'.*synthetic_lm.*text_lm.*synthetic_seq2seq"):
        pipeline.get_dataset("no_such_task", LENGTHS, seqio.DecoderFeatureConverter(), global_batch_size=8)


def test_batch_not_divisible_by_processes_names_both_numbers():
    with pytest.raises(ValueError, match=r"global_batch_size 8 .* 3"):
        _dataset(shard_index=0, num_shards=3)
    with pytest.raises(TypeError, match="FeatureConverter instance"):
        pipeline.get_dataset("synthetic_lm", LENGTHS, seqio.DecoderFeatureConverter, global_batch_size=8)


def test_global_batches_are_sharded_and_resume_exactly():
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    ds = _dataset(seed=3)
    it = pipeline.GlobalBatchIterator(ds, sharding)
    first = [next(it) for _ in range(3)]
    batch = first[0]["decoder_target_tokens"]
    assert batch.shape == (8, 16) and batch.dtype == np.int32 and batch.sharding == sharding
    assert {s.data.shape for s in batch.addressable_shards} == {(1, 16)}
    state = it.get_state()
    assert state == {"batches_consumed": 3}
    expected = next(it)

    resumed = pipeline.GlobalBatchIterator(_dataset(seed=3), sharding)
    resumed.set_state(state)
    got = next(resumed)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]))
    assert resumed.get_state() == {"batches_consumed": 4}

    it.set_state({"batches_consumed": np.asarray(0)})  # a checkpoint may restore a numpy scalar
    np.testing.assert_array_equal(np.asarray(next(it)["decoder_target_tokens"]), np.asarray(batch))
    with pytest.raises(ValueError, match="batches_consumed"):
        it.set_state({"batches_consumed": -1})


def test_feature_mapping_sharding_must_cover_every_feature():
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    it = pipeline.GlobalBatchIterator(_dataset(), {"decoder_target_tokens": NamedSharding(mesh, P("data"))})
    with pytest.raises(ValueError, match="no sharding given for feature"):
        next(it)


def test_live_iterators_do_not_block_interpreter_exit():
    """Python code inside tf.data (from_generator) hung exit while a prefetching iterator was alive."""
    code = """import seqio
from lmops_jax.data import pipeline
lm = pipeline.get_dataset("synthetic_lm", {"targets": 16}, seqio.DecoderFeatureConverter(),
                          global_batch_size=4)
s2s = pipeline.get_dataset("synthetic_seq2seq", {"inputs": 16, "targets": 16},
                           seqio.EncDecFeatureConverter(), global_batch_size=4)
iterators = [lm.as_numpy_iterator(), s2s.as_numpy_iterator()]
print([len(next(it)) for it in iterators])
"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                            env=dict(os.environ, PYTHONPATH=root))
    assert result.returncode == 0 and "[5, 8]" in result.stdout, result.stderr[-2000:]
