"""T5 1.1 encoder-decoder: buckets, masking, packing, axes, training sanity, gin configs, HF parity."""
import functools
import math
import pathlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmops_jax import losses
from lmops_jax.models import encoder_decoder, layers, model

CFG = encoder_decoder.T5Config(vocab_size=64, d_model=32, num_encoder_layers=2, num_decoder_layers=2, num_heads=4,
                               head_dim=8, mlp_dim=48)
MODEL = model.EncoderDecoderModel(CFG)
GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "lmops_jax" / "gin_configs" / "models"


@functools.lru_cache(maxsize=None)
def _params():
    shapes = MODEL.input_shapes(2, {"inputs": 12, "targets": 10})
    return jax.jit(functools.partial(MODEL.init_params, input_shapes=shapes))(jax.random.key(0))


@functools.partial(jax.jit, static_argnames="method")
def _jit_apply(params, *args, method="__call__", **kwargs):
    return MODEL.module.apply({"params": params}, *args, method=method, **kwargs)


def _apply(enc, dec, **kwargs):
    return np.asarray(_jit_apply(_params(), jnp.asarray(enc), jnp.asarray(dec), **kwargs))


def _reference_bucket(rel: int, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> int:
    """Straightforward exact-integer version of the T5 bucket rule (no floating point)."""
    base = 0
    if bidirectional:
        num_buckets //= 2
        base = num_buckets if rel > 0 else 0
        dist = abs(rel)
    else:
        dist = max(-rel, 0)
    exact = num_buckets // 2
    if dist < exact:
        return base + dist
    n_log = num_buckets - exact
    # largest k with exact * (max_distance / exact) ** (k / n_log) <= dist, in integers
    k = 0
    while k + 1 < n_log and dist ** n_log * exact ** (k + 1) >= max_distance ** (k + 1) * exact ** n_log:
        k += 1
    return base + exact + k


def test_relative_position_bucket_matches_reference():
    rel = np.arange(-300, 301)
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (16, 40)):
            got = np.asarray(layers.relative_position_bucket(
                jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance))
            want = [_reference_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel]
            np.testing.assert_array_equal(got, want, err_msg=f"{bidirectional=} {num_buckets=}")
    bucket = lambda r, bi: int(layers.relative_position_bucket(jnp.asarray(r), bidirectional=bi))  # noqa: E731
    # known values (Hugging Face T5); 16/32/64 sit exactly on log-bucket boundaries
    assert [bucket(r, True) for r in (0, -1, 1, 7, 8, 16, -16, 32, 64, 1000, -1000)] == \
        [0, 1, 17, 23, 24, 26, 10, 28, 30, 31, 15]
    assert [bucket(r, False) for r in (3, 0, -1, -15, -16, -32, -128, -1000)] == [0, 0, 1, 15, 16, 21, 31, 31]


def test_shapes_methods_and_remat():
    enc = np.random.default_rng(0).integers(1, 64, (2, 12))
    dec = np.random.default_rng(1).integers(1, 64, (2, 10))
    logits = _apply(enc, dec)
    assert logits.shape == (2, 10, 64) and logits.dtype == np.float32
    encoded = _jit_apply(_params(), jnp.asarray(enc), method="encode")
    assert encoded.shape == (2, 12, 32)
    split = _jit_apply(_params(), encoded, jnp.asarray(enc), jnp.asarray(dec), method="decode")
    np.testing.assert_allclose(split, logits, atol=1e-6)
    remat = encoder_decoder.T5EncoderDecoder(encoder_decoder.T5Config(**{**CFG.__dict__, "remat": True}))
    np.testing.assert_allclose(jax.jit(remat.apply)({"params": _params()}, enc, dec), logits, atol=1e-6)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        encoder_decoder.T5Config(num_heads=0)
    with pytest.raises(ValueError, match="relative_attention_max_distance"):
        encoder_decoder.T5Config(relative_attention_num_buckets=32, relative_attention_max_distance=16)
    with pytest.raises(ValueError, match="param_dtype"):
        encoder_decoder.T5Config(param_dtype="float17")


def test_decoder_is_causal():
    rng = np.random.default_rng(2)
    enc, dec = rng.integers(1, 64, (1, 12)), rng.integers(1, 64, (1, 10))
    changed = dec.copy()
    changed[0, 6] = (dec[0, 6] % 63) + 1
    a, b = _apply(enc, dec), _apply(enc, changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-4


def test_encoder_padding_is_ignored():
    rng = np.random.default_rng(3)
    enc, dec = rng.integers(1, 64, (2, 8)), rng.integers(1, 64, (2, 10))
    padded = np.concatenate([enc, np.zeros((2, 4), enc.dtype)], axis=1)
    np.testing.assert_allclose(_apply(padded, dec), _apply(enc, dec), atol=1e-5)
    # with segment ids, whatever sits in segment-0 slots is padding
    segments = (padded > 0).astype(np.int32)
    junk = np.where(segments > 0, padded, rng.integers(1, 64, padded.shape))
    dec_seg = np.ones_like(dec)
    np.testing.assert_allclose(
        _apply(junk, dec, encoder_segment_ids=segments, decoder_segment_ids=dec_seg),
        _apply(enc, dec), atol=1e-5)


@jax.jit
def _jit_token_loss(params, batch):
    logits = MODEL.compute_logits(params, batch)
    return losses.cross_entropy_with_logits(logits, batch["decoder_target_tokens"], z_loss=1e-4)[0]


def _token_loss(batch):
    return np.asarray(_jit_token_loss(_params(), {k: jnp.asarray(v) for k, v in batch.items()}))


def test_packed_equals_unpacked():
    rng = np.random.default_rng(4)
    lengths = [(5, 4), (6, 5)]  # (encoder, decoder) lengths of the two examples
    alone, enc_row, dec_row = [], [], []
    for seg, (le, ld) in enumerate(lengths, start=1):
        enc = rng.integers(1, 64, le)
        targets = rng.integers(1, 64, ld)
        inputs = np.concatenate([[0], targets[:-1]])  # T5 decoder inputs start with 0
        alone.append(_token_loss({"encoder_input_tokens": enc[None], "decoder_input_tokens": inputs[None],
                                  "decoder_target_tokens": targets[None]})[0])
        enc_row.append((enc, np.full(le, seg), np.arange(le)))
        dec_row.append((inputs, targets, np.full(ld, seg), np.arange(ld)))
    pad_e, pad_d = 3, 2
    cat = lambda parts, pad: np.concatenate(list(parts) + [np.zeros(pad, np.int64)])[None]  # noqa: E731
    packed = {
        "encoder_input_tokens": cat((e[0] for e in enc_row), pad_e),
        "encoder_segment_ids": cat((e[1] for e in enc_row), pad_e),
        "encoder_positions": cat((e[2] for e in enc_row), pad_e),
        "decoder_input_tokens": cat((d[0] for d in dec_row), pad_d),
        "decoder_target_tokens": cat((d[1] for d in dec_row), pad_d),
        "decoder_segment_ids": cat((d[2] for d in dec_row), pad_d),
        "decoder_positions": cat((d[3] for d in dec_row), pad_d),
    }
    got = _token_loss(packed)[0]
    np.testing.assert_allclose(got[:4], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[4:9], alone[1], rtol=1e-5, atol=1e-5)


def test_every_param_has_logical_axes_of_matching_rank():
    flat = flax.traverse_util.flatten_dict(_params(), sep="/", is_leaf=lambda _, v: isinstance(v, nn.Partitioned))
    assert "encoder/relpos_bias/rel_embedding" in flat and "decoder/layers_1/cross_attn/q_proj/kernel" in flat
    for name, leaf in flat.items():
        assert isinstance(leaf, nn.Partitioned), name
        assert len(leaf.names) == leaf.value.ndim, (name, leaf.names, leaf.value.shape)
    assert flat["encoder/relpos_bias/rel_embedding"].names == ("relpos_buckets", "heads")


def test_flops_count_matches_param_tree():
    flat = flax.traverse_util.flatten_dict(nn.unbox(_params()), sep="/")
    kernels = sum(v.size for k, v in flat.items() if k.endswith("/kernel"))
    lengths = {"inputs": 16, "targets": 16}
    width = CFG.num_heads * CFG.head_dim
    attn = 3 * 16 * width * (4 * CFG.num_encoder_layers + 6 * CFG.num_decoder_layers)
    assert MODEL.training_flops_per_token(lengths) == pytest.approx(6 * kernels + attn)


def test_adam_lowers_loss_on_a_repeated_batch():
    rng = np.random.default_rng(5)
    targets = rng.integers(1, 64, (2, 10))
    batch = {"encoder_input_tokens": jnp.asarray(rng.integers(1, 64, (2, 12))),
             "decoder_input_tokens": jnp.asarray(np.concatenate([np.zeros((2, 1), int), targets[:, :-1]], 1)),
             "decoder_target_tokens": jnp.asarray(targets)}
    params = nn.unbox(_params())
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        (loss, _), grads = jax.value_and_grad(MODEL.loss_fn, has_aux=True)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    history = []
    for _ in range(9):  # the last step reports the loss after 8 updates
        params, state, loss = step(params, state)
        history.append(float(loss))
    assert history[-1] < 0.7 * history[0], history


@pytest.mark.parametrize("name, num_params", [("t5_tiny", 1_902_976), ("t5_small", 76_961_152)])
def test_gin_configs_build(name, num_params):
    gin = pytest.importorskip("gin")
    gin.clear_config()
    try:
        gin.parse_config_file(str(GIN_DIR / f"{name}.gin"))
        built = gin.query_parameter("%MODEL").scoped_configurable_fn()
    finally:
        gin.clear_config()
    assert isinstance(built, model.EncoderDecoderModel)
    shapes = built.input_shapes(1, {"inputs": 4, "targets": 4})
    abstract = jax.eval_shape(functools.partial(built.init_params, input_shapes=shapes), jax.random.key(0))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == num_params


def _hf_params(state_dict, cfg):
    """The weight mapping documented in `encoder_decoder`: Hugging Face state dict -> param tree."""
    sd = {k: v.detach().numpy() for k, v in state_dict.items()}
    d, h, dh = cfg.d_model, cfg.num_heads, cfg.head_dim

    def attn(prefix):
        proj = {f"{n}_proj": {"kernel": sd[f"{prefix}.{n}.weight"].T.reshape(d, h, dh)} for n in "qkv"}
        return {**proj, "o_proj": {"kernel": sd[f"{prefix}.o.weight"].T.reshape(h, dh, d)}}

    def mlp(prefix):
        return {"gate_proj": {"kernel": sd[f"{prefix}.wi_0.weight"].T},
                "up_proj": {"kernel": sd[f"{prefix}.wi_1.weight"].T},
                "down_proj": {"kernel": sd[f"{prefix}.wo.weight"].T}}

    params = {"shared": {"embedding": sd["shared.weight"]}, "lm_head": {"kernel": sd["lm_head.weight"].T}}
    for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        bias = sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        tree = {"relpos_bias": {"rel_embedding": bias}, "final_norm": {"scale": sd[f"{stack}.final_layer_norm.weight"]}}
        for i in range(n):
            b = f"{stack}.block.{i}.layer"
            layer = {"self_attn_norm": {"scale": sd[f"{b}.0.layer_norm.weight"]},
                     "self_attn": attn(f"{b}.0.SelfAttention")}
            ff = 1
            if stack == "decoder":
                layer["cross_attn_norm"] = {"scale": sd[f"{b}.1.layer_norm.weight"]}
                layer["cross_attn"] = attn(f"{b}.1.EncDecAttention")
                ff = 2
            layer["mlp_norm"] = {"scale": sd[f"{b}.{ff}.layer_norm.weight"]}
            layer["mlp"] = mlp(f"{b}.{ff}.DenseReluDense")
            tree[f"layers_{i}"] = layer
        params[stack] = tree
    return params


def test_matches_hugging_face_t5_v1_1():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=CFG.vocab_size, d_model=CFG.d_model, d_kv=CFG.head_dim, d_ff=CFG.mlp_dim,
        num_layers=CFG.num_encoder_layers, num_decoder_layers=CFG.num_decoder_layers, num_heads=CFG.num_heads,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, layer_norm_epsilon=1e-6,
        decoder_start_token_id=0, pad_token_id=0)).eval()
    params = _hf_params(hf.state_dict(), CFG)
    ours = jax.tree.map(lambda x: x.shape, nn.unbox(_params()))
    assert jax.tree.map(lambda x: x.shape, params) == ours
    rng = np.random.default_rng(6)
    enc = rng.integers(1, 64, (2, 140))  # longer than max_distance: every bucket is used
    enc[1, 90:] = 0
    dec = rng.integers(1, 64, (2, 135))
    dec[:, 0] = 0
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0).long(),
                  decoder_input_ids=torch.tensor(dec)).logits.numpy()
    got = np.asarray(_jit_apply(params, jnp.asarray(enc), jnp.asarray(dec)))
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
