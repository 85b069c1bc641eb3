"""Per-token losses over logits: cross-entropy, knowledge-distillation divergences, argmax.

Each loss is written once, as a function of the logits one device holds: the whole vocabulary [..., V]
(`axis_name` None), or, inside `jax.shard_map`, a vocabulary shard [..., V/n] of the mesh axis
`axis_name`, where every sum, max and lookup over the vocabulary becomes a collective over per-token
values [...] (see `vocab_parallel`). `TokenLosses` runs them on whole logits; its subclass
`vocab_parallel.VocabParallelTokenLosses` runs the same functions per vocabulary shard. The trainers
compute through one of the two and `kd_loss` / `cross_entropy_with_logits` through the plain one, so
what the tests check is what trains.

Logits are computed in at least float32 (the distillation losses keep float64 inputs in float64, so
gradients can be checked against finite differences).

KD conventions: p is the teacher distribution softmax(teacher_logits / T), q the student distribution
softmax(student_logits / T); divergences are per token, summed over the vocabulary, and multiplied by
T^2 (Hinton et al. 2015) so that gradient magnitudes stay comparable across temperatures.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")

Schedule = Callable[[Any], Any]
ScalarOrSchedule = Union[float, jax.Array, Schedule]
AxisName = Union[str, None]


def resolve_schedule(value: ScalarOrSchedule, step: int | jax.Array | None) -> Any:
    """Value of a hyperparameter that is either a constant or an optax-style schedule.

    Args:
      value: a float (or scalar array), or a callable `step -> value` such as an optax schedule.
      step: the current train step; required only when `value` is a schedule.

    Returns:
      `value` itself for constants, `value(step)` for schedules (traceable under jit).
    """
    if callable(value):
        if step is None:
            raise ValueError("step is required when the value is a schedule (a callable of the step)")
        return value(step)
    return value


def check_kd_args(kind: str, temperature: Any, beta: Any) -> None:
    """Validates what can be checked before tracing (Python numbers, not traced schedule values)."""
    if kind not in KD_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KD_KINDS}")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind == "jsd" and isinstance(beta, (int, float)) and not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta must lie strictly between 0 and 1 for kind='jsd', got {beta}; "
            "use kind='forward_kl' or 'reverse_kl' for the limits"
        )


def _upcast(x: jax.Array) -> jax.Array:
    """Casts to float32, or keeps float64; half-precision logits lose too much in exp/log."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ---------------------------------------------------------------------------------------------------
# Reductions over the vocabulary: the last axis, then across the shards of `axis_name` when it is set.
# ---------------------------------------------------------------------------------------------------
def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmax(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def _pmin(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else jax.lax.pmin(x, axis_name)


def _vocab_sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return _psum(jnp.sum(x, axis=-1), axis_name)


def _global_vocab(x: jax.Array, axis_name: AxisName) -> int:
    return x.shape[-1] * (1 if axis_name is None else jax.lax.axis_size(axis_name))


def _shard_offset(x: jax.Array, axis_name: AxisName) -> Any:
    """Global id of this shard's first vocabulary entry."""
    return 0 if axis_name is None else jax.lax.axis_index(axis_name) * x.shape[-1]


def _logsumexp(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """log sum_v exp(x) [...]; -inf for rows that are all -inf. The max is a constant (stop_gradient)."""
    m = _pmax(jnp.max(jax.lax.stop_gradient(x), axis=-1), axis_name)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m + jnp.log(_vocab_sum(jnp.exp(x - m[..., None]), axis_name))


def _log_softmax(x: jax.Array, axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """(log-softmax of x [..., V/n], log-normalizer [...])."""
    log_z = _logsumexp(x, axis_name)
    return x - log_z[..., None], log_z


def _local_ids(x: jax.Array, ids: jax.Array, axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """(global ids [..., k] as indices into this shard, whether each id lies in this shard)."""
    local = ids.astype(jnp.int32) - _shard_offset(x, axis_name)
    return local, (local >= 0) & (local < x.shape[-1])


def _at_ids(x: jax.Array, ids: jax.Array, axis_name: AxisName) -> jax.Array:
    """x at global vocabulary ids [..., k], each value taken from the shard that holds it."""
    local, here = _local_ids(x, ids, axis_name)
    picked = jnp.take_along_axis(x, jnp.clip(local, 0, x.shape[-1] - 1), axis=-1)
    return _psum(jnp.where(here, picked, 0.0), axis_name)


def _is_one_of(x: jax.Array, ids: jax.Array, axis_name: AxisName) -> jax.Array:
    """bool [..., V/n]: True at the entries of this shard named by ids [..., k]."""
    local, here = _local_ids(x, ids, axis_name)
    shard, k = x.shape[-1], ids.shape[-1]
    cols = jnp.where(here, local, shard).reshape(-1, k)  # out of range: dropped by the scatter
    rows = jnp.arange(cols.shape[0])[:, None]
    mask = jnp.zeros((cols.shape[0], shard), bool).at[rows, cols].set(True, mode="drop")
    return mask.reshape(x.shape)


# ---------------------------------------------------------------------------------------------------
# The losses, per device: whole logits with axis_name None, a vocabulary shard inside shard_map.
# ---------------------------------------------------------------------------------------------------
def _cross_entropy(logits: jax.Array, targets: jax.Array, *, z_loss: float, label_smoothing: float,
                   axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    logits = logits.astype(jnp.float32)
    log_probs, log_z = _log_softmax(logits, axis_name)
    target_logp = _at_ids(log_probs, targets[..., None], axis_name)[..., 0]
    loss = -target_logp
    if label_smoothing:
        vocab = _global_vocab(logits, axis_name)
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab - 1)
        normalizer = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
        loss = -(confidence * target_logp + low * (_vocab_sum(log_probs, axis_name) - target_logp)) - normalizer
    z_term = z_loss * jnp.square(log_z)
    return loss + z_term, z_term


def _kl_terms(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """Elementwise a * (log a - log b), with 0 where a == 0 (0 log 0 = 0), NaN-free in value and grad.

    The double `where` keeps -inf log-probabilities (e.g. logits masked to -inf for padded vocabulary
    entries) from producing inf - inf in the unselected branch, whose NaN would leak into gradients.
    """
    live = log_a > -jnp.inf
    safe_a = jnp.where(live, log_a, 0.0)
    safe_b = jnp.where(live, log_b, 0.0)
    return jnp.where(live, jnp.exp(safe_a) * (safe_a - safe_b), 0.0)


def _divergence(log_p: jax.Array, log_q: jax.Array, beta: jax.Array, *, kind: str,
                axis_name: AxisName) -> jax.Array:
    """Per-token divergence [...] between the teacher p and the student q, from log-probs [..., V/n].

      forward_kl: KL(p || q) = sum_v p (log p - log q)        (mean-seeking; classic KD)
      reverse_kl: KL(q || p) = sum_v q (log q - log p)        (mode-seeking; MiniLLM)
      jsd:        beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q
                  (generalized JSD of GKD, Agarwal et al. 2024; beta weights the teacher). As beta -> 0,
                  jsd / beta -> KL(p || q); as beta -> 1, jsd / (1 - beta) -> KL(q || p).
                  log m = logaddexp(log beta + log p, log(1 - beta) + log q), never log of a sum.
    """
    if kind == "forward_kl":
        return _vocab_sum(_kl_terms(log_p, log_q), axis_name)
    if kind == "reverse_kl":
        return _vocab_sum(_kl_terms(log_q, log_p), axis_name)
    beta = beta.astype(log_p.dtype)
    # Where both distributions are 0, logaddexp(-inf, -inf) has a NaN gradient: feed it zeros there.
    live = (log_p > -jnp.inf) | (log_q > -jnp.inf)
    log_m = jnp.logaddexp(jnp.where(live, jnp.log(beta) + log_p, 0.0), jnp.where(live, jnp.log1p(-beta) + log_q, 0.0))
    log_m = jnp.where(live, log_m, -jnp.inf)
    return beta * _vocab_sum(_kl_terms(log_p, log_m), axis_name) + (1.0 - beta) * _vocab_sum(
        _kl_terms(log_q, log_m), axis_name)


def _kd(student: jax.Array, teacher: jax.Array, temperature: jax.Array, beta: jax.Array, *, kind: str,
        axis_name: AxisName) -> jax.Array:
    student = _upcast(student)
    teacher = _upcast(teacher).astype(student.dtype)
    temperature = temperature.astype(student.dtype)
    log_q, _ = _log_softmax(student / temperature, axis_name)
    log_p, _ = _log_softmax(teacher / temperature, axis_name)
    return jnp.square(temperature) * _divergence(log_p, log_q, beta, kind=kind, axis_name=axis_name)


def _kd_from_topk(student: jax.Array, stored: jax.Array, ids: jax.Array, temperature: jax.Array, *,
                  axis_name: AxisName) -> jax.Array:
    student = _upcast(student)
    temperature = temperature.astype(student.dtype)
    log_q, _ = _log_softmax(student / temperature, axis_name)
    log_q_top = _at_ids(log_q, ids, axis_name)
    stored = stored.astype(student.dtype)
    log_kept = jax.nn.logsumexp(stored, axis=-1, keepdims=True)
    log_p_top = log_kept + jax.nn.log_softmax(stored / temperature, axis=-1)
    loss = jnp.sum(_kl_terms(log_p_top, log_q_top), axis=-1)
    if ids.shape[-1] < _global_vocab(student, axis_name):
        # log r = log(1 - exp(s)) = log(-expm1(s)), accurate for s near 0; r = 0 when s >= 0 (rounding).
        kept = jnp.minimum(log_kept[..., 0], 0.0)
        log_rest = jnp.where(kept < 0.0, jnp.log(-jnp.expm1(jnp.minimum(kept, -1e-30))), -jnp.inf)
        log_q_rest = _logsumexp(jnp.where(_is_one_of(log_q, ids, axis_name), -jnp.inf, log_q), axis_name)
        loss = loss + _kl_terms(log_rest, log_q_rest)
    return jnp.square(temperature) * loss


def _argmax(logits: jax.Array, *, axis_name: AxisName) -> jax.Array:
    """First global index of the maximum (ties go to the lowest id, as jnp.argmax)."""
    local_max = jnp.max(logits, axis=-1)
    index = jnp.argmax(logits, axis=-1).astype(jnp.int32) + _shard_offset(logits, axis_name)
    best = _pmax(local_max, axis_name)
    return _pmin(jnp.where(local_max == best, index, jnp.iinfo(jnp.int32).max), axis_name)


# ---------------------------------------------------------------------------------------------------
# The loss object.
# ---------------------------------------------------------------------------------------------------
def _check_pair(student_logits: jax.Array, teacher_logits: jax.Array) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocab sizes of teacher and student logits differ: teacher {teacher_logits.shape[-1]}, "
            f"student {student_logits.shape[-1]}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {teacher_logits.shape} differs from student_logits shape {student_logits.shape}"
        )


def _check_topk(student_logits: jax.Array, logprobs: jax.Array, ids: jax.Array) -> None:
    if ids.shape != logprobs.shape:
        raise ValueError(f"teacher_topk_ids shape {ids.shape} differs from teacher_topk_logprobs shape "
                         f"{logprobs.shape}")
    if logprobs.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher_topk_logprobs leading shape {logprobs.shape[:-1]} differs from "
                         f"student_logits leading shape {student_logits.shape[:-1]}")
    if logprobs.shape[-1] > student_logits.shape[-1]:
        raise ValueError(f"teacher_topk_logprobs has k={logprobs.shape[-1]} entries, more than the student "
                         f"vocabulary {student_logits.shape[-1]}")


@dataclasses.dataclass(frozen=True)
class TokenLosses:
    """Per-token losses of logits [B, ..., V] -> [B, ...], with the whole vocabulary on each device.

    GSPMD may gather a vocabulary that the rules shard; `vocab_parallel.VocabParallelTokenLosses` runs
    the same functions per shard instead. Per-token values let trainers sum them, weighted, for
    gradient accumulation.
    """

    def cross_entropy(self, logits: jax.Array, targets: jax.Array, *, z_loss: float = 0.0,
                      label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
        """See cross_entropy_with_logits: (loss [B, ...] including the z-loss term, z-loss term [B, ...])."""
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"targets shape {targets.shape} differs from logits shape {logits.shape[:-1]}")
        return self._run(_cross_entropy, (logits, targets), ("vocab", "token"), ("token", "token"),
                         z_loss=float(z_loss), label_smoothing=float(label_smoothing))

    def kd(self, student_logits: jax.Array, teacher_logits: jax.Array, *, kind: str = "forward_kl",
           temperature: Any = 1.0, beta: Any = 0.5) -> jax.Array:
        """T^2 * D(softmax(teacher / T), softmax(student / T)) per token [B, ...].

        Args:
          student_logits, teacher_logits: [B, ..., V], same shape.
          kind: 'forward_kl' | 'reverse_kl' | 'jsd' (see _divergence).
          temperature: T > 0 (float or traced scalar, e.g. from a schedule).
          beta: teacher weight of the JSD mixture, in (0, 1); ignored by the KL kinds.

        Returns:
          [B, ...] float32 (float64 for float64 inputs).
        """
        check_kd_args(kind, temperature, beta)
        _check_pair(student_logits, teacher_logits)
        return self._run(_kd, (student_logits, teacher_logits, jnp.asarray(temperature), jnp.asarray(beta)),
                         ("vocab", "vocab", "scalar", "scalar"), "token", kind=kind)

    def kd_from_topk(self, student_logits: jax.Array, teacher_topk_logprobs: jax.Array,
                     teacher_topk_ids: jax.Array, *, temperature: Any = 1.0) -> jax.Array:
        """Per-token forward KL [B, ...] from stored top-k teacher log-probs, with an explicit tail bucket.

        Both distributions are reduced to k + 1 outcomes: the k stored ids and one "rest" bucket.
          teacher: s = logsumexp(topk_logprobs) = log(kept mass); rest r = 1 - exp(s);
                   p_i = exp(s) * softmax(topk_logprobs / T)_i: the kept mass is renormalized among the
                   top-k at temperature T, the tail keeps its temperature-1 mass r (its shape is unknown).
          student: q_i = softmax(student / T)[ids_i]; q_rest = sum of q over the ids not in the top-k
                   (a masked logsumexp, so it is accurate even when q_rest is tiny).
          loss = T^2 * [sum_i p_i (log p_i - log q_i) + r (log r - log q_rest)]
        This is a proper KL between two (k + 1)-outcome distributions, hence >= 0, and for k = V it
        equals the full forward KL at any T (r = 0 and the renormalized top-k is softmax(teacher / T)).

        Args:
          student_logits: [B, ..., V].
          teacher_topk_logprobs: [B, ..., k] from topk_teacher_logprobs (temperature 1, normalized over
            the full vocabulary).
          teacher_topk_ids: [B, ..., k] integer ids, distinct within a token.
          temperature: T > 0.
        """
        check_kd_args("forward_kl", temperature, 0.5)
        _check_topk(student_logits, teacher_topk_logprobs, teacher_topk_ids)
        args = (student_logits, teacher_topk_logprobs, teacher_topk_ids, jnp.asarray(temperature))
        return self._run(_kd_from_topk, args, ("vocab", "topk", "topk", "scalar"), "token")

    def argmax(self, logits: jax.Array) -> jax.Array:
        """jnp.argmax(logits, -1) [B, ...] (first index on ties); not differentiated."""
        return self._run(_argmax, (jax.lax.stop_gradient(logits),), ("vocab",), "token")

    def _run(self, fn: Callable[..., Any], args: tuple, in_kinds: tuple[str, ...], out_kinds: str | tuple[str, ...],
             **static: Any) -> Any:
        """fn(*args, **static) on whole logits. `in_kinds` / `out_kinds` say how each array is laid out
        ('vocab' [B, ..., V], 'token' [B, ...], 'topk' [B, ..., k], 'scalar'), for sharded subclasses."""
        del in_kinds, out_kinds
        return fn(*args, axis_name=None, **static)


def cross_entropy_with_logits(
    logits: jax.Array,
    targets: jax.Array,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy with optional z-loss and label smoothing.

    Args:
      logits: [..., V].
      targets: [...] integer ids.
      z_loss: coefficient of the auxiliary loss z_loss * log(Z)^2 that keeps the softmax normalizer
        near 1 (PaLM); it is included in the returned loss.
      label_smoothing: mass spread uniformly over the vocabulary; the constant entropy of the smoothed
        target is subtracted so that a perfect model scores 0, as in T5X.

    Returns:
      (loss [...], z_loss term [...]) in float32; `loss` already contains the z-loss term.
    """
    return TokenLosses().cross_entropy(logits, targets, z_loss=z_loss, label_smoothing=label_smoothing)


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    weights: jax.Array | None = None,
    *,
    kind: str = "forward_kl",
    temperature: Any = 1.0,
    beta: Any = 0.5,
) -> jax.Array:
    """Scalar KD loss: the weighted mean over tokens of TokenLosses.kd (what DistillationTrainer sums).

    Args:
      student_logits, teacher_logits: [..., V].
      weights: [...] loss weights (0 masks padding) or None for all ones; all zeros give 0.
      kind, temperature, beta: as in TokenLosses.kd.
    """
    tokens = TokenLosses().kd(student_logits, teacher_logits, kind=kind, temperature=temperature, beta=beta)
    if weights is None:
        return jnp.mean(tokens)
    if weights.shape != tokens.shape:
        raise ValueError(f"weights shape {weights.shape} differs from the per-token shape {tokens.shape}")
    weights = weights.astype(tokens.dtype)
    return jnp.sum(tokens * weights) / jnp.maximum(jnp.sum(weights), 1e-8)


def topk_teacher_logprobs(teacher_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k teacher log-probabilities at temperature 1 over the full vocabulary, for offline KD.

    Storing k << V values per token is what makes offline distillation datasets affordable; the tail
    mass 1 - sum(exp(logprobs)) stays recoverable because they are normalized over the full vocabulary.

    Args:
      teacher_logits: [..., V].
      k: 1 <= k <= V.

    Returns:
      (logprobs [..., k] float32 sorted descending, ids [..., k] int32).
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got {k}")
    log_p = jax.nn.log_softmax(_upcast(teacher_logits), axis=-1)
    values, ids = jax.lax.top_k(log_p, k)
    return values, ids.astype(jnp.int32)
