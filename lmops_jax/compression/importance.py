"""Activation-based importance of a Llama decoder's heads, MLP channels and layers (Minitron's criterion).

Calibration batches run through the float model once each (one jit), with a flax method interceptor
that reads, per layer, the input of `self_attn/o_proj` (the attention output per head, [B, L, H, Dh]),
the input of `mlp/down_proj` (the gated activation per channel, [B, L, F]) and the residual stream
before and after the layer ([B, L, D]). Over the real (non-padding) tokens it averages:

  heads     [layers, H]  ‖attention output of head h‖₂          (Minitron's head importance)
  channels  [layers, F]  |act(gate) · up| of channel f            (Minitron's neuron importance)
  layers    [layers]     1 - cos(x_in, x_out) of the residual     (block importance: a layer that barely
                                                                   turns the residual stream matters least)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmops_jax.models import decoder_only
from lmops_jax.models.model import DecoderOnlyModel

Batch = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Importance:
    """Mean activation magnitudes over the calibration tokens (module docstring); higher = keep."""

    heads: np.ndarray     # [num_layers, num_heads]
    channels: np.ndarray  # [num_layers, mlp_dim]
    layers: np.ndarray    # [num_layers]
    tokens: int


def _layer_index(module: nn.Module) -> int | None:
    """i of the `layers_i` scope a module sits in, or None."""
    for name in module.path:
        if isinstance(name, str) and name.startswith("layers_"):
            return int(name[len("layers_"):])
    return None


def _batch_sums(model: DecoderOnlyModel, params: Any, batch: Batch) -> dict[str, jax.Array]:
    """Token-weighted sums of one batch: heads [N, H], channels [N, F], layers [N], tokens []."""
    seen: dict[tuple[str, int], Any] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module, i = context.module, _layer_index(context.module)
        if context.method_name != "__call__" or i is None:
            return out
        if isinstance(module, decoder_only.DecoderLayer):
            seen["layer", i] = (args[0], out)
        elif module.name in ("o_proj", "down_proj"):
            seen[module.name, i] = args[0]
        return out

    with nn.intercept_methods(record):
        model.compute_logits(params, batch)
    segments = batch.get("decoder_segment_ids")
    weights = (jnp.ones(batch["decoder_input_tokens"].shape) if segments is None else segments > 0).astype(jnp.float32)
    per_token = lambda x: jnp.einsum("bl,bl...->...", weights, x.astype(jnp.float32))  # noqa: E731
    n = model.config.num_layers

    def block_importance(pair):
        x_in, x_out = (a.astype(jnp.float32) for a in pair)
        cos = jnp.sum(x_in * x_out, -1) / (jnp.linalg.norm(x_in, axis=-1) * jnp.linalg.norm(x_out, axis=-1) + 1e-9)
        return per_token(1.0 - cos)

    return {"heads": jnp.stack([per_token(jnp.linalg.norm(seen["o_proj", i].astype(jnp.float32), axis=-1))
                                for i in range(n)]),
            "channels": jnp.stack([per_token(jnp.abs(seen["down_proj", i])) for i in range(n)]),
            "layers": jnp.stack([block_importance(seen["layer", i]) for i in range(n)]),
            "tokens": jnp.sum(weights)}


def measure(model: DecoderOnlyModel, params: Any, batches: Iterable[Batch]) -> Importance:
    """Importance of every head, MLP channel and layer of `model` (unboxed float params) over `batches`."""
    if not isinstance(model, DecoderOnlyModel):
        raise TypeError(f"importance is measured on a DecoderOnlyModel, got {type(model).__name__}")
    model = dataclasses.replace(model, config=dataclasses.replace(model.config, remat=False))
    step = jax.jit(lambda p, b: _batch_sums(model, p, b))
    totals = None
    for batch in batches:
        sums = jax.device_get(step(params, dict(batch)))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if totals is None or totals["tokens"] <= 0:
        raise ValueError("the calibration task yielded no tokens (CALIBRATION_TASK, CALIBRATION_BATCHES)")
    count = float(totals["tokens"])
    return Importance(np.asarray(totals["heads"]) / count, np.asarray(totals["channels"]) / count,
                      np.asarray(totals["layers"]) / count, int(count))
