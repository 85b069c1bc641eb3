"""The device side of serving: a slot engine in the shape of JetStream's `Engine` (MaxText's maxengine).

    prefix = engine.prefill(tokens, true_length)     # one request into a one-row cache (+ first logits)
    engine.insert(prefix, slot)                       # the row becomes decode slot `slot`
    result = engine.generate(sampling)                # one compiled step for all slots
    engine.free(slot)                                 # the slot is empty; its row is overwritten later

Decode state (dense rows): the model's own cache for `max_slots` rows (`model.init_cache(max_slots,
max_length, max_prompt_length)`), sharded by the partitioner's rules (KV heads over `model` with tensor
parallelism), plus per slot the float32 logits [max_slots, V] that predict its next token and the
number of tokens it has generated [max_slots]. `generate` samples every slot's token from those logits
with the slot's own temperature / top-k / top-p and key (`SlotSampling`, arrays, so mixed requests
never recompile; key = fold_in(request key, tokens generated)), then feeds the tokens through
`model.decode_step`, so a slot's first token comes from its prefill logits, as in
`decoding.generate`. Free slots compute garbage that nobody reads; `insert` overwrites every leaf of
the row, its cache_index included.

Prefill is jitted once per length bucket (powers of two from `min_prefill_bucket`, the last one
`max_prompt_length`). For a model whose prompt shares the cache (`BaseModel.prompt_shares_cache`,
decoder-only), `prefill(..., prefix=p)` continues the row of `p` at its cache_index: the scheduler
feeds a long prompt chunk by chunk between decode steps, and a prompt longer than the largest bucket
is fed in chunks of that bucket.

Prefix-cache blocks with dense rows (`prefix_cache=True`, prompt-sharing models only): a pool on device
(`serving.prefix_pool`) holds the keys/values of `block_size` prompt positions per block; `load_prefix`
copies blocks into a fresh row, `save_blocks` copies a prefilled row's blocks into the pool. Which
blocks hold what is the host's bookkeeping (`serving.kv_blocks`).

Paged KV cache (`kv_cache="paged"`, decoder-only models): the model's paged cache
(`models.paged_attention`): one pool of `kv_blocks` blocks per layer shared by every slot, and a block
table per slot. The pool is sized by `kv_blocks`, else `kv_cache_bytes`, else a fraction of the
device's free memory (devices that report it), else as many positions as dense rows would hold. A
request's prefix is a list of blocks the host allocated (`paged_prefix`); `prefill` writes the prompt
straight into them, `insert` only points the slot's table at them, and a prefix-cache hit is a block
shared by several tables, never copied. As a slot grows the host gives it more blocks (`set_blocks`,
`lengths` tells where each slot is); positions without a block are dropped on write, so a free slot's
table is cleared and its garbage steps touch nothing.

One process: the engine's mesh must hold only local devices.
"""
from __future__ import annotations

import collections
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmops_jax.inference import decoding
from lmops_jax.models import loading
from lmops_jax.models.model import BaseModel, Cache
from lmops_jax.models.multi_lora import Adapter, AdapterLayout, per_row_adapters, write_slot
from lmops_jax.models.paged_attention import BLOCK_TABLE, KVPages
from lmops_jax.partitioning import Partitioner
from lmops_jax.serving.prefix_pool import CACHE_INDEX, PrefixPool
# The step types are part of the engine's API: importable from here as well.
from lmops_jax.serving.slots import (MAX_TOP_LOGPROBS, Prefix, SlotSampling, StepResult, TopLogprobs,  # noqa: F401
                                     top_log_probs, top_pairs)

class DecodeState(NamedTuple):
    cache: Cache  # the model's cache, every leaf [max_slots, ...]
    logits: jax.Array  # float32 [max_slots, V]: predicts each slot's next token
    steps: jax.Array  # int32 [max_slots]: tokens the slot's request has generated (folds its key)


def _boxed_values(tree: Any) -> Any:
    """The arrays of a boxed tree, without sharding constraints (out_shardings place them)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def narrow_tables(cache: Cache, width: int | None) -> Cache:
    """The cache as a paged step reads it: its block table cut to the first `width` columns (None: as it is)."""
    return cache if width is None else {**cache, BLOCK_TABLE: cache[BLOCK_TABLE][:, :width]}


def restore_tables(cache: Cache, original: Cache) -> Cache:
    """`cache` (from a narrowed step) with `original`'s full block table back."""
    return {**cache, BLOCK_TABLE: original[BLOCK_TABLE]} if BLOCK_TABLE in original else cache


def _cache_bytes(make_cache) -> int:
    """Bytes of the cache `make_cache()` would build (shapes only)."""
    leaves = jax.tree.leaves(_boxed_values(jax.eval_shape(make_cache)))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)


def kv_bytes_per_block(model: BaseModel, block_size: int, max_length: int) -> int:
    """Bytes one paged block of `block_size` positions takes over every layer (keys and values)."""
    return (_cache_bytes(lambda: model.init_cache(1, max_length, pages=KVPages(2, block_size)))
            - _cache_bytes(lambda: model.init_cache(1, max_length, pages=KVPages(1, block_size))))


def kv_bytes_per_row(model: BaseModel, max_length: int, prompt_length: int | None = None) -> int:
    """Bytes one dense cache row of `max_length` positions takes."""
    return (_cache_bytes(lambda: model.init_cache(2, max_length, prompt_length))
            - _cache_bytes(lambda: model.init_cache(1, max_length, prompt_length)))


def _prefill_buckets(min_bucket: int, longest: int) -> tuple[int, ...]:
    """Powers of two from min_bucket below `longest`, then `longest` itself."""
    buckets = [min_bucket]
    while buckets[-1] < longest:
        buckets.append(buckets[-1] * 2)
    return tuple(b for b in buckets if b < longest) + (longest,)


class Engine:
    """Slots of dense cache rows over any `BaseModel` (module docstring).

    Args:
      model, params, partitioner: the model, its params (placed with `loading.place_params`) and the
        mesh + rules (default one local device).
      max_slots: decode slots (requests decoding at once).
      max_length: positions of a slot; a request needs prompt + max_tokens <= max_length.
      max_prompt_length: longest prompt; default max_length - 1, or max_length // 2 for a model whose
        prompt has its own cache region (encoder-decoder: its encoder length).
      min_prefill_bucket, prefill_buckets: prefill lengths compiled (default powers of two from
        min_prefill_bucket up to max_prompt_length).
      kv_cache: 'dense' (a row per slot) or 'paged' (module docstring).
      block_size: positions per KV block (paged) and per prefix-cache block.
      kv_blocks, kv_cache_bytes, kv_memory_fraction: the paged pool's size: kv_blocks blocks, else as
        many as kv_cache_bytes holds (every layer's keys and values), else kv_memory_fraction of the
        free device memory where the device reports it, else max_slots rows' worth.
      prefix_cache: reuse the keys/values of prompt blocks seen before (prompt-sharing models).
      prefix_cache_blocks: dense rows only: the prefix-cache pool's blocks (default max_slots rows' worth).
      adapters: LoRA adapters served per slot (`models.multi_lora`): the stack's layout, whose
        `slots` adapters are resident at once (`load_adapter`); a request's slot runs through the
        adapter `insert` names (0: the base model). None: the base model only.
    """

    def __init__(self, model: BaseModel, params: Any, partitioner: Partitioner | None = None, *, max_slots: int,
                 max_length: int, max_prompt_length: int | None = None, min_prefill_bucket: int = 8,
                 prefill_buckets: Sequence[int] | None = None, kv_cache: str = "dense", block_size: int = 16,
                 kv_blocks: int | None = None, kv_cache_bytes: int | None = None, kv_memory_fraction: float = 0.9,
                 prefix_cache: bool = False, prefix_cache_blocks: int | None = None,
                 adapters: AdapterLayout | None = None):
        if max_slots < 1 or max_length < 2:
            raise ValueError(f"Engine needs max_slots >= 1 and max_length >= 2, got {max_slots}, {max_length}")
        shares = model.prompt_shares_cache
        if kv_cache not in ("dense", "paged"):
            raise ValueError(f"KV_CACHE must be 'dense' or 'paged', got {kv_cache!r}")
        self.paged, self.block_size, self.prefix_caching = kv_cache == "paged", block_size, prefix_cache
        if self.paged and not shares:
            raise ValueError(f"KV_CACHE='paged' needs a decoder-only model; {type(model).__name__} keeps dense rows")
        if prefix_cache and not shares:
            raise ValueError(f"prefix caching needs a model whose prompt shares the cache (decoder-only); "
                             f"{type(model).__name__} encodes the whole prompt at once")
        if self.paged and prefix_cache_blocks:
            raise ValueError("prefix_cache_blocks sizes the dense rows' prefix pool; a paged cache caches "
                             "prefixes in its own blocks")
        self.model, self.max_slots, self.max_length = model, max_slots, max_length
        self.pages = (KVPages(self._pool_blocks(kv_blocks, kv_cache_bytes, kv_memory_fraction), block_size)
                      if self.paged else None)
        self.kv_blocks = self.pages.num_pages if self.paged else 0
        self.row_limit = min(max_length, self.kv_blocks * block_size) if self.paged else max_length
        self.max_prompt_length = max_prompt_length or (self.row_limit - 1 if shares else max_length // 2)
        if not 0 < self.max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must lie in [1, max_length={max_length})")
        self.buckets = tuple(sorted(prefill_buckets or _prefill_buckets(min_prefill_bucket, self.max_prompt_length)))
        if self.buckets[-1] > self.max_prompt_length or (not shares and self.buckets[-1] < self.max_prompt_length):
            raise ValueError(f"prefill_buckets {self.buckets} must end at most at max_prompt_length="
                             f"{self.max_prompt_length} (exactly there for a model without chunked prefill)")
        self.partitioner = partitioner or loading.default_partitioner()
        self.params = loading.place_params(model, params, self.partitioner)
        self.trace_counts: collections.Counter = collections.Counter()
        replicated = self.partitioner.replicated
        self.adapter_layout = adapters
        self._adapter_ids = np.zeros(max_slots, np.int32)  # each slot's adapter (0: none)
        self.lora = None
        if adapters is not None:
            self._empty_lora = jax.jit(adapters.empty, out_shardings=replicated)
            with self.partitioner.context():
                self.lora = self._empty_lora()
            self._write_slot_jit = jax.jit(write_slot, donate_argnums=0, out_shardings=replicated)
        cache_boxed = jax.eval_shape(lambda: self._new_cache(max_slots))
        row_boxed = jax.eval_shape(lambda: self._new_cache(1))
        self._state_shardings = DecodeState(self.partitioner.shardings_of_boxed(cache_boxed), replicated, replicated)
        self._row_shardings = self.partitioner.shardings_of_boxed(row_boxed)
        self._empty_row = jax.jit(lambda: _boxed_values(self._new_cache(1)), out_shardings=self._row_shardings)
        self._prefill_jit = jax.jit(self._prefill_fn, donate_argnums=2,
                                    out_shardings=(replicated, self._row_shardings))
        self._insert_jit = jax.jit(self._insert_fn, donate_argnums=0, out_shardings=self._state_shardings)
        self._step_jit = jax.jit(self._step_fn, donate_argnums=2, static_argnames=("with_top", "width"),
                                 out_shardings=(self._state_shardings, replicated, replicated, replicated))
        self._empty_state = jax.jit(lambda: DecodeState(
            _boxed_values(self._new_cache(max_slots)), jnp.zeros((max_slots, model.vocab_size), jnp.float32),
            jnp.zeros((max_slots,), jnp.int32)), out_shardings=self._state_shardings)
        with self.partitioner.context():
            self._state = self._empty_state()
        self._occupied = np.zeros(max_slots, bool)
        self._room = np.zeros(max_slots, np.int64)  # tokens each slot can still emit
        self.lengths = np.zeros(max_slots, np.int64)  # positions each slot has written (its cache_index)
        self.prefix_cache_blocks = 0
        if self.paged:
            self._init_paged()
        elif prefix_cache:
            self.prefix_cache_blocks = prefix_cache_blocks or max_slots * (self.max_prompt_length // block_size)
            self._prefix_pool = PrefixPool(
                row_boxed, lambda: _boxed_values(self._new_cache(1)), self.partitioner, self._row_shardings,
                num_blocks=self.prefix_cache_blocks, block_size=block_size, max_length=max_length,
                max_prompt_length=self.max_prompt_length, trace_counts=self.trace_counts)

    # ------------------------------------------------------------------------- device memory
    def device_bytes(self) -> int:
        """Bytes the engine holds on its devices: params, decode state (the KV cache), adapters, prefix pool."""
        pool = self._prefix_pool.arrays() if self.prefix_cache_blocks else None
        leaves = jax.tree.leaves((self.params, self._state, self.lora, pool))
        return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)

    def offload(self) -> None:
        """Drops every device array (params, KV cache, adapters, prefix pool) and keeps the compiled
        functions, so `reload` costs a transfer, not a compilation. Every slot must be free; adapters
        and cached prefixes are gone afterwards."""
        if self._occupied.any():
            raise RuntimeError(f"offload: slots {np.flatnonzero(self._occupied).tolist()} are still decoding")
        self.params = self._state = self.lora = None
        if self.prefix_cache_blocks:
            self._prefix_pool.release()

    def reload(self, params: Any) -> None:
        """Places `params` (e.g. host numpy) and fresh empty state after `offload`."""
        self.params = loading.place_params(self.model, params, self.partitioner)
        with self.partitioner.context():
            self._state = self._empty_state()
            if self.adapter_layout is not None:
                self.lora = self._empty_lora()
            if self.prefix_cache_blocks:
                self._prefix_pool.reset()
        if self.paged:
            self._tables[:] = self.kv_blocks
            self._tables_dirty = True

    @property
    def loaded(self) -> bool:
        return self.params is not None

    def _new_cache(self, batch: int) -> Cache:
        """The model's empty cache for `batch` rows, boxed with its logical axes (paged: the shared pool)."""
        return self.model.init_cache(batch, self.max_length, self.max_prompt_length, pages=self.pages)

    def _pool_blocks(self, kv_blocks: int | None, kv_cache_bytes: int | None, fraction: float) -> int:
        """The paged pool's size in blocks (class docstring)."""
        if kv_blocks is not None:
            if kv_blocks < 1:
                raise ValueError(f"kv_blocks must be >= 1, got {kv_blocks}")
            return kv_blocks
        block_bytes = kv_bytes_per_block(self.model, self.block_size, self.max_length)
        if kv_cache_bytes is not None:
            if kv_cache_bytes < block_bytes:
                raise ValueError(f"KV_CACHE_BYTES={kv_cache_bytes} holds no block: one block of {self.block_size} "
                                 f"positions takes {block_bytes} bytes")
            return kv_cache_bytes // block_bytes
        stats = jax.local_devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            return max(1, int(free * fraction) // block_bytes)
        return self.max_slots * -(-self.max_length // self.block_size)

    def _init_paged(self) -> None:
        """Host block tables (every entry "no block" = kv_blocks) and the paged prefill / insert."""
        replicated = self.partitioner.replicated
        self._tables = np.full((self.max_slots, self.pages.pages_per_row(self.max_length)), self.kv_blocks, np.int32)
        self._tables_dirty = True
        self._table_sharding = jax.tree.leaves(self._state_shardings.cache[BLOCK_TABLE])[0]
        self._paged_prefill_jit = jax.jit(self._paged_prefill_fn, donate_argnums=2,
                                          out_shardings=(replicated, self._state_shardings))
        self._paged_insert_jit = jax.jit(self._paged_insert_fn, donate_argnums=0, out_shardings=self._state_shardings)

    def paged_prefix(self, blocks: Sequence[int], length: int = 0) -> Prefix:
        """A paged request's row before (more of) its prompt is fed: `blocks` hold its positions, the
        first `length` of them already written (a prefix-cache hit)."""
        if not self.paged:
            raise ValueError("paged_prefix: this engine keeps dense rows (kv_cache='dense')")
        return Prefix(None, None, length, blocks=list(blocks))

    def set_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        """Points slot `slot`'s block table at `blocks` (paged), from its next step on."""
        if len(blocks) > self._tables.shape[1]:
            raise ValueError(f"set_blocks: {len(blocks)} blocks exceed a row's {self._tables.shape[1]}")
        self._tables[slot] = self.kv_blocks
        self._tables[slot, :len(blocks)] = blocks
        self._tables_dirty = True

    def table_width(self) -> int | None:
        """Paged: the block-table columns the next step reads, the smallest power of two that covers every
        occupied slot's positions after the step (None for dense rows). Short rows then gather a few
        blocks, not max_length positions; one compiled step per width."""
        if not self.paged:
            return None
        used = self.lengths[self._occupied] + self.tokens_per_step
        need = -(-int(used.max()) // self.block_size) if used.size else 1
        width = 1
        while width < need:
            width *= 2
        return min(width, self._tables.shape[1])

    def _sync_tables(self) -> None:
        """Uploads the host block tables into the decode state when they changed."""
        if self.paged and self._tables_dirty:
            table = jax.device_put(self._tables, self._table_sharding)
            self._state = self._state._replace(cache={**self._state.cache, BLOCK_TABLE: table})
            self._tables_dirty = False

    def _paged_prefill_fn(self, params, lora, state: DecodeState, tokens, lengths, table, index, adapter):
        self.trace_counts[f"prefill_{tokens.shape[1]}"] += 1
        row = {**state.cache, CACHE_INDEX: index[None], BLOCK_TABLE: table[None]}
        with per_row_adapters(lora, adapter[None]):
            logits, row = self.model.prefill(params, tokens, lengths, row)
        cache = {**row, CACHE_INDEX: state.cache[CACHE_INDEX], BLOCK_TABLE: state.cache[BLOCK_TABLE]}
        return logits, state._replace(cache=cache)

    def _paged_insert_fn(self, state: DecodeState, logits, slot, length, steps) -> DecodeState:
        self.trace_counts["insert"] += 1
        cache = {**state.cache, CACHE_INDEX: state.cache[CACHE_INDEX].at[slot].set(length)}
        return DecodeState(cache, jax.lax.dynamic_update_slice_in_dim(state.logits, logits, slot, axis=0),
                           state.steps.at[slot].set(steps))

    # ------------------------------------------------------------------------------------- prefill
    def capacity(self, prompt_length: int) -> int:
        """Most tokens a request with a prompt of this length may generate."""
        used = prompt_length if self.model.prompt_shares_cache else self.max_prompt_length
        return self.row_limit - used

    def prefill(self, tokens: Sequence[int] | np.ndarray, true_length: int | None = None,
                prefix: Prefix | None = None, adapter: int = 0) -> Prefix:
        """Feeds tokens[:true_length] into a fresh row, or after the row of `prefix` (whose cache is then
        consumed): the Prefix with the logits predicting the next token. A fresh row needs the whole
        prompt unless the model's prompt shares the cache; longer than the largest bucket, it is fed in
        chunks of that bucket. adapter: the resident adapter slot the row runs through (0: none)."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        true_length = len(tokens) if true_length is None else int(true_length)
        done = 0 if prefix is None else prefix.length
        limit = self.row_limit - 1 if self.paged else self.max_prompt_length  # paged: a preempted row is recomputed
        if not 0 < true_length <= len(tokens) or done + true_length > limit:
            raise ValueError(f"prefill: {true_length} tokens after {done} do not make a prompt of 1 to {limit} tokens "
                             f"(max_prompt_length={self.max_prompt_length})")
        if prefix is not None and not self.model.prompt_shares_cache:
            raise ValueError(f"prefill: {type(self.model).__name__} takes its whole prompt at once; no prefix")
        if self.paged and (prefix is None or len(prefix.blocks) * self.block_size < done + true_length):
            raise ValueError("prefill: a paged engine writes into the request's blocks; pass "
                             "engine.paged_prefix(blocks) with blocks for every prompt position")
        cache = None if self.paged else self._empty_row() if prefix is None else prefix.cache
        if self.paged:  # the row's block table, the same for every chunk
            table = np.full(self._tables.shape[1], self.kv_blocks, np.int32)
            table[:len(prefix.blocks)] = prefix.blocks
        logits = None
        with self.partitioner.context():
            for start in range(0, true_length, self.buckets[-1]):
                chunk = tokens[start:min(true_length, start + self.buckets[-1])]
                bucket = next(b for b in self.buckets if b >= len(chunk))
                padded = np.zeros((1, bucket), np.int32)
                padded[0, :len(chunk)] = chunk
                length = np.array([len(chunk)], np.int32)
                if self.paged:
                    logits, self._state = self._paged_prefill_jit(self.params, self.lora, self._state, padded, length,
                                                                  table, np.int32(done + start), np.int32(adapter))
                else:
                    logits, cache = self._prefill_jit(self.params, self.lora, cache, padded, length,
                                                      np.int32(adapter))
        return Prefix(cache, logits, done + true_length, blocks=None if prefix is None else prefix.blocks)

    def _prefill_fn(self, params, lora, cache, tokens, lengths, adapter):
        self.trace_counts[f"prefill_{tokens.shape[1]}"] += 1
        with per_row_adapters(lora, adapter[None]):
            return self.model.prefill(params, tokens, lengths, cache)

    # ---------------------------------------------------------------------------- slots and steps
    def insert(self, prefix: Prefix, slot: int, steps: int = 0, adapter: int = 0) -> None:
        """Writes the prefilled row into decode slot `slot` (which must be free); paged, the slot's table
        points at the prefix's blocks. steps: tokens the request generated before (a preempted request
        resumes its sampling keys where it stopped); adapter: the resident adapter slot it decodes with
        (the one it was prefilled with)."""
        if prefix.logits is None:
            raise ValueError("insert: the prefix has no logits yet; prefill at least one prompt token")
        if not 0 <= slot < self.max_slots or self._occupied[slot]:
            raise ValueError(f"insert: slot {slot} is not a free slot of {self.max_slots}")
        with self.partitioner.context():
            if self.paged:
                self.set_blocks(slot, prefix.blocks)
                self._state = self._paged_insert_jit(self._state, prefix.logits, np.int32(slot),
                                                     np.int32(prefix.length), np.int32(steps))
            else:
                self._state = self._insert_jit(self._state, prefix.cache, prefix.logits, np.int32(slot),
                                               np.int32(steps))
        self._occupied[slot] = True
        self._adapter_ids[slot] = adapter
        self._room[slot] = self.capacity(prefix.length)
        self.lengths[slot] = prefix.length

    def _insert_fn(self, state: DecodeState, row: Cache, logits: jax.Array, slot: jax.Array,
                   steps: jax.Array) -> DecodeState:
        self.trace_counts["insert"] += 1
        cache = jax.tree.map(lambda rows, one: jax.lax.dynamic_update_slice_in_dim(rows, one, slot, axis=0),
                             state.cache, row)
        return DecodeState(cache, jax.lax.dynamic_update_slice_in_dim(state.logits, logits, slot, axis=0),
                           state.steps.at[slot].set(steps))

    def free(self, slot: int) -> None:
        """Marks `slot` empty; its row is overwritten by the next insert (paged: its table is cleared,
        so its garbage steps write nowhere)."""
        self._occupied[slot] = False
        self._adapter_ids[slot] = 0
        self.lengths[slot] = 0
        if self.paged:
            self.set_blocks(slot, [])

    @property
    def tokens_per_step(self) -> int:
        """Most positions one `generate` writes per slot (paged slots need blocks for them beforehand)."""
        return 1

    @property
    def free_slots(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self._occupied)]

    def generate(self, sampling: SlotSampling, top_logprobs: bool = False) -> StepResult:
        """One token for every slot (one compiled step), fetched to the host; top_logprobs: also the most
        likely tokens of every slot (a second compiled step, used while a request asks for them)."""
        self._sync_tables()
        with self.partitioner.context():
            self._state, tokens, logprobs, top = self._step_jit(
                self.params, self.lora, self._state, sampling.temperature, sampling.top_k, sampling.top_p,
                sampling.key_data, self._adapter_ids, with_top=top_logprobs, width=self.table_width())
        self._room -= self._occupied
        self.lengths += self._occupied
        top_tokens, top_values = (np.asarray(top[0]), np.asarray(top[1])) if top_logprobs else (None, None)
        return StepResult(np.asarray(tokens), np.asarray(logprobs), self._occupied & (self._room <= 0),
                          top_tokens, top_values)

    def _step_fn(self, params, lora, state: DecodeState, temperature, top_k, top_p, key_data, adapter_ids,
                 with_top: bool, width: int | None):
        self.trace_counts["generate_top" if with_top else "generate"] += 1
        keys = jax.vmap(lambda data, step: jax.random.fold_in(jax.random.wrap_key_data(data), step))(
            key_data, state.steps)
        tokens = decoding.sample_rows(state.logits, keys, temperature, top_k, top_p)
        logprobs = jnp.take_along_axis(jax.nn.log_softmax(state.logits), tokens[:, None], axis=-1)[:, 0]
        top = top_log_probs(state.logits) if with_top else None
        with per_row_adapters(lora, adapter_ids):
            logits, cache = self.model.decode_step(params, tokens, narrow_tables(state.cache, width))
        return DecodeState(restore_tables(cache, state.cache), logits, state.steps + 1), tokens, logprobs, top

    def load_adapter(self, slot: int, adapter: Adapter) -> None:
        """Makes `adapter` resident in adapter slot `slot` (1 ... layout.slots), replacing what was
        there; rows decoding with that slot must have finished (the scheduler's residency sees to it)."""
        if self.adapter_layout is None or not 1 <= slot <= self.adapter_layout.slots:
            raise ValueError(f"load_adapter: no adapter slot {slot} (this engine has "
                             f"{0 if self.adapter_layout is None else self.adapter_layout.slots})")
        with self.partitioner.context():
            self.lora = self._write_slot_jit(self.lora, np.int32(slot), self.adapter_layout.padded(adapter))

    # ------------------------------------------------------------------------- prefix-cache blocks
    def load_prefix(self, block_ids: Sequence[int]) -> Prefix:
        """Dense rows: a fresh row holding the prefix pool's blocks `block_ids` as its first positions (no
        logits yet)."""
        with self.partitioner.context():
            row = self._prefix_pool.load(block_ids)
        return Prefix(row, None, len(block_ids) * self.block_size)

    def save_blocks(self, prefix: Prefix, blocks: Sequence[tuple[int, int]]) -> None:
        """Dense rows: copies block j of the row (positions j * block_size ...) into pool block b, for each (j, b)."""
        if blocks:
            with self.partitioner.context():
                self._prefix_pool.save(prefix.cache, blocks)
