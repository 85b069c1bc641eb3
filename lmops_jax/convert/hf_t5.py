"""T5 v1.1 <-> `EncoderDecoderModel`: config translation and the weight-name table.

Accepted: `T5ForConditionalGeneration` (and `MT5ForConditionalGeneration`) with `feed_forward_proj='gated-gelu'` and no output rescaling
(T5 v1.1). Refused with the field named: other feed-forward kinds ('relu' is T5 1.0), T5 1.0's tied
head that rescales decoder outputs by d_model**-0.5, and a decoder_start_token_id other than 0 (the
decoder here always starts from 0). transformers 4 marks 1.0 by `tie_word_embeddings` (default
true); transformers 5 always ties T5's `lm_head` to `shared` and marks 1.0 by `scale_decoder_outputs`
instead, so a v1.1 model it saves stores no `lm_head.weight`: it is then read from `shared.weight`.
Export always writes `lm_head.weight` (transformers 5 keeps a stored head that differs from `shared`).

Names (HF -> ours; S = encoder | decoder, i = block; see `encoder_decoder` for shapes):

    shared.weight                                            shared/embedding
    S.block.0.layer.0.SelfAttention.relative_attention_bias.weight  S/relpos_bias/rel_embedding
    S.block.i.layer.0.layer_norm.weight                      S/layers_i/self_attn_norm/scale
    S.block.i.layer.0.SelfAttention.{q,k,v,o}.weight         S/layers_i/self_attn/{q,k,v,o}_proj/kernel
    decoder.block.i.layer.1.layer_norm.weight                decoder/layers_i/cross_attn_norm/scale
    decoder.block.i.layer.1.EncDecAttention.{q,k,v,o}.weight decoder/layers_i/cross_attn/{q,k,v,o}_proj/kernel
    S.block.i.layer.{1|2}.layer_norm.weight                  S/layers_i/mlp_norm/scale
    S.block.i.layer.{1|2}.DenseReluDense.{wi_0,wi_1,wo}.weight  S/layers_i/mlp/{gate,up,down}_proj/kernel
    S.final_layer_norm.weight                                S/final_norm/scale
    lm_head.weight                                           lm_head/kernel
    {encoder,decoder}.embed_tokens.weight: tied copies of shared.weight (must equal it; not exported)
"""
from __future__ import annotations

from typing import Any, Mapping

from lmops_jax.convert.mapping import ConversionError, Entry, ImportSpec, refuse_unless, require
from lmops_jax.models import encoder_decoder
from lmops_jax.models import model as model_lib

# mT5 is T5 v1.1 with a larger vocabulary: same modeling code, same names.
ARCHITECTURES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")
MODEL_TYPES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}
SPECIAL_TOKENS = ("eos_id", "pad_id", "decoder_start_id")  # the `tokens.HF_FIELDS` its config.json has
REFUSED = {
    "UMT5ForConditionalGeneration": "it has a relative position bias in every layer",
    "T5EncoderModel": "it has no decoder",
}


def _attention(us: str, hf: str) -> list[Entry]:
    return ([Entry(f"{us}/{n}_proj/kernel", f"{hf}.{n}.weight", "t_heads") for n in "qkv"]
            + [Entry(f"{us}/o_proj/kernel", f"{hf}.o.weight", "t_out")])


def table(cfg: encoder_decoder.T5Config) -> list[Entry]:
    """The name table of a T5 config (see the module docstring)."""
    entries = [Entry("shared/embedding", "shared.weight", "same"), Entry("lm_head/kernel", "lm_head.weight", "t")]
    for stack, n_layers in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        entries += [Entry(f"{stack}/relpos_bias/rel_embedding",
                          f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "same"),
                    Entry(f"{stack}/final_norm/scale", f"{stack}.final_layer_norm.weight", "same")]
        for i in range(n_layers):
            us, hf = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            entries.append(Entry(f"{us}/self_attn_norm/scale", f"{hf}.0.layer_norm.weight", "same"))
            entries += _attention(f"{us}/self_attn", f"{hf}.0.SelfAttention")
            ff = 1
            if stack == "decoder":
                entries.append(Entry(f"{us}/cross_attn_norm/scale", f"{hf}.1.layer_norm.weight", "same"))
                entries += _attention(f"{us}/cross_attn", f"{hf}.1.EncDecAttention")
                ff = 2
            entries.append(Entry(f"{us}/mlp_norm/scale", f"{hf}.{ff}.layer_norm.weight", "same"))
            entries += [Entry(f"{us}/mlp/{ours}/kernel", f"{hf}.{ff}.DenseReluDense.{theirs}.weight", "t")
                        for ours, theirs in (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo"))]
    return entries


def import_spec(cfg: Mapping[str, Any], arch: str) -> ImportSpec:
    """The model, name table and tied copies for a T5 v1.1 config.json dict."""
    if arch not in ARCHITECTURES:
        raise ConversionError(f"hf_t5 cannot import architecture {arch!r}")
    refuse_unless(cfg, "feed_forward_proj", ("gated-gelu",), "relu",
                  "only T5 v1.1 (gated-GELU feed-forward) is supported")
    refuse_unless(cfg, "decoder_start_token_id", (model_lib.DECODER_START_ID, None), None,
                  f"the decoder starts from token {model_lib.DECODER_START_ID} (models.model.DECODER_START_ID)")
    scaled = cfg.get("scale_decoder_outputs", cfg.get("tie_word_embeddings", True))
    if scaled:
        field = "scale_decoder_outputs" if "scale_decoder_outputs" in cfg else "tie_word_embeddings"
        raise ConversionError(
            f"config.json field {field}={cfg.get(field, True)!r} means T5 1.0 (tied head, decoder outputs scaled "
            "by d_model**-0.5): only T5 v1.1 (untied head, no rescaling) is supported")
    layers = require(cfg, "num_layers")
    try:
        config = encoder_decoder.T5Config(
            vocab_size=require(cfg, "vocab_size"), d_model=require(cfg, "d_model"), num_encoder_layers=layers,
            num_decoder_layers=cfg.get("num_decoder_layers") or layers, num_heads=require(cfg, "num_heads"),
            head_dim=require(cfg, "d_kv"), mlp_dim=require(cfg, "d_ff"),
            relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
            rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-6)))
    except ValueError as e:
        raise ConversionError(f"config.json describes no valid T5 model: {e}") from e
    aliases = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if cfg.get("tie_word_embeddings", True):  # transformers 5 saves the head tied: read it from `shared`
        aliases["lm_head.weight"] = "shared.weight"
    # HF ignores this one when loading: old checkpoints store a cross-attention bias that is never used.
    unused = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
    return ImportSpec(model_lib.EncoderDecoderModel(config), table(config), aliases, ignored_suffixes=unused)


def hf_config(cfg: encoder_decoder.T5Config) -> dict[str, Any]:
    """The config.json dict of a T5 config, readable by transformers 4 (untied) and 5 (no rescaling)."""
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.mlp_dim, "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.rms_norm_eps, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
        "is_gated_act": True, "tie_word_embeddings": False, "scale_decoder_outputs": False,
        "is_encoder_decoder": True, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
        "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype,
    }
