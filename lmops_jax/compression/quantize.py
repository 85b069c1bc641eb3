"""Post-training quantization of a checkpoint through qwix: int8, int4 (tiled), w8a8; PTQ, GPTQ, AWQ.

    python -m lmops_jax.compress quantize --gin_file=gin_configs/runs/quantize.gin \\
      --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.OUTPUT_DIR="'/tmp/run_int4'" \\
      --gin.QUANT_SCHEME="'int4'" --gin.QUANT_METHOD="'gptq'" --gin.CALIBRATION_BATCHES=8

Rules. Without QUANT_RULES every projection and the output head (`.*_proj|lm_head`) take QUANT_SCHEME;
embeddings and norms stay float. QUANT_RULES is a list of (module regex, scheme) pairs, first match
wins, with schemes 'int8', 'int4', 'w8a8' or 'float' and an optional tile ('int4/32'); int4 without
one takes QUANT_TILE_SIZE, int8 and w8a8 are per output channel unless given one. Before anything
is computed, every module's kernel is checked against its rule: a tile that does not divide the
innermost contraction axis (o_proj contracts [heads, head_dim]: the tile must divide head_dim) is
refused naming the module and shapes, and so is a rule that matches no module.

Methods. 'ptq' rounds to nearest per tile or channel. 'gptq' and 'awq' (qwix.contrib) first run
CALIBRATION_BATCHES batches of CALIBRATION_TASK's train split through the float model to collect
each quantized matmul's input statistics (GPTQ: the Hessian X Xᵀ; AWQ: mean |x| per input channel),
then quantize with them. Kernels that contract more than one axis (o_proj) fall back to PTQ there,
as qwix does.

The output is a params-only checkpoint whose model spec is a `models.quantized.QuantizedModel`
(the float model's spec and the rules), so every loader takes it with no flag. The job ends by
printing one JSON line: scheme, method, bytes and validation loss before and after.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from lmops_jax import checkpoints
from lmops_jax.cli import gin_flags
from lmops_jax.compression.calibration import ModuleUse, batches, collect_stats, mean_loss, module_uses
from lmops_jax.models import loading
from lmops_jax.models.model import BaseModel
from lmops_jax.models.quantized import METHODS, QuantizedModel, QuantRule, is_quantized_leaf, quantization_of
from lmops_jax.models.spec import ModelSpec

DEFAULT_MODULES = r".*_proj|lm_head"  # every projection and the output head
SCHEMES = ("int8", "int4", "w8a8")


class QuantizationError(ValueError):
    """A quantization request that cannot be met; the message names the setting, module and shapes."""


def parse_scheme(scheme: str, tile_size: int | None, where: str) -> tuple[str, int | None]:
    """(scheme, tile) of 'int4', 'int4/32', 'int8', 'w8a8' or 'float'; int4 takes `tile_size` by default."""
    name, _, tile = str(scheme).partition("/")
    if name not in (*SCHEMES, "float"):
        raise QuantizationError(f"{where}: unknown quantization scheme {scheme!r}; use one of {SCHEMES} or "
                                "'float', optionally with a tile, e.g. 'int4/32'")
    if tile and not tile.isdigit():
        raise QuantizationError(f"{where}: the tile of {scheme!r} must be a positive int")
    return name, int(tile) if tile else (tile_size if name == "int4" else None)


def build_rules(scheme: str, tile_size: int | None, rules: Sequence[Sequence[str]] | None) -> tuple[QuantRule, ...]:
    """QUANT_RULES as QuantRules, or the default rule: QUANT_SCHEME on every projection and the head."""
    if tile_size is not None and (not isinstance(tile_size, int) or tile_size < 1):
        raise QuantizationError(f"QUANT_TILE_SIZE must be None or an int >= 1, got {tile_size!r}")
    if not rules:
        name, tile = parse_scheme(scheme, tile_size, "QUANT_SCHEME")
        if name == "float":
            raise QuantizationError("QUANT_SCHEME 'float' quantizes nothing; use it inside QUANT_RULES")
        return (QuantRule(DEFAULT_MODULES, name, tile),)
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, str) or len(rule) != 2:
            raise QuantizationError(f"QUANT_RULES[{i}] must be a (module regex, scheme) pair, got {rule!r}")
        name, tile = parse_scheme(rule[1], tile_size, f"QUANT_RULES[{i}]")
        try:
            out.append(QuantRule(rule[0], name, tile))
        except ValueError as e:
            raise QuantizationError(f"QUANT_RULES[{i}]: {e}") from e
    return tuple(out)


def check_rules(rules: Sequence[QuantRule], uses: Sequence[ModuleUse], method: str) -> None:
    """Refuses rules that match no module, tiles that do not divide the innermost contraction axis, and
    w8a8 with AWQ (module docstring); names the module, its kernel shape and contracting axes."""
    if method not in METHODS:
        raise QuantizationError(f"QUANT_METHOD must be one of {METHODS}, got {method!r}")
    if method == "awq" and any(r.scheme == "w8a8" for r in rules):
        raise QuantizationError("AWQ rescales weights per input channel at run time and quantizes weights only; "
                                "use w8a8 with QUANT_METHOD 'ptq' or 'gptq'")
    matched = set()
    for use in uses:
        rule = next((r for r in rules if re.fullmatch(r.module_path, use.path)), None)
        if rule is None:
            continue
        matched.add(rule)
        if rule.tile_size is None or rule.scheme == "float" or not use.contracting:
            continue
        size = use.kernel_shape[max(use.contracting)]
        if size % rule.tile_size:
            raise QuantizationError(
                f"tile {rule.tile_size} of rule ({rule.module_path!r}, {rule.scheme!r}) does not divide the "
                f"contraction axis of {use.path}: kernel {use.kernel_shape} contracts axes {use.contracting}, "
                f"the innermost of size {size}; give that module its own rule in QUANT_RULES, e.g. "
                f"('{use.path}', '{rule.scheme}/{_divisor(size, rule.tile_size)}')")
    unused = [r.module_path for r in rules if r not in matched]
    if unused:
        raise QuantizationError(f"quantization rules {unused} match no module with a weight matmul; module paths "
                                f"are {sorted({u.path for u in uses})}")


def _divisor(size: int, tile: int) -> int:
    """The largest divisor of `size` not above `tile` (a tile that fits)."""
    return max(d for d in range(1, min(size, tile) + 1) if size % d == 0)


def quantize_params(model: QuantizedModel, float_params: Any, calibration: Iterator[Mapping[str, np.ndarray]]) -> Any:
    """`model`'s params from unboxed float params of `model.base` by its method (GPTQ / AWQ read batches)."""
    if model.method == "ptq":
        return model.quantize(float_params)
    from qwix.contrib import awq, gptq
    contrib = {"gptq": (gptq, gptq.GptqCalibrationProvider, gptq.GptqRule),
               "awq": (awq, awq.AwqCalibrationProvider, awq.AwqRule)}[model.method]
    library, provider_cls, rule_cls = contrib
    provider = provider_cls([r.qwix_rule(rule_cls) for r in model.rules if r.scheme != "float"])
    stats = collect_stats(model.base, provider, float_params, calibration)
    abstract = nn.meta.unbox(model.abstract_params())
    return library.quantize_params(float_params, abstract, stats)


def weight_bytes(params: Any) -> tuple[float, float, float]:
    """Bytes of (all params, the quantized kernels with their scales, those kernels in float32)."""
    total = sum(checkpoints.array_bytes(x.shape, x.dtype) for x in jax.tree.leaves(params))
    kernels = [x for x in jax.tree.leaves(params, is_leaf=is_quantized_leaf) if is_quantized_leaf(x)]
    quantized = sum(checkpoints.array_bytes(x.shape, x.dtype) for k in kernels for x in jax.tree.leaves(k))
    return total, quantized, sum(4.0 * int(np.prod(k.shape)) for k in kernels)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where calibration and evaluation batches come from.

    Attributes:
      task: seqio task or mixture (CALIBRATION_TASK): the built-in ones or `text_lm` over files.
      task_feature_lengths: e.g. {'targets': 128} (TASK_FEATURE_LENGTHS).
      batch_size: examples per batch (BATCH_SIZE).
      calibration_batches: batches of the train split GPTQ / AWQ collect statistics on (CALIBRATION_BATCHES).
      eval_batches: batches of the validation split the losses before and after are measured on (EVAL_BATCHES).
    """

    task: str = "synthetic_lm"
    task_feature_lengths: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"targets": 128})
    batch_size: int = 8
    calibration_batches: int = 8
    eval_batches: int = 4

    def __post_init__(self):
        for name in ("batch_size", "calibration_batches", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise QuantizationError(f"{name.upper()} must be an int >= 1, got {value!r}")


def _check_paths(checkpoint_path: Any, output_dir: Any) -> None:
    for macro, value in (("CHECKPOINT_PATH", checkpoint_path), ("OUTPUT_DIR", output_dir)):
        if value is None or gin_flags.is_required_sentinel(value):
            raise gin_flags.GinConfigError(f"quantize(): {macro} is not set (quantize.gin)")
    if os.path.isdir(os.path.join(output_dir, checkpoints.CHECKPOINTS_SUBDIR)):
        raise QuantizationError(f"OUTPUT_DIR {output_dir!r} already holds a checkpoint; choose a new directory")


def _float_model(checkpoint_path: str) -> tuple[ModelSpec, BaseModel]:
    loaded = loading.read_spec(checkpoint_path)
    if quantization_of(loaded.model) is not None:
        raise QuantizationError(f"checkpoint {checkpoint_path!r} is already quantized "
                                f"({quantization_of(loaded.model).rules}); quantize its float checkpoint")
    return loaded, loaded.model


def quantize(
    *,
    checkpoint_path: str,
    output_dir: str,
    scheme: str = "int8",
    method: str = "ptq",
    tile_size: int | None = 64,
    rules: Sequence[Sequence[str]] | None = None,
    data: DataConfig | None = None,
    setup_fns: Sequence[Callable[[], Any]] = (),
) -> dict[str, Any]:
    """Quantizes a float checkpoint into OUTPUT_DIR; returns (and prints as one JSON line) the summary.

    Args:
      checkpoint_path: the float model's checkpoint (CHECKPOINT_PATH; a run, or one `convert from_hf` wrote).
      output_dir: where the quantized params-only checkpoint goes (OUTPUT_DIR; must hold none yet).
      scheme: 'int8', 'int4' or 'w8a8' for the default rule (QUANT_SCHEME).
      method: 'ptq', 'gptq' or 'awq' (QUANT_METHOD).
      tile_size: the tile of int4 rules that give none (QUANT_TILE_SIZE); None: per output channel.
      rules: (module regex, scheme) pairs replacing the default rule (QUANT_RULES).
      data: calibration and evaluation batches (module `DataConfig`).
      setup_fns: called first, e.g. task registrations (quantize.gin registers `text_lm` over TEXT_FILES).
    """
    _check_paths(checkpoint_path, output_dir)
    data = data or DataConfig()
    quant_rules = build_rules(scheme, tile_size, rules)
    loaded, base = _float_model(checkpoint_path)
    params = loading.restore_params(checkpoint_path, base, loading.default_partitioner())
    check_rules(quant_rules, module_uses(base, params), method)
    for fn in setup_fns:
        fn()
    model = QuantizedModel(base, quant_rules, method)
    eval_data = list(batches(base, data.task, data.task_feature_lengths, data.batch_size, "validation",
                             data.eval_batches))
    calibration = batches(base, data.task, data.task_feature_lengths, data.batch_size, "train",
                          data.calibration_batches)
    qparams = jax.device_get(quantize_params(model, params, calibration))
    before, after = mean_loss(base, params, eval_data), mean_loss(model, qparams, eval_data)
    (bytes_before, _, _), (bytes_after, kernels_after, kernels_before) = weight_bytes(params), weight_bytes(qparams)
    path = checkpoints.save_params(output_dir, qparams, checkpoints.read_config(checkpoint_path),
                                   model_spec=dataclasses.replace(loaded, model=model).to_json())
    summary = {"scheme": scheme if not rules else "rules", "method": method, "tile_size": tile_size,
               "rules": [dataclasses.asdict(r) for r in quant_rules], "bytes_before": bytes_before,
               "bytes_after": bytes_after, "matmul_bytes_float32": kernels_before, "matmul_bytes_after": kernels_after,
               "matmul_bytes_ratio": kernels_after / kernels_before, "eval_loss_before": before,
               "eval_loss_after": after, "eval_loss_change": (after - before) / before, "task": data.task,
               "calibration_batches": data.calibration_batches if method != "ptq" else 0,
               "eval_batches": data.eval_batches, "output": path}
    logging.info("quantized %s into %s", checkpoint_path, path)
    print(json.dumps(summary), flush=True)
    return summary
