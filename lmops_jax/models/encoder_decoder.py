"""T5 1.1-style encoder-decoder (relative position bias, gated-GELU MLP, RMSNorm, no biases).

Numerics follow Hugging Face `T5ForConditionalGeneration` with a v1.1 config: attention scores are not
scaled by 1/sqrt(d_kv); the relative position bias is computed once per stack (bidirectional buckets
in the encoder, causal in the decoder) and added in every self-attention layer of that stack;
cross-attention has no position bias; the token embedding is shared by both stacks and not rescaled;
the untied `lm_head` is applied without the d_model**-0.5 factor that tied T5 1.0 uses; dropout is 0.

Parameter names map one-to-one onto Hugging Face weights, transposed to (in, out) order with the head
dimension split out (S = encoder or decoder, i = block index, H heads, Dh = d_kv, F = d_ff):

    shared/embedding                      [V, D]       shared.weight (= {S}.embed_tokens.weight)
    {S}/relpos_bias/rel_embedding         [32, H]      {S}.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    {S}/layers_i/self_attn_norm/scale     [D]          {S}.block.i.layer.0.layer_norm.weight
    {S}/layers_i/self_attn/q_proj/kernel  [D, H, Dh]   {S}.block.i.layer.0.SelfAttention.q.weight.T  (k, v likewise)
    {S}/layers_i/self_attn/o_proj/kernel  [H, Dh, D]   {S}.block.i.layer.0.SelfAttention.o.weight.T
    decoder/layers_i/cross_attn_norm/scale             decoder.block.i.layer.1.layer_norm.weight
    decoder/layers_i/cross_attn/{q,k,v,o}_proj/kernel  decoder.block.i.layer.1.EncDecAttention.{q,k,v,o}.weight.T
    {S}/layers_i/mlp_norm/scale           [D]          {S}.block.i.layer.{1 enc | 2 dec}.layer_norm.weight
    {S}/layers_i/mlp/gate_proj/kernel     [D, F]       {S}.block.i.layer.{1|2}.DenseReluDense.wi_0.weight.T
    {S}/layers_i/mlp/up_proj/kernel       [D, F]       ...DenseReluDense.wi_1.weight.T
    {S}/layers_i/mlp/down_proj/kernel     [F, D]       ...DenseReluDense.wo.weight.T
    {S}/final_norm/scale                  [D]          {S}.final_layer_norm.weight
    lm_head/kernel                        [D, V]       lm_head.weight.T

(q/k/v kernels reshape [D, H*Dh] -> [D, H, Dh]; o reshapes [H*Dh, D] -> [H, Dh, D].)

Packing: segment ids (0 = padding) keep packed examples apart in self- and cross-attention, and
relative positions are taken from the given positions, so a packed row scores each example exactly
as it would alone. Without segment ids, encoder token 0 is padding (masked as a key); decoder inputs
are never masked by id because 0 is also T5's decoder start token.

KV-cache decoding (`T5EncoderDecoder(..., decode=True)`, apply with `mutable=["cache"]`): the encoder
runs once; the first call (the prefill) gets the encoder tokens, encodes them and stores, per decoder
layer, the cross-attention keys/values `cross_attn/cached_key|cached_value` [B, H, Dh, Le], and in
`decoder/encoder_valid` [B, Le] which encoder positions are real tokens; later calls pass
`encoder_input_tokens=None` and reuse them. The decoder self-attention caches
`self_attn/cached_key|cached_value` [B, H, Dh, S] with `decoder/cache_index` [B] (positions written per
example), exactly as in `decoder_only`: right-padded ragged decoder prefixes pass their
`decoder_lengths`. The causal relative position bias is computed over the cache slots from those
positions. Every cache leaf has the row first and is created boxed with its logical axes. Decoding goes
through `__call__`, the method that qwix (LoRA, quantization) intercepts; `model.EncoderDecoderModel`
exposes it as the decode API (`init_cache`, `prefill`, `decode_step`).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmops_jax.models import attention, layers

_ACT = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 1.1 encoder-decoder. Defaults give a tiny CPU model."""

    vocab_size: int = 512
    d_model: int = 128
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 512
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    rms_norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"  # with remat: what the backward keeps (layers.REMAT_POLICIES)

    def __post_init__(self):
        layers.check_remat_policy(self.remat_policy, "T5Config")
        for name in ("vocab_size", "d_model", "num_encoder_layers", "num_decoder_layers", "num_heads", "head_dim",
                     "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"T5Config: {name} must be a positive integer, got {value!r}")
        buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
        if not isinstance(buckets, int) or buckets < 4:
            raise ValueError(f"T5Config: relative_attention_num_buckets must be an integer >= 4, got {buckets!r}")
        if not isinstance(distance, int) or distance <= buckets // 2:
            raise ValueError(
                f"T5Config: relative_attention_max_distance={distance!r} must be an integer larger than "
                f"relative_attention_num_buckets // 2 = {buckets // 2}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"T5Config: rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"T5Config: {name}={getattr(self, name)!r} is not a dtype name") from e

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


def _attention(cfg: T5Config, name: str) -> layers.Attention:
    # T5 folds the 1/sqrt(d_kv) into the query init instead of the scores (see `scale_query_init`).
    return layers.Attention(cfg.num_heads, cfg.num_heads, cfg.head_dim, use_rope=False, scale=1.0,
                            dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name=name)


def _norm(cfg: T5Config, name: str) -> layers.RMSNorm:
    return layers.RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name=name)


def _mlp(cfg: T5Config) -> layers.GatedMLP:
    return layers.GatedMLP(cfg.mlp_dim, "gelu_tanh", cfg.compute_dtype, cfg.params_dtype, name="mlp")


def _relpos_bias(cfg: T5Config, bidirectional: bool) -> layers.RelativePositionBias:
    return layers.RelativePositionBias(
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.num_heads, bidirectional,
        cfg.compute_dtype, cfg.params_dtype, nn.initializers.normal(stddev=cfg.d_model ** -0.5), name="relpos_bias")


def _positions(positions: jax.Array | None, length: int) -> jax.Array:
    """Given positions [B, L], or [1, L] array indices (the bias then broadcasts over the batch)."""
    return jnp.arange(length)[None, :] if positions is None else positions



def _not_padding(tokens: jax.Array) -> jax.Array:
    """Key "segment ids" [B, L] that mask token id 0: 1 for real tokens, 0 for padding."""
    return (tokens > 0).astype(jnp.int32)


class EncoderLayer(nn.Module):
    """x [B, Le, D] -> [B, Le, D]: pre-norm bidirectional self-attention, then gated-GELU MLP."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, bias: jax.Array) -> jax.Array:
        cfg = self.config
        h = _attention(cfg, "self_attn")(_norm(cfg, "self_attn_norm")(x), mask=mask, bias=bias)
        x = layers.constrain(x + h, _ACT)
        h = _mlp(cfg)(_norm(cfg, "mlp_norm")(x))
        return layers.constrain(x + h, _ACT)


class DecoderLayer(nn.Module):
    """y [B, Ld, D], encoded [B, Le, D] -> [B, Ld, D]: causal self-attention, cross-attention, MLP."""

    config: T5Config

    @nn.compact
    def __call__(self, y: jax.Array, encoded: jax.Array | None, self_mask: jax.Array | None,
                 self_bias: jax.Array | None, cross_mask: jax.Array | None, decode: bool = False,
                 positions: jax.Array | None = None, bias_fn=None) -> jax.Array:
        """In decode mode `positions` [B, Ld] are the cache positions, `bias_fn` the shared relpos bias,
        and `encoded` is None after the prefill (cross keys/values come from the cache)."""
        cfg = self.config
        h = _attention(cfg, "self_attn")(_norm(cfg, "self_attn_norm")(y), mask=self_mask, bias=self_bias,
                                         decode=decode, query_positions=positions if decode else None,
                                         bias_fn=bias_fn, causal=True)
        y = layers.constrain(y + h, _ACT)
        h = _attention(cfg, "cross_attn")(_norm(cfg, "cross_attn_norm")(y), encoded, mask=cross_mask,
                                          decode=decode, cross_attention=decode)
        y = layers.constrain(y + h, _ACT)
        h = _mlp(cfg)(_norm(cfg, "mlp_norm")(y))
        return layers.constrain(y + h, _ACT)


class T5Encoder(nn.Module):
    """Embedded inputs x [B, Le, D] -> encoded [B, Le, D] (after the final norm)."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, positions: jax.Array | None) -> jax.Array:
        cfg = self.config
        pos = _positions(positions, x.shape[1])
        bias = _relpos_bias(cfg, bidirectional=True)(pos, pos)
        layer_cls = layers.maybe_remat(EncoderLayer, cfg.remat, cfg.remat_policy)
        for i in range(cfg.num_encoder_layers):
            x = layer_cls(cfg, name=f"layers_{i}")(x, mask, bias)
        return layers.constrain(_norm(cfg, "final_norm")(x), _ACT)


class T5Decoder(nn.Module):
    """Embedded decoder inputs y [B, Ld, D] and encoded [B, Le, D] -> hidden states [B, Ld, D]."""

    config: T5Config

    @nn.compact
    def __call__(self, y: jax.Array, encoded: jax.Array | None, self_mask: jax.Array | None,
                 cross_mask: jax.Array | None, positions: jax.Array | None, *, decode: bool = False,
                 lengths: jax.Array | None = None, encoder_valid: jax.Array | None = None) -> jax.Array:
        """Decode mode (module docstring): `lengths` [B] real tokens per row of y, `encoder_valid` [B, Le]
        with the prefill's `encoded`; masks and positions come from the cache."""
        cfg = self.config
        if decode:
            return self._decode(y, encoded, lengths, encoder_valid)
        pos = _positions(positions, y.shape[1])
        bias = _relpos_bias(cfg, bidirectional=False)(pos, pos)
        layer_cls = layers.maybe_remat(DecoderLayer, cfg.remat, cfg.remat_policy)
        for i in range(cfg.num_decoder_layers):
            y = layer_cls(cfg, name=f"layers_{i}")(y, encoded, self_mask, bias, cross_mask)
        return layers.constrain(_norm(cfg, "final_norm")(y), _ACT)

    def _decode(self, y, encoded, lengths, encoder_valid):
        cfg = self.config
        batch, length = y.shape[:2]
        index = self.variable("cache", "cache_index", layers.zeros_with_axes(("batch",)), (batch,), jnp.int32)
        positions = index.value[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
        index.value = index.value + (length if lengths is None else jnp.asarray(lengths, jnp.int32))
        if encoded is not None:
            if encoder_valid is None:
                raise ValueError("T5Decoder(decode=True): the prefill needs encoder_valid [B, Le] with encoded")
            valid = self.variable("cache", "encoder_valid", layers.zeros_with_axes(("batch", None)),
                                  encoder_valid.shape, jnp.bool_)
            valid.value = encoder_valid.astype(jnp.bool_)
        elif not self.has_variable("cache", "encoder_valid"):
            raise ValueError("T5Decoder(decode=True): the first (prefill) call must pass the encoder outputs")
        else:
            valid = self.variable("cache", "encoder_valid")
        cross_mask = valid.value[:, None, None, :]
        relpos = _relpos_bias(cfg, bidirectional=False)
        for i in range(cfg.num_decoder_layers):
            y = DecoderLayer(cfg, name=f"layers_{i}")(y, encoded, None, None, cross_mask, True, positions, relpos)
        return layers.constrain(_norm(cfg, "final_norm")(y), _ACT)


class T5EncoderDecoder(nn.Module):
    """T5 1.1 encoder-decoder: (encoder tokens [B, Le], decoder input tokens [B, Ld]) -> logits [B, Ld, V].

    `__call__(..., decode=True)` decodes step by step over the KV cache (module docstring); `encode` and
    `decode` are its two halves.
    """

    config: T5Config

    def setup(self):
        cfg = self.config
        self.shared = layers.Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype, cfg.params_dtype,
                                   nn.initializers.normal(stddev=1.0))
        self.encoder = T5Encoder(cfg)
        self.decoder = T5Decoder(cfg)
        self.lm_head = layers.DenseGeneral((cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",),
                                           cfg.compute_dtype, cfg.params_dtype)

    def encode(self, encoder_input_tokens: jax.Array, encoder_segment_ids: jax.Array | None = None,
               encoder_positions: jax.Array | None = None) -> jax.Array:
        """encoder_input_tokens [B, Le] (0 = padding) -> encoded [B, Le, D].

        encoder_segment_ids / encoder_positions [B, Le] describe packed rows; segment ids, when given,
        replace the token-id padding mask.
        """
        length = encoder_input_tokens.shape[1]
        if encoder_segment_ids is None:
            mask = attention.make_attention_mask(None, _not_padding(encoder_input_tokens), query_length=length,
                                              key_length=length, causal=False)
        else:
            mask = attention.make_attention_mask(encoder_segment_ids, encoder_segment_ids, query_length=length,
                                              key_length=length, causal=False)
        x = layers.constrain(self.shared(encoder_input_tokens), _ACT)
        return self.encoder(x, mask, encoder_positions)

    def decode(self, encoded: jax.Array | None, encoder_input_tokens: jax.Array | None,
               decoder_input_tokens: jax.Array, encoder_segment_ids: jax.Array | None = None,
               decoder_segment_ids: jax.Array | None = None, decoder_positions: jax.Array | None = None, *,
               decode: bool = False, decoder_lengths: jax.Array | None = None) -> jax.Array:
        """encoded [B, Le, D] and decoder_input_tokens [B, Ld] -> logits [B, Ld, V].

        encoder_input_tokens [B, Le] give the padding mask of the cross-attention keys; with both
        segment ids given, cross-attention instead pairs equal nonzero segments. The decoder
        self-attention is causal (over `decoder_positions` when packed) within each segment.

        `decode=True` extends the KV cache (module docstring): the prefill passes `encoded` and
        `encoder_input_tokens`, later steps None for both; `decoder_lengths` [B] counts the real tokens
        of each right-padded row of decoder_input_tokens. Packing is not supported there.
        """
        if decode:
            if encoder_segment_ids is not None or decoder_segment_ids is not None or decoder_positions is not None:
                raise ValueError("T5EncoderDecoder.decode(decode=True) takes no segment ids or positions")
            if encoded is not None and encoder_input_tokens is None:
                raise ValueError("T5EncoderDecoder.decode(decode=True): encoded needs encoder_input_tokens")
            valid = None if encoded is None else _not_padding(encoder_input_tokens)
            y = layers.constrain(self.shared(decoder_input_tokens), _ACT)
            y = self.decoder(y, encoded, None, None, None, decode=True, lengths=decoder_lengths, encoder_valid=valid)
            return layers.constrain(self.lm_head(y), ("batch", "length", "act_vocab"))
        enc_len, dec_len = encoder_input_tokens.shape[1], decoder_input_tokens.shape[1]
        packed = decoder_segment_ids is not None
        self_mask = attention.make_attention_mask(
            decoder_segment_ids, decoder_segment_ids, query_length=dec_len, key_length=dec_len, causal=True,
            query_positions=decoder_positions if packed else None,
            key_positions=decoder_positions if packed else None)
        if packed and encoder_segment_ids is not None:
            cross_mask = attention.make_attention_mask(decoder_segment_ids, encoder_segment_ids, query_length=dec_len,
                                                    key_length=enc_len, causal=False)
        else:
            cross_mask = attention.make_attention_mask(None, _not_padding(encoder_input_tokens), query_length=dec_len,
                                                    key_length=enc_len, causal=False)
        y = layers.constrain(self.shared(decoder_input_tokens), _ACT)
        y = self.decoder(y, encoded, self_mask, cross_mask, decoder_positions)
        return layers.constrain(self.lm_head(y), ("batch", "length", "act_vocab"))

    def __call__(self, encoder_input_tokens: jax.Array | None, decoder_input_tokens: jax.Array,
                 encoder_segment_ids: jax.Array | None = None, decoder_segment_ids: jax.Array | None = None,
                 encoder_positions: jax.Array | None = None, decoder_positions: jax.Array | None = None, *,
                 decode: bool = False, decoder_lengths: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits [B, Ld, V] (compute dtype).

        With `decode=True` (module docstring) the prefill passes the encoder tokens [B, Le] (0 =
        padding), later steps None; `decoder_lengths` [B] count the real tokens of each right-padded row
        of decoder_input_tokens.
        """
        if decode:
            if encoder_positions is not None:
                raise ValueError("T5EncoderDecoder(decode=True) takes no encoder_positions: rows are not packed")
            encoded = None if encoder_input_tokens is None else self.encode(encoder_input_tokens)
            return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                               decoder_segment_ids, decoder_positions, decode=True, decoder_lengths=decoder_lengths)
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                           decoder_segment_ids, decoder_positions)


def scale_query_init(params, head_dim: int):
    """Multiplies every q_proj kernel by head_dim**-0.5 (any pytree of params, boxed or not).

    T5 does not scale attention scores; Mesh TensorFlow and Hugging Face instead initialize the query
    projection with std (d_model * d_kv)**-0.5 rather than d_model**-0.5, keeping initial scores O(1).
    `layers.Attention` has one initializer for all four projections, so the model wrapper applies
    this factor after init.
    """
    def scale(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        return leaf * head_dim ** -0.5 if "q_proj" in names else leaf
    return jax.tree_util.tree_map_with_path(scale, params)


def matmul_params_per_token(cfg: T5Config) -> tuple[int, int]:
    """(per encoder token, per decoder token) weights touched by matmuls; the embedding lookup excluded.

    Cross-attention k/v projections run over encoder tokens, so they count per encoder token.
    """
    attn = cfg.d_model * cfg.num_heads * cfg.head_dim  # one projection
    mlp = 3 * cfg.d_model * cfg.mlp_dim
    encoder = cfg.num_encoder_layers * (4 * attn + mlp) + cfg.num_decoder_layers * 2 * attn
    decoder = cfg.num_decoder_layers * (4 * attn + 2 * attn + mlp) + cfg.d_model * cfg.vocab_size
    return encoder, decoder


def training_flops_per_token(cfg: T5Config, encoder_length: int, decoder_length: int) -> float:
    """Model FLOPs per *target* token of a training step (forward + backward = 3x forward).

    Matmuls: 6 * (decoder params per token + Le/Ld * encoder params per token), i.e. the encoder work
    of a row is spread over its Ld targets. Attention scores and values (QK^T and AV, 2 FLOPs per
    multiply-add each) over H * Dh features, forward per layer: encoder self-attention 4 * Le per
    encoder token (bidirectional), decoder self-attention 2 * Ld per target (causal half),
    cross-attention 4 * Le per target; times 3 for training.
    """
    enc_params, dec_params = matmul_params_per_token(cfg)
    ratio = encoder_length / decoder_length
    width = cfg.num_heads * cfg.head_dim
    attn = (ratio * cfg.num_encoder_layers * 4 * encoder_length * width
            + cfg.num_decoder_layers * (2 * decoder_length + 4 * encoder_length) * width)
    return 6.0 * (dec_params + ratio * enc_params) + 3.0 * attn
