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

from lmops_jax import checkpoints, partitioning
from lmops_jax.models import attention, paged_attention

Dtype = Any
Initializer = Callable[..., jax.Array]


# Rematerialization policies (MaxText's names where it has them): what the backward pass keeps of a
# layer's forward instead of recomputing it. 'full' keeps nothing (least memory, one more forward).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls' outputs
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # every matmul's output, attention's too
    "save_everything": jax.checkpoint_policies.everything_saveable,
}


def check_remat_policy(policy: str, owner: str) -> None:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"{owner}: remat_policy={policy!r} is not one of {', '.join(REMAT_POLICIES)}")


def maybe_remat(layer_cls: type, remat: bool, policy: str) -> type:
    """`layer_cls` wrapped in `nn.remat` with the named policy when `remat`, else as it is."""
    return nn.remat(layer_cls, policy=REMAT_POLICIES[policy]) if remat else layer_cls


# A model that scans its layers (`nn.scan`) holds them in one scope, SCANNED_SCOPE, with every param
# stacked along a leading axis whose logical name is SCANNED_AXIS (replicated by every rule preset).
# Checkpoints hold them per layer, as an unscanned model names them (`checkpoints.per_layer`).
SCANNED_SCOPE = checkpoints.STACKED_LAYERS
SCANNED_AXIS = "layers"


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
        return contract_trailing(jnp.asarray(x, self.dtype), jnp.asarray(self.embedding, self.dtype), (1,))


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
        return contract_trailing(jnp.asarray(x, self.dtype), kernel, tuple(range(n_in)))


def contract_trailing(x: jax.Array, kernel: jax.Array, kernel_dims: tuple[int, ...]) -> jax.Array:
    """x [*batch, *in] contracted with `kernel`'s dims `kernel_dims` (sizes `in`) -> [*batch, *kernel's others].

    The batch dims are merged into one first, so that the weight gradient contracts a single dim of the
    activations ([N, in] with [N, out]), which XLA:CPU multiplies where they lie; contracting [B, L] it first
    copies the output's gradient transposed (32 MiB for the bench config's logits; docs/benchmarks.md).
    """
    n_in = len(kernel_dims)
    batch_shape = x.shape[:x.ndim - n_in]
    rows = x.reshape((int(np.prod(batch_shape)),) + x.shape[x.ndim - n_in:])
    y = jax.lax.dot_general(rows, kernel, ((tuple(range(1, n_in + 1)), kernel_dims), ((), ())))
    return y.reshape(batch_shape + y.shape[1:])


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
    # Full-width [B, L, 1, Dh] tables and x * cos + rotate_half(x) * sin: XLA:CPU then computes cos and sin
    # once per position, not once per element of x inside the concatenate (5x faster forward + backward).
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = x32 * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return out.astype(x.dtype)


KV_CACHE_AXES = ("batch", "act_kv_heads", None, None)  # logical axes of a [B, K, Dh, S] key/value cache
def zeros_with_axes(axes: Sequence[str | None]) -> Callable[[Sequence[int], Dtype], Any]:
    """An initializer (shape, dtype) -> zeros boxed with logical `axes`: how cache variables are created."""
    return nn.with_logical_partitioning(jnp.zeros, tuple(axes))


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional rotary embeddings, no biases.

    Self-attention when `inputs_kv is None`. Projections: q [D, H, Dh], k/v [D, K, Dh], o [H, Dh, D], the
    Hugging Face head split (output feature h * Dh + d) after a transpose and reshape.

    KV-cache decoding (`decode=True`) keeps keys and values in the flax `cache` collection (apply with
    `mutable=["cache"]`), laid out [B, K, Dh, S] (see `dot_product_attention`) with logical axes
    `KV_CACHE_AXES` (boxed when the cache is created, so it can be sharded like the params):

    - self-attention: `cached_key` / `cached_value` (keys after rotary embedding). Each call writes
      its L new keys/values at the absolute positions `query_positions` [B, L] (per example, so ragged
      batches decode in lock step) and attends over all S slots with the mask key_position <=
      query_position. Slots past an example's last written position are never visible; a
      right-padded prefill writes its padding there, and the following steps overwrite it before it
      could be seen. Positions must be < S. The first call (at `init`) creates the cache with S = L.
      A call with L > 1 (a prefill or its chunk) goes through `jax.nn.dot_product_attention` where
      `attention.fused_attention()` says so (GPU, TPU), over the cache viewed [B, S, K, Dh]; otherwise,
      and for every one-token step, attention reads the filled part of the cache
      (`attention.filled_cache_attention`).
      `bias_fn(query_positions [B, L], key_positions [1, S]) -> [B|1, H, L, S]` gives a position bias
      over the cache (T5); `bias` is not used in this mode.
    - paged self-attention (`block_table` [B, T] given): keys/values live in `key_pages` /
      `value_pages` [K, pages, page_size, Dh] shared by all rows, row b's position p in page
      block_table[b, p // page_size] (`models.paged_attention`); created at `init` from `pages`.
    - without `decode`, `causal=True` says that `mask` is a causal self-attention mask
      (`attention.make_attention_mask(causal=True)`), which lets CPU attention skip the keys past each
      block of queries (`attention.dot_product_attention`); ignored for cross-attention and decoding.
    - cross-attention (`cross_attention=True`): with `inputs_kv` [B, Le, D] the projected keys and
      values are computed once and stored in `cached_key` / `cached_value` [B, K, Dh, Le]; with
      `inputs_kv=None` the stored ones are used. `mask` is the caller's cross mask.
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
        decode: bool = False,
        cross_attention: bool = False,
        bias_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
        block_table: jax.Array | None = None,
        pages: paged_attention.KVPages | None = None,
        causal: bool = False,
    ) -> jax.Array:
        d_model = inputs_q.shape[-1]
        dense = lambda out_shape, out_axes, name: DenseGeneral(  # noqa: E731
            (d_model,), out_shape, ("embed",), out_axes, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, name=name)
        q_proj = dense((self.num_heads, self.head_dim), ("heads", "head_dim"), "q_proj")
        k_proj = dense((self.num_kv_heads, self.head_dim), ("kv_heads", "head_dim"), "k_proj")
        v_proj = dense((self.num_kv_heads, self.head_dim), ("kv_heads", "head_dim"), "v_proj")
        q = constrain(q_proj(inputs_q), ("batch", "length", "act_heads", None))
        kv_axes = ("batch", "length", "act_kv_heads", None)
        if decode and cross_attention:
            k, v = self._cross_kv(inputs_kv, k_proj, v_proj)
            out = attention.dot_product_attention(q, k, v, mask, bias, self.scale, kv_layout="bkds")
        elif decode:
            if inputs_kv is not None:
                raise ValueError("Attention(decode=True): self-attention takes no inputs_kv; pass "
                                 "cross_attention=True for cached cross-attention")
            if query_positions is None:
                raise ValueError("Attention(decode=True) needs query_positions [B, L]: where the new keys go")
            k = constrain(k_proj(inputs_q), kv_axes)
            v = constrain(v_proj(inputs_q), kv_axes)
            if self.use_rope:
                q = rotary_embedding(q, query_positions, self.rope_theta)
                k = rotary_embedding(k, query_positions, self.rope_theta)
            if block_table is None:
                k, v, mask, bias = self._update_cache(k, v, query_positions, mask, bias_fn)
                if q.shape[1] > 1 and attention.fused_attention():  # a prefill (chunk) on GPU / TPU
                    out = attention.dot_product_attention(q, k.transpose(0, 3, 1, 2), v.transpose(0, 3, 1, 2), mask,
                                                          bias, self.scale)
                else:
                    out = attention.filled_cache_attention(q, k, v, mask, bias, self.scale,
                                                           jnp.max(query_positions) + 1)
            else:
                out = self._paged(q, k, v, query_positions, block_table, pages, mask, bias_fn)
        else:
            causal = causal and inputs_kv is None  # only a self-attention mask is causal
            inputs_kv = inputs_q if inputs_kv is None else inputs_kv
            k = constrain(k_proj(inputs_kv), kv_axes)
            v = constrain(v_proj(inputs_kv), kv_axes)
            if self.use_rope:
                if query_positions is None:
                    query_positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
                if key_positions is None:
                    key_positions = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])
                q = rotary_embedding(q, query_positions, self.rope_theta)
                k = rotary_embedding(k, key_positions, self.rope_theta)
            out = attention.dot_product_attention(q, k, v, mask, bias, self.scale, causal=causal)
        out = constrain(out, ("batch", "length", "act_heads", None))
        return DenseGeneral(
            (self.num_heads, self.head_dim), (d_model,), ("heads", "head_dim"), ("embed",), dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=self.kernel_init, name="o_proj")(out)

    def _update_cache(self, k, v, positions, mask, bias_fn):
        """Writes k/v [B, L, K, Dh] at positions [B, L]; returns the cache's (k, v, mask, bias)."""
        batch, length, num_kv, head_dim = k.shape
        shape = (batch, num_kv, head_dim, length)  # at init, L is the cache length
        cached_key = self.variable("cache", "cached_key", zeros_with_axes(KV_CACHE_AXES), shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", zeros_with_axes(KV_CACHE_AXES), shape, v.dtype)
        positions = positions.astype(jnp.int32)
        rows = jnp.arange(batch)[:, None, None]
        heads = jnp.arange(num_kv)[None, None, :]
        # Indices [B, L, K] of [Dh] vectors each, so the updates are k as it is; one index per head keeps
        # XLA from turning a batch-1 write into a dynamic-update-slice, which it then copies the cache for.
        cached_key.value = cached_key.value.at[rows, heads, :, positions[:, :, None]].set(
            k.astype(cached_key.value.dtype), mode="drop")
        cached_value.value = cached_value.value.at[rows, heads, :, positions[:, :, None]].set(
            v.astype(cached_value.value.dtype), mode="drop")
        mask, bias = attention.decode_mask_and_bias(positions, cached_key.value.shape[3], mask, bias_fn)
        return constrain(cached_key.value, KV_CACHE_AXES), constrain(cached_value.value, KV_CACHE_AXES), mask, bias

    def _paged(self, q, k, v, positions, block_table, pages, mask, bias_fn):
        """Writes k/v [B, L, K, Dh] into the paged pools at positions [B, L] and attends over each row's
        pages (a Pallas kernel for one-token steps where `paged_attention.kernel_choice` says so)."""
        if pages is None and not self.has_variable("cache", "key_pages"):
            raise ValueError("Attention: a paged cache is created by the first (init) call, which needs pages=KVPages")
        shape = None if pages is None else (k.shape[2], pages.num_pages, pages.page_size, k.shape[3])
        init = zeros_with_axes(paged_attention.KV_PAGES_AXES)
        key_pages = self.variable("cache", "key_pages", init, shape, k.dtype)
        value_pages = self.variable("cache", "value_pages", init, shape, v.dtype)
        positions = positions.astype(jnp.int32)
        key_pages.value = paged_attention.write(key_pages.value, k, block_table, positions)
        value_pages.value = paged_attention.write(value_pages.value, v, block_table, positions)
        kernel = paged_attention.kernel_choice()
        if q.shape[1] == 1 and mask is None and bias_fn is None and kernel != "jnp":
            return paged_attention.decode_attention_kernel(
                q, key_pages.value, value_pages.value, block_table, positions[:, 0] + 1,
                self.scale or q.shape[-1] ** -0.5, interpret=kernel == "pallas_interpret")
        axes = ("act_kv_heads", "batch", None, None)
        keys = constrain(paged_attention.gather(key_pages.value, block_table), axes)
        values = constrain(paged_attention.gather(value_pages.value, block_table), axes)
        mask, bias = attention.decode_mask_and_bias(positions, keys.shape[2], mask, bias_fn)
        return attention.dot_product_attention(q, keys, values, mask, bias, self.scale, kv_layout="kbsd")

    def _cross_kv(self, inputs_kv, k_proj, v_proj):
        """Cross-attention keys/values: projected from inputs_kv and cached, or read from the cache."""
        if inputs_kv is None:
            if not self.has_variable("cache", "cached_key"):
                raise ValueError("Attention(decode=True, cross_attention=True): no cached keys yet; the first "
                                 "(prefill) call must pass the encoder outputs as inputs_kv")
            cached_key = self.variable("cache", "cached_key")
            cached_value = self.variable("cache", "cached_value")
            return cached_key.value, cached_value.value
        k = constrain(jnp.transpose(k_proj(inputs_kv), (0, 2, 3, 1)), KV_CACHE_AXES)  # [B, K, Dh, Le]
        v = constrain(jnp.transpose(v_proj(inputs_kv), (0, 2, 3, 1)), KV_CACHE_AXES)
        cached_key = self.variable("cache", "cached_key", zeros_with_axes(KV_CACHE_AXES), k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", zeros_with_axes(KV_CACHE_AXES), v.shape, v.dtype)
        cached_key.value, cached_value.value = k, v
        return k, v


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
