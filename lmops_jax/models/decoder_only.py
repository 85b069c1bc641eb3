"""Llama-style decoder-only transformer (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention).

Parameter names and layouts follow Hugging Face `LlamaForCausalLM` one-to-one, transposed to
(in, out) order and with the head dimension split out:

    embed_tokens/embedding          [V, D]        model.embed_tokens.weight
    layers_i/self_attn/q_proj/kernel [D, H, Dh]   model.layers.i.self_attn.q_proj.weight.T
    layers_i/self_attn/k_proj/kernel [D, K, Dh]   ...k_proj.weight.T   (v_proj likewise)
    layers_i/self_attn/o_proj/kernel [H, Dh, D]   ...o_proj.weight.T
    layers_i/mlp/{gate,up}_proj/kernel [D, F], down_proj/kernel [F, D]
    layers_i/{input,post_attention}_layernorm/scale [D];  norm/scale [D]
    lm_head/kernel                  [D, V]        lm_head.weight.T (absent when tied)

With `scan_layers` the layers run through `nn.scan` (`scanned_layers`): one scope `layers` whose params
are stacked [num_layers, ...] (logical axis `layers` first), e.g. `layers/self_attn/q_proj/kernel`
[N, D, H, Dh]. Checkpoints still hold the per-layer names above (`checkpoints.per_layer`), and the
KV-cache path below needs the unscanned model.

KV-cache decoding (`decode=True`, apply with `mutable=["cache"]`): the `cache` collection holds
`cache_index` int32 [B], the number of positions written so far per example, and in every layer
`self_attn/cached_key` / `cached_value` [B, K, Dh, S] (see `layers.Attention`); every leaf has the row
first and is created boxed with its logical axes. A call with tokens [B, L] places them at positions
cache_index + 0..L-1 and advances cache_index by `lengths` [B] (default L). Ragged prompts are
right-padded: the prefill passes the padded prompts with their true lengths, so each example's next
token goes right after its own last real token (its padding slots are overwritten before they could be
attended to). `model.DecoderOnlyModel` exposes this as the decode API (`init_cache`, `prefill`,
`decode_step`). A paged cache (`pages=KVPages(...)` at init) holds `block_table` [B, T] next to
`cache_index` and per layer `self_attn/key_pages` / `value_pages` [K, pages, page_size, Dh] instead of
the per-row keys/values (`models.paged_attention`).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from lmops_jax.models import attention, layers, paged_attention


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder. `head_dim` defaults to d_model // num_heads."""

    vocab_size: int = 512
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_dim: int = 352
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    max_length: int = 2048
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"  # with remat: what the backward keeps (layers.REMAT_POLICIES)
    scan_layers: bool = False  # training runs the layers through nn.scan (params stacked under `layers`)

    def __post_init__(self):
        layers.check_remat_policy(self.remat_policy, "LlamaConfig")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"LlamaConfig: d_model={self.d_model} is not divisible by num_heads={self.num_heads}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, mask, positions, decode: bool = False, block_table=None, pages=None):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = lambda name: layers.RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name=name)  # noqa: E731
        h = layers.Attention(
            cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, use_rope=True, rope_theta=cfg.rope_theta,
            dtype=dtype, param_dtype=param_dtype, name="self_attn",
        )(norm("input_layernorm")(x), mask=mask, query_positions=positions, key_positions=positions,
          decode=decode, block_table=block_table, pages=pages, causal=True)
        x = layers.constrain(x + h, ("batch", "length", "act_embed"))
        h = layers.GatedMLP(cfg.mlp_dim, "silu", dtype, param_dtype, name="mlp")(norm("post_attention_layernorm")(x))
        return layers.constrain(x + h, ("batch", "length", "act_embed"))


class ScannedDecoderLayer(DecoderLayer):
    """A `DecoderLayer` as an `nn.scan` body: (x, None) -> (x, None), mask and positions broadcast."""

    def __call__(self, x, mask, positions):
        return super().__call__(x, mask, positions), None


def scanned_layers(cfg: LlamaConfig) -> nn.Module:
    """All `cfg.num_layers` layers as one scanned module: params stacked [num_layers, ...] with the logical
    axis `layers` first, the layer body traced and compiled once. With remat the body is rematerialized
    inside the scan, as MaxText composes them (`prevent_cse=False`: the scan already keeps XLA from
    merging the recomputation into the forward)."""
    body = nn.remat(ScannedDecoderLayer, policy=layers.REMAT_POLICIES[cfg.remat_policy], prevent_cse=False) \
        if cfg.remat else ScannedDecoderLayer
    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: layers.SCANNED_AXIS})
    return scan(cfg, name=layers.SCANNED_SCOPE)


class LlamaDecoder(nn.Module):
    """tokens [B, L] -> logits [B, L, V] (compute dtype).

    `segment_ids` [B, L] (0 = padding) keep packed sequences from attending to each other and
    `positions` [B, L] restart at 0 in each packed sequence; both default to a single unpacked sequence.
    With `decode=True` the call extends the KV cache (module docstring); `lengths` [B] counts the real
    (non-padding) tokens of each row, positions come from the cache and packing is not supported.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, *, decode: bool = False, lengths=None,
                 pages: paged_attention.KVPages | None = None):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, length = tokens.shape
        if decode:
            if positions is not None or segment_ids is not None:
                raise ValueError("LlamaDecoder(decode=True) takes no positions or segment_ids: positions come "
                                 "from the cache and packed rows cannot be decoded")
            index = self.variable("cache", "cache_index", layers.zeros_with_axes(("batch",)), (batch,), jnp.int32)
            positions = index.value[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
            index.value = index.value + (length if lengths is None else jnp.asarray(lengths, jnp.int32))
            block_table = self._block_table(batch, length, pages)
        elif lengths is not None:
            raise ValueError("LlamaDecoder: lengths is only used with decode=True")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        embed_std = cfg.d_model ** -0.5 if cfg.tie_embeddings else 1.0
        embed = layers.Embed(cfg.vocab_size, cfg.d_model, dtype, param_dtype,
                             nn.initializers.normal(stddev=embed_std), name="embed_tokens")
        x = layers.constrain(embed(tokens), ("batch", "length", "act_embed"))
        mask = None if decode else attention.make_attention_mask(
            segment_ids, segment_ids, query_length=length, key_length=length, causal=True,
            query_positions=positions if segment_ids is not None else None,
            key_positions=positions if segment_ids is not None else None)
        if cfg.scan_layers:
            if decode:
                raise NotImplementedError(
                    "LlamaConfig.scan_layers=True: the KV-cache decode path runs the layers one by one, not "
                    "scanned; decode with scan_layers=False (checkpoints hold the per-layer params, and the model "
                    "spec a scanned run saves has scan_layers=False, so loaded models decode)")
            x, _ = scanned_layers(cfg)(x, mask, positions)
        else:
            layer_cls = layers.maybe_remat(DecoderLayer, cfg.remat and not decode, cfg.remat_policy)
            for i in range(cfg.num_layers):
                # decode is passed only when set: nn.remat (training) would trace a bool argument.
                x = layer_cls(cfg, name=f"layers_{i}")(x, mask, positions,
                                                       *((True, block_table, pages) if decode else ()))
        x = layers.RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = layers.DenseGeneral((cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",), dtype,
                                         param_dtype, name="lm_head")(x)
        return layers.constrain(logits, ("batch", "length", "act_vocab"))

    def _block_table(self, batch: int, length: int, pages: paged_attention.KVPages | None):
        """The paged cache's block table [B, T] (None for a dense cache); at init L is the row length."""
        if pages is None and not self.has_variable("cache", paged_attention.BLOCK_TABLE):
            return None
        shape = None if pages is None else (batch, pages.pages_per_row(length))
        return self.variable("cache", paged_attention.BLOCK_TABLE, layers.zeros_with_axes(("batch", None)), shape,
                             jnp.int32).value


def matmul_params_per_token(cfg: LlamaConfig) -> int:
    """Weights touched by matmuls per token (attention, MLP, unembedding; not the embedding lookup)."""
    hd = cfg.resolved_head_dim
    attn = cfg.d_model * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.d_model * cfg.mlp_dim
    return cfg.num_layers * (attn + mlp) + cfg.d_model * cfg.vocab_size


def training_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Model FLOPs per trained token as the field counts them (forward + backward = 3x forward).

    6 * matmul params, plus causal attention scores and values: per layer the forward costs
    2 (QK^T) + 2 (AV) multiply-adds over H * Dh features and half of the L keys, i.e. 2 * L * H * Dh.
    """
    attn = cfg.num_layers * 2 * seq_len * cfg.num_heads * cfg.resolved_head_dim
    return 6.0 * matmul_params_per_token(cfg) + 3.0 * attn
