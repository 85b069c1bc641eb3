"""Paged key/value caches (vLLM's PagedAttention): one pool of fixed-size pages per layer, shared by all
rows, and a block table per row naming the pages that hold its positions.

    pages = KVPages(num_pages=256, page_size=16)
    cache = model.init_cache(batch, max_length, pages=pages)   # the decode API, paged
    # cache["block_table"] int32 [B, ceil(max_length / page_size)]: row b's position p lives in page
    #   block_table[b, p // page_size] at offset p % page_size; entries >= num_pages mean "no page"
    # per layer: key_pages / value_pages [K, num_pages, page_size, Dh]

Who owns which page is the caller's business (the serving engine's block pool): a row may share pages
with other rows (a cached prompt prefix), and rows only ever read pages through their own table.
Writes at positions whose table entry is "no page" are dropped, so a right-padded prefill past a row's
pages, or a row whose table was cleared (a free serving slot), never touches another row's pages.

Attention reads the row's pages back in position order. Portable path: a pure-jnp gather
[K, B, pages_per_row * page_size, Dh] then the usual grouped-query attention with the mask
key_position <= query_position (the same numbers as the dense cache, up to the matmul's summation
order). On GPU, a one-token decode step without a position bias dispatches to the Pallas paged
attention kernel (`jax.experimental.pallas.ops.gpu.paged_attention`), whose page layout
[K, pages, page_size, Dh] is the pool's own, so nothing is copied. `LMOPS_JAX_PAGED_KERNEL` overrides
the choice: `jnp`, `pallas`, or `pallas_interpret` (the kernel interpreted, for tests on CPU); the
default `auto` uses the kernel on a single GPU device. The TPU kernel
(`pallas.ops.tpu.ragged_paged_attention`) needs TPU v4 or newer and a ragged batch format: not wired,
TPUs take the jnp path.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

BLOCK_TABLE = "block_table"  # the cache leaf int32 [B, pages per row]
KV_PAGES_AXES = ("act_kv_heads", None, None, None)  # logical axes of a [K, pages, page_size, Dh] pool
KERNEL_ENV = "LMOPS_JAX_PAGED_KERNEL"


@dataclasses.dataclass(frozen=True)
class KVPages:
    """The shape of a paged cache: `num_pages` pages of `page_size` positions, per layer."""

    num_pages: int
    page_size: int

    def __post_init__(self):
        if self.num_pages < 1 or self.page_size < 1:
            raise ValueError(f"KVPages needs num_pages >= 1 and page_size >= 1, got {self.num_pages}, "
                             f"{self.page_size}")

    def pages_per_row(self, max_length: int) -> int:
        return -(-max_length // self.page_size)


def write(pages: jax.Array, values: jax.Array, block_table: jax.Array, positions: jax.Array) -> jax.Array:
    """pages [K, P, page_size, Dh] with values [B, L, K, Dh] written at positions [B, L] through
    block_table [B, T]; positions without a page (entry >= P, or past the table) are dropped."""
    num_kv, num_pages, page_size, _ = pages.shape
    page = jnp.take_along_axis(block_table, positions // page_size, axis=1, mode="fill", fill_value=num_pages)
    heads = jnp.arange(num_kv)[None, None, :]
    # Indices [B, L, K] (page, offset per head) of [Dh] vectors: the update is `values` as it is.
    return pages.at[heads, page[:, :, None], (positions % page_size)[:, :, None]].set(
        values.astype(pages.dtype), mode="drop")


def gather(pages: jax.Array, block_table: jax.Array) -> jax.Array:
    """The rows' positions in order: [K, B, T * page_size, Dh]. "No page" entries read page P - 1 (clipped):
    finite values the decode mask never lets a query see."""
    gathered = jnp.take(pages, block_table, axis=1, mode="clip")  # [K, B, T, page_size, Dh]
    k, b, t, size, dh = gathered.shape
    return gathered.reshape(k, b, t * size, dh)


def kernel_choice() -> str:
    """'jnp', 'pallas' or 'pallas_interpret' for a one-token decode step (module docstring)."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", "jnp", "pallas", "pallas_interpret"):
        raise ValueError(f"{KERNEL_ENV}={choice!r}: expected auto, jnp, pallas or pallas_interpret")
    if choice == "auto":
        return "pallas" if jax.default_backend() == "gpu" and jax.device_count() == 1 else "jnp"
    return choice


def decode_attention_kernel(query: jax.Array, key_pages: jax.Array, value_pages: jax.Array, block_table: jax.Array,
                            lengths: jax.Array, scale: float, interpret: bool) -> jax.Array:
    """One query per row through the Pallas GPU kernel: query [B, 1, H, Dh], the row attending to its
    first lengths [B] positions; returns [B, 1, H, Dh]. The kernel does not scale the scores: q is
    pre-scaled."""
    from jax.experimental.pallas.ops.gpu import paged_attention as pallas_paged

    q = (query[:, 0] * scale).astype(key_pages.dtype)
    pages_per_row = block_table.shape[1]
    k_splits = _largest_divisor(pages_per_row, 16)  # the kernel splits a row's pages into equal parts
    out = pallas_paged.paged_attention(
        q, key_pages, value_pages, jnp.minimum(block_table, key_pages.shape[1] - 1).astype(jnp.int32),
        lengths.astype(jnp.int32), k_splits=k_splits,
        pages_per_compute_block=_largest_divisor(pages_per_row // k_splits, 8), interpret=interpret)
    return out[:, None].astype(query.dtype)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)
