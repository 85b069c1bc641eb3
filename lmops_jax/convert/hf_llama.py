"""Llama family <-> `DecoderOnlyModel`: config translation and the weight-name table.

Accepted: `LlamaForCausalLM`, and `MistralForCausalLM` whose sliding window never binds (None or at
least max_position_embeddings), since their weights and numerics are Llama's. Refused with the field
named: rope scaling of any type, attention or MLP biases, activations other than SiLU. Other
Llama-like architectures differ in their weights or numerics and are refused by name (`REFUSED`).

Names (HF -> ours, kernels transposed to (in, out) and q/k/v/o heads split; see `decoder_only`):

    model.embed_tokens.weight                  embed_tokens/embedding
    model.layers.i.self_attn.{q,k,v}_proj.weight  layers_i/self_attn/{q,k,v}_proj/kernel   ("t_heads")
    model.layers.i.self_attn.o_proj.weight     layers_i/self_attn/o_proj/kernel           ("t_out")
    model.layers.i.mlp.{gate,up,down}_proj.weight  layers_i/mlp/{gate,up,down}_proj/kernel ("t")
    model.layers.i.{input,post_attention}_layernorm.weight  layers_i/{...}_layernorm/scale
    model.norm.weight                          norm/scale
    lm_head.weight                             lm_head/kernel ("t"; absent when tied: a stored copy
                                               must equal model.embed_tokens.weight)
"""
from __future__ import annotations

from typing import Any, Mapping

from lmops_jax.convert.mapping import ConversionError, Entry, ImportSpec, refuse_unless, require
from lmops_jax.models import decoder_only
from lmops_jax.models import model as model_lib

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SPECIAL_TOKENS = ("bos_id", "eos_id", "pad_id")  # the `tokens.HF_FIELDS` its config.json has
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
REFUSED = {
    "Qwen2ForCausalLM": "its q/k/v projections carry biases, which LlamaDecoder has no place for",
    "Qwen3ForCausalLM": "it normalizes queries and keys per head (q_norm / k_norm)",
    "GemmaForCausalLM": "it scales embeddings by sqrt(d_model) and its norms multiply by (1 + weight)",
    "Gemma2ForCausalLM": "it soft-caps logits and alternates sliding-window layers",
    "MixtralForCausalLM": "it is a mixture of experts",
    "Phi3ForCausalLM": "it fuses q/k/v and gate/up projections and uses partial rotary embeddings",
}


def rope_theta(cfg: Mapping[str, Any]) -> float:
    """The RoPE base of a config (transformers 5 `rope_parameters` or 4 `rope_theta`); scaling is refused."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    if scaling or params.get("rope_type", "default") != "default":
        raise ConversionError(
            f"config.json sets rope scaling ({scaling or params}; fields rope_scaling / rope_parameters."
            "rope_type): only unscaled rotary embeddings (rope_type 'default') are supported")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConversionError(f"config.json field rope_theta={theta!r} must be a positive number")
    return float(theta)


def table(cfg: decoder_only.LlamaConfig) -> list[Entry]:
    """The name table of a Llama config (see the module docstring)."""
    entries = [Entry("embed_tokens/embedding", "model.embed_tokens.weight", "same"),
               Entry("norm/scale", "model.norm.weight", "same")]
    for i in range(cfg.num_layers):
        hf, us = f"model.layers.{i}", f"layers_{i}"
        entries += [Entry(f"{us}/self_attn/{n}_proj/kernel", f"{hf}.self_attn.{n}_proj.weight", "t_heads")
                    for n in "qkv"]
        entries.append(Entry(f"{us}/self_attn/o_proj/kernel", f"{hf}.self_attn.o_proj.weight", "t_out"))
        entries += [Entry(f"{us}/mlp/{n}_proj/kernel", f"{hf}.mlp.{n}_proj.weight", "t")
                    for n in ("gate", "up", "down")]
        entries += [Entry(f"{us}/{n}/scale", f"{hf}.{n}.weight", "same")
                    for n in ("input_layernorm", "post_attention_layernorm")]
    if not cfg.tie_embeddings:
        entries.append(Entry("lm_head/kernel", "lm_head.weight", "t"))
    return entries


def import_spec(cfg: Mapping[str, Any], arch: str) -> ImportSpec:
    """The model, name table and tied copies for a Llama-family config.json dict."""
    if arch not in ARCHITECTURES:
        raise ConversionError(f"hf_llama cannot import architecture {arch!r}")
    refuse_unless(cfg, "hidden_act", ("silu",), "silu")
    refuse_unless(cfg, "attention_bias", (False, None), False, "LlamaDecoder has no attention biases")
    refuse_unless(cfg, "mlp_bias", (False, None), False, "LlamaDecoder has no MLP biases")
    max_length = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window")
    if window is not None and cfg.get("use_sliding_window", True) and window < max_length:
        raise ConversionError(
            f"config.json field sliding_window={window} is smaller than max_position_embeddings={max_length}: "
            "sliding-window attention is not supported")
    heads = require(cfg, "num_attention_heads")
    hidden = require(cfg, "hidden_size")
    head_dim = cfg.get("head_dim") or hidden // heads
    tied = bool(cfg.get("tie_word_embeddings", False))
    try:
        config = decoder_only.LlamaConfig(
            vocab_size=require(cfg, "vocab_size"), d_model=hidden, num_layers=require(cfg, "num_hidden_layers"),
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            mlp_dim=require(cfg, "intermediate_size"), head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta(cfg), tie_embeddings=tied,
            max_length=int(max_length))
    except ValueError as e:
        raise ConversionError(f"config.json describes no valid Llama model: {e}") from e
    aliases = {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}
    return ImportSpec(model_lib.DecoderOnlyModel(config), table(config), aliases,
                      ignored_suffixes=("rotary_emb.inv_freq",))


def hf_config(cfg: decoder_only.LlamaConfig) -> dict[str, Any]:
    """The config.json dict of a Llama config (rope and dtype written in transformers 4 and 5 spellings)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim, "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu",
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_length, "attention_bias": False, "mlp_bias": False,
        "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype,
    }
