"""Attention as pure functions: masks, grouped-query dot-product attention over the training and cache
layouts (with `jax.nn.dot_product_attention` dispatch on accelerators), and attention over the filled part
of a dense KV cache. `layers.Attention` holds the projections and the cache variables around them.

Shape legend: B batch, L query length, S key length, H heads, K kv heads, Dh head dim.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp


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


ATTENTION_ENV = "LMOPS_JAX_ATTENTION"


def fused_attention() -> bool:
    """Whether training / prefill attention ([B, S, K, Dh] keys) goes through `jax.nn.dot_product_attention`,
    which picks cuDNN's fused flash kernel on GPUs where it applies (XLA's fusion elsewhere). Default: on
    GPU and TPU; on CPU the einsums below are faster. `LMOPS_JAX_ATTENTION=jax_nn` / `einsum` forces one."""
    choice = os.environ.get(ATTENTION_ENV, "auto")
    if choice not in ("auto", "jax_nn", "einsum"):
        raise ValueError(f"{ATTENTION_ENV}={choice!r}: expected auto, jax_nn or einsum")
    return choice == "jax_nn" or (choice == "auto" and jax.default_backend() in ("gpu", "tpu"))


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    *,
    kv_layout: str = "bskd",
) -> jax.Array:
    """Grouped-query attention. query [B, L, H, Dh]; key/value [B, S, K, Dh] (`kv_layout="bskd"`, training),
    [B, K, Dh, S] (`"bkds"`, the KV cache) or [K, B, S, Dh] (`"kbsd"`, read from a paged cache), with H % K == 0.

    Scores and softmax in float32. mask: bool [B|1, 1|H, L, S]; bias: [B|1, H, L, S]. Returns [B, L, H, Dh].
    [K, Dh, S] is the operand layout XLA:CPU's batched matmul takes for both products (scores and
    values), so the cache is multiplied where it lies, the cache operand first: with [B, S, K, Dh] XLA
    would transpose the whole cache of every layer at every decoding step. The operand order of each
    einsum is part of its speed (it decides which operand XLA transposes), so each layout keeps its own.
    """
    if kv_layout not in ("bskd", "bkds", "kbsd"):
        raise ValueError(f"kv_layout must be 'bskd', 'bkds' or 'kbsd', got {kv_layout!r}")
    b, q_len, num_heads, head_dim = query.shape
    num_kv, key_len = key.shape[kv_layout.index("k")], key.shape[kv_layout.index("s")]
    if num_heads % num_kv:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv}")
    groups = num_heads // num_kv
    if scale is None:
        scale = head_dim ** -0.5
    if kv_layout == "bskd" and fused_attention():
        return jax.nn.dot_product_attention(query, key, value, bias, mask, scale=scale)
    q = query.reshape(b, q_len, num_kv, groups, head_dim)
    if kv_layout == "bskd":
        scores = jnp.einsum("blkgd,bskd->bkgls", q, key, preferred_element_type=jnp.float32)
    else:
        scores = jnp.einsum(f"{kv_layout},blkgd->bkgls", key, q, preferred_element_type=jnp.float32)
    scores = (scores * scale).reshape(b, num_heads, q_len, key_len)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    probs = probs.reshape(b, num_kv, groups, q_len, key_len)
    out = jnp.einsum(f"bkgls,{kv_layout}->blkgd", probs, value)
    return out.reshape(b, q_len, num_heads, head_dim)


# A dense cache is read up to its filled length rounded up to S / FILLED_CACHE_CHUNKS positions.
FILLED_CACHE_CHUNKS = 8


def filled_cache_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
                           bias: jax.Array | None, scale: float | None, filled: jax.Array,
                           chunks: int = FILLED_CACHE_CHUNKS) -> jax.Array:
    """`dot_product_attention` over a [B, K, Dh, S] cache that reads only its first `filled` positions
    (int32 scalar: the batch's largest query position + 1), rounded up to a multiple of ceil(S / chunks).

    Decoding streams every layer's whole cache at every step; a cache allocated for the longest request
    is mostly empty for most of the steps, and the positions past `filled` are masked for every row, so
    leaving them out changes no result. Shapes must be static under jit, so a `lax.switch` picks one of
    `chunks` static lengths (each compiled once). mask [B|1, 1|H, L, S], bias [B|1, H, L, S] as for
    `dot_product_attention`; returns [B, L, H, Dh].
    """
    cache_length = key.shape[-1]
    step = -(-cache_length // chunks)
    lengths = sorted({min(cache_length, step * (i + 1)) for i in range(chunks)})

    def attend(length: int) -> Callable[..., jax.Array]:
        def run(query, key, value, mask, bias):
            cut = lambda x: None if x is None else x[..., :length]  # noqa: E731
            return dot_product_attention(query, cut(key), cut(value), cut(mask), cut(bias), scale, kv_layout="bkds")
        return run

    index = jnp.clip((filled - 1) // step, 0, len(lengths) - 1)
    return jax.lax.switch(index, [attend(n) for n in lengths], query, key, value, mask, bias)


def decode_mask_and_bias(positions: jax.Array, cache_length: int, mask: jax.Array | None,
                          bias_fn: Callable[[jax.Array, jax.Array], jax.Array] | None) -> tuple[Any, Any]:
    """A cache's decode mask [B, 1, L, S] (key_position <= query_position, and `mask`) and bias_fn's bias."""
    key_positions = jnp.arange(cache_length, dtype=jnp.int32)[None, :]
    visible = (key_positions[:, None, :] <= positions[:, :, None])[:, None]
    mask = visible if mask is None else mask & visible
    return mask, None if bias_fn is None else bias_fn(positions, key_positions)
