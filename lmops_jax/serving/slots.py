"""What the engine's API passes around: a prefilled row, per-slot sampling, one step's results.

Host-side dataclasses and two pure helpers over the most likely tokens; `serving.engine` (which
re-exports them) builds and consumes them, the scheduler and the speculative engine read them.
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from lmops_jax.models.model import Cache

MAX_TOP_LOGPROBS = 20  # most likely tokens a step reports per slot when asked (OpenAI's chat limit)


@dataclasses.dataclass
class Prefix:
    """A request prefilled into a one-row cache, not yet in a slot.

    cache: the row (every leaf [1, ...]); logits: float32 [1, V] predicting the first new token, None
    while no prompt token has been fed (a row made by `load_prefix`); length: prompt tokens in the row.
    """

    cache: Cache
    logits: jax.Array | None
    length: int
    draft: Prefix | None = None  # the draft model's row of the same tokens (serving.speculative)
    blocks: list[int] | None = None  # paged: the row's blocks (its cache lives in the engine's pool)


@dataclasses.dataclass
class SlotSampling:
    """Per-slot sampling arrays for `Engine.generate` (host numpy; changing them never recompiles).

    temperature float32 [S] (0 = greedy), top_k int32 [S] (0 = all), top_p float32 [S] in (0, 1],
    key_data uint32 [S, ...]: each slot's request key (`jax.random.key_data`).
    """

    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    key_data: np.ndarray

    @classmethod
    def greedy(cls, max_slots: int) -> SlotSampling:
        key = np.asarray(jax.random.key_data(jax.random.key(0)))
        return cls(np.zeros(max_slots, np.float32), np.zeros(max_slots, np.int32), np.ones(max_slots, np.float32),
                   np.zeros((max_slots,) + key.shape, key.dtype))

    def set(self, slot: int, *, temperature: float, top_k: int, top_p: float, seed: int) -> None:
        """Slot `slot` samples with these knobs and the key of `seed` (an int in [0, 2**63))."""
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = temperature, top_k, top_p
        key = jax.random.fold_in(jax.random.key(seed % 2 ** 32), seed >> 32)  # keys take 32-bit seeds
        self.key_data[slot] = np.asarray(jax.random.key_data(key))


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One `generate` step, host arrays over slots (entries of free slots mean nothing).

    tokens int32 [S]; logprobs float32 [S], each token's log-probability under the model's unmodified
    distribution; finished bool [S]: the slot's row is full, so this was the last token it can take;
    top_tokens int32 / top_logprobs float32 [S, MAX_TOP_LOGPROBS]: the most likely tokens at the step,
    when asked (`generate(..., top_logprobs=True)`), else None.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    finished: np.ndarray
    top_tokens: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None

    def emitted(self, slot: int) -> list[tuple[int, float, TopLogprobs]]:
        """(token, logprob, top (token, logprob) pairs or ()) slot `slot` got this step, in order: one
        here (speculative steps give more)."""
        return [(int(self.tokens[slot]), float(self.logprobs[slot]), top_pairs(self.top_tokens, self.top_logprobs,
                                                                                  (slot,)))]


TopLogprobs = tuple[tuple[int, float], ...]


def top_pairs(tokens: np.ndarray | None, logprobs: np.ndarray | None, index: tuple[int, ...]) -> TopLogprobs:
    """The (token, logprob) pairs at `index` of top arrays [..., MAX_TOP_LOGPROBS]; () when not computed."""
    if tokens is None:
        return ()
    return tuple((int(t), float(lp)) for t, lp in zip(tokens[index], logprobs[index]))


def top_log_probs(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The MAX_TOP_LOGPROBS most likely tokens of float32 logits [..., V]: (ids int32, log-probs) [..., K]."""
    values, ids = jax.lax.top_k(jax.nn.log_softmax(logits), min(MAX_TOP_LOGPROBS, logits.shape[-1]))
    return ids.astype(jnp.int32), values
