"""The token losses over logits whose vocabulary axis is sharded over a mesh axis, without gathering it.

With tensor parallelism the unembedding leaves logits [B, L, V] sharded as V / n per device over the
`model` axis. Letting GSPMD compute a softmax over them may all-gather the vocabulary (n times the
memory of the largest activation). `VocabParallelTokenLosses` runs the functions of `token_losses` on
each device's own vocabulary shard inside `jax.shard_map`, with `axis_name` set, so that only per-token
scalars cross devices:

  m   = pmax_v(max_local(x))                              (stop_gradient: lse does not depend on m)
  lse = m + log(psum_v(sum_local(exp(x - m))))            log-softmax = x - lse, shard by shard
  x[target] = psum_v(x_local[target - offset] if the target lies in this shard else 0)
  KD sums over v: psum_v(sum_local(terms))

The same holds for the argmax (teacher agreement) and the KD against a teacher's stored top-k (offline
distillation), whose tail bucket is a log-sum-exp over the ids outside the top-k.

Each collective moves [B, L] floats, not [B, L, V]. The batch axis (axis 0) may also be sharded over
`batch_axes`; the other leading axes are replicated. Results equal `TokenLosses` up to float rounding,
and the losses are jittable and differentiable (the gradient of a psum is a broadcast, so the backward
pass stays sharded too).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

from lmops_jax.losses.token_losses import TokenLosses


@functools.lru_cache(maxsize=64)
def _on_mesh(fn: Callable[..., Any], mesh: Mesh, in_specs: tuple, out_specs: Any, axis_name: str,
             static: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    """jit(shard_map(fn)): under jit, eager calls reshard their inputs (eager shard_map does not); the
    cache keeps them from recompiling."""
    local = functools.partial(fn, axis_name=axis_name, **dict(static))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


@dataclasses.dataclass(frozen=True)
class VocabParallelTokenLosses(TokenLosses):
    """TokenLosses with the vocabulary of every logits array sharded over `vocab_axis`.

    Attributes:
      mesh: the device mesh; axes named in neither `vocab_axis` nor `batch_axes` replicate.
      vocab_axis: mesh axis sharding the vocabulary (V must be divisible by its size).
      batch_axes: mesh axes sharding axis 0 (those absent from the mesh are skipped); None replicates.
    """

    mesh: Mesh
    vocab_axis: str = "model"
    batch_axes: Sequence[str] | str | None = ("data", "fsdp")

    def __post_init__(self):
        if self.vocab_axis not in self.mesh.axis_names:
            raise ValueError(f"vocab_axis {self.vocab_axis!r} is not an axis of the mesh {self.mesh.axis_names}")
        axes = self.batch_axes
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a in self.mesh.axis_names)
        if self.vocab_axis in axes:
            raise ValueError(f"vocab_axis {self.vocab_axis!r} cannot also be one of batch_axes {axes}")
        object.__setattr__(self, "batch_axes", axes)

    def _specs(self, shape: tuple[int, ...]) -> dict[str, PartitionSpec]:
        """Specs of each layout for logits of `shape`: axis 0 over batch_axes, axis -1 over vocab_axis."""
        n_vocab = self.mesh.shape[self.vocab_axis]
        if shape[-1] % n_vocab:
            raise ValueError(f"logits vocabulary size {shape[-1]} is not divisible by mesh axis "
                             f"{self.vocab_axis!r} ({n_vocab})")
        token = (None,) * (len(shape) - 1)
        if len(shape) > 1 and self.batch_axes:
            n_batch = math.prod(self.mesh.shape[a] for a in self.batch_axes)
            if shape[0] % n_batch:
                raise ValueError(f"logits batch size {shape[0]} is not divisible by batch_axes {self.batch_axes} "
                                 f"({n_batch} devices)")
            token = (self.batch_axes,) + token[1:]
        return {"vocab": PartitionSpec(*token, self.vocab_axis), "token": PartitionSpec(*token),
                "topk": PartitionSpec(*token, None), "scalar": PartitionSpec()}

    def _run(self, fn: Callable[..., Any], args: tuple, in_kinds: tuple[str, ...], out_kinds: str | tuple[str, ...],
             **static: Any) -> Any:
        specs = self._specs(args[0].shape)
        out_specs = specs[out_kinds] if isinstance(out_kinds, str) else tuple(specs[k] for k in out_kinds)
        sharded = _on_mesh(fn, self.mesh, tuple(specs[k] for k in in_kinds), out_specs, self.vocab_axis,
                           tuple(sorted(static.items())))
        return sharded(*args)
