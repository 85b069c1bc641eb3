"""Attention as pure functions: masks, grouped-query dot-product attention over the training and cache
layouts (with `jax.nn.dot_product_attention` dispatch on accelerators), and attention over the filled part
of a dense KV cache. `layers.Attention` holds the projections and the cache variables around them.

Shape legend: B batch, L query length, S key length, H heads, K kv heads, Dh head dim.
"""
from __future__ import annotations

import math
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

    Segment ids (0 = padding) keep packed sequences apart. `causal` hides every key past the query's
    array index (the last query is aligned with the last key), and with positions (packed rows) also every
    key at a later position; so a causal mask never shows a query a later key, which
    `dot_product_attention(causal=True)` relies on.
    """
    mask = None
    if causal:
        q_idx = jnp.arange(query_length)[:, None] + (key_length - query_length)
        mask = (q_idx >= jnp.arange(key_length)[None, :])[None]
        if query_positions is not None and key_positions is not None:
            mask = mask & (query_positions[:, :, None] >= key_positions[:, None, :])
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


# Causal self-attention without a fused kernel (CPU) runs in up to CAUSAL_QUERY_BLOCKS blocks of at least
# MIN_QUERY_BLOCK queries, each over the keys up to its last query: 3/4 of the full square's work. On the CPU
# training bench 2 blocks took 1-4% more step time than 4 and 50-90 MiB less peak memory (docs/benchmarks.md).
CAUSAL_QUERY_BLOCKS = 2
MIN_QUERY_BLOCK = 32


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    *,
    kv_layout: str = "bskd",
    causal: bool = False,
) -> jax.Array:
    """Grouped-query attention. query [B, L, H, Dh]; key/value [B, S, K, Dh] (`kv_layout="bskd"`, training),
    [B, K, Dh, S] (`"bkds"`, the KV cache) or [K, B, S, Dh] (`"kbsd"`, read from a paged cache), with H % K == 0.

    Scores and softmax in float32. mask: bool [B|1, 1|H, L, S]; bias: [B|1, H, L, S]. Returns [B, L, H, Dh].
    The operand order and layout of each product are part of its speed on XLA:CPU: training keys and values
    are moved to [B, K, S, Dh] and queries to [B, K, G, L, Dh] first (on the training bench's shapes the
    forward + backward runs 1.6x faster than contracting them where they lie; docs/benchmarks.md); the cache
    layouts are multiplied where they lie, the cache operand first ([K, Dh, S] is what XLA:CPU's batched
    matmul takes, so no decoding step transposes a cache).

    `causal=True` (training layout, L == S, a mask given): the caller's mask hides every key past its query's
    index (`make_attention_mask(causal=True)` guarantees it), so without a fused kernel the queries run in
    blocks that leave out the keys past each block's last query: the same result, less work.
    """
    if kv_layout not in ("bskd", "bkds", "kbsd"):
        raise ValueError(f"kv_layout must be 'bskd', 'bkds' or 'kbsd', got {kv_layout!r}")
    b, q_len, num_heads, head_dim = query.shape
    num_kv, key_len = key.shape[kv_layout.index("k")], key.shape[kv_layout.index("s")]
    if num_heads % num_kv:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv}")
    if causal and (kv_layout != "bskd" or q_len != key_len or mask is None):
        raise ValueError("dot_product_attention(causal=True) is for self-attention in the training layout "
                         f"with its causal mask; got kv_layout={kv_layout!r}, {q_len} queries, {key_len} keys, "
                         f"mask {'given' if mask is not None else 'None'}")
    groups = num_heads // num_kv
    if scale is None:
        scale = head_dim ** -0.5
    if kv_layout == "bskd" and fused_attention():
        return jax.nn.dot_product_attention(query, key, value, bias, mask, scale=scale)
    # A power-of-two scale goes on the queries (L x Dh values, exactly) rather than on the scores (L x S):
    # XLA:CPU materializes the broadcast scalar that multiplies a matmul's output. Other scales stay on the
    # float32 scores, where they round no low-precision value.
    on_queries = math.frexp(scale)[0] == 0.5
    if on_queries and scale != 1.0:
        query = query * jnp.asarray(scale, query.dtype)
    score_scale = 1.0 if on_queries else scale
    q = query.reshape(b, q_len, num_kv, groups, head_dim)
    if kv_layout != "bskd":
        scores = jnp.einsum(f"{kv_layout},blkgd->bkgls", key, q, preferred_element_type=jnp.float32)
        probs = _softmax(scores, mask, bias, score_scale).astype(value.dtype)
        out = jnp.einsum(f"bkgls,{kv_layout}->blkgd", probs, value)
        return out.reshape(b, q_len, num_heads, head_dim)
    out = _training_layout_attention(q.transpose(0, 2, 3, 1, 4), key.transpose(0, 2, 1, 3),
                                     value.transpose(0, 2, 1, 3), mask, bias, score_scale, causal)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, q_len, num_heads, head_dim)


def _training_layout_attention(q: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
                               bias: jax.Array | None, scale: float, causal: bool) -> jax.Array:
    """q [B, K, G, L, Dh], key/value [B, K, S, Dh] -> [B, K, G, L, Dh]; with `causal`, in query blocks over
    the keys up to each block's last query (`dot_product_attention`)."""
    q_len, key_len = q.shape[3], key.shape[2]
    blocks = max(1, min(CAUSAL_QUERY_BLOCKS, q_len // MIN_QUERY_BLOCK)) if causal else 1
    size = -(-q_len // blocks)
    outs = []
    for start in range(0, q_len, size):
        end = min(start + size, q_len)
        keys_to = end if causal else key_len
        cut = lambda x: None if x is None else x[..., start:end, :keys_to] if x.shape[-2] > 1 \
            else x[..., :keys_to]  # noqa: E731  (a mask or bias may broadcast over the queries)
        scores = jnp.einsum("bkgld,bksd->bkgls", q[:, :, :, start:end], key[:, :, :keys_to],
                            preferred_element_type=jnp.float32)
        probs = _softmax(scores, cut(mask), cut(bias), scale).astype(value.dtype)
        outs.append(jnp.einsum("bkgls,bksd->bkgld", probs, value[:, :, :keys_to]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)


def _softmax(scores: jax.Array, mask: jax.Array | None, bias: jax.Array | None, scale: float) -> jax.Array:
    """softmax(scores * scale + bias) over the keys where `mask`, in float32: scores [B, K, G, L, S],
    mask [B|1, 1|H, L, S], bias [B|1, H, L, S] (H = K * G)."""
    b, num_kv, groups, q_len, key_len = scores.shape
    scores = scores.reshape(b, num_kv * groups, q_len, key_len)
    if scale != 1.0:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).reshape(b, num_kv, groups, q_len, key_len)


# A dense cache is read up to its filled length rounded up to S / FILLED_CACHE_CHUNKS positions. Cutting
# copies the kept positions (XLA:CPU materializes the slice before the matmul), so the cut reads and
# writes them once more: past S / FILLED_CACHE_MAX_CUT_FRACTION kept positions, reading the whole cache
# with the unfilled positions masked moves fewer bytes, and that branch reads it uncut.
FILLED_CACHE_CHUNKS = 8
FILLED_CACHE_MAX_CUT_FRACTION = 3


def filled_cache_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
                           bias: jax.Array | None, scale: float | None, filled: jax.Array,
                           chunks: int = FILLED_CACHE_CHUNKS) -> jax.Array:
    """`dot_product_attention` over a [B, K, Dh, S] cache that reads only its first `filled` positions
    (int32 scalar: the batch's largest query position + 1), rounded up to a multiple of ceil(S / chunks).

    Decoding streams every layer's whole cache at every step; a cache allocated for the longest request
    is mostly empty for most of the steps, and the positions past `filled` are masked for every row, so
    leaving them out changes no result. Shapes must be static under jit, so a `lax.switch` picks one of
    `chunks` static lengths (each compiled once); a length past S / FILLED_CACHE_MAX_CUT_FRACTION reads
    the whole cache instead (see there). mask [B|1, 1|H, L, S], bias [B|1, H, L, S] as for
    `dot_product_attention`; returns [B, L, H, Dh].
    """
    cache_length = key.shape[-1]
    step = -(-cache_length // chunks)
    # Chunk i needs step * (i + 1) positions; the cuts short enough come first, then the whole cache.
    lengths = sorted({n if n * FILLED_CACHE_MAX_CUT_FRACTION <= cache_length else cache_length
                      for n in (min(cache_length, step * (i + 1)) for i in range(chunks))})

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
