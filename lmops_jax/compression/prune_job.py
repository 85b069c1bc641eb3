"""`python -m lmops_jax.compress prune`: prune a checkpoint into a new one (prune.gin binds `prune`).

    python -m lmops_jax.compress prune --gin_file=gin_configs/runs/prune.gin \\
      --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.OUTPUT_DIR="'/tmp/run_pruned'" \\
      --gin.PRUNE_METHOD="'width'" --gin.PRUNE_NUM_HEADS=2 --gin.PRUNE_MLP_DIM=256

Everything is checked before anything is written. 'magnitude' and '2:4' write the same model with
zeros (the mask); 'width' and 'depth' measure importance on CALIBRATION_BATCHES batches of the task's
train split, then write a smaller dense model whose stored spec rebuilds it (`compression.prune`).
The job ends by printing one JSON line: parameters, bytes and validation loss before and after, the
sparsity per module, and for structured pruning the `--gin.` flags that make a model file match.

`pruned_model` is what prune_distill.gin builds the student with: the pruned checkpoint's own model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from lmops_jax import checkpoints
from lmops_jax.cli import gin_flags, gin_render, runner
from lmops_jax.compression import importance as importance_lib
from lmops_jax.compression import prune as prune_lib
from lmops_jax.compression.calibration import batches, mean_loss
from lmops_jax.compression.quantize import DataConfig
from lmops_jax.models import loading
from lmops_jax.models.model import BaseModel, DecoderOnlyModel
from lmops_jax.models.quantized import quantization_of
from lmops_jax.models.spec import ModelSpec

_SIZE_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")


def _required(**values: Any) -> None:
    for macro, value in values.items():
        if value is None or gin_flags.is_required_sentinel(value):
            raise gin_flags.GinConfigError(f"prune(): {macro} is not set (gin_configs/runs/prune.gin)")


def _check_request(loaded: ModelSpec, checkpoint_path: str, output_dir: str, method: str) -> None:
    """Refuses, before any work, what `prune` cannot do with this checkpoint."""
    if method not in prune_lib.METHODS:
        raise prune_lib.PruneError(f"unknown PRUNE_METHOD {method!r}; choose one of {prune_lib.METHODS}")
    if os.path.isdir(os.path.join(output_dir, checkpoints.CHECKPOINTS_SUBDIR)):
        raise prune_lib.PruneError(f"OUTPUT_DIR {output_dir!r} already holds a checkpoint; choose a new directory")
    if quantization_of(loaded.model) is not None:
        raise prune_lib.PruneError(f"checkpoint {checkpoint_path!r} is quantized; prune its float checkpoint "
                                   "(and quantize the pruned one)")
    if method in ("width", "depth") and type(loaded.model) is not DecoderOnlyModel:
        raise prune_lib.PruneError(f"{method} pruning rebuilds Llama decoders (DecoderOnlyModel); checkpoint "
                                   f"{checkpoint_path!r} holds a {type(loaded.model).__name__}")


def _size(params: Any) -> tuple[int, int, float]:
    """(parameters, nonzero parameters, bytes) of a params tree."""
    leaves = jax.tree.leaves(params)
    return (sum(int(np.size(x)) for x in leaves), sum(int(np.count_nonzero(x)) for x in leaves),
            sum(checkpoints.array_bytes(np.shape(x), np.asarray(x).dtype) for x in leaves))


def _structured(method: str, model: DecoderOnlyModel, params: Any, calibration: Any, targets: dict[str, Any]
                ) -> tuple[DecoderOnlyModel, dict, dict[str, Any]]:
    """A width or depth cut of `model` ranked on the calibration batches; the last item describes it."""
    scores = importance_lib.measure(model, params, calibration)
    if method == "width":
        small, pruned, kept = prune_lib.prune_width(model, params, scores, targets["num_heads"], targets["mlp_dim"])
    else:
        small, pruned, kept = prune_lib.prune_depth(model, params, scores, targets["num_layers"])
    config = {name: getattr(small.config, name) for name in _SIZE_FIELDS}
    flags = [f"--gin.decoder_only.LlamaConfig.{name}={value}" for name, value in config.items()
             if value != getattr(model.config, name)]
    return small, pruned, {"config": config, "gin_overrides": flags, "kept": kept,
                           "calibration_tokens": scores.tokens}


def _check_targets(method: str, sparsity: Any, targets: dict[str, Any]) -> None:
    """Refuses settings that the method does not use (a likely mistake) before any work."""
    used = {"magnitude": ("sparsity",), "2:4": ("sparsity",), "width": ("num_heads", "mlp_dim"),
            "depth": ("num_layers",)}[method]
    given = {"sparsity": sparsity, **targets}
    stray = [f"PRUNE_{name.upper()}" for name, value in given.items() if value is not None and name not in used]
    if stray:
        raise prune_lib.PruneError(f"PRUNE_METHOD={method!r} does not use {', '.join(stray)}; unset it")


@dataclasses.dataclass(frozen=True)
class Result:
    """A pruned model, its params (host arrays) and what the summary line says about the cut."""
    model: BaseModel
    params: Any
    details: dict[str, Any]


def _prune(method: str, model: BaseModel, params: Any, data: DataConfig, kernels: str, sparsity: Any,
           targets: dict[str, Any]) -> Result:
    if method in ("magnitude", "2:4"):
        pruned = prune_lib.sparsify(params, method, kernels, sparsity)
        per_module = prune_lib.sparsity_by_module(pruned, kernels)
        return Result(model, pruned, {"kernels": kernels, "sparsity_per_module": per_module,
                                      "sparsity": float(np.mean(list(per_module.values())))})
    calibration = batches(model, data.task, data.task_feature_lengths, data.batch_size, "train",
                          data.calibration_batches)
    small, pruned, details = _structured(method, model, params, calibration, targets)
    return Result(small, pruned, {**details, "calibration_batches": data.calibration_batches})


def prune(
    *,
    checkpoint_path: str,
    output_dir: str,
    method: str = "width",
    kernels: str = prune_lib.DEFAULT_KERNELS,
    sparsity: float | None = None,
    num_heads: int | None = None,
    mlp_dim: int | None = None,
    num_layers: int | None = None,
    data: DataConfig | None = None,
    setup_fns: Sequence[Callable[[], Any]] = (),
) -> dict[str, Any]:
    """Prunes a float checkpoint into OUTPUT_DIR; returns (and prints as one JSON line) the summary.

    Args:
      checkpoint_path: the model to prune (CHECKPOINT_PATH: a run, a checkpoints folder or a step).
      output_dir: a new directory for the pruned params-only checkpoint (OUTPUT_DIR).
      method: 'magnitude', '2:4', 'width' or 'depth' (PRUNE_METHOD).
      kernels: regex of the param paths masked by 'magnitude' / '2:4' (PRUNE_KERNELS).
      sparsity: fraction of weights zeroed per kernel by 'magnitude', in (0, 1) (PRUNE_SPARSITY).
      num_heads: query heads kept per layer by 'width', a multiple of heads per KV group (PRUNE_NUM_HEADS).
      mlp_dim: MLP channels kept per layer by 'width' (PRUNE_MLP_DIM).
      num_layers: layers kept by 'depth' (PRUNE_NUM_LAYERS).
      data: calibration (importance) and evaluation batches (`quantize.DataConfig`).
      setup_fns: called first, e.g. the `text_lm` registration over TEXT_FILES.
    """
    _required(CHECKPOINT_PATH=checkpoint_path, OUTPUT_DIR=output_dir)
    data = data or DataConfig()
    targets = {"num_heads": num_heads, "mlp_dim": mlp_dim, "num_layers": num_layers}
    loaded = loading.read_spec(checkpoint_path)
    _check_request(loaded, checkpoint_path, output_dir, method)
    _check_targets(method, sparsity, targets)
    for fn in setup_fns:
        fn()
    params = jax.device_get(loading.restore_params(checkpoint_path, loaded.model, loading.default_partitioner()))
    result = _prune(method, loaded.model, params, data, kernels, sparsity, targets)
    eval_data = list(batches(loaded.model, data.task, data.task_feature_lengths, data.batch_size, "validation",
                             data.eval_batches))
    before, after = mean_loss(loaded.model, params, eval_data), mean_loss(result.model, result.params, eval_data)
    (count_before, _, bytes_before), (count_after, nonzero_after, bytes_after) = _size(params), _size(result.params)
    text = gin_render.render({"MODEL": result.model}, header=f"Pruned ({method}) from {checkpoint_path} by "
                             "`python -m lmops_jax.compress prune`; the model spec stored beside it rebuilds it.")
    path = checkpoints.save_params(output_dir, result.params, text,
                                   model_spec=dataclasses.replace(loaded, model=result.model).to_json())
    summary = {"method": method, "params_before": count_before, "params_after": count_after,
               "nonzero_params_after": nonzero_after, "params_ratio": count_after / count_before,
               "bytes_before": bytes_before, "bytes_after": bytes_after, "eval_loss_before": before,
               "eval_loss_after": after, "eval_loss_change": (after - before) / before, **result.details,
               "task": data.task, "eval_batches": data.eval_batches, "output": path}
    logging.info("pruned %s into %s", checkpoint_path, path)
    print(json.dumps(summary), flush=True)
    return summary


def pruned_model(checkpoint_path: str) -> BaseModel:
    """The model a pruned checkpoint's spec rebuilds (PRUNED_CHECKPOINT in prune_distill.gin)."""
    _required(PRUNED_CHECKPOINT=checkpoint_path)
    return loading.model_from_checkpoint(checkpoint_path)


JOB = runner.GinJob(prune, "gin_configs/runs/prune.gin",
                    help="prune a checkpoint: magnitude or 2:4 masks, or a smaller dense model (width, depth)")
