"""Host bookkeeping of KV-cache blocks: a refcounted block pool with automatic prefix caching (vLLM's
block manager; SGLang's radix cache keeps the same information as a tree).

A block holds the keys/values of `block_size` consecutive positions. Requests hold references on the
blocks they use (`allocate`, `match`) and drop them with `release`. A block nobody references goes
back to the free list, unless it is cached: then it stays where it is, evictable, and the least
recently used cached block is evicted first when a new block is needed. A chain is released child
first, so a prefix's tail is evicted before its head.

Prefix caching: full blocks of a prompt are keyed by hash(key of the block before, its tokens, model
id), so a key names the whole prefix up to the block's end and prompts sharing a prefix share keys. A
prompt read through a LoRA adapter passes the adapter's name (`namespace`): its first block's parent
is then the namespace, so its blocks never match the base model's or another adapter's.
`match` finds the longest cached run of a prompt's leading blocks, stopping one token short of its
end (the last token is always fed: its logits start the generation).

Two engines use it (`serving.engine`):
- paged KV cache: the pool is the KV cache itself. A request's row is its list of blocks: the cached
  ones `match` found (shared, never copied), then blocks from `allocate` for the rest; once its prompt
  is prefilled, `publish` keys its own full prompt blocks so later requests can share them.
- dense rows: the pool is a side pool of prompt blocks; `cache_prompt` picks blocks for a prefilled
  prompt's full blocks and says which the engine must copy there.

Host-side Python, used by the scheduler's thread only.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

Key = int


@dataclasses.dataclass
class _Block:
    refs: int = 0
    key: Key | None = None  # set while the block is cached
    parent: Key | None = None
    tokens: tuple[int, ...] = ()


class BlockPool:
    """`num_blocks` blocks of `block_size` positions (module docstring).

    prefix_caching: whether full prompt blocks are kept for reuse (else `match` finds nothing and
    `publish` keys nothing). model_id: part of every key, so two models or adapters never share blocks.
    Counters (vLLM's prefix-cache metrics, in tokens): `queries`, prompt tokens looked up; `hits`, of
    them found cached (`record_lookup`).
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True, model_id: str = ""):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching, self.model_id = prefix_caching, model_id
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free = list(range(num_blocks - 1, -1, -1))  # unreferenced, uncached; popped from the end
        self._by_key: dict[Key, int] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unreferenced; LRU first
        self.queries = 0
        self.hits = 0

    # ------------------------------------------------------------------------------ counting
    def blocks_for(self, positions: int) -> int:
        """Blocks that hold `positions` positions."""
        return -(-positions // self.block_size)

    @property
    def available(self) -> int:
        """Blocks `allocate` can hand out now (free, or cached and evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def blocks_referenced(self) -> int:
        """Blocks some request holds (vLLM's KV-cache usage counts these)."""
        return self.num_blocks - self.available

    @property
    def blocks_used(self) -> int:
        """Blocks holding something: referenced or cached."""
        return self.num_blocks - len(self._free)

    # ------------------------------------------------------------------------- references
    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks referenced once by the caller, evicting cached blocks LRU first; None (and no
        change) when fewer are available."""
        if count > self.available:
            return None
        out = []
        for _ in range(count):
            if self._free:
                block_id = self._free.pop()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                del self._by_key[self._blocks[block_id].key]
                self._blocks[block_id] = _Block()
            self._blocks[block_id].refs = 1
            out.append(block_id)
        return out

    def _ref(self, block_id: int) -> None:
        self._blocks[block_id].refs += 1
        self._evictable.pop(block_id, None)

    def release(self, block_ids: Sequence[int]) -> None:
        """Drops one reference on each block, last block first (tails become evictable before heads)."""
        for block_id in reversed(block_ids):
            block = self._blocks[block_id]
            block.refs -= 1
            if block.refs == 0:
                if block.key is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None

    # ----------------------------------------------------------------------- prefix caching
    def _chain(self, prompt: Sequence[int], count: int,
               namespace: str | None = None) -> list[tuple[Key, Key | None, tuple[int, ...]]]:
        """(key, parent key, tokens) of the first `count` full blocks of `prompt` (read in `namespace`)."""
        out, parent = [], None if namespace is None else hash(("namespace", namespace, self.model_id))
        for j in range(count):
            tokens = tuple(prompt[j * self.block_size:(j + 1) * self.block_size])
            key = hash((parent, tokens, self.model_id))
            out.append((key, parent, tokens))
            parent = key
        return out

    def _cached(self, key: Key, parent: Key | None, tokens: tuple[int, ...]) -> int | None:
        """The block caching exactly this (parent, tokens), if any (a hash collision is a miss)."""
        block_id = self._by_key.get(key)
        if block_id is None:
            return None
        block = self._blocks[block_id]
        return block_id if (block.parent, block.tokens) == (parent, tokens) else None

    def _cache(self, block_id: int, key: Key, parent: Key | None, tokens: tuple[int, ...]) -> None:
        block = self._blocks[block_id]
        block.key, block.parent, block.tokens = key, parent, tokens
        self._by_key[key] = block_id

    def match(self, prompt: Sequence[int], namespace: str | None = None) -> list[int]:
        """Blocks of the longest cached run of `prompt`'s leading full blocks (short of its last token),
        now referenced by the caller until `release`. Counts nothing (`record_lookup`)."""
        found = []
        if self.prefix_caching:
            for key, parent, tokens in self._chain(prompt, (len(prompt) - 1) // self.block_size, namespace):
                block_id = self._cached(key, parent, tokens)
                if block_id is None:
                    break
                found.append(block_id)
        for block_id in found:
            self._ref(block_id)
        return found

    def record_lookup(self, prompt_tokens: int, hit_blocks: int) -> None:
        """Counts one admitted prompt's lookup: its tokens, and those its `match` found cached."""
        self.queries += prompt_tokens
        self.hits += hit_blocks * self.block_size

    def publish(self, prompt: Sequence[int], block_ids: Sequence[int], namespace: str | None = None) -> None:
        """Paged rows: caches the prefilled prompt's own full blocks (block j of the prompt is block_ids[j]),
        those not cached yet; a key another block already caches stays with that block."""
        if not self.prefix_caching:
            return
        count = min(len(prompt) // self.block_size, len(block_ids))
        for block_id, (key, parent, tokens) in zip(block_ids, self._chain(prompt, count, namespace)):
            if self._blocks[block_id].key is None and key not in self._by_key:
                self._cache(block_id, key, parent, tokens)

    def cache_prompt(self, prompt: Sequence[int], held: Sequence[int],
                     namespace: str | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """Dense rows: caches the full blocks of a prefilled prompt after the `held` ones (its `match`).

        Returns (every block the caller now holds, `held` first; the copies (block index j in the prompt,
        pool block) the engine must make). Blocks another request cached meanwhile are only referenced;
        when no block can be allocated, caching stops there.
        """
        held_blocks, copies = list(held), []
        for j, (key, parent, tokens) in enumerate(self._chain(prompt, len(prompt) // self.block_size, namespace)):
            if j < len(held):
                continue
            block_id = self._cached(key, parent, tokens)
            if block_id is not None:
                self._ref(block_id)
            else:
                fresh = self.allocate(1)
                if fresh is None:
                    break
                block_id = fresh[0]
                self._cache(block_id, key, parent, tokens)
                copies.append((j, block_id))
            held_blocks.append(block_id)
        return held_blocks, copies
