"""Loss functions: pure functions of logits, targets and weights.

All take logits [..., V] in any float dtype and compute in float32 (the distillation losses keep
float64 inputs in float64, so gradients can be checked against finite differences).
"""
from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp


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
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    target_logp = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing:
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab - 1)
        normalizer = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
        loss = -(confidence * target_logp + low * (jnp.sum(log_probs, axis=-1) - target_logp)) - normalizer
    else:
        loss = -target_logp
    z_term = z_loss * jnp.square(log_z)
    return loss + z_term, z_term


# ---------------------------------------------------------------------------------------------------
# Knowledge distillation.
#
# Conventions: p is the teacher distribution softmax(teacher_logits / T), q the student distribution
# softmax(student_logits / T); divergences are per token, summed over the vocabulary, and multiplied by
# T^2 (Hinton et al. 2015) so that gradient magnitudes stay comparable across temperatures. Logits are
# computed in at least float32 (float64 inputs stay float64, which lets tests check gradients
# against finite differences).
# ---------------------------------------------------------------------------------------------------

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")

Schedule = Callable[[Any], Any]
ScalarOrSchedule = Union[float, jax.Array, Schedule]


def _upcast(x: jax.Array) -> jax.Array:
    """Casts to float32, or keeps float64; half-precision logits lose too much in exp/log."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


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


def weighted_mean(values: jax.Array, weights: jax.Array | None = None, eps: float = 1e-8) -> jax.Array:
    """sum(w * v) / max(sum(w), eps): the mean over weighted tokens, 0 when every weight is 0.

    Args:
      values: [...] per-token values.
      weights: [...] (same shape) or None for all ones.
    """
    if weights is None:
        return jnp.mean(values)
    if weights.shape != values.shape:
        raise ValueError(f"weights shape {weights.shape} differs from the per-token shape {values.shape}")
    weights = weights.astype(values.dtype)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), eps)


def _check_kd_args(kind: str, temperature: Any, beta: Any) -> None:
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


def _kl_terms(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """Elementwise a * (log a - log b), with 0 where a == 0 (0 log 0 = 0), NaN-free in value and grad.

    The double `where` keeps -inf log-probabilities (e.g. logits masked to -inf for padded vocabulary
    entries) from producing inf - inf in the unselected branch, whose NaN would leak into gradients.
    """
    live = log_a > -jnp.inf
    safe_a = jnp.where(live, log_a, 0.0)
    safe_b = jnp.where(live, log_b, 0.0)
    return jnp.where(live, jnp.exp(safe_a) * (safe_a - safe_b), 0.0)


def divergence_from_log_probs(
    teacher_log_probs: jax.Array,
    student_log_probs: jax.Array,
    *,
    kind: str,
    beta: Any = 0.5,
    vocab_sum: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Per-token divergence between the teacher (p) and the student (q) from normalized log-probs.

      forward_kl: KL(p || q) = sum_v p (log p - log q)        (mean-seeking; classic KD)
      reverse_kl: KL(q || p) = sum_v q (log q - log p)        (mode-seeking; MiniLLM)
      jsd:        beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q
                  (generalized JSD of GKD, Agarwal et al. 2024; beta weights the teacher). As beta -> 0,
                  jsd / beta -> KL(p || q); as beta -> 1, jsd / (1 - beta) -> KL(q || p).
                  log m = logaddexp(log beta + log p, log(1 - beta) + log q), never log of a sum.

    Args:
      teacher_log_probs, student_log_probs: [..., V] (or a vocabulary shard of it).
      kind: one of KD_KINDS.
      beta: mixture weight of the teacher for 'jsd'.
      vocab_sum: reduces [..., V] terms to [...]; default sums the last axis. The vocabulary-parallel
        losses pass a local sum followed by a psum over the vocabulary mesh axis.

    Returns:
      [...] divergence (no temperature scaling).
    """
    if kind not in KD_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KD_KINDS}")
    if vocab_sum is None:
        vocab_sum = lambda x: jnp.sum(x, axis=-1)  # noqa: E731
    if kind == "forward_kl":
        return vocab_sum(_kl_terms(teacher_log_probs, student_log_probs))
    if kind == "reverse_kl":
        return vocab_sum(_kl_terms(student_log_probs, teacher_log_probs))
    beta = jnp.asarray(beta, teacher_log_probs.dtype)
    # Where both distributions are 0, logaddexp(-inf, -inf) has a NaN gradient: feed it zeros there.
    live = (teacher_log_probs > -jnp.inf) | (student_log_probs > -jnp.inf)
    log_m = jnp.logaddexp(
        jnp.where(live, jnp.log(beta) + teacher_log_probs, 0.0),
        jnp.where(live, jnp.log1p(-beta) + student_log_probs, 0.0),
    )
    log_m = jnp.where(live, log_m, -jnp.inf)
    return beta * vocab_sum(_kl_terms(teacher_log_probs, log_m)) + (1.0 - beta) * vocab_sum(
        _kl_terms(student_log_probs, log_m)
    )


def kd_token_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    kind: str = "forward_kl",
    temperature: Any = 1.0,
    beta: Any = 0.5,
) -> jax.Array:
    """Per-token KD loss T^2 * D(softmax(teacher / T), softmax(student / T)); see divergence_from_log_probs.

    Per-token values let trainers sum (rather than average) for gradient accumulation.

    Args:
      student_logits, teacher_logits: [..., V], same shape.
      kind: 'forward_kl' | 'reverse_kl' | 'jsd'.
      temperature: T > 0 (float or traced scalar, e.g. from a schedule).
      beta: teacher weight of the JSD mixture, in (0, 1); ignored by the KL kinds.

    Returns:
      [...] float32 (float64 for float64 inputs).
    """
    _check_kd_args(kind, temperature, beta)
    _check_pair(student_logits, teacher_logits)
    student = _upcast(student_logits)
    teacher = _upcast(teacher_logits).astype(student.dtype)
    temperature = jnp.asarray(temperature, student.dtype)
    log_q = jax.nn.log_softmax(student / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    return jnp.square(temperature) * divergence_from_log_probs(log_p, log_q, kind=kind, beta=beta)


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    weights: jax.Array | None = None,
    *,
    kind: str = "forward_kl",
    temperature: Any = 1.0,
    beta: Any = 0.5,
) -> jax.Array:
    """Scalar KD loss: weighted mean over tokens of kd_token_loss.

    Args:
      student_logits, teacher_logits: [..., V].
      weights: [...] loss weights (0 masks padding) or None for all ones.
    """
    token_loss = kd_token_loss(student_logits, teacher_logits, kind=kind, temperature=temperature, beta=beta)
    return weighted_mean(token_loss, weights)


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


def kd_token_loss_from_topk(
    student_logits: jax.Array,
    teacher_topk_logprobs: jax.Array,
    teacher_topk_ids: jax.Array,
    *,
    temperature: Any = 1.0,
) -> jax.Array:
    """Per-token forward KL from stored top-k teacher log-probs, with an explicit tail bucket.

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
      student_logits: [..., V].
      teacher_topk_logprobs: [..., k] from topk_teacher_logprobs (temperature-1, full-vocab normalized).
      teacher_topk_ids: [..., k] integer ids, distinct within a token.
      temperature: T > 0.

    Returns:
      [...] per-token loss.
    """
    _check_kd_args("forward_kl", temperature, 0.5)
    vocab = student_logits.shape[-1]
    k = teacher_topk_logprobs.shape[-1]
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids shape {teacher_topk_ids.shape} differs from "
            f"teacher_topk_logprobs shape {teacher_topk_logprobs.shape}"
        )
    if teacher_topk_logprobs.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher_topk_logprobs leading shape {teacher_topk_logprobs.shape[:-1]} differs from "
            f"student_logits leading shape {student_logits.shape[:-1]}"
        )
    if k > vocab:
        raise ValueError(f"teacher_topk_logprobs has k={k} entries, more than the student vocabulary {vocab}")
    student = _upcast(student_logits)
    temperature = jnp.asarray(temperature, student.dtype)
    stored = teacher_topk_logprobs.astype(student.dtype)
    ids = teacher_topk_ids.astype(jnp.int32)

    log_q = jax.nn.log_softmax(student / temperature, axis=-1)
    log_q_top = jnp.take_along_axis(log_q, ids, axis=-1)
    log_kept = jax.nn.logsumexp(stored, axis=-1, keepdims=True)
    log_p_top = log_kept + jax.nn.log_softmax(stored / temperature, axis=-1)
    loss = jnp.sum(_kl_terms(log_p_top, log_q_top), axis=-1)
    if k < vocab:
        # log r = log(1 - exp(s)) = log(-expm1(s)), accurate for s near 0; r = 0 when s >= 0 (rounding).
        kept = jnp.minimum(log_kept[..., 0], 0.0)
        log_rest = jnp.where(kept < 0.0, jnp.log(-jnp.expm1(jnp.minimum(kept, -1e-30))), -jnp.inf)
        in_topk = jnp.put_along_axis(jnp.zeros(log_q.shape, bool), ids, True, axis=-1, inplace=False)
        log_q_rest = jax.nn.logsumexp(jnp.where(in_topk, -jnp.inf, log_q), axis=-1)
        loss = loss + _kl_terms(log_rest, log_q_rest)
    return jnp.square(temperature) * loss


def kd_loss_from_topk(
    student_logits: jax.Array,
    teacher_topk_logprobs: jax.Array,
    teacher_topk_ids: jax.Array,
    weights: jax.Array | None = None,
    *,
    temperature: Any = 1.0,
) -> jax.Array:
    """Scalar offline KD loss: weighted mean over tokens of kd_token_loss_from_topk."""
    token_loss = kd_token_loss_from_topk(
        student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature=temperature
    )
    return weighted_mean(token_loss, weights)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None,
    *,
    alpha: ScalarOrSchedule = 0.5,
    kind: str = "forward_kl",
    temperature: ScalarOrSchedule = 1.0,
    beta: float = 0.5,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    step: int | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Student loss = alpha * KD + (1 - alpha) * hard-label CE + z-loss, weighted means over tokens.

    The teacher logits pass through stop_gradient: the teacher is never trained by this loss. The
    z-loss (PaLM) regularizes the student's normalizer whatever alpha is, so it sits outside the mix.

    Args:
      student_logits, teacher_logits: [..., V].
      targets: [...] integer ids of the hard labels.
      weights: [...] loss weights or None for all ones.
      alpha: weight of the KD term in [0, 1]; a float or a schedule of `step`.
      kind, temperature, beta: as in kd_loss; temperature may be a schedule of `step`.
      z_loss, label_smoothing: as in cross_entropy_with_logits.
      step: train step, needed when alpha or temperature is a schedule.

    Returns:
      (loss scalar, metrics) with metrics kd_loss, ce_loss (without z-loss), z_loss, teacher_agreement
      (weighted fraction of tokens where argmax student == argmax teacher), alpha and temperature.
    """
    alpha = resolve_schedule(alpha, step)
    temperature = resolve_schedule(temperature, step)
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if targets.shape != student_logits.shape[:-1]:
        raise ValueError(f"targets shape {targets.shape} differs from student_logits shape {student_logits.shape[:-1]}")
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    kd = kd_loss(student_logits, teacher_logits, weights, kind=kind, temperature=temperature, beta=beta)
    ce_token, z_token = cross_entropy_with_logits(
        student_logits, targets, z_loss=z_loss, label_smoothing=label_smoothing
    )
    ce = weighted_mean(ce_token - z_token, weights)
    z = weighted_mean(z_token, weights)
    loss = alpha * kd + (1.0 - alpha) * ce + z
    agree = (jnp.argmax(student_logits, axis=-1) == jnp.argmax(teacher_logits, axis=-1)).astype(jnp.float32)
    metrics = {
        "kd_loss": kd,
        "ce_loss": ce,
        "z_loss": z,
        "teacher_agreement": weighted_mean(agree, weights),
        "alpha": jnp.asarray(alpha, jnp.float32),
        "temperature": jnp.asarray(temperature, jnp.float32),
    }
    return loss, metrics
