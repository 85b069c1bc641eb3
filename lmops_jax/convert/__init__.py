"""Hugging Face bridge: import Llama-family and T5 v1.1 safetensors models, export them back.

    python -m lmops_jax.convert from_hf --hf_dir=DIR --out_dir=DIR [--dtype=float32|bfloat16]
    python -m lmops_jax.convert to_hf --checkpoint=DIR --out_dir=DIR [--max_shard_gb=5]

Import writes a params-only Orbax checkpoint (`checkpoints.save_params`) whose stored model spec
(`models.spec`) rebuilds the model and holds its special token ids and tokenizer (`tokens`), with gin
text that builds it too, also written as `out_dir/model.gin` (for fine-tuning configs). Only
`*.safetensors` files are read (sharded ones through their index); pickled PyTorch files are never
loaded. A config the models cannot represent exactly is refused naming the field; missing, misshapen
and unexpected tensors are listed by name. Without `dtype` the params keep the stored dtype (so a
bfloat16 model round-trips bit for bit); a checkpoint mixing float dtypes is imported as float32.

Per-architecture config translation and name tables live in `hf_llama` and `hf_t5`; the layouts
shared by both directions in `mapping`; special ids and tokenizer files in `tokens`; file handling in
`safetensors_io`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from lmops_jax import checkpoints
from lmops_jax.convert import hf_llama, hf_t5, safetensors_io, tokens
from lmops_jax.convert.mapping import ConversionError, Entry, ImportSpec, hf_shape, to_hf, to_ours
from lmops_jax.models import decoder_only, encoder_decoder, loading
from lmops_jax.models import model as model_lib
from lmops_jax.models.spec import SEQIO_CONVENTION, ModelSpec

__all__ = ["ConversionError", "Entry", "model_from_hf_config", "hf_to_params", "params_to_hf", "gin_config",
           "load_checkpoint", "import_hf", "export_hf"]

DTYPES = loading.DTYPES
_ARCH_MODULES = (hf_llama, hf_t5)
_IMPORTERS = {arch: module for module in _ARCH_MODULES for arch in module.ARCHITECTURES}


def _architecture(cfg: Mapping[str, Any]) -> str:
    archs = cfg.get("architectures")
    if archs:
        if not isinstance(archs, list) or not isinstance(archs[0], str):
            raise ConversionError(f"config.json field architectures={archs!r} must be a list of class names")
        return archs[0]
    model_type = cfg.get("model_type")
    for module in _ARCH_MODULES:
        if model_type in module.MODEL_TYPES:
            return module.MODEL_TYPES[model_type]
    raise ConversionError(f"config.json names no supported architecture (architectures is missing, model_type="
                          f"{model_type!r}); supported: {', '.join(_IMPORTERS)}")


def import_spec(cfg: Mapping[str, Any]) -> ImportSpec:
    """Model, name table and tied copies for a config.json dict; unsupported configs raise ConversionError."""
    if not isinstance(cfg, Mapping):
        raise ConversionError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
    arch = _architecture(cfg)
    module = _IMPORTERS.get(arch)
    if module is None:
        why = {k: v for m in _ARCH_MODULES for k, v in m.REFUSED.items()}.get(arch)
        raise ConversionError(f"unsupported architecture {arch!r}{' (' + why + ')' if why else ''}; supported: "
                              f"{', '.join(_IMPORTERS)}")
    return module.import_spec(cfg, arch)


def model_from_hf_config(cfg: Mapping[str, Any]) -> model_lib.BaseModel:
    """Our model (float32) for a Hugging Face config.json dict."""
    return import_spec(cfg).model


def read_hf_config(hf_dir: str) -> dict:
    """The parsed config.json of a Hugging Face model directory."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in {hf_dir!r}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e


def _expected_shapes(model: model_lib.BaseModel) -> dict[str, tuple[int, ...]]:
    """{our param path: shape} of `model`, from abstract initialization (no arrays are made)."""
    abstract, _ = loading.param_shardings(model, loading.default_partitioner())
    return {name: tuple(s.shape) for name, s in checkpoints.flatten(abstract).items()}


def _arch_module(model: model_lib.BaseModel):
    if isinstance(model, model_lib.DecoderOnlyModel) and isinstance(model.config, decoder_only.LlamaConfig):
        return hf_llama
    if isinstance(model, model_lib.EncoderDecoderModel) and isinstance(model.config, encoder_decoder.T5Config):
        return hf_t5
    raise ConversionError(f"no Hugging Face mapping for {type(model).__name__} with {type(model.config).__name__}")


def _checked_table(model: model_lib.BaseModel, table: list[Entry]) -> dict[str, tuple[int, ...]]:
    """The model's param shapes, after checking that the name table covers exactly its params."""
    expected = _expected_shapes(model)
    covered = {e.ours for e in table}
    if covered != set(expected):
        raise ConversionError(  # a model change the converter has not followed
            f"the name table for {type(model.config).__name__} is out of date: params without an entry "
            f"{sorted(set(expected) - covered)}, entries without a param {sorted(covered - set(expected))}")
    return expected


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def hf_to_params(hf_dir: str) -> tuple[model_lib.BaseModel, dict]:
    """(model, param tree of numpy arrays) from a Hugging Face model directory.

    The model's dtype and param_dtype are the stored tensors' common float dtype (float32 if mixed).
    Raises ConversionError naming unsupported config fields, and listing missing tensors, tensors whose
    shape disagrees with the config, unexpected tensors, and tied copies that differ from their source.
    """
    spec = import_spec(read_hf_config(hf_dir))
    tensors = safetensors_io.read_tensors(hf_dir)
    expected = _checked_table(spec.model, spec.table)
    values, missing, misshapen = {}, [], []
    for e in spec.table:
        name = e.hf if e.hf in tensors else spec.aliases.get(e.hf, e.hf)
        if name not in tensors:
            missing.append(e.hf)
            continue
        x, want = tensors[name], hf_shape(expected[e.ours], e.layout)
        if x.shape != want:
            misshapen.append(f"{name} {x.shape} (config.json implies {want})")
        elif not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
            misshapen.append(f"{name} has dtype {x.dtype}, not a float dtype")
        else:
            values[e.ours] = to_ours(x, e.layout, expected[e.ours])
    table_names = {e.hf for e in spec.table}
    unexpected, untied = [], []
    for name, x in tensors.items():
        if name in table_names or name.endswith(spec.ignored_suffixes):
            continue
        source = spec.aliases.get(name)
        if source is None:
            unexpected.append(name)
        elif source in tensors and not _same_bits(x, tensors[source]):
            untied.append(f"{name} (differs from {source}, which the model ties it to)")
    problems = [f"{label}: {', '.join(items)}" for label, items in (
        ("tensors missing", missing), ("tensors with the wrong shape or dtype", misshapen),
        ("unexpected tensors (the model has no place for them)", unexpected), ("untied copies", untied)) if items]
    if problems:
        raise ConversionError(f"cannot convert the weights in {hf_dir}:\n  " + "\n  ".join(problems))
    dtypes = {v.dtype.name for v in values.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in DTYPES else "float32"
    values = {k: v if v.dtype.name == dtype else v.astype(np.float32) for k, v in values.items()}
    return loading.with_dtype(spec.model, dtype), checkpoints.unflatten(values)


def params_to_hf(model: model_lib.BaseModel, params: Mapping[str, Any]) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, {HF name: numpy array}) for a model and its params (boxed or not).

    Params the name table does not know (e.g. unmerged LoRA factors) raise ConversionError.
    """
    import flax.linen as nn

    module = _arch_module(model)
    table = module.table(model.config)
    flat = checkpoints.flatten(nn.meta.unbox(params))
    known = {e.ours for e in table}
    missing, extra = sorted(known - set(flat)), sorted(set(flat) - known)
    if missing or extra:
        raise ConversionError(f"params do not match {type(model.config).__name__}: missing {missing}, "
                              f"not exportable {extra} (merge adapters into the base weights first)")
    tensors = {e.hf: to_hf(np.asarray(flat[e.ours]), e.layout) for e in table}
    config = module.hf_config(model.config)
    dtypes = {v.dtype.name for v in tensors.values()}
    if len(dtypes) == 1:  # the dtype actually stored, which may differ from the config's param_dtype
        config["dtype"] = config["torch_dtype"] = dtypes.pop()
    return config, tensors


def gin_config(model: model_lib.BaseModel, source: str | None = None) -> str:
    """Gin text whose MODEL macro rebuilds `model`, in the format of gin_configs/models/*.gin: the
    human-readable config of an imported checkpoint, which fine-tuning runs can include (loading
    itself reads the checkpoint's model spec).

    Compute and param dtypes go through the COMPUTE_DTYPE / PARAM_DTYPE macros, so `--gin.PARAM_DTYPE`
    overrides them as for the hand-written model configs.
    """
    module = _arch_module(model)
    cfg = model.config
    mod_name = "decoder_only" if module is hf_llama else "encoder_decoder"
    cls, wrapper = type(cfg).__name__, type(model).__name__
    lines = [f"# Converted from Hugging Face {source}."] if source else []
    lines += ["from __gin__ import dynamic_registration", f"from lmops_jax.models import {mod_name}",
             "from lmops_jax.models import model", "", f"MODEL = @model.{wrapper}()",
             f"model.{wrapper}.config = @{mod_name}.{cls}()", f"{mod_name}.{cls}:"]
    for field in dataclasses.fields(cfg):
        if field.name not in ("dtype", "param_dtype"):
            lines.append(f"  {field.name} = {getattr(cfg, field.name)!r}")
    lines += ["  dtype = %COMPUTE_DTYPE", "  param_dtype = %PARAM_DTYPE", "",
              f"COMPUTE_DTYPE = {cfg.dtype!r}", f"PARAM_DTYPE = {cfg.param_dtype!r}"]
    return "\n".join(lines) + "\n"


def load_checkpoint(checkpoint_path: str) -> tuple[model_lib.BaseModel, dict]:
    """(model from the checkpoint's model spec, params as host numpy arrays) of a checkpoint.

    Params are restored onto one device (replicated), in the model's param dtype; a train-state
    checkpoint works too (its optimizer state is ignored).
    """
    import jax

    model = loading.model_from_checkpoint(checkpoint_path)
    _arch_module(model)
    params = loading.restore_params(checkpoint_path, model, loading.default_partitioner())
    return model, jax.tree.map(np.asarray, jax.device_get(params))


def import_hf(hf_dir: str, out_dir: str, dtype: str | None = None) -> str:
    """Converts a Hugging Face directory into a params-only Orbax checkpoint + model.gin in `out_dir`.

    The spec stores config.json's special ids and, when `hf_dir` has tokenizer.json, the tokenizer
    copied to `out_dir/tokenizer/` (`tokens`).

    Args:
      hf_dir: directory with config.json and *.safetensors (sharded with an index, or not), and
        optionally tokenizer.json.
      out_dir: model directory to create; must not hold checkpoints already.
      dtype: 'float32', 'bfloat16' or 'float16' for params and compute; None keeps the stored dtype.

    Returns the checkpoint step directory.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be None or one of {DTYPES}, got {dtype!r}")
    existing = os.path.join(out_dir, checkpoints.CHECKPOINTS_SUBDIR)
    if os.path.isdir(existing) and os.listdir(existing):
        raise ConversionError(f"{out_dir} already holds checkpoints: import into an empty directory")
    model, params = hf_to_params(hf_dir)
    if dtype is not None and dtype != model.config.param_dtype:
        model = loading.with_dtype(model, dtype)
        params = checkpoints.unflatten({k: v.astype(_np_dtype(dtype)) for k, v in checkpoints.flatten(params).items()})
    cfg = read_hf_config(hf_dir)
    special = tokens.special_tokens(cfg, model.vocab_size, _arch_module(model).SPECIAL_TOKENS)
    text = gin_config(model, f"{_architecture(cfg)} in {os.path.abspath(hf_dir)}")
    rebuilt = loading.spec_from_gin(text, "the generated model.gin").model
    if rebuilt != model:  # the text must rebuild the model exactly, or later loads would differ
        raise ConversionError(f"generated gin config rebuilds {rebuilt}, not {model}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "model.gin"), "w", encoding="utf-8") as f:
        f.write(text)
    spec = ModelSpec(model, tokens.import_tokenizer(hf_dir, out_dir), special)
    return checkpoints.save_params(out_dir, params, text, model_spec=spec.to_json())


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes  # numpy has no bfloat16 of its own
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def export_hf(checkpoint_path: str, out_dir: str,
              max_shard_bytes: int = safetensors_io.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Writes config.json + safetensors weights (sharded above `max_shard_bytes`) for a checkpoint.

    The checkpoint's model spec (or, for older checkpoints, its gin config) names the model; its special
    ids go into config.json (an imported model's own, else seqio's convention: BOS, pad and decoder
    start 0, so an import of the export reads prompts as training did) and its Hugging Face tokenizer
    files are copied beside it. Returns the written paths.
    """
    model, params = load_checkpoint(checkpoint_path)
    config, tensors = params_to_hf(model, params)
    loaded = loading.read_spec(checkpoint_path)
    config.update(tokens.hf_fields(loaded.special_tokens or SEQIO_CONVENTION, _arch_module(model).SPECIAL_TOKENS))
    paths = safetensors_io.write_tensors(out_dir, tensors, max_shard_bytes)
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return [config_path] + paths + tokens.export_tokenizer(loaded.vocabulary, out_dir)
