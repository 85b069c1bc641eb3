"""models.paged_attention: a paged cache gives the dense cache's logits through the decode API, rows
write only their own pages, and the Pallas GPU kernel (interpreted on CPU) agrees with the jnp gather."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmops_jax.models import model as model_lib
from lmops_jax.models import paged_attention
from tests.helpers import tiny_llama

LLAMA = tiny_llama(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_length=64)
PAGES = model_lib.KVPages(num_pages=20, page_size=4)


def params():
    return nn.meta.unbox(LLAMA.init_params(jax.random.key(1), LLAMA.input_shapes(1, {"targets": 8})))


def paged_cache(rows: int, table: np.ndarray):
    cache = nn.meta.unbox(LLAMA.init_cache(rows, 32, pages=PAGES))
    assert (np.asarray(cache["block_table"]) == PAGES.num_pages).all()  # every entry "no page" at first
    return {**cache, "block_table": jnp.asarray(table, jnp.int32)}


def scattered_table() -> np.ndarray:
    pages = np.random.default_rng(0).permutation(PAGES.num_pages)
    table = np.full((3, 8), PAGES.num_pages, np.int32)
    for row in range(3):
        table[row, :6] = pages[6 * row:6 * row + 6]
    return table


def test_paged_cache_gives_the_dense_logits():
    p, table = params(), scattered_table()
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 64, (3, 10)), jnp.int32)
    lengths = jnp.array([10, 5, 7], jnp.int32)
    dense_logits, dense = LLAMA.prefill(p, tokens, lengths, LLAMA.init_cache(3, 32))
    paged_logits, paged = LLAMA.prefill(p, tokens, lengths, paged_cache(3, table))
    # Not bit-equal: the dense cache is read only up to its filled length (`filled_cache_attention`), the
    # paged one over every page of the table, so the two sum over different key lengths.
    np.testing.assert_allclose(paged_logits, dense_logits, atol=1e-6)
    for _ in range(12):  # row 0 reaches position 21, into its 6th page
        next_tokens = jnp.argmax(dense_logits, -1).astype(jnp.int32)
        dense_logits, dense = LLAMA.decode_step(p, next_tokens, dense)
        paged_logits, paged = LLAMA.decode_step(p, next_tokens, paged)
        np.testing.assert_allclose(paged_logits, dense_logits, atol=1e-6)


def test_a_row_without_pages_writes_nothing():
    p, table = params(), scattered_table()
    cache = paged_cache(3, table)
    _, cache = LLAMA.prefill(p, jnp.ones((3, 6), jnp.int32), jnp.full((3,), 6, jnp.int32), cache)
    before = cache["layers_0"]["self_attn"]["key_pages"]
    cleared = {**cache, "block_table": jnp.asarray(table).at[1].set(PAGES.num_pages)}
    _, after = LLAMA.decode_step(p, jnp.array([3, 3, 3], jnp.int32), cleared)
    changed = np.flatnonzero(np.any(np.asarray(after["layers_0"]["self_attn"]["key_pages"] != before),
                                    axis=(0, 2, 3)))
    assert sorted(changed) == sorted([table[0, 1], table[2, 1]])  # rows 0 and 2 wrote position 6; row 1 nothing


def test_pallas_kernel_interpreted_agrees_with_the_gather(monkeypatch):
    p, table = params(), scattered_table()
    _, cache = LLAMA.prefill(p, jnp.arange(1, 25).reshape(3, 8) % 64, jnp.array([8, 3, 6], jnp.int32),
                             paged_cache(3, table))
    step = jnp.array([5, 6, 7], jnp.int32)
    monkeypatch.setenv(paged_attention.KERNEL_ENV, "jnp")
    reference, _ = LLAMA.decode_step(p, step, cache)
    monkeypatch.setenv(paged_attention.KERNEL_ENV, "pallas_interpret")
    kernel, _ = LLAMA.decode_step(p, step, cache)
    np.testing.assert_allclose(kernel, reference, atol=1e-4)
    monkeypatch.setenv(paged_attention.KERNEL_ENV, "cuda")
    with pytest.raises(ValueError, match="LMOPS_JAX_PAGED_KERNEL='cuda': expected auto, jnp, pallas"):
        LLAMA.decode_step(p, step, cache)


def test_encoder_decoder_models_keep_dense_rows():
    from lmops_jax.models import encoder_decoder
    t5 = model_lib.EncoderDecoderModel(encoder_decoder.T5Config(
        vocab_size=64, d_model=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=2, head_dim=16, mlp_dim=64))
    with pytest.raises(NotImplementedError, match="paged KV cache is built for decoder-only models"):
        t5.init_cache(1, 32, 16, pages=PAGES)
