"""Universal Logit Distillation (ULD; Boizard et al. 2024): a loss between next-token distributions over
different vocabularies, for a student whose tokenizer is not the teacher's.

Logits of two tokenizers index unrelated sets of tokens, so no divergence that pairs entries by id
applies. ULD compares the distributions' shapes: both are sorted by decreasing probability, the shorter
padded with zeros to the longer, and the per-token loss is the sum of absolute differences

    ULD(p, q) = sum_i | p_(i) - q_(i) |,    p_(1) >= p_(2) >= ...,  q_(1) >= q_(2) >= ...

which the paper derives as the Wasserstein-1 distance between p and q under its cost simplification
(entries matched by rank). It is 0 exactly when q is a permutation of p (zero-padded), lies in [0, 2],
and ignores which token carries which probability. p = softmax(teacher / T), q = softmax(student / T);
unlike the KL kinds it is not multiplied by T^2 (a distance between probabilities, bounded by 2).

`uld_from_topk` does the same from an offline store's top-k teacher log-probs (`topk_store`): the
teacher's k stored probabilities plus one tail bucket for the mass it put elsewhere, against the
student's k largest probabilities plus its own tail; with k equal to the teacher's vocabulary it is
the full ULD.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _upcast(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _sorted_probs(logits: jax.Array, temperature: Any) -> jax.Array:
    """softmax(logits / T) [..., V] in decreasing order."""
    return jnp.flip(jnp.sort(jax.nn.softmax(logits / temperature, axis=-1), axis=-1), axis=-1)


def _pad_to(x: jax.Array, size: int) -> jax.Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def uld(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: Any = 1.0) -> jax.Array:
    """Per-token ULD [...] between student logits [..., Vs] and teacher logits [..., Vt] (Vs, Vt may differ).

    The teacher side is not differentiated here any differently from the student's: callers pass
    teacher logits under stop_gradient.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"ULD compares the same positions: student logits {student_logits.shape} and teacher "
                         f"logits {teacher_logits.shape} differ before the vocabulary axis")
    student = _upcast(student_logits)
    teacher = _upcast(teacher_logits).astype(student.dtype)
    temperature = jnp.asarray(temperature, student.dtype)
    size = max(student.shape[-1], teacher.shape[-1])
    q = _pad_to(_sorted_probs(student, temperature), size)
    p = _pad_to(_sorted_probs(teacher, temperature), size)
    return jnp.sum(jnp.abs(p - q), axis=-1)


def uld_from_topk(student_logits: jax.Array, teacher_topk_logprobs: jax.Array, *, temperature: Any = 1.0
                  ) -> jax.Array:
    """Per-token ULD [...] from the teacher's stored top-k log-probs [..., k] (temperature 1, normalized
    over its whole vocabulary) against student logits [..., Vs].

    Teacher: the kept mass exp(s), s = logsumexp(top-k), is spread over the k ids as softmax(top-k / T)
    (as `TokenLosses.kd_from_topk` does) and the rest r = 1 - exp(s) is one tail bucket. Student: its k
    largest probabilities (zero-padded when k > Vs) and the tail sum of the others.
        loss = sum_i<k | p_(i) - q_(i) | + | r - q_tail |
    """
    if student_logits.shape[:-1] != teacher_topk_logprobs.shape[:-1]:
        raise ValueError(f"student logits {student_logits.shape} and teacher top-k log-probs "
                         f"{teacher_topk_logprobs.shape} differ before the last axis")
    student = _upcast(student_logits)
    stored = teacher_topk_logprobs.astype(student.dtype)
    temperature = jnp.asarray(temperature, student.dtype)
    k = stored.shape[-1]
    log_kept = jax.nn.logsumexp(stored, axis=-1, keepdims=True)
    p_top = jnp.flip(jnp.sort(jnp.exp(log_kept + jax.nn.log_softmax(stored / temperature, axis=-1)), axis=-1), -1)
    p_rest = jnp.maximum(1.0 - jnp.exp(log_kept[..., 0]), 0.0)
    q = _pad_to(_sorted_probs(student, temperature), max(k, student.shape[-1]))
    q_top, q_rest = q[..., :k], jnp.sum(q[..., k:], axis=-1)
    return jnp.sum(jnp.abs(p_top - q_top), axis=-1) + jnp.abs(p_rest - q_rest)
