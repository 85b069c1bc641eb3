"""Transformer building blocks shared by the decoder-only and encoder-decoder models.

Every parameter is created through `nn.with_logical_partitioning`, so it carries logical axis names
(`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`, `norm`, `relpos_buckets`) that
`lmops_jax.partitioning` maps onto mesh axes. Activations are annotated with `constrain`, whose logical
names (`batch`, `length`, `act_embed`, `act_mlp`, `act_heads`, `act_kv_heads`, `act_vocab`) are distinct
from parameter names so that FSDP can shard weights over `fsdp` without sharding activations' features.

Shape legend: B batch, L query length, S key length, D d_model, H heads, K kv heads, Dh head dim,
F mlp width, V vocab.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmops_jax import partitioning

Dtype = Any
Initializer = Callable[..., jax.Array]


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh + rules context)."""
    return partitioning.constrain_logical(x, tuple(logical_axes))


def param_with_axes(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    dtype: Dtype,
    axes: Sequence[str | None],
) -> jax.Array:
    """Creates a parameter whose metadata names its logical axes (one name per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name!r}: {len(axes)} logical axes {axes} for shape {shape}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm as in Llama and T5: x * rsqrt(mean(x^2) + eps) * scale.

    Computed in float32 and cast back to the compute dtype before the scale is applied, which is the
    Hugging Face Llama order of operations (so imported weights give the same numbers).
    """

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (features,), self.param_dtype, ("norm",))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return jnp.asarray(scale, self.dtype) * y.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` gives tied-unembedding logits [..., V]."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = param_with_axes(
            self, "embedding", self.embedding_init, (self.num_embeddings, self.features), self.param_dtype,
            ("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x, jnp.asarray(self.embedding, self.dtype))


class DenseGeneral(nn.Module):
    """A bias-free linear map contracting the trailing `len(in_shape)` input dims into `out_shape` dims.

    The kernel has shape `in_shape + out_shape` and logical axes `in_axes + out_axes`; fan-in for the
    initializer is the product of `in_shape`.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        fan_in = int(np.prod(self.in_shape))
        fan_out = int(np.prod(self.out_shape))

        def init(key, shape, dtype):
            flat = self.kernel_init(key, (fan_in, fan_out), dtype)
            return flat.reshape(shape)

        kernel = param_with_axes(
            self, "kernel", init, self.in_shape + self.out_shape, self.param_dtype, self.in_axes + self.out_axes)
        kernel = jnp.asarray(kernel, self.dtype)
        x = jnp.asarray(x, self.dtype)
        batch_dims = x.ndim - n_in
        contract = (tuple(range(batch_dims, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, kernel, (contract, ((), ())))


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Applies rotary position embedding in the "rotate half" convention of Hugging Face Llama.

    x: [B, L, N, Dh]; positions: [B, L] integer positions. The head dim is split into two halves
    (x1, x2) rotated as (x1 cos - x2 sin, x2 cos + x1 sin) with frequency theta^(-2i/Dh).
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def make_attention_mask(
    query_segment_ids: jax.Array | None,
    key_segment_ids: jax.Array | None,
    *,
    query_length: int,
    key_length: int,
    causal: bool,
    query_positions: jax.Array | None = None,
    key_positions: jax.Array | None = None,
) -> jax.Array | None:
    """Boolean mask [B or 1, 1, L, S]: True where a query may attend to a key.

    Segment ids (0 = padding) keep packed sequences apart; `causal` uses positions when given (packed
    decoding), else array indices.
    """
    mask = None
    if causal:
        if query_positions is not None and key_positions is not None:
            mask = query_positions[:, :, None] >= key_positions[:, None, :]
        else:
            q_idx = jnp.arange(query_length)[:, None] + (key_length - query_length)
            mask = (q_idx >= jnp.arange(key_length)[None, :])[None]
    if query_segment_ids is not None and key_segment_ids is not None:
        seg = (query_segment_ids[:, :, None] == key_segment_ids[:, None, :]) & (key_segment_ids[:, None, :] > 0)
        mask = seg if mask is None else mask & seg
    elif key_segment_ids is not None:
        seg = (key_segment_ids > 0)[:, None, :]
        mask = seg if mask is None else mask & seg
    return None if mask is None else mask[:, None, :, :]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Grouped-query attention. query [B, L, H, Dh], key/value [B, S, K, Dh] with H % K == 0.

    Scores and softmax in float32. mask: bool [B|1, 1, L, S]; bias: [B|1, H, L, S]. Returns [B, L, H, Dh].
    """
    b, q_len, num_heads, head_dim = query.shape
    num_kv = key.shape[2]
    if num_heads % num_kv:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv}")
    groups = num_heads // num_kv
    if scale is None:
        scale = head_dim ** -0.5
    q = query.reshape(b, q_len, num_kv, groups, head_dim)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, key, preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(b, num_heads, q_len, key.shape[1])
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    probs = probs.reshape(b, num_kv, groups, q_len, key.shape[1])
    out = jnp.einsum("bkgls,bskd->blkgd", probs, value)
    return out.reshape(b, q_len, num_heads, head_dim)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional rotary embeddings, no biases.

    Self-attention when `inputs_kv is None`. Projections: q [D, H, Dh], k/v [D, K, Dh], o [H, Dh, D], the
    Hugging Face head split (output feature h * Dh + d) after a transpose and reshape.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_rope: bool = True
    rope_theta: float = 10000.0
    scale: float | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        query_positions: jax.Array | None = None,
        key_positions: jax.Array | None = None,
    ) -> jax.Array:
        d_model = inputs_q.shape[-1]
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        dense = lambda out_shape, out_axes, name: DenseGeneral(  # noqa: E731
            (d_model,), out_shape, ("embed",), out_axes, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, name=name)
        q = dense((self.num_heads, self.head_dim), ("heads", "head_dim"), "q_proj")(inputs_q)
        k = dense((self.num_kv_heads, self.head_dim), ("kv_heads", "head_dim"), "k_proj")(inputs_kv)
        v = dense((self.num_kv_heads, self.head_dim), ("kv_heads", "head_dim"), "v_proj")(inputs_kv)
        q = constrain(q, ("batch", "length", "act_heads", None))
        k = constrain(k, ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        if self.use_rope:
            if query_positions is None:
                query_positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
            if key_positions is None:
                key_positions = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])
            q = rotary_embedding(q, query_positions, self.rope_theta)
            k = rotary_embedding(k, key_positions, self.rope_theta)
        out = dot_product_attention(q, k, v, mask, bias, self.scale)
        out = constrain(out, ("batch", "length", "act_heads", None))
        return DenseGeneral(
            (self.num_heads, self.head_dim), (d_model,), ("heads", "head_dim"), ("embed",), dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=self.kernel_init, name="o_proj")(out)


class GatedMLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)). SwiGLU for Llama (silu), gated-GELU for T5 1.1."""

    hidden_dim: int
    activation: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_model = x.shape[-1]
        act = {"silu": nn.silu, "gelu_tanh": lambda y: nn.gelu(y, approximate=True),
               "gelu": lambda y: nn.gelu(y, approximate=False)}[self.activation]
        dense = lambda i, o, ia, oa, name: DenseGeneral(  # noqa: E731
            (i,), (o,), (ia,), (oa,), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, name=name)
        gate = dense(d_model, self.hidden_dim, "embed", "mlp", "gate_proj")(x)
        up = dense(d_model, self.hidden_dim, "embed", "mlp", "up_proj")(x)
        h = constrain(act(gate) * up, ("batch", "length", "act_mlp"))
        return dense(self.hidden_dim, d_model, "mlp", "embed", "down_proj")(h)


def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128,
) -> jax.Array:
    """T5 relative-position buckets, numerically identical to Hugging Face `T5Attention._relative_position_bucket`.

    relative_position = key_position - query_position (any integer shape). Bidirectional (encoder):
    half of the buckets for keys after the query, half for keys at or before it. Causal (decoder):
    positive offsets (future keys) all fall in bucket 0. Within each half, offsets below
    `max_exact = half // 2` get their own bucket; larger ones share log-spaced buckets up to
    `max_distance`, beyond which they all land in the last bucket. The log is taken in float32 in the
    same operation order as Hugging Face, so the buckets agree at the exact-boundary offsets too.
    Returns int32 buckets in [0, num_buckets) of the input's shape.
    """
    rel = jnp.asarray(relative_position).astype(jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    # Offsets below max_exact take the exact branch; the floor of 1 only keeps log() finite there.
    scaled = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact) / float(np.log(max_distance / max_exact))
    large = max_exact + (scaled * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(rel < max_exact, rel, large)


class RelativePositionBias(nn.Module):
    """T5 relative attention bias: a learned scalar per (bucket, head), `rel_embedding` [num_buckets, H].

    Called with query positions [B|1, L] and key positions [B|1, S]; returns the bias [B|1, H, L, S]
    (compute dtype) that is added to the attention scores.
    """

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        table = param_with_axes(
            self, "rel_embedding", self.embedding_init, (self.num_buckets, self.num_heads), self.param_dtype,
            ("relpos_buckets", "heads"))
        relative = key_positions[:, None, :] - query_positions[:, :, None]  # [B|1, L, S]
        buckets = relative_position_bucket(
            relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
            max_distance=self.max_distance)
        values = jnp.take(jnp.asarray(table, self.dtype), buckets, axis=0)  # [B|1, L, S, H]
        return jnp.transpose(values, (0, 3, 1, 2))
