"""Dense rows' prefix-cache pool on device: keys/values of prompt blocks copied out of prefilled rows and
into fresh ones (`Engine(prefix_cache=True)` with kv_cache='dense'; a paged cache shares its blocks instead).

For every cache leaf whose last axis is the position (the model's documented [B, K, Dh, S] layout) the
pool holds [num_blocks, K, Dh, block_size], sharded like the leaf without its row axis. `load` gathers
blocks into a fresh row (its cache_index set past them); `save` scatters a row's blocks into the pool.
Which block holds which prompt block is the host's bookkeeping (`serving.kv_blocks`).
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmops_jax.models.model import Cache
from lmops_jax.partitioning import Partitioner

CACHE_INDEX = "cache_index"  # the per-row positions leaf every model cache holds (models.model)


class PrefixPool:
    """The pool and its two compiled copies (module docstring).

    row_boxed: the boxed shapes of a one-row cache; empty_row: a one-row cache of zeros (traced inside
    `load`); row_shardings: where a row lives.
    """

    def __init__(self, row_boxed: Cache, empty_row: Callable[[], Cache], partitioner: Partitioner,
                 row_shardings: Any, *, num_blocks: int, block_size: int, max_length: int, max_prompt_length: int,
                 trace_counts: collections.Counter):
        self.num_blocks, self.block_size, self.max_prompt_length = num_blocks, block_size, max_prompt_length
        self._empty_row, self.trace_counts = empty_row, trace_counts
        is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
        leaves = jax.tree_util.tree_flatten_with_path(row_boxed, is_leaf=is_box)[0]
        self._positional = []
        for path, box in leaves:
            shape = box.value.shape
            if shape[-1] == max_length and len(shape) > 2:
                self._positional.append(True)
            elif jax.tree_util.keystr(path).endswith(f"['{CACHE_INDEX}']"):
                self._positional.append(False)
            else:
                raise ValueError(f"prefix caching: cache leaf {jax.tree_util.keystr(path)} {shape} is neither a "
                                 f"position-last [B, ..., S={max_length}] leaf nor {CACHE_INDEX}")
        pools = [jax.ShapeDtypeStruct((num_blocks,) + box.value.shape[1:-1] + (block_size,), box.value.dtype)
                 for (_, box), pos in zip(leaves, self._positional) if pos]
        names = [(None,) + tuple(box.names[1:]) for (_, box), pos in zip(leaves, self._positional) if pos]
        shardings = [partitioner.sharding(n, p.shape) for n, p in zip(names, pools)]
        self._zeros = jax.jit(lambda: [jnp.zeros(p.shape, p.dtype) for p in pools], out_shardings=shardings)
        self._pool = self._zeros()
        self._max_blocks = max_prompt_length // block_size
        self._load_jit = jax.jit(self._load_fn, out_shardings=row_shardings)
        self._store_jit = jax.jit(self._store_fn, donate_argnums=0, out_shardings=shardings)

    def arrays(self) -> list[jax.Array] | None:
        """The pool's device arrays (None while released)."""
        return self._pool

    def release(self) -> None:
        """Drops the pool's device memory (what it cached is gone); `reset` makes an empty one again."""
        self._pool = None

    def reset(self) -> None:
        self._pool = self._zeros()

    def _padded_ids(self, ids: Sequence[int], fill: int) -> np.ndarray:
        if len(ids) > self._max_blocks:
            raise ValueError(f"{len(ids)} blocks do not fit a prompt of max_prompt_length={self.max_prompt_length}")
        out = np.full(self._max_blocks, fill, np.int32)
        out[:len(ids)] = ids
        return out

    def load(self, block_ids: Sequence[int]) -> Cache:
        """A fresh one-row cache holding blocks `block_ids` as its first positions."""
        return self._load_jit(self._pool, self._padded_ids(block_ids, 0), np.int32(len(block_ids) * self.block_size))

    def _load_fn(self, pool, ids, length):
        self.trace_counts["load_prefix"] += 1
        leaves, treedef = jax.tree.flatten(self._empty_row())
        blocks = iter(pool)
        out = []
        for leaf, positional in zip(leaves, self._positional):
            if positional:
                gathered = jnp.moveaxis(next(blocks)[ids], 0, -2)  # [..., max_blocks, block_size]
                span = gathered.reshape(gathered.shape[:-2] + (-1,))
                leaf = jax.lax.dynamic_update_slice_in_dim(leaf, span[None].astype(leaf.dtype), 0, axis=leaf.ndim - 1)
            else:
                leaf = jnp.full_like(leaf, length)
            out.append(leaf)
        return jax.tree.unflatten(treedef, out)

    def save(self, row: Cache, blocks: Sequence[tuple[int, int]]) -> None:
        """Copies block j of the one-row cache `row` into pool block b, for each (j, b)."""
        dest = self._padded_ids([], self.num_blocks)  # out of range: dropped
        for j, b in blocks:
            dest[j] = b
        self._pool = self._store_jit(self._pool, row, dest)

    def _store_fn(self, pool, row, dest):
        self.trace_counts["save_blocks"] += 1
        leaves = [leaf for leaf, positional in zip(jax.tree.leaves(row), self._positional) if positional]
        span = self._max_blocks * self.block_size
        out = []
        for blocks, leaf in zip(pool, leaves):
            seq = leaf[0, ..., :span]
            seq = jnp.moveaxis(seq.reshape(seq.shape[:-1] + (self._max_blocks, self.block_size)), -2, 0)
            out.append(blocks.at[dest].set(seq.astype(blocks.dtype), mode="drop"))
        return out
