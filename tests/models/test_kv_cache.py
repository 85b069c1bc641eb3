"""KV-cache decoding: a prefill plus one-token steps gives the full-sequence logits, ragged batches too."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from lmops_jax.models import decoder_only, encoder_decoder, model

llama_step = jax.jit(decoder_only.decode_step, static_argnums=0)
t5_step = jax.jit(encoder_decoder.decode_step, static_argnums=0)


def _llama():
    cfg = decoder_only.LlamaConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
    wrapper = model.DecoderOnlyModel(cfg)
    return cfg, nn.meta.unbox(wrapper.init_params(jax.random.key(0), {"decoder_input_tokens": (1, 8)}))


def test_llama_gqa_ragged_prefill_then_steps_match_full_logits():
    cfg, params = _llama()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 64, 9).astype(np.int32), rng.integers(1, 64, 12).astype(np.int32)]
    prompt_lengths = np.array([3, 6], np.int32)
    steps = 6
    prompts = np.zeros((2, 6), np.int32)  # right-padded ragged prompts
    for b, n in enumerate(prompt_lengths):
        prompts[b, :n] = seqs[b][:n]
    cache = decoder_only.init_cache(cfg, 2, 6 + steps)
    logits, cache = llama_step(cfg, params, cache, prompts, prompt_lengths)
    cached = {b: [np.asarray(logits[b, :prompt_lengths[b]])] for b in range(2)}
    for t in range(steps):
        tokens = np.array([seqs[b][prompt_lengths[b] + t] for b in range(2)], np.int32)[:, None]
        logits, cache = llama_step(cfg, params, cache, tokens)
        for b in range(2):
            cached[b].append(np.asarray(logits[b]))
    np.testing.assert_array_equal(np.asarray(cache["cache_index"]), prompt_lengths + steps)
    for b in range(2):
        n = prompt_lengths[b] + steps
        full = decoder_only.LlamaDecoder(cfg).apply({"params": params}, seqs[b][None, :n])[0]
        np.testing.assert_allclose(np.concatenate(cached[b]), full, atol=2e-5, rtol=1e-5)


def test_t5_cached_decoder_matches_full_logits_with_ragged_encoder_and_prefix():
    cfg = encoder_decoder.T5Config(vocab_size=64, d_model=32, num_encoder_layers=1, num_decoder_layers=2,
                                   num_heads=2, head_dim=16, mlp_dim=64)
    wrapper = model.EncoderDecoderModel(cfg)
    shapes = wrapper.input_shapes(1, {"inputs": 4, "targets": 4})
    params = nn.meta.unbox(wrapper.init_params(jax.random.key(1), shapes))
    rng = np.random.default_rng(1)
    enc = rng.integers(1, 64, (2, 7)).astype(np.int32)
    enc[0, 4:] = 0  # padded encoder row
    dec = rng.integers(1, 64, (2, 7)).astype(np.int32)
    dec[:, 0] = 0  # decoder start token
    prefix = np.array([1, 3], np.int32)
    steps = 4
    prompts = np.zeros((2, 3), np.int32)
    for b, n in enumerate(prefix):
        prompts[b, :n] = dec[b, :n]
    encoded = encoder_decoder.encode(cfg, params, enc)
    cache = encoder_decoder.init_cache(cfg, 2, 7, 3 + steps)
    logits, cache = t5_step(cfg, params, cache, prompts, encoded=encoded,
                                                encoder_input_tokens=enc, lengths=prefix)
    cached = {b: [np.asarray(logits[b, :prefix[b]])] for b in range(2)}
    for t in range(steps):
        tokens = dec[np.arange(2), prefix + t][:, None]
        logits, cache = t5_step(cfg, params, cache, tokens)
        for b in range(2):
            cached[b].append(np.asarray(logits[b]))
    full = wrapper.module.apply({"params": params}, enc, dec)
    for b in range(2):
        n = prefix[b] + steps
        np.testing.assert_allclose(np.concatenate(cached[b]), full[b, :n], atol=2e-5, rtol=1e-5)


def test_decode_mode_keeps_param_names_and_rejects_packing():
    cfg, params = _llama()
    decode_params = jax.eval_shape(
        lambda: decoder_only.LlamaDecoder(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32), decode=True))
    assert jax.tree.structure(nn.meta.unbox(decode_params["params"])) == jax.tree.structure(params)
    cache = decoder_only.init_cache(cfg, 1, 4)
    with pytest.raises(ValueError, match="positions or segment_ids"):
        decoder_only.LlamaDecoder(cfg).apply({"params": params, "cache": cache}, np.ones((1, 2), np.int32),
                                             segment_ids=np.ones((1, 2), np.int32), decode=True, mutable=["cache"])
