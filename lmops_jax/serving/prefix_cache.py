"""Prefix-cache bookkeeping: which prompt blocks the engine's block pool holds (vLLM's automatic prefix
caching, dense rows).

A prompt is cut into full blocks of `block_size` tokens; block j is keyed by hash(key of block j - 1,
its tokens, model id), so a key names the whole prefix up to the block's end, and prompts sharing a
prefix share its keys. Each cached key owns one block of the engine's pool (`Engine.load_prefix`,
`Engine.save_blocks` move the keys/values). A request holds references on the blocks it uses from
`match` to `release`; blocks nobody references stay cached and are evicted least recently used first
when a new block needs room. A chain is released child first, so a prefix's tail is evicted before
its head. Matching stops one token short of the prompt: the last token is always prefilled, since its
logits start the generation.

Host-side Python, used by the scheduler's thread only.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

Key = int


@dataclasses.dataclass
class _Block:
    block_id: int  # its block in the engine's pool
    parent: Key | None
    tokens: tuple[int, ...]
    refs: int = 0


class PrefixCache:
    """Refcounted, LRU-evicted cache of prompt blocks over a pool of `num_blocks` blocks.

    Counters (vLLM's prefix-cache metrics, in tokens): `queries`, the prompt tokens looked up; `hits`,
    those found cached.
    """

    def __init__(self, num_blocks: int, block_size: int, model_id: str = ""):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"PrefixCache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.model_id = num_blocks, block_size, model_id
        self._free = list(range(num_blocks - 1, -1, -1))
        self._blocks: dict[Key, _Block] = {}
        self._unreferenced: collections.OrderedDict[Key, None] = collections.OrderedDict()  # LRU first
        self.queries = 0
        self.hits = 0

    def _chain(self, prompt: Sequence[int], count: int) -> list[tuple[Key, Key | None, tuple[int, ...]]]:
        """(key, parent key, tokens) of the first `count` full blocks of `prompt`."""
        out, parent = [], None
        for j in range(count):
            tokens = tuple(prompt[j * self.block_size:(j + 1) * self.block_size])
            key = hash((parent, tokens, self.model_id))
            out.append((key, parent, tokens))
            parent = key
        return out

    def _cached(self, key: Key, parent: Key | None, tokens: tuple[int, ...]) -> bool:
        block = self._blocks.get(key)
        return block is not None and block.parent == parent and block.tokens == tokens

    def _ref(self, key: Key) -> None:
        block = self._blocks[key]
        block.refs += 1
        self._unreferenced.pop(key, None)

    def match(self, prompt: Sequence[int]) -> list[Key]:
        """Keys of the longest cached run of `prompt`'s leading blocks (short of its last token), now
        referenced by the caller until `release`."""
        keys = []
        for key, parent, tokens in self._chain(prompt, (len(prompt) - 1) // self.block_size):
            if not self._cached(key, parent, tokens):
                break
            keys.append(key)
        for key in keys:
            self._ref(key)
        self.queries += len(prompt)
        self.hits += len(keys) * self.block_size
        return keys

    def block_ids(self, keys: Sequence[Key]) -> list[int]:
        return [self._blocks[key].block_id for key in keys]

    def insert(self, prompt: Sequence[int], held: Sequence[Key]) -> tuple[list[Key], list[tuple[int, int]]]:
        """Caches the full blocks of a prefilled prompt after the `held` ones (its `match`).

        Returns (every key the caller now holds, `held` first; the copies (block index j in the prompt,
        pool block) the engine must make). Blocks another request cached meanwhile are only referenced;
        when no block is free or evictable, caching stops there.
        """
        keys, copies = list(held), []
        for j, (key, parent, tokens) in enumerate(self._chain(prompt, len(prompt) // self.block_size)):
            if j < len(held):
                continue
            if not self._cached(key, parent, tokens):
                block_id = self._allocate()
                if block_id is None:
                    break
                self._blocks[key] = _Block(block_id, parent, tokens)
                copies.append((j, block_id))
            self._ref(key)
            keys.append(key)
        return keys, copies

    def _allocate(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._unreferenced:
            return None
        key, _ = self._unreferenced.popitem(last=False)
        return self._blocks.pop(key).block_id

    def release(self, keys: Sequence[Key]) -> None:
        """Drops the caller's references (from `match` / `insert`); tails become evictable before heads."""
        for key in reversed(keys):
            block = self._blocks[key]
            block.refs -= 1
            if block.refs == 0:
                self._unreferenced[key] = None

    @property
    def blocks_used(self) -> int:
        return self.num_blocks - len(self._free)
