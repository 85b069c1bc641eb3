"""Weight-name tables between Hugging Face state dicts and lmops_jax parameter trees.

One table serves both directions, so export is the exact inverse of import. Each entry is
(our path, HF name, layout) where layout says how the HF tensor (PyTorch [out, in] order) becomes ours:
  "same"      identical (embeddings, norm scales, T5 relative-position tables)
  "t"         transposed [out, in] -> [in, out]
  "t_heads"   q/k/v: [H*Dh, D] -> [D, H, Dh] (transpose, then split the head dimension)
  "t_out"     o:     [D, H*Dh] -> [H, Dh, D]
"""
from __future__ import annotations

import numpy as np

from lmops_jax.models.decoder_only import LlamaConfig
from lmops_jax.models.encoder_decoder import T5Config

Entry = tuple[str, str, str]


def llama_table(cfg: LlamaConfig) -> list[Entry]:
    table = [("embed_tokens/embedding", "model.embed_tokens.weight", "same"), ("norm/scale", "model.norm.weight", "same")]
    for i in range(cfg.num_layers):
        hf, us = f"model.layers.{i}", f"layers_{i}"
        table += [(f"{us}/self_attn/{n}_proj/kernel", f"{hf}.self_attn.{n}_proj.weight", "t_heads") for n in "qkv"]
        table += [(f"{us}/self_attn/o_proj/kernel", f"{hf}.self_attn.o_proj.weight", "t_out")]
        table += [(f"{us}/mlp/{n}_proj/kernel", f"{hf}.mlp.{n}_proj.weight", "t") for n in ("gate", "up", "down")]
        table += [(f"{us}/{n}/scale", f"{hf}.{n}.weight", "same") for n in ("input_layernorm", "post_attention_layernorm")]
    if not cfg.tie_embeddings:
        table.append(("lm_head/kernel", "lm_head.weight", "t"))
    return table


def t5_table(cfg: T5Config) -> list[Entry]:
    table = [("shared/embedding", "shared.weight", "same"), ("lm_head/kernel", "lm_head.weight", "t")]

    def attn(us, hf):
        return ([(f"{us}/{n}_proj/kernel", f"{hf}.{n}.weight", "t_heads") for n in "qkv"]
                + [(f"{us}/o_proj/kernel", f"{hf}.o.weight", "t_out")])

    for stack, n_layers in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        table += [(f"{stack}/relpos_bias/rel_embedding",
                   f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "same"),
                  (f"{stack}/final_norm/scale", f"{stack}.final_layer_norm.weight", "same")]
        for i in range(n_layers):
            us, hf = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            table += [(f"{us}/self_attn_norm/scale", f"{hf}.0.layer_norm.weight", "same")]
            table += attn(f"{us}/self_attn", f"{hf}.0.SelfAttention")
            ff = 1
            if stack == "decoder":
                table += [(f"{us}/cross_attn_norm/scale", f"{hf}.1.layer_norm.weight", "same")]
                table += attn(f"{us}/cross_attn", f"{hf}.1.EncDecAttention")
                ff = 2
            table += [(f"{us}/mlp_norm/scale", f"{hf}.{ff}.layer_norm.weight", "same")]
            table += [(f"{us}/mlp/{ours}/kernel", f"{hf}.{ff}.DenseReluDense.{theirs}.weight", "t")
                      for ours, theirs in (("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo"))]
    return table


def to_ours(x: np.ndarray, layout: str, head_dim: int) -> np.ndarray:
    """HF tensor -> our layout; the head count follows from the shape and `head_dim`."""
    if layout == "same":
        return x
    if layout == "t":
        return x.T
    if layout == "t_heads":
        return x.T.reshape(x.shape[1], x.shape[0] // head_dim, head_dim)
    return x.T.reshape(x.shape[1] // head_dim, head_dim, x.shape[0])


def to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "same":
        return x
    if layout == "t":
        return x.T
    if layout == "t_heads":
        return x.reshape(x.shape[0], -1).T
    return x.reshape(-1, x.shape[-1]).T
