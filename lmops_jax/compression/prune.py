"""Pruning a parameter tree: unstructured magnitude and N:M masks, and structured width and depth cuts.

Masks (any model; kernels chosen by a path regex, default every projection `DEFAULT_KERNELS`):
  magnitude  per kernel, the `sparsity` fraction of weights smallest in |w| become zero.
  2:4        in every group of 4 consecutive weights along a kernel's contraction (input) axes, for
             each output feature, the 2 smallest in |w| become zero (o_proj [H, Dh, D] contracts H·Dh).
The model keeps its shapes; the zeros are the mask. Fine-tuning and distillation keep them zero with
`OptimizerConfig.sparse_params` (training/optimizers.py), which zeros the updates of zero weights.

Structured (Llama decoders; a smaller dense model with its own config):
  width  query heads pruned in whole key-value groups (H heads over K KV heads form K groups of H/K
         heads; keeping H' heads keeps the H'/(H/K) groups of largest summed head importance, so 4
         heads over 2 KV heads pruned to 2 leave 1 KV head), and MLP channels (the most important
         kept); the same counts in every layer.
         head_dim is written explicitly, since d_model // num_heads no longer gives it.
  depth  whole layers: the `num_layers` most important kept, in their order, renumbered layers_0...
Importance comes from calibration batches (`compression.importance`); kept indices stay sorted, so a
pruned unit that was zero to begin with leaves the model's function unchanged.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from lmops_jax.checkpoints import flatten, unflatten
from lmops_jax.compression.importance import Importance
from lmops_jax.models.model import DecoderOnlyModel

DEFAULT_KERNELS = r"_proj/kernel$"  # every attention and MLP projection; embeddings, norms, lm_head stay
METHODS = ("magnitude", "2:4", "width", "depth")
_INPUT_AXES = {"o_proj": 2}  # kernels contracting more than their first axis: o_proj [H, Dh, D]


class PruneError(ValueError):
    """A pruning request that cannot be met; the message names the setting (PRUNE_*) and the shapes."""


def matching_kernels(params: Mapping[str, Any], pattern: str) -> list[str]:
    """Paths of the params whose path `pattern` searches; PruneError when there are none."""
    found = [name for name in flatten(params) if re.search(pattern, name)]
    if not found:
        raise PruneError(f"PRUNE_KERNELS {pattern!r} matches no parameter (e.g. {sorted(flatten(params))[:3]})")
    return found


def magnitude_mask(kernel: np.ndarray, sparsity: float) -> np.ndarray:
    """Bool mask of `kernel`'s shape: False for the round(sparsity · size) weights smallest in |w|."""
    values = np.abs(np.asarray(kernel, np.float32)).ravel()
    drop = int(round(sparsity * values.size))
    keep = np.ones(values.size, bool)
    keep[np.argsort(values, kind="stable")[:drop]] = False
    return keep.reshape(np.shape(kernel))


def n_m_mask(kernel: np.ndarray, name: str, n: int = 2, m: int = 4) -> np.ndarray:
    """Bool mask keeping the n largest |w| of every m consecutive inputs, per output feature."""
    shape = np.shape(kernel)
    axes = _INPUT_AXES.get(name.split("/")[-2], 1)
    inputs = int(np.prod(shape[:axes]))
    if inputs % m:
        raise PruneError(f"{n}:{m} pruning of {name} {tuple(shape)}: its {inputs} inputs are not a multiple of {m}")
    grouped = np.abs(np.asarray(kernel, np.float32)).reshape(inputs // m, m, -1)
    rank = np.argsort(np.argsort(-grouped, axis=1, kind="stable"), axis=1, kind="stable")
    return (rank < n).reshape(shape)


def sparsify(params: Mapping[str, Any], method: str, pattern: str, sparsity: float | None) -> dict:
    """`params` with the matched kernels masked by `method` ('magnitude' at `sparsity`, or '2:4')."""
    if method == "magnitude" and not (isinstance(sparsity, (int, float)) and 0.0 < sparsity < 1.0):
        raise PruneError(f"magnitude pruning needs PRUNE_SPARSITY in (0, 1), got {sparsity!r}")
    if method == "2:4" and sparsity not in (None, 0.5):
        raise PruneError(f"2:4 pruning has sparsity 0.5; unset PRUNE_SPARSITY (got {sparsity!r})")
    out = flatten(params)
    for name in matching_kernels(params, pattern):
        kernel = np.asarray(out[name])
        mask = magnitude_mask(kernel, sparsity) if method == "magnitude" else n_m_mask(kernel, name)
        out[name] = np.where(mask, kernel, np.zeros_like(kernel))
    return unflatten(out)


def sparsity_by_module(params: Mapping[str, Any], pattern: str) -> dict[str, float]:
    """Fraction of exact zeros in each matched kernel, by path."""
    return {name: float(np.mean(np.asarray(value) == 0)) for name, value in flatten(params).items()
            if re.search(pattern, name)}


def _check_target(setting: str, value: int | None, have: int, step: int = 1) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= have or value % step:
        multiple = f", a multiple of {step} (whole key-value groups)" if step > 1 else ""
        raise PruneError(f"{setting}={value!r}: the model has {have}; ask for an int in [1, {have}]{multiple}")


def _kept(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores, in increasing order (ties: the earlier index)."""
    return np.sort(np.argsort(-scores, kind="stable")[:count])


def prune_width(model: DecoderOnlyModel, params: Mapping[str, Any], importance: Importance,
                num_heads: int | None, mlp_dim: int | None) -> tuple[DecoderOnlyModel, dict, dict[str, list]]:
    """(smaller model, its params, {'kv_groups': kept KV groups per layer}) keeping `num_heads` query
    heads in whole KV groups and `mlp_dim` MLP channels in every layer (None: that width unchanged)."""
    cfg = model.config
    group = cfg.num_heads // cfg.num_kv_heads
    _check_target("PRUNE_NUM_HEADS", num_heads, cfg.num_heads, group)
    _check_target("PRUNE_MLP_DIM", mlp_dim, cfg.mlp_dim)
    if num_heads is None and mlp_dim is None:
        raise PruneError("width pruning needs PRUNE_NUM_HEADS and/or PRUNE_MLP_DIM")
    num_heads, mlp_dim = num_heads or cfg.num_heads, mlp_dim or cfg.mlp_dim
    out, kept = flatten(params), {"kv_groups": []}
    for i in range(cfg.num_layers):
        attn, mlp = f"layers_{i}/self_attn", f"layers_{i}/mlp"
        groups = _kept(importance.heads[i].reshape(cfg.num_kv_heads, group).sum(-1), num_heads // group)
        heads = (groups[:, None] * group + np.arange(group)).ravel()
        channels = _kept(importance.channels[i], mlp_dim)
        kept["kv_groups"].append(groups.tolist())
        for name, axis, index in ((f"{attn}/q_proj", 1, heads), (f"{attn}/k_proj", 1, groups),
                                  (f"{attn}/v_proj", 1, groups), (f"{attn}/o_proj", 0, heads),
                                  (f"{mlp}/gate_proj", 1, channels), (f"{mlp}/up_proj", 1, channels),
                                  (f"{mlp}/down_proj", 0, channels)):
            out[f"{name}/kernel"] = np.take(np.asarray(out[f"{name}/kernel"]), index, axis=axis)
    config = dataclasses.replace(cfg, num_heads=num_heads, num_kv_heads=num_heads // group, mlp_dim=mlp_dim,
                                 head_dim=cfg.resolved_head_dim)
    return dataclasses.replace(model, config=config), unflatten(out), kept


def prune_depth(model: DecoderOnlyModel, params: Mapping[str, Any], importance: Importance,
                num_layers: int | None) -> tuple[DecoderOnlyModel, dict, dict[str, list]]:
    """(smaller model, its params, kept layers) keeping the `num_layers` most important layers."""
    cfg = model.config
    if num_layers is None:
        raise PruneError("depth pruning needs PRUNE_NUM_LAYERS")
    _check_target("PRUNE_NUM_LAYERS", num_layers, cfg.num_layers)
    layers = _kept(importance.layers, num_layers)
    out = {name: value for name, value in params.items() if not name.startswith("layers_")}
    out.update({f"layers_{new}": params[f"layers_{old}"] for new, old in enumerate(layers)})
    config = dataclasses.replace(cfg, num_layers=num_layers)
    return dataclasses.replace(model, config=config), out, {"layers": layers.tolist()}
