"""Beam search over the `tokens_to_logits` callback of `lmops_jax.inference.decoding`, as one `lax.while_loop`.

Scoring: a hypothesis of `length` tokens (EOS included) with summed log-probability `log_prob` scores

    score = log_prob / brevity_penalty(length),  brevity_penalty(length) = ((5 + length) / 6) ** alpha

the GNMT / T5X "brevity penalty" (Wu et al. 2016). alpha = 0 ranks by raw log-probability; alpha > 0
favours longer hypotheses.

Bookkeeping (T5X style): each step extends the K live beams of every prompt to K * V candidates and
keeps the best 2K by log-probability; at most K of them end in EOS (one per beam), so K non-EOS
candidates always remain to become the next live beams. Candidates ending in EOS, and every candidate
at the last step, compete with the K finished hypotheses kept so far; the best K by score stay. So
a hypothesis that finished early survives as long as it beats the others. The loop stops once, for
every prompt, the worst of K finished hypotheses scores at least the best score any live beam could
still reach.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lmops_jax.inference.decoding import (PAD_ID, State, TokensToLogits, call_model, check_decode_inputs,
                                expand_state, gather_beams)


class BeamOutput(NamedTuple):
    """Result of `beam_search`, a pytree, hypotheses sorted best first.

    Attributes:
      tokens: int32 [B, K, T]; EOS included when emitted, PAD_ID (0) after the hypothesis ends.
      scores: float32 [B, K]; length-penalized scores (module docstring).
      lengths: int32 [B, K]; tokens per hypothesis, EOS included.
      log_probs: float32 [B, K]; summed log-probabilities, log_softmax of the model's logits.
    Slots that no hypothesis filled (only when K exceeds the number of distinct hypotheses) have
    score -inf, length 0 and PAD_ID tokens.
    """

    tokens: jax.Array
    scores: jax.Array
    lengths: jax.Array
    log_probs: jax.Array


def brevity_penalty(length: jax.Array | int, alpha: float | jax.Array) -> jax.Array:
    """GNMT / T5X brevity penalty ((5 + length) / 6) ** alpha, float32 of length's shape."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


class _BeamCarry(NamedTuple):
    step: jax.Array  # int32 scalar: tokens generated so far by every live beam
    live_tokens: jax.Array  # int32 [B, K, T]
    live_log_probs: jax.Array  # float32 [B, K]; -inf for dead beams
    fin_tokens: jax.Array  # int32 [B, K, T]
    fin_scores: jax.Array  # float32 [B, K]; sorted descending, -inf for empty slots
    fin_log_probs: jax.Array  # float32 [B, K]
    fin_lengths: jax.Array  # int32 [B, K]
    state: State  # per-sequence leaves [B * K, ...]


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Gathers along axis 1: x [B, M, ...], idx [B, J] -> [B, J, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(
    initial_logits: jax.Array,
    state: State,
    tokens_to_logits: TokensToLogits,
    *,
    max_new_tokens: int,
    eos_id: int,
    num_beams: int,
    length_penalty: float | jax.Array = 1.0,
) -> BeamOutput:
    """Beam search with length penalty, finished-hypothesis bookkeeping and early termination.

    Args:
      initial_logits: float [B, V], the prefill's logits predicting the first new token.
      state: model state after the prompt; expanded to B * num_beams rows with `expand_state` and
        reordered with `gather_beams` as beams are chosen.
      tokens_to_logits: (int32 [B * K], state) -> (float [B * K, V], state); called at most
        max_new_tokens - 1 times.
      max_new_tokens: static maximum hypothesis length T, EOS included. Hypotheses that reach T
        without EOS are finished as they are.
      eos_id: end-of-sequence id (-1: none, every hypothesis has length T).
      num_beams: static beam width K.
      length_penalty: alpha of the length penalty (module docstring); may be traced.

    Returns:
      BeamOutput, K hypotheses per prompt sorted by score, best first.

    Jit with static_argnames=("tokens_to_logits", "max_new_tokens", "num_beams").
    """
    if not isinstance(num_beams, numbers.Integral) or num_beams < 1:
        raise ValueError(f"num_beams must be a static int >= 1, got {num_beams!r}")
    batch, vocab = check_decode_inputs(initial_logits, state, max_new_tokens)
    k, t = num_beams, max_new_tokens
    num_candidates = min(2 * k, k * vocab)
    neg_inf = jnp.array(-jnp.inf, jnp.float32)

    def extend(carry: _BeamCarry, logits: jax.Array, state: State) -> _BeamCarry:
        """Extends the live beams by one token from logits [B * K, V] and updates both beam sets."""
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
        candidates = (carry.live_log_probs[:, :, None] + log_probs).reshape(batch, k * vocab)
        cand_log_probs, flat = lax.top_k(candidates, num_candidates)  # [B, C]
        source_beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        cand_tokens = _take(carry.live_tokens, source_beam).at[:, :, carry.step].set(token)
        length = carry.step + 1
        ends = (token == eos_id) | (length == t)

        cand_scores = jnp.where(ends, cand_log_probs / brevity_penalty(length, length_penalty), neg_inf)
        fin_scores, keep = lax.top_k(jnp.concatenate([carry.fin_scores, cand_scores], axis=1), k)
        fin_tokens = _take(jnp.concatenate([carry.fin_tokens, cand_tokens], axis=1), keep)
        fin_log_probs = _take(jnp.concatenate([carry.fin_log_probs, cand_log_probs], axis=1), keep)
        cand_lengths = jnp.full(cand_scores.shape, length, jnp.int32)
        fin_lengths = _take(jnp.concatenate([carry.fin_lengths, cand_lengths], axis=1), keep)
        filled = jnp.isfinite(fin_scores)

        live_log_probs, live = lax.top_k(jnp.where(ends, neg_inf, cand_log_probs), k)
        return _BeamCarry(
            step=length,
            live_tokens=_take(cand_tokens, live),
            live_log_probs=live_log_probs,
            fin_tokens=jnp.where(filled[:, :, None], fin_tokens, PAD_ID),
            fin_scores=fin_scores,
            fin_log_probs=jnp.where(filled, fin_log_probs, neg_inf),
            fin_lengths=jnp.where(filled, fin_lengths, 0),
            state=gather_beams(state, _take(source_beam, live)),
        )

    def cond(carry: _BeamCarry) -> jax.Array:
        # Log-probs only decrease, so a live beam's best reachable score is its log-prob divided by
        # the largest penalty over the lengths it can still reach; the penalty is monotonic in length.
        best_penalty = jnp.maximum(brevity_penalty(carry.step + 1, length_penalty),
                                   brevity_penalty(t, length_penalty))
        best_live = jnp.max(carry.live_log_probs, axis=1) / best_penalty
        worst_finished = carry.fin_scores[:, -1]
        return (carry.step < t) & ~jnp.all(worst_finished >= best_live)

    def body(carry: _BeamCarry) -> _BeamCarry:
        last = carry.live_tokens[:, :, carry.step - 1].reshape(batch * k)
        logits, new_state = call_model(tokens_to_logits, last, carry.state, vocab)
        return extend(carry, logits, new_state)

    # Only beam 0 is alive at the start, so the first step picks K distinct tokens.
    start_log_probs = jnp.full((batch, k), neg_inf).at[:, 0].set(0.0)
    start = _BeamCarry(
        step=jnp.array(0, jnp.int32),
        live_tokens=jnp.full((batch, k, t), PAD_ID, jnp.int32),
        live_log_probs=start_log_probs,
        fin_tokens=jnp.full((batch, k, t), PAD_ID, jnp.int32),
        fin_scores=jnp.full((batch, k), neg_inf),
        fin_log_probs=jnp.full((batch, k), neg_inf),
        fin_lengths=jnp.zeros((batch, k), jnp.int32),
        state=expand_state(state, k),
    )
    first = extend(start, expand_state(initial_logits, k), start.state)
    final = lax.while_loop(cond, body, first)
    return BeamOutput(tokens=final.fin_tokens, scores=final.fin_scores, lengths=final.fin_lengths,
                      log_probs=final.fin_log_probs)
