"""What quantization reads from a float model: its weight matmuls, calibration statistics and losses.

- `module_uses`: every module that multiplies by a weight, with the kernel's shape and contracting
  axes, found by tracing the model once (no FLOPs) through a qwix interceptor; the rules are checked
  against it before anything is quantized.
- `collect_stats`: runs calibration batches through the model under a qwix.contrib calibration
  provider (GPTQ's Hessians, AWQ's activation scales), jitted once, and returns the averaged
  `quant_stats` collection.
- `batches`, `mean_loss`: a seqio task's batches in the model's format and its token-weighted loss.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lmops_jax.models.model import BaseModel
from lmops_jax.models.wrapper import ModuleSwap

Batch = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ModuleUse:
    """A weight matmul: module path ('layers_0/self_attn/o_proj'), kernel shape, contracted kernel axes
    (() for an einsum, whose axes are not checked)."""

    path: str
    kernel_shape: tuple[int, ...]
    contracting: tuple[int, ...]


def _probe_provider() -> Any:
    """A qwix provider that records each weight matmul (`ModuleUse`) and computes it unchanged."""
    import qwix
    from qwix._src.utils import flax_util  # qwix's own module-path and param lookup (no public API)

    class Probe(qwix.QuantizationProvider):
        def __init__(self):
            super().__init__([])
            self.uses: dict[str, ModuleUse] = {}

        def _record(self, weight: Any, contracting: tuple[int, ...]) -> None:
            if flax_util.find_param(weight) is not None:
                path = "/".join(map(str, flax_util.get_current_module_path()))
                self.uses[path] = ModuleUse(path, tuple(weight.shape), contracting)

        def dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs):
            self._record(rhs, tuple(dimension_numbers[0][1]))
            return jax.lax.dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)

        def einsum(self, spec, *operands, **kwargs):
            for operand in operands:
                self._record(operand, ())
            return jnp.einsum(spec, *operands, **kwargs)

        def get_intercept_map(self):
            return super().get_intercept_map() | {"jax.lax.dot_general": self.dot_general,
                                                  "jax.numpy.einsum": self.einsum}
    return Probe()


def module_uses(model: BaseModel, params: Any) -> list[ModuleUse]:
    """The weight matmuls of `model` (unboxed params), traced on a one-row batch without computing."""
    import qwix
    probe = _probe_provider()
    view = ModuleSwap(model, qwix.quantize_model(model.module, probe))
    rows = model.logits_features([[1, 2, 3, 4]], None if model.prompt_shares_cache else [[0, 1, 2, 3]])
    batch = {name: np.asarray(r, np.int32) for name, r in rows.items()}
    jax.eval_shape(lambda p: type(model).compute_logits(view, p, batch), params)
    return sorted(probe.uses.values(), key=lambda u: u.path)


class _CollectStats:
    """A module whose `apply` also reads and updates the `quant_stats` collection (kept in `stats`)."""

    def __init__(self, module: Any, stats: Any):
        self.module, self.stats = module, stats

    def apply(self, variables, *args, **kwargs):
        out, updated = self.module.apply({**variables, "quant_stats": self.stats}, *args, mutable=["quant_stats"],
                                         **kwargs)
        self.stats = updated["quant_stats"]
        return out


def collect_stats(model: BaseModel, provider: Any, params: Any, calibration: Iterator[Batch]) -> Any:
    """The `quant_stats` a qwix.contrib calibration provider averages over the calibration batches."""
    import qwix
    module = qwix.quantize_model(model.module, provider)

    def step(params, stats, batch):
        collector = _CollectStats(module, stats)
        type(model).compute_logits(ModuleSwap(model, collector), params, batch)
        return collector.stats

    first, stats = True, {}
    for batch in calibration:
        if first:  # the collection is created by the first call; jit from then on, with fixed shapes
            stats, step, first = step(params, stats, batch), jax.jit(step), False
        else:
            stats = step(params, stats, batch)
    if first:
        raise ValueError("the calibration task yielded no batch (CALIBRATION_TASK, CALIBRATION_BATCHES)")
    return jax.device_get(stats)


def batches(model: BaseModel, task: str, task_feature_lengths: Mapping[str, int], batch_size: int, split: str,
            count: int) -> Iterator[Batch]:
    """Up to `count` unshuffled, packed batches of a seqio task's split, in `model`'s format."""
    from lmops_jax.data import pipeline
    ds = pipeline.get_dataset(task, task_feature_lengths, model.feature_converter_cls(pack=True),
                              global_batch_size=batch_size, split=split, shuffle=False, num_epochs=1,
                              shard_index=0, num_shards=1)
    return itertools.islice(ds.as_numpy_iterator(), count)


def mean_loss(model: BaseModel, params: Any, data: list[Batch]) -> float:
    """Token-weighted loss of `model` over the batches (`loss_fn`'s loss_sum / weight_sum)."""
    if not data:
        raise ValueError("the evaluation split yielded no batch (CALIBRATION_TASK, EVAL_BATCHES)")
    sums = jax.jit(lambda p, b: model.loss_fn(p, b)[1])
    totals = [jax.device_get(sums(params, b)) for b in data]
    return float(sum(t["loss_sum"] for t in totals) / max(sum(t["weight_sum"] for t in totals), 1.0))
