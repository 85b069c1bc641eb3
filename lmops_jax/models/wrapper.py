"""A model that runs its base model's methods through another Flax module (LoRA, quantization).

    class QuantizedModel(WrapperModel):          # models.quantized
        @functools.cached_property
        def module(self): return qwix.quantize_model(self.base.module, provider)

`WrapperModel` holds `base` (any BaseModel) and delegates everything a wrapper does not change: the
batch format, FLOP count, request formats and the decode API (its keyword options passed through). The network runs through `self.module`:
each base method is called on a view of the base model whose `module` is the wrapper's, so whatever the
base wrapper knows about its batch format is reused unchanged (BaseModel methods reach the network only
through `self.module`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmops_jax.models.model import BaseModel


class ModuleSwap:
    """`base` seen with another `module` (whose `apply` also gets `rngs`, when given)."""

    def __init__(self, base: BaseModel, module: nn.Module, rngs: Mapping[str, jax.Array] | None = None):
        self._base, self._module, self._rngs = base, module, rngs

    def __getattr__(self, name):
        return getattr(self._base, name)

    @property
    def module(self) -> Any:
        if self._rngs is None:
            return self._module
        return _ApplyWithRngs(self._module, self._rngs)


@dataclasses.dataclass(frozen=True)
class _ApplyWithRngs:
    module: nn.Module
    rngs: Mapping[str, jax.Array]

    def apply(self, variables, *args, **kwargs):
        return self.module.apply(variables, *args, rngs=self.rngs, **kwargs)


def device_params(params: Any) -> Any:
    """`params` as jax Arrays: qwix recognizes weights by type, so host (numpy) leaves would silently
    skip its interception (no adapters, no dequantization)."""
    return jax.tree.map(jnp.asarray, params)


@dataclasses.dataclass(frozen=True)
class WrapperModel(BaseModel):
    """`base` with its network run through `self.module` (a subclass defines it); the rest delegated."""

    base: BaseModel

    def __post_init__(self):
        if not isinstance(self.base, BaseModel):
            raise TypeError(f"{type(self).__name__}.base must be a model (BaseModel), got {self.base!r}")

    def view(self, rngs: Mapping[str, jax.Array] | None = None, module: nn.Module | None = None) -> ModuleSwap:
        """The base model with this wrapper's module (or `module`), for calling the base's methods."""
        return ModuleSwap(self.base, self.module if module is None else module, rngs)

    @property
    def z_loss(self) -> float:  # type: ignore[override]
        return self.base.z_loss

    @property
    def label_smoothing(self) -> float:  # type: ignore[override]
        return self.base.label_smoothing

    @property
    def config(self) -> Any:
        return getattr(self.base, "config", None)

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def feature_converter_cls(self) -> type:
        return self.base.feature_converter_cls

    def input_shapes(self, batch_size, task_feature_lengths):
        return self.base.input_shapes(batch_size, task_feature_lengths)

    def training_flops_per_token(self, task_feature_lengths):
        return self.base.training_flops_per_token(task_feature_lengths)

    def compute_logits(self, params, batch, rng=None):
        return type(self.base).compute_logits(self.view(), device_params(params), batch)

    @property
    def max_length(self) -> int | None:
        return self.base.max_length

    @property
    def prompt_shares_cache(self) -> bool:
        return self.base.prompt_shares_cache

    def init_cache(self, batch, max_length, prompt_length=None, **kwargs):
        """The base model's cache: a wrapper changes weights, not what is cached."""
        return self.base.init_cache(batch, max_length, prompt_length, **kwargs)

    def prefill(self, params, tokens, lengths, cache, **kwargs):
        return type(self.base).prefill(self.view(), device_params(params), tokens, lengths, cache, **kwargs)

    def decode_step(self, params, tokens, cache, **kwargs):
        return type(self.base).decode_step(self.view(), device_params(params), tokens, cache, **kwargs)

    def decode_tokens(self, params, tokens, cache, **kwargs):
        return type(self.base).decode_tokens(self.view(), device_params(params), tokens, cache, **kwargs)

    def prompt_tokens(self, prompt, *, bos_id=None, eos_id=None):
        return self.base.prompt_tokens(prompt, bos_id=bos_id, eos_id=eos_id)

    def score_features(self, inputs, targets, *, bos_id=None, eos_id=None):
        return self.base.score_features(inputs, targets, bos_id=bos_id, eos_id=eos_id)

    def logits_features(self, tokens, decoder_tokens=None):
        return self.base.logits_features(tokens, decoder_tokens)
