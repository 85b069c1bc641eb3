"""serving.engine: dense slots decode exactly like `InferenceModule`, mixed sampling in one compiled step,
prompts continued chunk by chunk or from prefix-cache blocks, and a tensor-parallel mesh."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from lmops_jax.models import encoder_decoder, model
from lmops_jax.partitioning import Partitioner
from lmops_jax.peft import lora
from lmops_jax.serving.engine import Engine, SlotSampling
from tests.helpers import tiny_llama

LLAMA = tiny_llama(max_length=64)
T5 = model.EncoderDecoderModel(encoder_decoder.T5Config(
    vocab_size=128, d_model=32, num_encoder_layers=1, num_decoder_layers=2, num_heads=2, head_dim=16, mlp_dim=64))


@functools.lru_cache(maxsize=None)
def params_of(m: model.BaseModel):
    return nn.meta.unbox(m.init_params(jax.random.key(0), m.input_shapes(1, {"inputs": 8, "targets": 8})))


@functools.lru_cache(maxsize=None)
def llama_engine() -> Engine:
    return Engine(LLAMA, params_of(LLAMA), max_slots=4, max_length=64, max_prompt_length=40,
                  prefix_cache=True, prefix_cache_blocks=8, block_size=4)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 128, n).tolist() for n in lengths]


def prefill_for_slot(engine: Engine, row, slot: int):
    """engine.prefill(row); a paged engine's row gets its own blocks, in reverse order (any order works)."""
    if not engine.paged:
        return engine.prefill(row)
    per_row = engine.max_length // engine.block_size
    return engine.prefill(row, prefix=engine.paged_prefix(range((slot + 1) * per_row - 1, slot * per_row - 1, -1)))


def run_slots(engine: Engine, rows, steps: int, sampling: SlotSampling | None = None) -> np.ndarray:
    """Inserts one prompt per slot and runs `steps` generate steps: tokens [slots, steps]."""
    for slot, row in enumerate(rows):
        engine.insert(prefill_for_slot(engine, row, slot), slot)
    sampling = sampling or SlotSampling.greedy(engine.max_slots)
    out = np.stack([engine.generate(sampling).tokens for _ in range(steps)], axis=1)
    for slot in range(len(rows)):
        engine.free(slot)
    return out[:len(rows)]


def test_slots_decode_independently_and_a_freed_slot_is_refilled():
    """Each row decodes as it would alone (InferenceModule equality: tests/serving/test_scheduler.py)."""
    engine = llama_engine()
    rows = prompts([3, 17, 9, 30])
    alone = [run_slots(engine, [row], 6)[0] for row in rows]
    np.testing.assert_array_equal(run_slots(engine, rows, 6), alone)
    # Slot 2 is refilled while the others go on: its new request starts from scratch.
    sampling = SlotSampling.greedy(4)
    for slot, row in enumerate(rows):
        engine.insert(engine.prefill(row), slot)
    first = [engine.generate(sampling).tokens for _ in range(2)]
    engine.free(2)
    engine.insert(engine.prefill(rows[0]), 2)
    later = [engine.generate(sampling) for _ in range(4)]
    for slot in range(4):
        engine.free(slot)
    np.testing.assert_array_equal([step.tokens[2] for step in later], alone[0][:4])
    np.testing.assert_array_equal(np.stack(first + [step.tokens for step in later], 1)[[0, 1, 3]],
                                  np.asarray(alone)[[0, 1, 3]])
    assert not any(step.finished.any() for step in later)
    assert engine.trace_counts["generate"] == 1 and engine.trace_counts["insert"] == 1


def test_a_full_row_is_flagged_finished_at_its_last_token():
    engine = llama_engine()
    engine.insert(engine.prefill(prompts([40])[0]), 1)
    assert engine.capacity(40) == 24
    finished = [engine.generate(SlotSampling.greedy(4)).finished for _ in range(24)]
    engine.free(1)
    assert [f[1] for f in finished] == [False] * 23 + [True] and not any(f[[0, 2, 3]].any() for f in finished)


def test_mixed_sampling_in_one_step_never_recompiles():
    engine = llama_engine()
    rows = prompts([5, 5, 5, 5], seed=1)
    rows = [rows[0]] * 4
    greedy = run_slots(engine, rows, 8)[0]
    sampling = SlotSampling.greedy(4)
    sampling.set(0, temperature=0.0, top_k=0, top_p=1.0, seed=0)  # greedy
    sampling.set(1, temperature=2.0, top_k=1, top_p=1.0, seed=1)  # top-1 is greedy at any temperature
    sampling.set(2, temperature=5.0, top_k=3, top_p=1.0, seed=2)
    sampling.set(3, temperature=1.5, top_k=0, top_p=0.9, seed=3)
    traces = engine.trace_counts["generate"]
    first = run_slots(engine, rows, 8, sampling)
    again = run_slots(engine, rows, 8, sampling)
    assert engine.trace_counts["generate"] == traces  # new knobs, same compiled step
    np.testing.assert_array_equal(first[:2], [greedy, greedy])
    np.testing.assert_array_equal(first, again)  # each slot's key is its seed folded with its step
    assert not np.array_equal(first[2], greedy) and not np.array_equal(first[3], greedy)
    sampling.set(2, temperature=5.0, top_k=3, top_p=1.0, seed=4)
    assert not np.array_equal(run_slots(engine, rows, 8, sampling)[2], first[2])
    sampling.set(3, temperature=1.0, top_k=0, top_p=1.0, seed=2 ** 32 + 4)  # seeds wider than 32 bits count
    assert not np.array_equal(sampling.key_data[2], sampling.key_data[3])


def test_top_k_slots_sample_inside_their_top_k():
    engine = llama_engine()
    row = prompts([6], seed=2)[0]
    sampling = SlotSampling.greedy(4)
    for slot in range(4):
        sampling.set(slot, temperature=10.0, top_k=2, top_p=1.0, seed=slot)
    prefix = engine.prefill(row)
    top2 = np.argsort(-np.asarray(prefix.logits[0]))[:2]
    for slot in range(4):
        engine.insert(engine.prefill(row), slot)
    tokens = engine.generate(sampling).tokens
    for slot in range(4):
        engine.free(slot)
    assert set(tokens) <= set(top2)


def test_chunked_prefill_and_prefix_blocks_continue_a_row_exactly():
    engine = llama_engine()
    row = prompts([37], seed=3)[0]
    whole = engine.prefill(row)
    chunked = None
    for start in range(0, 37, 10):
        chunk = row[start:start + 10]
        chunked = engine.prefill(chunk, len(chunk), chunked)
    assert chunked.length == 37
    np.testing.assert_allclose(chunked.logits, whole.logits, atol=2e-5, rtol=1e-5)
    # Blocks 0..8 of the row go to pool blocks 7..-1; a fresh row loads the first 5 and prefills the rest.
    engine.save_blocks(whole, [(j, 7 - j) for j in range(8)])
    loaded = engine.load_prefix([7, 6, 5, 4, 3])
    assert loaded.length == 20 and loaded.logits is None
    resumed = engine.prefill(row[20:], 17, loaded)
    np.testing.assert_allclose(resumed.logits, whole.logits, atol=2e-5, rtol=1e-5)
    expected = run_slots(engine, [row], 5)[0]
    engine.insert(resumed, 0)
    got = [engine.generate(SlotSampling.greedy(4)).tokens[0] for _ in range(5)]
    engine.free(0)
    np.testing.assert_array_equal(got, expected)
    assert engine.trace_counts["load_prefix"] == 1 and engine.trace_counts["save_blocks"] == 1


def test_a_prompt_longer_than_the_largest_bucket_is_fed_in_chunks():
    engine = Engine(LLAMA, params_of(LLAMA), max_slots=2, max_length=64, prefill_buckets=(8, 16))
    row = prompts([38], seed=4)[0]
    long = engine.prefill(row)
    reference = llama_engine().prefill(row)
    np.testing.assert_allclose(long.logits, reference.logits, atol=2e-5, rtol=1e-5)
    assert dict(engine.trace_counts) == {"prefill_16": 1, "prefill_8": 1}  # 16 + 16 + 6


@pytest.mark.parametrize("kv_cache", ["dense", "paged"])
def test_tensor_parallel_slots_give_the_one_device_tokens(kv_cache):
    m = tiny_llama(num_heads=4, num_kv_heads=4, max_length=64)
    rows = prompts([3, 12, 7, 20], seed=6)
    args = dict(max_slots=4, max_length=48, kv_cache=kv_cache, block_size=4)
    one = Engine(m, params_of(m), **args)
    tp = Engine(m, params_of(m), Partitioner({"data": 2, "fsdp": 1, "model": 4}, "tp"), **args)
    specs = {jax.tree_util.keystr(path): tuple(x.sharding.spec)
             for path, x in jax.tree_util.tree_flatten_with_path(tp._state.cache)[0]}
    if kv_cache == "dense":
        assert specs["['layers_0']['self_attn']['cached_key']"][:2] == (("data", "fsdp"), "model")  # rows, KV heads
    else:
        assert specs["['layers_0']['self_attn']['key_pages']"][:1] == ("model",)  # KV heads; pages shared by rows
    np.testing.assert_array_equal(run_slots(tp, rows, 6), run_slots(one, rows, 6))


def test_paged_slots_give_the_dense_slots_tokens_and_logprobs():
    rows = prompts([3, 12, 7, 20], seed=7)
    dense = Engine(LLAMA, params_of(LLAMA), max_slots=4, max_length=64)
    paged = Engine(LLAMA, params_of(LLAMA), max_slots=4, max_length=64, kv_cache="paged", block_size=8)
    sampling = SlotSampling.greedy(4)
    sampling.set(1, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    np.testing.assert_array_equal(run_slots(paged, rows, 12, sampling), run_slots(dense, rows, 12, sampling))
    assert paged.kv_blocks == 4 * 64 // 8  # no budget given, no device memory figures: dense rows' worth
    paged.free(2)  # a free slot's table is cleared: its garbage steps write no block
    assert (paged._tables[2] == paged.kv_blocks).all()


def test_whether_a_prompt_shares_the_cache_is_the_models_own():
    assert LLAMA.prompt_shares_cache and not T5.prompt_shares_cache
    assert not lora.LoraModel(T5, rank=2, targets=r"decoder/.*/q_proj").prompt_shares_cache
    assert lora.LoraModel(LLAMA, rank=2).prompt_shares_cache


def test_engine_errors_name_their_cause():
    with pytest.raises(ValueError, match="prefix caching needs a model whose prompt shares the cache"):
        Engine(T5, params_of(T5), max_slots=1, max_length=32, prefix_cache=True)
    with pytest.raises(ValueError, match="max_prompt_length=40 must lie in"):
        Engine(LLAMA, params_of(LLAMA), max_slots=1, max_length=40, max_prompt_length=40)
    engine = llama_engine()
    with pytest.raises(ValueError, match="max_prompt_length=40"):
        engine.prefill(prompts([41])[0])
    with pytest.raises(ValueError, match="no logits yet"):
        engine.insert(engine.load_prefix([0]), 0)
    with pytest.raises(ValueError, match="KV_CACHE must be 'dense' or 'paged', got 'pages'"):
        Engine(LLAMA, params_of(LLAMA), max_slots=1, max_length=32, kv_cache="pages")
    with pytest.raises(ValueError, match="KV_CACHE='paged' needs a decoder-only model; EncoderDecoderModel"):
        Engine(T5, params_of(T5), max_slots=1, max_length=32, kv_cache="paged")
    with pytest.raises(ValueError, match="KV_CACHE_BYTES=100 holds no block: one block of 16 positions takes"):
        Engine(LLAMA, params_of(LLAMA), max_slots=1, max_length=32, kv_cache="paged", kv_cache_bytes=100)
    paged = Engine(LLAMA, params_of(LLAMA), max_slots=1, max_length=32, kv_cache="paged", block_size=4)
    with pytest.raises(ValueError, match="pass engine.paged_prefix"):
        paged.prefill([1, 2, 3])
    with pytest.raises(ValueError, match="pass engine.paged_prefix"):
        paged.prefill([1, 2, 3, 4, 5], prefix=paged.paged_prefix([0]))  # 5 positions, one block of 4
