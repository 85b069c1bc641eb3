"""Speculative decoding for the slot engine: a draft model proposes k tokens per slot, the served model
checks them in one forward, and each slot keeps the longest prefix the served model accepts.

    engine = SpeculativeEngine(model, params, draft_model=draft, draft_params=dparams, num_draft_tokens=4,
                               max_slots=8, max_length=1024)
    scheduler = Scheduler(engine, ...)          # as with `Engine`; stats() counts drafts and acceptances

The draft (same vocabulary, its own params) keeps its own cache for the same slots: a draft `Engine`
of the same layout prefills, inserts, frees (and loads / saves prefix-cache blocks; paged: uses the
same block ids, in its own pool) next to the served one. Both caches hold the same tokens; the last emitted token of a slot is `pending`
(emitted, not yet fed to either model). One `generate` (one compiled function) per step:

  1. a slot just inserted first samples its first token from its prefill logits (that is `pending`);
  2. the draft feeds `pending` and samples d_1..d_k from its distributions q_1..q_k (k decode steps),
     then feeds d_k too, so it holds every token the served model may accept;
  3. the served model feeds [pending, d_1..d_k] in one forward (`BaseModel.decode_tokens`): p_1..p_{k+1};
  4. rejection sampling (`accept_drafts`): d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i))
     until the first rejection at j, which emits a token from norm(max(0, p_j - q_j)); with all k
     accepted, a bonus token from p_{k+1}. p and q are the distributions the slot samples from
     (`decoding.row_log_probs`: temperature, top-k, top-p; one-hot for greedy), so each emitted token
     follows the served model's distribution, and a greedy slot emits exactly the served model's
     greedy tokens;
  5. both caches' cache_index roll back to the accepted length (old index + 1 + accepted). Keys past a
     row's cache_index are never attended to (the decode mask is key_position <= query_position, and
     every position up to a query's own is rewritten in the call that reads it), so the rejected
     tail needs no clearing.

A slot emits 1 + accepted tokens per step (one more on its first step), at most its room in the row.
Decoder-only served and draft models only: an encoder-decoder cannot feed several decoder tokens at
once here (NotImplementedError).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmops_jax.inference import decoding
from lmops_jax.models.model import BaseModel, Cache
from lmops_jax.partitioning import Partitioner
from lmops_jax.serving.engine import (CACHE_INDEX, DecodeState, Engine, Prefix, SlotSampling, TopLogprobs, top_pairs,
                                      narrow_tables, restore_tables, top_log_probs)


class DraftMismatch(ValueError):
    """A draft model the served model cannot verify (another vocabulary)."""


@dataclasses.dataclass(frozen=True)
class SpeculativeStepResult:
    """One speculative step, host arrays over slots (entries of free slots mean nothing).

    tokens int32 [S, k + 2] and logprobs float32 [S, k + 2] (under the served model's unmodified
    distribution), valid up to num_tokens int32 [S]; finished bool [S]: the slot's row is full.
    drafts, draft_tokens, accepted_tokens: this step's counts over occupied slots (vLLM's
    spec_decode_num_drafts / _draft_tokens / _accepted_tokens). top_tokens / top_logprobs [S, k + 2, K]:
    the most likely tokens at each emitted position, when asked, else None.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    num_tokens: np.ndarray
    finished: np.ndarray
    drafts: int
    draft_tokens: int
    accepted_tokens: int
    top_tokens: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None

    def emitted(self, slot: int) -> list[tuple[int, float, TopLogprobs]]:
        return [(int(self.tokens[slot, i]), float(self.logprobs[slot, i]),
                 top_pairs(self.top_tokens, self.top_logprobs, (slot, i))) for i in range(int(self.num_tokens[slot]))]


def accept_drafts(logp: jax.Array, logq: jax.Array, drafts: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rejection sampling of draft tokens (Leviathan et al. 2023; Chen et al. 2023).

    logp float32 [N, k + 1, V]: the served model's log-distributions at the k drafts and after them;
    logq [N, k, V]: the draft's, from which drafts int32 [N, k] were sampled; keys: PRNG keys [N].
    Returns (accepted int32 [N]: the length of the accepted prefix, next int32 [N]: the token after it,
    from norm(max(0, p - q)) at the first rejection or from p_{k+1} when all were accepted).
    """
    k = drafts.shape[1]
    accept_keys, next_keys = jnp.moveaxis(jax.vmap(lambda key: jax.random.split(key))(keys), 1, 0)
    uniform = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(accept_keys)
    p_d = jnp.take_along_axis(logp[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(logq, drafts[..., None], axis=-1)[..., 0]
    accepted = jnp.sum(jnp.cumprod(jnp.log(uniform) < p_d - q_d, axis=1), axis=1).astype(jnp.int32)
    rows = jnp.arange(drafts.shape[0])
    p = jnp.exp(logp[rows, accepted])
    q = jnp.exp(jnp.concatenate([logq, jnp.full_like(logq[:, :1], -jnp.inf)], axis=1)[rows, accepted])
    residual = jnp.maximum(p - q, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p)  # p == q: never rejected
    return accepted, jax.vmap(jax.random.categorical)(next_keys, jnp.log(residual)).astype(jnp.int32)


def _map_cache_index(cache: Cache, fn) -> Cache:
    """The cache with fn applied to its cache_index leaves (int32 [B])."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: fn(x) if jax.tree_util.keystr(path).endswith(f"['{CACHE_INDEX}']") else x, cache)


def check_draft(model: BaseModel, draft_model: BaseModel) -> None:
    """Raises unless `draft_model` can draft for `model`: both decoder-only, the same vocab_size."""
    for name, m in (("served", model), ("draft", draft_model)):
        if not m.prompt_shares_cache:
            raise NotImplementedError(f"speculative decoding: the {name} model {type(m).__name__} is an "
                                      "encoder-decoder; only decoder-only models verify several tokens at once")
    if draft_model.vocab_size != model.vocab_size:
        raise DraftMismatch(f"DRAFT_CHECKPOINT: the draft model's vocab_size {draft_model.vocab_size} differs "
                            f"from the served model's vocab_size {model.vocab_size}")


class SpeculativeEngine(Engine):
    """An `Engine` whose `generate` decodes speculatively with a draft model (module docstring).

    Args: those of `Engine` for the served model, plus
      draft_model, draft_params: the draft (decoder-only, the served model's vocab_size).
      num_draft_tokens: k, tokens the draft proposes per slot and step (>= 1).
    """

    def __init__(self, model: BaseModel, params: Any, partitioner: Partitioner | None = None, *,
                 draft_model: BaseModel, draft_params: Any, num_draft_tokens: int = 4, **engine_kwargs: Any):
        check_draft(model, draft_model)
        if engine_kwargs.get("adapters") is not None:
            raise NotImplementedError("speculative decoding with LoRA adapters: the draft would need each slot's "
                                      "adapter too; serve adapters without DRAFT_CHECKPOINT")
        if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"NUM_DRAFT_TOKENS must be an int >= 1, got {num_draft_tokens!r}")
        super().__init__(model, params, partitioner, **engine_kwargs)
        self.num_draft_tokens = num_draft_tokens
        self.draft = Engine(draft_model, draft_params, self.partitioner, max_slots=self.max_slots,
                            max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                            prefill_buckets=self.buckets, kv_cache="paged" if self.paged else "dense",
                            block_size=self.block_size, kv_blocks=self.kv_blocks if self.paged else None,
                            prefix_cache=self.prefix_caching, prefix_cache_blocks=self.prefix_cache_blocks or None)
        replicated = self.partitioner.replicated
        self._pending = jax.device_put(np.zeros(self.max_slots, np.int32), replicated)
        self._fresh = np.zeros(self.max_slots, bool)  # inserted since the last step: no pending token yet
        self._spec_jit = jax.jit(
            self._spec_step_fn, donate_argnums=(2, 3, 4), static_argnames=("with_top", "width"),
            out_shardings=(self._state_shardings, self.draft._state_shardings, replicated, replicated, replicated,
                           replicated, replicated))  # the draft engine's decode state is this engine's to step

    # ------------------------------------------------- both models: prefill, prefix blocks, slots
    def prefill(self, tokens: Sequence[int] | np.ndarray, true_length: int | None = None,
                prefix: Prefix | None = None, adapter: int = 0) -> Prefix:
        draft = self.draft.prefill(tokens, true_length, None if prefix is None else prefix.draft)
        return dataclasses.replace(super().prefill(tokens, true_length, prefix, adapter), draft=draft)

    def paged_prefix(self, blocks: Sequence[int], length: int = 0) -> Prefix:
        return dataclasses.replace(super().paged_prefix(blocks, length), draft=self.draft.paged_prefix(blocks, length))

    def set_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        super().set_blocks(slot, blocks)
        self.draft.set_blocks(slot, blocks)

    @property
    def tokens_per_step(self) -> int:
        return self.num_draft_tokens + 1

    def load_prefix(self, block_ids: Sequence[int]) -> Prefix:
        return dataclasses.replace(super().load_prefix(block_ids), draft=self.draft.load_prefix(block_ids))

    def save_blocks(self, prefix: Prefix, blocks: Sequence[tuple[int, int]]) -> None:
        super().save_blocks(prefix, blocks)
        self.draft.save_blocks(prefix.draft, blocks)

    def insert(self, prefix: Prefix, slot: int, steps: int = 0, adapter: int = 0) -> None:
        super().insert(prefix, slot, steps, adapter)
        self.draft.insert(prefix.draft, slot, steps)
        self._fresh[slot] = True

    def free(self, slot: int) -> None:
        super().free(slot)
        self.draft.free(slot)

    # ------------------------------------------------------------------------------- the step
    def generate(self, sampling: SlotSampling, top_logprobs: bool = False) -> SpeculativeStepResult:
        """One speculative step for every slot (one compiled function), fetched to the host."""
        draft = self.draft
        self._sync_tables()
        draft._sync_tables()
        with self.partitioner.context():
            self._state, draft._state, self._pending, tokens, logprobs, accepted, top = self._spec_jit(
                self.params, draft.params, self._state, draft._state, self._pending, self._fresh,
                sampling.temperature, sampling.top_k, sampling.top_p, sampling.key_data, with_top=top_logprobs,
                width=self.table_width())
        accepted = np.asarray(accepted)
        count = np.where(self._occupied, np.minimum(accepted + 1 + self._fresh, self._room), 0)
        self._fresh[:] = False
        self._room -= count
        self.lengths += np.where(self._occupied, accepted + 1, 0)
        used = int(self._occupied.sum())
        return SpeculativeStepResult(
            np.asarray(tokens), np.asarray(logprobs), count, self._occupied & (self._room <= 0), drafts=used,
            draft_tokens=used * self.num_draft_tokens, accepted_tokens=int(accepted[self._occupied].sum()),
            top_tokens=np.asarray(top[0]) if top_logprobs else None,
            top_logprobs=np.asarray(top[1]) if top_logprobs else None)

    def _spec_step_fn(self, params, draft_params, state: DecodeState, draft_state: DecodeState, pending, fresh,
                      temperature, top_k, top_p, key_data, with_top: bool, width: int | None):
        """Steps 1-5 of the module docstring: (state, draft_state, pending, tokens [S, k + 2],
        logprobs [S, k + 2], accepted [S], top (ids, log-probs) [S, k + 2, K] or None)."""
        self.trace_counts["speculate"] += 1
        k, slots = self.num_draft_tokens, self.max_slots
        keys = jax.vmap(lambda data, step: jax.random.split(
            jax.random.fold_in(jax.random.wrap_key_data(data), step), k + 2))(key_data, state.steps)  # [S, k + 2]
        first = decoding.sample_rows(state.logits, keys[:, 0], temperature, top_k, top_p)
        pending = jnp.where(fresh, first, pending)
        log_probs = lambda logits: decoding.row_log_probs(logits, temperature, top_k, top_p)  # noqa: E731

        def propose(carry, key):
            cache, token = carry
            logits, cache = self.draft.model.decode_step(draft_params, token, cache)
            logq = log_probs(logits)
            draft = jax.vmap(jax.random.categorical)(key, logq).astype(jnp.int32)
            return (cache, draft), (draft, logq)

        (draft_cache, last), (drafts, logq) = jax.lax.scan(propose, (narrow_tables(draft_state.cache, width), pending),
                                                           jnp.moveaxis(keys[:, 1:k + 1], 1, 0))
        _, draft_cache = self.draft.model.decode_step(draft_params, last, draft_cache)
        drafts, logq = drafts.T, jnp.moveaxis(logq, 0, 1)  # [S, k], [S, k, V]
        logits, cache = self.model.decode_tokens(params, jnp.concatenate([pending[:, None], drafts], axis=1),
                                                 narrow_tables(state.cache, width))  # [S, k + 1, V]
        repeat = lambda x: jnp.repeat(x, k + 1)  # noqa: E731
        logp = decoding.row_log_probs(logits.reshape(slots * (k + 1), -1), repeat(temperature), repeat(top_k),
                                      repeat(top_p)).reshape(logits.shape)
        accepted, nxt = accept_drafts(logp, logq, drafts, keys[:, k + 1])
        candidates = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], axis=1).at[
            jnp.arange(slots), accepted].set(nxt)  # [S, k + 1]: valid up to accepted + 1
        cand_logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), candidates[..., None], axis=-1)[..., 0]
        first_logprob = jnp.take_along_axis(jax.nn.log_softmax(state.logits), pending[:, None], axis=-1)
        tokens = jnp.where(fresh[:, None], jnp.concatenate([pending[:, None], candidates], axis=1),
                           jnp.pad(candidates, ((0, 0), (0, 1))))
        logprobs = jnp.where(fresh[:, None], jnp.concatenate([first_logprob, cand_logprobs], axis=1),
                             jnp.pad(cand_logprobs, ((0, 0), (0, 1))))
        roll_back = lambda c: _map_cache_index(c, lambda index: index - k + accepted)  # noqa: E731
        steps = state.steps + accepted + 1 + fresh
        top = None
        if with_top:  # laid out like tokens: the first token's (fresh slots) from the prefill logits, then each candidate's
            first, rest = top_log_probs(state.logits), top_log_probs(logits)
            top = tuple(jnp.where(fresh[:, None, None], jnp.concatenate([f[:, None], r], axis=1),
                                  jnp.pad(r, ((0, 0), (0, 1), (0, 0)))) for f, r in zip(first, rest))
        return (DecodeState(restore_tables(roll_back(cache), state.cache), state.logits, steps),
                DecodeState(restore_tables(roll_back(draft_cache), draft_state.cache), draft_state.logits,
                            draft_state.steps),
                nxt, tokens, logprobs, accepted, top)
