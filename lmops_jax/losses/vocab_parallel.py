"""Losses over logits whose vocabulary axis is sharded over a mesh axis, without gathering it.

With tensor parallelism the unembedding leaves logits [B, L, V] sharded as V / n per device over the
`model` axis. Letting GSPMD compute a softmax over them may all-gather the vocabulary (n times the
memory of the largest activation). Here each device works on its own vocabulary shard inside
`jax.shard_map` and only per-token scalars cross devices:

  m   = pmax_v(max_local(x))                              (stop_gradient: lse does not depend on m)
  lse = m + log(psum_v(sum_local(exp(x - m))))            log-softmax = x - lse, shard by shard
  x[target] = psum_v(x_local[target - offset] if the target lies in this shard else 0)
  KD sums over v: psum_v(sum_local(terms))                terms as in losses.divergence_from_log_probs

The same holds for the argmax (teacher agreement) and the KD against a teacher's stored top-k (offline
distillation), whose tail bucket is a log-sum-exp over the ids outside the top-k.

Each collective moves [B, L] floats, not [B, L, V]. The batch axis (axis 0) may also be sharded over
`batch_axes`; the other leading axes are replicated. Results equal the unsharded functions in
`lmops_jax.losses` up to float rounding, and the functions are jittable and differentiable (the
gradient of a psum is a broadcast, so the backward pass stays sharded too).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmops_jax import losses


def _batch_entry(mesh: Mesh, batch_axes: Sequence[str] | str | None) -> tuple[str, ...]:
    """Mesh axes that shard the batch axis, limited to those the mesh has."""
    if batch_axes is None:
        return ()
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    return tuple(a for a in axes if a in mesh.axis_names)


def _specs(
    mesh: Mesh, shape: tuple[int, ...], vocab_axis: str, batch_axes: Sequence[str] | str | None, name: str
) -> tuple[PartitionSpec, PartitionSpec]:
    """(logits spec, per-token spec) for logits of `shape`: axis 0 over batch_axes, axis -1 over vocab_axis."""
    if vocab_axis not in mesh.axis_names:
        raise ValueError(f"vocab_axis {vocab_axis!r} is not an axis of the mesh {mesh.axis_names}")
    if len(shape) < 1:
        raise ValueError(f"{name} must have a vocabulary axis, got shape {shape}")
    n_vocab = mesh.shape[vocab_axis]
    if shape[-1] % n_vocab:
        raise ValueError(f"{name} vocabulary size {shape[-1]} is not divisible by mesh axis {vocab_axis!r} ({n_vocab})")
    batch = _batch_entry(mesh, batch_axes)
    if vocab_axis in batch:
        raise ValueError(f"vocab_axis {vocab_axis!r} cannot also be one of batch_axes {batch}")
    if len(shape) == 1 or not batch:
        token = (None,) * (len(shape) - 1)
    else:
        n_batch = 1
        for a in batch:
            n_batch *= mesh.shape[a]
        if shape[0] % n_batch:
            raise ValueError(f"{name} batch size {shape[0]} is not divisible by batch_axes {batch} ({n_batch} devices)")
        token = (batch,) + (None,) * (len(shape) - 2)
    return PartitionSpec(*token, vocab_axis), PartitionSpec(*token)


def _vocab_sum(vocab_axis: str) -> Callable[[jax.Array], jax.Array]:
    return lambda x: jax.lax.psum(jnp.sum(x, axis=-1), vocab_axis)


def _log_softmax(x: jax.Array, vocab_axis: str) -> tuple[jax.Array, jax.Array]:
    """(log-softmax of the local shard [..., V/n], global log-normalizer [...]) for a vocab-sharded x."""
    local_max = jax.lax.stop_gradient(jnp.max(x, axis=-1))
    m = jax.lax.pmax(local_max, vocab_axis)
    log_z = m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(x - m[..., None]), axis=-1), vocab_axis))
    return x - log_z[..., None], log_z


def _at_ids(x: jax.Array, ids: jax.Array, vocab_axis: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Values of the vocab-sharded x [..., V/n] at global ids [..., k], psummed over the shards.

    Returns (values [..., k], ids local to this shard [..., k], whether each id lies in this shard).
    """
    shard = x.shape[-1]
    local_ids = ids.astype(jnp.int32) - jax.lax.axis_index(vocab_axis) * shard
    here = (local_ids >= 0) & (local_ids < shard)
    picked = jnp.take_along_axis(x, jnp.clip(local_ids, 0, shard - 1), axis=-1)
    return jax.lax.psum(jnp.where(here, picked, 0.0), vocab_axis), local_ids, here


def _on_mesh(fn: Callable[..., Any], mesh: Mesh, in_specs: tuple, out_specs: Any) -> Callable[..., Any]:
    """shard_map(fn) under jit, so eager calls reshard their inputs (eager shard_map does not)."""
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


@functools.lru_cache(maxsize=64)
def _cross_entropy_fn(
    mesh: Mesh, logits_spec: PartitionSpec, token_spec: PartitionSpec, vocab_axis: str, vocab: int,
    z_loss: float, label_smoothing: float,
) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """Built once per configuration; the cache keeps eager calls from recompiling."""

    def local(x: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x.astype(jnp.float32)
        log_probs, log_z = _log_softmax(x, vocab_axis)
        target_logp = _at_ids(log_probs, targets[..., None], vocab_axis)[0][..., 0]
        if label_smoothing:
            confidence = 1.0 - label_smoothing
            low = label_smoothing / (vocab - 1)
            normalizer = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
            sum_logp = jax.lax.psum(jnp.sum(log_probs, axis=-1), vocab_axis)
            loss = -(confidence * target_logp + low * (sum_logp - target_logp)) - normalizer
        else:
            loss = -target_logp
        z_term = z_loss * jnp.square(log_z)
        return loss + z_term, z_term

    return _on_mesh(local, mesh, (logits_spec, token_spec), (token_spec, token_spec))


def vocab_parallel_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    mesh: Mesh,
    vocab_axis: str = "model",
    batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """losses.cross_entropy_with_logits with the vocabulary sharded over `vocab_axis`.

    Args:
      logits: [B, ..., V], V divisible by the size of `vocab_axis`.
      targets: [B, ...] integer ids.
      weights: [B, ...] or None; when given, both outputs are multiplied by it so that masked tokens are
        exactly 0 and a sum gives the weighted total (what gradient accumulation needs).
      mesh: the device mesh; axes of it named in neither `vocab_axis` nor `batch_axes` replicate.
      vocab_axis: mesh axis sharding the vocabulary.
      batch_axes: mesh axes sharding axis 0 (those absent from the mesh are skipped); None replicates.
      z_loss, label_smoothing: as in cross_entropy_with_logits (static Python floats).

    Returns:
      (loss [B, ...], z_term [B, ...]) float32; `loss` contains the z-loss term.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {targets.shape} differs from logits shape {logits.shape[:-1]}")
    logits_spec, token_spec = _specs(mesh, logits.shape, vocab_axis, batch_axes, "logits")
    fn = _cross_entropy_fn(
        mesh, logits_spec, token_spec, vocab_axis, logits.shape[-1], float(z_loss), float(label_smoothing)
    )
    loss, z_term = fn(logits, targets)
    if weights is not None:
        if weights.shape != loss.shape:
            raise ValueError(f"weights shape {weights.shape} differs from targets shape {loss.shape}")
        weights = weights.astype(loss.dtype)
        loss, z_term = loss * weights, z_term * weights
    return loss, z_term


@functools.lru_cache(maxsize=64)
def _kd_fn(
    mesh: Mesh, logits_spec: PartitionSpec, token_spec: PartitionSpec, vocab_axis: str, kind: str
) -> Callable[..., jax.Array]:
    """Built once per configuration; temperature and beta are traced arguments (they may be scheduled)."""

    def local(student: jax.Array, teacher: jax.Array, temperature: jax.Array, beta: jax.Array) -> jax.Array:
        student = losses._upcast(student)
        teacher = losses._upcast(teacher).astype(student.dtype)
        temperature = temperature.astype(student.dtype)
        log_q, _ = _log_softmax(student / temperature, vocab_axis)
        log_p, _ = _log_softmax(teacher / temperature, vocab_axis)
        divergence = losses.divergence_from_log_probs(
            log_p, log_q, kind=kind, beta=beta.astype(student.dtype), vocab_sum=_vocab_sum(vocab_axis)
        )
        return jnp.square(temperature) * divergence

    scalar = PartitionSpec()
    return _on_mesh(local, mesh, (logits_spec, logits_spec, scalar, scalar), token_spec)


def vocab_parallel_kd_token_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    mesh: Mesh,
    kind: str = "forward_kl",
    temperature: Any = 1.0,
    beta: Any = 0.5,
    vocab_axis: str = "model",
    batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
) -> jax.Array:
    """losses.kd_token_loss with the vocabulary sharded over `vocab_axis`: [B, ..., V] -> [B, ...].

    temperature and beta may be traced scalars (e.g. from a schedule); see vocab_parallel_cross_entropy
    for mesh, vocab_axis and batch_axes.
    """
    losses._check_kd_args(kind, temperature, beta)
    losses._check_pair(student_logits, teacher_logits)
    logits_spec, token_spec = _specs(mesh, student_logits.shape, vocab_axis, batch_axes, "student_logits")
    fn = _kd_fn(mesh, logits_spec, token_spec, vocab_axis, kind)
    return fn(student_logits, teacher_logits, jnp.asarray(temperature), jnp.asarray(beta))


def vocab_parallel_kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    weights: jax.Array | None = None,
    *,
    mesh: Mesh,
    kind: str = "forward_kl",
    temperature: Any = 1.0,
    beta: Any = 0.5,
    vocab_axis: str = "model",
    batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
) -> jax.Array:
    """losses.kd_loss with the vocabulary sharded over `vocab_axis`: the weighted token mean, a scalar."""
    token_loss = vocab_parallel_kd_token_loss(
        student_logits, teacher_logits, mesh=mesh, kind=kind, temperature=temperature, beta=beta,
        vocab_axis=vocab_axis, batch_axes=batch_axes,
    )
    return losses.weighted_mean(token_loss, weights)


@functools.lru_cache(maxsize=64)
def _argmax_fn(mesh: Mesh, logits_spec: PartitionSpec, token_spec: PartitionSpec,
               vocab_axis: str) -> Callable[[jax.Array], jax.Array]:
    def local(x: jax.Array) -> jax.Array:
        local_max = jnp.max(x, axis=-1)
        index = jnp.argmax(x, axis=-1).astype(jnp.int32) + jax.lax.axis_index(vocab_axis) * x.shape[-1]
        best = jax.lax.pmax(local_max, vocab_axis)
        return jax.lax.pmin(jnp.where(local_max == best, index, jnp.iinfo(jnp.int32).max), vocab_axis)

    return _on_mesh(local, mesh, (logits_spec,), token_spec)


def vocab_parallel_argmax(
    logits: jax.Array, *, mesh: Mesh, vocab_axis: str = "model",
    batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
) -> jax.Array:
    """jnp.argmax(logits, -1) (first index on ties) with the vocabulary sharded: only [B, ...] values move."""
    logits_spec, token_spec = _specs(mesh, logits.shape, vocab_axis, batch_axes, "logits")
    return _argmax_fn(mesh, logits_spec, token_spec, vocab_axis)(jax.lax.stop_gradient(logits))


@functools.lru_cache(maxsize=64)
def _kd_from_topk_fn(mesh: Mesh, logits_spec: PartitionSpec, token_spec: PartitionSpec, vocab_axis: str,
                     vocab: int, k: int) -> Callable[..., jax.Array]:
    """Built once per configuration; temperature is a traced argument (it may be scheduled)."""

    def local(student, stored, ids, temperature):
        student = losses._upcast(student)
        temperature = temperature.astype(student.dtype)
        log_q, _ = _log_softmax(student / temperature, vocab_axis)
        shard = log_q.shape[-1]
        log_q_top, local_ids, here = _at_ids(log_q, ids, vocab_axis)
        stored = stored.astype(student.dtype)
        log_kept = jax.nn.logsumexp(stored, axis=-1, keepdims=True)
        log_p_top = log_kept + jax.nn.log_softmax(stored / temperature, axis=-1)
        loss = jnp.sum(losses._kl_terms(log_p_top, log_q_top), axis=-1)
        if k < vocab:
            kept = jnp.minimum(log_kept[..., 0], 0.0)
            log_rest = jnp.where(kept < 0.0, jnp.log(-jnp.expm1(jnp.minimum(kept, -1e-30))), -jnp.inf)
            flat = log_q.reshape(-1, shard)
            rows = jnp.arange(flat.shape[0])[:, None]
            cols = jnp.where(here, local_ids, shard).reshape(flat.shape[0], k)  # out of range: dropped
            in_topk = jnp.zeros(flat.shape, bool).at[rows, cols].set(True, mode="drop").reshape(log_q.shape)
            masked = jnp.where(in_topk, -jnp.inf, log_q)
            m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(masked, axis=-1)), vocab_axis)
            m = jnp.where(jnp.isfinite(m), m, 0.0)
            log_q_rest = m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(masked - m[..., None]), axis=-1), vocab_axis))
            loss = loss + losses._kl_terms(log_rest, log_q_rest)
        return jnp.square(temperature) * loss

    topk_spec = PartitionSpec(*token_spec, None)
    return _on_mesh(local, mesh, (logits_spec, topk_spec, topk_spec, PartitionSpec()), token_spec)


def vocab_parallel_kd_token_loss_from_topk(
    student_logits: jax.Array,
    teacher_topk_logprobs: jax.Array,
    teacher_topk_ids: jax.Array,
    *,
    mesh: Mesh,
    temperature: Any = 1.0,
    vocab_axis: str = "model",
    batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
) -> jax.Array:
    """losses.kd_token_loss_from_topk with the student's vocabulary sharded over `vocab_axis`.

    student_logits [B, ..., V]; the teacher's top-k log-probs and ids [B, ..., k] (replicated over the
    vocabulary axis). Returns [B, ...].
    """
    logits_spec, token_spec = _specs(mesh, student_logits.shape, vocab_axis, batch_axes, "student_logits")
    fn = _kd_from_topk_fn(mesh, logits_spec, token_spec, vocab_axis, student_logits.shape[-1],
                          teacher_topk_logprobs.shape[-1])
    return fn(student_logits, teacher_topk_logprobs, teacher_topk_ids, jnp.asarray(temperature))


def logits_sharding(
    mesh: Mesh, shape: tuple[int, ...], *, vocab_axis: str = "model",
    batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
) -> NamedSharding:
    """The sharding these losses expect for logits of `shape`; placing inputs there avoids a reshard."""
    return NamedSharding(mesh, _specs(mesh, shape, vocab_axis, batch_axes, "logits")[0])
