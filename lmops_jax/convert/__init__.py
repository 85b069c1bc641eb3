"""Hugging Face bridge: import Llama-family and T5 v1.1 safetensors models, export them back.

    python -m lmops_jax.convert from_hf --hf_dir=DIR --out_dir=DIR [--dtype=bfloat16]
    python -m lmops_jax.convert to_hf --checkpoint=DIR --out_dir=DIR

Import writes a params-only Orbax checkpoint (`checkpoints.save_params`) whose stored gin config builds
the model, plus the same text as `out_dir/model.gin`. Only `*.safetensors` files are read: pickled
PyTorch files are never loaded. A config the models cannot represent exactly is refused, naming the field.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from lmops_jax import checkpoints
from lmops_jax.convert import mapping
from lmops_jax.models import decoder_only, encoder_decoder, model as model_lib


class ConversionError(ValueError):
    """A Hugging Face directory or checkpoint that cannot be converted; the message says why."""


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise ConversionError(f"rope scaling {params or cfg.get('rope_scaling')} is not supported (field "
                              "rope_parameters / rope_scaling)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def model_from_hf_config(cfg: dict) -> model_lib.BaseModel:
    """Our model for a Hugging Face config.json dict; unsupported fields raise ConversionError."""
    archs = cfg.get("architectures") or [{"llama": "LlamaForCausalLM", "t5": "T5ForConditionalGeneration"}.get(
        cfg.get("model_type"), str(cfg.get("model_type")))]
    arch = archs[0]
    if arch in ("LlamaForCausalLM", "MistralForCausalLM"):
        for field, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
            if cfg.get(field, ok) != ok:
                raise ConversionError(f"config field {field}={cfg[field]!r} is not supported (needs {ok!r})")
        if cfg.get("sliding_window"):
            raise ConversionError(f"config field sliding_window={cfg['sliding_window']} is not supported")
        heads = cfg["num_attention_heads"]
        return model_lib.DecoderOnlyModel(decoder_only.LlamaConfig(
            vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads, mlp_dim=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_length=cfg.get("max_position_embeddings", 2048)))
    if arch == "T5ForConditionalGeneration":
        if cfg.get("feed_forward_proj") != "gated-gelu":
            raise ConversionError(f"config field feed_forward_proj={cfg.get('feed_forward_proj')!r}: only T5 v1.1 "
                                  "('gated-gelu') is supported")
        # transformers 5 always ties T5's lm_head to `shared` and marks T5 1.0's output rescaling with
        # scale_decoder_outputs; transformers 4 configs say the same with tie_word_embeddings.
        if cfg.get("scale_decoder_outputs", cfg.get("tie_word_embeddings", True)):
            raise ConversionError("config fields scale_decoder_outputs / tie_word_embeddings say T5 1.0 (outputs "
                                  "rescaled by d_model**-0.5): only T5 v1.1 is supported")
        return model_lib.EncoderDecoderModel(encoder_decoder.T5Config(
            vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], num_encoder_layers=cfg["num_layers"],
            num_decoder_layers=cfg.get("num_decoder_layers") or cfg["num_layers"], num_heads=cfg["num_heads"],
            head_dim=cfg["d_kv"], mlp_dim=cfg["d_ff"],
            relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
            rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-6)))
    raise ConversionError(f"unsupported architecture {arch!r}; supported: LlamaForCausalLM, MistralForCausalLM "
                          "(without sliding window), T5ForConditionalGeneration (v1.1)")


def _table(model: model_lib.BaseModel) -> tuple[list[mapping.Entry], int]:
    cfg = model.config
    if isinstance(cfg, decoder_only.LlamaConfig):
        return mapping.llama_table(cfg), cfg.resolved_head_dim
    return mapping.t5_table(cfg), cfg.head_dim


def _read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
    from safetensors.flax import load_file  # handles bfloat16, which plain numpy cannot
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else []
        raise ConversionError(f"no *.safetensors in {hf_dir!r} (found {found}); pickled .bin/.pt files are "
                              "never loaded: convert them to safetensors first")
    tensors = {}
    for path in files:
        tensors.update({k: np.asarray(v) for k, v in load_file(path).items()})
    return tensors


def hf_to_params(hf_dir: str) -> tuple[model_lib.BaseModel, dict]:
    """(model, param tree of numpy arrays) from a Hugging Face model directory."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"no config.json in {hf_dir!r}")
    with open(config_path, encoding="utf-8") as f:
        model = model_from_hf_config(json.load(f))
    tensors = _read_safetensors(hf_dir)
    if isinstance(model, model_lib.EncoderDecoderModel) and "lm_head.weight" not in tensors and "shared.weight" in tensors:
        tensors["lm_head.weight"] = tensors["shared.weight"]  # saved tied (transformers 5)
    table, head_dim = _table(model)
    missing = [hf for _, hf, _ in table if hf not in tensors]
    if missing:
        raise ConversionError(f"tensors missing from {hf_dir}: {', '.join(missing)}")
    used = {hf for _, hf, _ in table}
    # HF stores tied copies (embed_tokens of each T5 stack, rotary caches) that carry no extra weights.
    extra = [k for k in tensors if k not in used and not k.endswith(("embed_tokens.weight", "rotary_emb.inv_freq"))]
    if extra:
        raise ConversionError(f"unexpected tensors in {hf_dir} (the model has no place for them): {', '.join(extra)}")
    return model, checkpoints.unflatten({ours: mapping.to_ours(tensors[hf], layout, head_dim) for ours, hf, layout in table})


def params_to_hf(model: model_lib.BaseModel, params: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, {HF name: array}) for a model and its params."""
    flat = checkpoints.flatten(params)
    table, _ = _table(model)
    tensors = {hf: np.ascontiguousarray(mapping.to_hf(np.asarray(flat[ours]), layout)) for ours, hf, layout in table}
    cfg = model.config
    if isinstance(cfg, decoder_only.LlamaConfig):
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
                  "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
                  "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
                  "head_dim": cfg.resolved_head_dim, "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu",
                  "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
                  "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_length,
                  "attention_bias": False, "mlp_bias": False}
    else:
        for stack in ("encoder", "decoder"):
            tensors[f"{stack}.embed_tokens.weight"] = tensors["shared.weight"]
        config = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
                  "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.mlp_dim, "num_layers": cfg.num_encoder_layers,
                  "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
                  "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
                  "relative_attention_max_distance": cfg.relative_attention_max_distance,
                  "layer_norm_epsilon": cfg.rms_norm_eps, "feed_forward_proj": "gated-gelu",
                  "tie_word_embeddings": False, "scale_decoder_outputs": False, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
    return config, tensors


def gin_config(model: model_lib.BaseModel) -> str:
    """Gin text whose MODEL macro rebuilds `model` (the format of gin_configs/models/*.gin)."""
    cfg = model.config
    module, cls = ("decoder_only", "LlamaConfig") if isinstance(cfg, decoder_only.LlamaConfig) else \
        ("encoder_decoder", "T5Config")
    lines = ["from __gin__ import dynamic_registration", f"from lmops_jax.models import {module}",
             "from lmops_jax.models import model", "", f"MODEL = @model.{type(model).__name__}()",
             f"model.{type(model).__name__}.config = @{module}.{cls}()"]
    for field, value in vars(cfg).items():
        lines.append(f"{module}.{cls}.{field} = {value!r}")
    return "\n".join(lines) + "\n"


def import_hf(hf_dir: str, out_dir: str, dtype: str | None = None) -> str:
    """Converts a Hugging Face directory into an Orbax checkpoint + model.gin in `out_dir`."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    model, params = hf_to_params(hf_dir)
    if dtype is not None:
        model = dataclasses.replace(model, config=dataclasses.replace(model.config, dtype=dtype, param_dtype=dtype))
        params = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, dtype)), params)
    text = gin_config(model)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "model.gin"), "w", encoding="utf-8") as f:
        f.write(text)
    return checkpoints.save_params(out_dir, params, text)


def export_hf(checkpoint_path: str, out_dir: str) -> None:
    """Writes config.json + model.safetensors for a checkpoint whose stored gin config names the model."""
    import jax
    from safetensors.flax import save_file

    from lmops_jax import inference, partitioning
    text = checkpoints.read_config(checkpoint_path)
    if not text.strip():
        raise ConversionError(f"checkpoint {checkpoint_path!r} has no stored gin config to tell its architecture")
    model, _ = inference.model_from_gin(text, checkpoint_path)
    part = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
    abstract, shardings = inference.param_shardings(model, part)
    params = jax.device_get(checkpoints.restore_params(checkpoint_path, abstract, shardings))
    config, tensors = params_to_hf(model, params)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file({k: jax.numpy.asarray(v) for k, v in tensors.items()}, os.path.join(out_dir, "model.safetensors"))
