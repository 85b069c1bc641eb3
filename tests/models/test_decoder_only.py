import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmops_jax.models import attention, decoder_only, layers
from tests.helpers import tiny_llama


def _params(m, length=16):
    return nn.meta.unbox(m.init_params(jax.random.key(0), m.input_shapes(1, {"targets": length})))


def test_shapes_and_logical_axes():
    m = tiny_llama(num_layers=2, tie_embeddings=False)
    boxed = m.init_params(jax.random.key(0), m.input_shapes(1, {"targets": 8}))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    p = nn.meta.unbox(boxed)
    assert p["layers_1"]["self_attn"]["k_proj"]["kernel"].shape == (64, 2, 16)
    assert p["layers_1"]["self_attn"]["o_proj"]["kernel"].shape == (4, 16, 64)
    assert p["lm_head"]["kernel"].shape == (64, 128)
    logits = m.compute_logits(p, {"decoder_input_tokens": jnp.ones((3, 8), jnp.int32)})
    assert logits.shape == (3, 8, 128)


def test_tied_embeddings_have_no_lm_head():
    m = tiny_llama(tie_embeddings=True)
    assert "lm_head" not in _params(m)


def test_causal_mask_future_tokens_do_not_change_past_logits():
    m = tiny_llama()
    p = _params(m)
    a = np.arange(1, 17, dtype=np.int32)[None]
    b = a.copy()
    b[0, 10:] = 5
    la = m.compute_logits(p, {"decoder_input_tokens": a})
    lb = m.compute_logits(p, {"decoder_input_tokens": b})
    np.testing.assert_allclose(la[0, :10], lb[0, :10], atol=1e-5)
    assert not np.allclose(la[0, 10:], lb[0, 10:])


def test_mask_combines_causality_and_segments():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    pos = jnp.array([[0, 1, 0, 1, 0]])
    mask = attention.make_attention_mask(seg, seg, query_length=5, key_length=5, causal=True,
                                      query_positions=pos, key_positions=pos)[0, 0]
    expected = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(mask, int), expected)


def test_packed_batch_gives_same_per_token_loss_as_unpacked():
    m = tiny_llama(num_layers=2)
    p = _params(m)
    rng = np.random.default_rng(0)
    seq_a, seq_b = rng.integers(1, 128, 7), rng.integers(1, 128, 5)

    def unpacked(seq):
        inputs = np.concatenate([[0], seq[:-1]])[None].astype(np.int32)
        logits = m.compute_logits(p, {"decoder_input_tokens": inputs})
        return np.asarray(jax.nn.log_softmax(logits)[0, np.arange(len(seq)), seq])

    packed_targets = np.concatenate([seq_a, seq_b, [0, 0, 0, 0]])[None].astype(np.int32)
    packed_inputs = np.concatenate([[0], seq_a[:-1], [0], seq_b[:-1], [0, 0, 0, 0]])[None].astype(np.int32)
    segments = np.array([[1] * 7 + [2] * 5 + [0] * 4], np.int32)
    positions = np.array([list(range(7)) + list(range(5)) + [0] * 4], np.int32)
    logits = m.compute_logits(p, {"decoder_input_tokens": packed_inputs, "decoder_segment_ids": segments,
                                  "decoder_positions": positions})
    logp = np.asarray(jax.nn.log_softmax(logits)[0, np.arange(12), packed_targets[0, :12]])
    np.testing.assert_allclose(logp, np.concatenate([unpacked(seq_a), unpacked(seq_b)]), atol=2e-5)


def test_rope_matches_rotate_half_reference():
    x = np.random.default_rng(1).normal(size=(1, 3, 2, 8)).astype(np.float32)
    pos = np.array([[0, 1, 5]])
    out = np.asarray(layers.rotary_embedding(jnp.asarray(x), jnp.asarray(pos)))
    inv = 1.0 / (10000 ** (np.arange(0, 8, 2) / 8))
    ang = pos[..., None] * inv
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1)[:, :, None], np.concatenate([np.sin(ang)] * 2, -1)[:, :, None]
    rot = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    np.testing.assert_allclose(out, x * cos + rot * sin, atol=1e-5)


@pytest.mark.parametrize("kernel_shape,kernel_dims,spec", [
    ((6, 3, 4), (0,), "bld,dhk->blhk"),      # q/k/v projections
    ((3, 4, 6), (0, 1), "blhk,hkd->bld"),    # the output projection
    ((5, 6), (1,), "bld,vd->blv"),           # tied unembedding against the [V, D] table
])
def test_merged_batch_contraction_equals_the_einsum_with_gradients(kernel_shape, kernel_dims, spec):
    rng = np.random.default_rng(0)
    in_shape = tuple(kernel_shape[d] for d in kernel_dims)
    x = jnp.asarray(rng.normal(size=(2, 7) + in_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    ours = lambda x, k: jnp.sum(jnp.sin(layers.contract_trailing(x, k, kernel_dims)))  # noqa: E731
    ref = lambda x, k: jnp.sum(jnp.sin(jnp.einsum(spec, x, k)))  # noqa: E731
    np.testing.assert_allclose(layers.contract_trailing(x, kernel, kernel_dims), jnp.einsum(spec, x, kernel),
                               rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(ours, (0, 1))(x, kernel), jax.grad(ref, (0, 1))(x, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_weight_gradient_does_not_copy_the_output_gradient_transposed():
    """The reason for merging the batch dims: XLA:CPU multiplies [N, in] by [N, out] where they lie."""
    if jax.default_backend() != "cpu":
        pytest.skip("a property of XLA:CPU's layout assignment")
    x = jnp.ones((8, 32, 16), jnp.float32)
    kernel = jnp.ones((16, 512), jnp.float32)
    weight_grad = jax.jit(jax.grad(lambda k, x: jnp.sum(jnp.tanh(layers.contract_trailing(x, k, (0,))))))
    hlo = weight_grad.lower(kernel, x).compile().as_text()
    transposed_copies = [line for line in hlo.splitlines()
                         if "f32[512,256]" in line and ("copy" in line or "transpose" in line)]
    assert not transposed_copies, transposed_copies


def test_bfloat16_compute_keeps_float32_params():
    m = tiny_llama(dtype="bfloat16", param_dtype="float32")
    p = _params(m)
    assert p["lm_head"]["kernel"].dtype == jnp.float32
    logits = m.compute_logits(p, {"decoder_input_tokens": jnp.ones((1, 8), jnp.int32)})
    assert logits.dtype == jnp.bfloat16


def test_bad_head_config_is_named():
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        decoder_only.LlamaConfig(num_heads=4, num_kv_heads=3)


def test_flops_count_matches_hand_count():
    cfg = decoder_only.LlamaConfig(vocab_size=4096, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4,
                                   mlp_dim=704)
    per_layer = 4 * 256 * 256 + 3 * 256 * 704
    expected = 6 * (4 * per_layer + 256 * 4096) + 6 * 4 * 256 * 256
    assert decoder_only.training_flops_per_token(cfg, 256) == expected


@pytest.mark.parametrize("policy", sorted(layers.REMAT_POLICIES))
def test_remat_policies_give_the_plain_loss_and_gradients(policy):
    plain = tiny_llama(num_layers=2)
    remat = tiny_llama(num_layers=2, remat=True, remat_policy=policy)
    batch = {k: jnp.asarray(np.random.default_rng(0).integers(1, 128, (2, 16)), jnp.int32)
             for k in ("decoder_input_tokens", "decoder_target_tokens")}
    batch["decoder_loss_weights"] = jnp.ones((2, 16), jnp.float32)
    params = nn.meta.unbox(plain.init_params(jax.random.key(0), plain.input_shapes(2, {"targets": 16})))

    def loss_and_grads(m):
        return jax.jit(jax.value_and_grad(lambda p: m.loss_fn(p, batch, None)[0]))(params)
    (loss, grads), (remat_loss, remat_grads) = loss_and_grads(plain), loss_and_grads(remat)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), remat_grads, grads)


def test_unknown_remat_policy_is_named():
    with pytest.raises(ValueError, match="LlamaConfig: remat_policy='some' is not one of full, minimal"):
        decoder_only.LlamaConfig(remat=True, remat_policy="some")


def test_jax_nn_attention_path_gives_the_einsum_logits_and_loss(monkeypatch):
    m = tiny_llama(num_layers=2)
    params = nn.meta.unbox(m.init_params(jax.random.key(0), m.input_shapes(2, {"targets": 16})))
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 128, (2, 16)), jnp.int32)
    segments = jnp.asarray([[1] * 10 + [2] * 6, [1] * 16], jnp.int32)  # packed rows: mask and positions matter
    positions = jnp.asarray([list(range(10)) + list(range(6)), list(range(16))], jnp.int32)

    def logits():
        return jax.jit(lambda p: m.module.apply({"params": p}, tokens, positions, segments))(params)
    monkeypatch.setenv(attention.ATTENTION_ENV, "einsum")
    reference = logits()
    monkeypatch.setenv(attention.ATTENTION_ENV, "jax_nn")
    np.testing.assert_allclose(logits(), reference, atol=2e-5)
    monkeypatch.setenv(attention.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="LMOPS_JAX_ATTENTION='flash': expected auto, jax_nn or einsum"):
        logits()


def test_causal_query_blocks_give_the_full_square_loss_and_gradients(monkeypatch):
    """CPU attention skips the keys past each block of queries (`attention.CAUSAL_QUERY_BLOCKS`): packed rows,
    grouped heads and 128 positions (4 blocks) give the loss and gradients of the unblocked computation."""
    m = tiny_llama(num_layers=2)
    rng = np.random.default_rng(2)
    batch = {k: jnp.asarray(rng.integers(1, 128, (2, 128)), jnp.int32)
             for k in ("decoder_input_tokens", "decoder_target_tokens")}
    batch["decoder_loss_weights"] = jnp.ones((2, 128), jnp.float32)
    batch["decoder_segment_ids"] = jnp.asarray([[1] * 50 + [2] * 70 + [0] * 8, [1] * 128], jnp.int32)
    batch["decoder_positions"] = jnp.asarray([list(range(50)) + list(range(70)) + [0] * 8, list(range(128))],
                                             jnp.int32)
    params = _params(m, 128)

    def loss_and_grads():
        return jax.jit(jax.value_and_grad(lambda p: m.loss_fn(p, batch, None)[0]))(params)
    monkeypatch.setattr(attention, "CAUSAL_QUERY_BLOCKS", 1)
    loss, grads = loss_and_grads()
    monkeypatch.setattr(attention, "CAUSAL_QUERY_BLOCKS", 4)
    blocked_loss, blocked_grads = loss_and_grads()
    np.testing.assert_allclose(blocked_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), blocked_grads, grads)


def test_causal_attention_with_a_bias_in_uneven_blocks_equals_the_reference():
    """100 queries in blocks of 34, 34, 32 with a T5-style bias and grouped heads; causal=True without a mask is
    refused."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, 100, 4, 24)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 100, 2, 24)), jnp.float32) for _ in range(2))
    bias = jnp.asarray(rng.normal(size=(1, 4, 100, 100)), jnp.float32)
    mask = attention.make_attention_mask(None, None, query_length=100, key_length=100, causal=True)
    blocked = attention.dot_product_attention(q, k, v, mask, bias, causal=True)
    scores = jnp.einsum("blhd,bshd->bhls", q, jnp.repeat(k, 2, axis=2)) * 24 ** -0.5 + bias
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    np.testing.assert_allclose(blocked, jnp.einsum("bhls,bshd->blhd", probs, jnp.repeat(v, 2, axis=2)), atol=1e-5)
    with pytest.raises(ValueError, match=r"causal=True\) is for self-attention .* mask None"):
        attention.dot_product_attention(q, k, v, None, causal=True)
