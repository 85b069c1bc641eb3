"""The decode API (`init_cache`, `prefill`, `decode_step`) of every model family, LoRA included: a prefill
plus one-token steps gives the full-forward logits at every position of ragged rows, rows keep their own
positions (one can be refilled while the others continue), and the cache carries its logical axes."""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmops_jax import partitioning
from lmops_jax.models import attention, decoder_only, encoder_decoder, model
from lmops_jax.peft import lora

VOCAB = 64
LLAMA = model.DecoderOnlyModel(decoder_only.LlamaConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                                                        num_kv_heads=2, mlp_dim=64))
T5 = model.EncoderDecoderModel(encoder_decoder.T5Config(vocab_size=VOCAB, d_model=32, num_encoder_layers=1,
                                                        num_decoder_layers=2, num_heads=2, head_dim=16, mlp_dim=64))
MODELS = {
    "llama": LLAMA,
    "t5": T5,
    "lora_llama": lora.LoraModel(LLAMA, rank=2, alpha=4.0, targets=r".*/(q_proj|v_proj|up_proj)"),
    "lora_t5": lora.LoraModel(T5, rank=2, alpha=4.0, targets=r"(encoder|decoder)/.*/(q_proj|v_proj|up_proj)"),
}


@functools.lru_cache(maxsize=None)
def _params(name: str) -> Any:
    m = MODELS[name]
    params = nn.meta.unbox(m.init_params(jax.random.key(0), m.input_shapes(1, {"inputs": 8, "targets": 8})))
    # LoRA's B starts at zero; make the adapters change the logits.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, 0.05) if "lora_b" in jax.tree_util.keystr(path) else x, params)


@dataclasses.dataclass
class Case:
    """Rows of one request each: the prompt `prefill` takes, and the decoder sequence the logits run over.

    The logits predicting decoder[b][first[b] + 1 + t] come from step t (t = -1: the prefill).
    """
    prompts: list[list[int]]
    decoder: list[list[int]]
    first: list[int]


def _case(name: str, lengths: list[int], steps: int, seed: int) -> Case:
    """Ragged prompts of `lengths` tokens and `steps` more tokens per row."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(2, VOCAB, n + steps).tolist() for n in lengths]
    if "t5" in name:  # prompt -> encoder; the decoder runs over the start token and `steps` targets
        return Case([r[:n] for r, n in zip(rows, lengths)], [[0] + r[n:] for r, n in zip(rows, lengths)],
                    [0] * len(rows))
    return Case([r[:n] for r, n in zip(rows, lengths)], rows, [n - 1 for n in lengths])


def _full_logits(name: str, case: Case) -> list[np.ndarray]:
    """The teacher-forced logits [Ld, V] of each row alone (no padding)."""
    m, out = MODELS[name], []
    for b in range(len(case.prompts)):
        if "t5" in name:
            features = m.logits_features(case.prompts[b:b + 1], case.decoder[b:b + 1])
        else:  # the prompt is the start of the decoder sequence
            features = m.logits_features(case.decoder[b:b + 1])
        out.append(np.asarray(m.compute_logits(_params(name), {k: jnp.asarray(v) for k, v in features.items()}))[0])
    return out


def _padded(rows: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


@functools.lru_cache(maxsize=None)
def _jitted(name: str):
    m = MODELS[name]
    return jax.jit(m.prefill), jax.jit(m.decode_step)


@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_and_steps_equal_full_forward_for_ragged_rows(name):
    steps, prompt_len = 5, 8
    case = _case(name, [3, 7, 1], steps, seed=1)
    m, params = MODELS[name], _params(name)
    prefill, step = _jitted(name)
    # Prompts padded to 7 < prompt_len: the cache takes shorter prompts too.
    cache = m.init_cache(3, prompt_len + steps, prompt_len)
    logits, cache = prefill(params, _padded(case.prompts, 7), np.array([3, 7, 1], np.int32), cache)
    got = [[np.asarray(logits[b])] for b in range(3)]
    for t in range(steps - 1):
        tokens = np.array([case.decoder[b][case.first[b] + 1 + t] for b in range(3)], np.int32)
        logits, cache = step(params, tokens, cache)
        assert logits.dtype == jnp.float32 and logits.shape == (3, VOCAB)
        for b in range(3):
            got[b].append(np.asarray(logits[b]))
    for b, full in enumerate(_full_logits(name, case)):
        np.testing.assert_allclose(np.stack(got[b]), full[case.first[b]:case.first[b] + steps], atol=3e-5, rtol=1e-5)
    if name.startswith("lora"):  # the adapters are applied in decoding too
        base = "t5" if "t5" in name else "llama"
        assert not np.allclose(np.stack(got[0]), _full_logits(base, case)[0][:steps], atol=1e-3)


def test_a_prefill_through_jax_nn_attention_gives_the_einsum_prefill(monkeypatch):
    """GPUs and TPUs prefill through `jax.nn.dot_product_attention` (forced here on CPU): a first prefill and a
    second chunk written after it, over the whole cache, give what the einsum path over its filled part gives."""
    m, params = MODELS["llama"], _params("llama")
    case = _case("llama", [3, 7, 1], 2, seed=4)
    prompts, lengths = _padded(case.prompts, 7), np.array([3, 7, 1], np.int32)
    chunk = np.array([[5, 6, 7], [8, 9, 10], [11, 12, 13]], np.int32)

    def run():  # a fresh jit: the path is chosen while tracing
        prefill = jax.jit(m.prefill)
        first, cache = prefill(params, prompts, lengths, m.init_cache(3, 16, 8))
        second, _ = prefill(params, chunk, np.full(3, 3, np.int32), cache)
        return np.asarray(first), np.asarray(second)
    monkeypatch.setenv(attention.ATTENTION_ENV, "einsum")
    reference = run()
    monkeypatch.setenv(attention.ATTENTION_ENV, "jax_nn")
    for got, want in zip(run(), reference):
        np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_a_row_is_refilled_while_the_others_continue(name):
    """Serving-engine use: rows keep their own positions, so one row's cache is replaced mid-decode."""
    m, params = MODELS[name], _params(name)
    prefill, step = _jitted(name)
    old = _case(name, [4, 2], 8, seed=2)
    new = _case(name, [6], 4, seed=3)
    cache = m.init_cache(2, 16, 8)
    logits, cache = prefill(params, _padded(old.prompts, 8), np.array([4, 2], np.int32), cache)
    for t in range(3):  # both rows decode 3 tokens
        logits, cache = step(params, np.array([old.decoder[b][old.first[b] + 1 + t] for b in range(2)], np.int32),
                             cache)
    # Refill row 1 with a new request: prefill a one-row cache and write it into row 1 (every leaf is [B, ...]).
    one_logits, one = prefill(params, _padded(new.prompts, 8), np.array([6], np.int32), m.init_cache(1, 16, 8))
    cache = jax.tree.map(lambda rows, row: rows.at[1].set(row[0]), cache, one)
    got = {0: [], 1: [np.asarray(one_logits[0])]}
    for t in range(3):
        tokens = np.array([old.decoder[0][old.first[0] + 4 + t], new.decoder[0][new.first[0] + 1 + t]], np.int32)
        logits, cache = step(params, tokens, cache)
        got[0].append(np.asarray(logits[0]))
        got[1].append(np.asarray(logits[1]))
    full_old, full_new = _full_logits(name, old)[0], _full_logits(name, new)[0]
    np.testing.assert_allclose(np.stack(got[0]), full_old[old.first[0] + 4:old.first[0] + 7], atol=3e-5, rtol=1e-5)
    np.testing.assert_allclose(np.stack(got[1]), full_new[new.first[0]:new.first[0] + 4], atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_cache_is_boxed_with_logical_axes_and_decodes_sharded(name):
    m, params = MODELS[name], _params(name)
    boxed = m.init_cache(4, 12, 4)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim and x.names[0] == "batch"
               for x in leaves)
    assert all(np.all(np.asarray(x.value) == 0) for x in leaves)
    # A [B, K, Dh, S] cache with per-row cache_index [B].
    kv = [x for x in leaves if x.value.ndim == 4]
    assert kv and all(x.names == ("batch", "act_kv_heads", None, None) for x in kv)
    # Heads over `model`, rows over `data`, as a tensor-parallel serving engine would place them.
    p = partitioning.Partitioner({"data": 2, "fsdp": 1, "model": 2}, "tp", devices=jax.devices()[:4])
    shardings = p.shardings_of_boxed(jax.eval_shape(lambda: m.init_cache(4, 12, 4)))
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    assert len(specs) == len(leaves)
    for box, spec in zip(leaves, specs):
        rows = ("data", "fsdp")
        expected = (rows, "model") if box.value.ndim == 4 else (rows,)
        assert spec == jax.sharding.PartitionSpec(*expected), (box.names, spec)
    with p.context():
        cache = jax.jit(lambda: nn.meta.unbox(m.init_cache(4, 12, 4)), out_shardings=shardings)()
        tokens = np.arange(1, 17, dtype=np.int32).reshape(4, 4)
        sharded, _ = jax.jit(m.prefill)(params, tokens, np.array([4, 3, 2, 1], np.int32), cache)
    plain, _ = _jitted(name)[0](params, tokens, np.array([4, 3, 2, 1], np.int32), m.init_cache(4, 12, 4))
    np.testing.assert_allclose(sharded, plain, atol=2e-5)


def test_errors_name_their_cause():
    with pytest.raises(ValueError, match="needs prompt_length"):
        T5.init_cache(1, 8)
    with pytest.raises(ValueError, match="prompt_length=9 must lie in"):
        LLAMA.init_cache(1, 8, 9)
    with pytest.raises(ValueError, match="prompts of 9 tokens do not fit the cache's 8 positions"):
        LLAMA.prefill(_params("llama"), np.ones((1, 9), np.int32), np.array([9]), LLAMA.init_cache(1, 8))
    with pytest.raises(ValueError, match="do not fit the cache's 4 encoder positions"):
        T5.prefill(_params("t5"), np.ones((1, 5), np.int32), np.array([5]), T5.init_cache(1, 8, 4))


def test_decode_mode_keeps_param_names_and_rejects_packing():
    params = _params("llama")
    decode_params = jax.eval_shape(
        lambda: LLAMA.module.init(jax.random.key(0), np.zeros((1, 4), np.int32), decode=True))
    assert jax.tree.structure(nn.meta.unbox(decode_params["params"])) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="positions or segment_ids"):
        LLAMA.module.apply({"params": params, "cache": nn.meta.unbox(LLAMA.init_cache(1, 4))},
                           np.ones((1, 2), np.int32), segment_ids=np.ones((1, 2), np.int32), decode=True,
                           mutable=["cache"])


def test_attention_takes_both_key_layouts_with_the_same_result():
    """One attention for training ([B, S, K, Dh]) and the cache ([B, K, Dh, S]), grouped heads, mask and bias."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(2, 3, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)])
    mask = jnp.asarray(rng.random((2, 1, 3, 5)) > 0.3)
    bias = jnp.asarray(rng.normal(size=(1, 4, 3, 5)), jnp.float32)
    training = attention.dot_product_attention(q, k, v, mask, bias)
    to_cache = lambda x: jnp.transpose(x, (0, 2, 3, 1))  # noqa: E731
    cached = attention.dot_product_attention(q, to_cache(k), to_cache(v), mask, bias, kv_layout="bkds")
    np.testing.assert_allclose(cached, training, atol=1e-6)
    scores = jnp.einsum("blhd,bshd->bhls", q, jnp.repeat(k, 2, axis=2)) * 8 ** -0.5 + bias
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    np.testing.assert_allclose(training, jnp.einsum("bhls,bshd->blhd", probs, jnp.repeat(v, 2, axis=2)), atol=1e-5)
    with pytest.raises(ValueError, match="kv_layout must be"):
        attention.dot_product_attention(q, k, v, mask, kv_layout="bsdk")


def test_filled_cache_attention_reads_every_visible_key_at_every_fill():
    """The dense cache is read up to its filled length in one of a few static lengths, or whole once a cut
    would copy a third of it (`attention.FILLED_CACHE_MAX_CUT_FRACTION`): at every fill of a 40-slot cache
    (chunks of 5: cuts at 5 and 10, then the whole cache) the rows' visible keys are all read, and the
    result is attention over the whole masked cache. The slots past the filled length hold noise."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 1, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 2, 8, 40)), jnp.float32) for _ in range(2))

    def both(filled, positions):
        mask, _ = attention.decode_mask_and_bias(positions[:, None], 40, None, None)
        whole = attention.dot_product_attention(q, k, v, mask, None, 0.3, kv_layout="bkds")
        return whole, attention.filled_cache_attention(q, k, v, mask, None, 0.3, filled)

    run = jax.jit(both)
    for filled in range(1, 41):
        whole, cut = run(jnp.int32(filled), jnp.asarray([filled - 1, max(0, filled - 4)], jnp.int32))
        np.testing.assert_allclose(np.asarray(cut), np.asarray(whole), atol=1e-6, err_msg=f"filled {filled}")
    switch = [e for e in jax.make_jaxpr(both)(jnp.int32(1), jnp.zeros(2, jnp.int32)).eqns if e.primitive.name == "cond"]
    assert len(switch) == 1 and len(switch[0].params["branches"]) == 3  # lengths 5, 10 and 40
