"""Model wrappers: what a Trainer or an InferenceModule needs from a network.

A wrapper pairs a Flax module with its batch format (the seqio feature converter that produces it) and
exposes pure functions of (params, batch): `compute_logits`, `loss_fn`, `score_batch`. It knows
nothing about meshes or optimizers.

Batch format (decoder-only, from `seqio.DecoderFeatureConverter`): int32 arrays [B, L] named
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights` and, when packed,
`decoder_segment_ids`, `decoder_positions`. Encoder-decoder batches add `encoder_input_tokens` [B, Le]
(and `encoder_segment_ids`, `encoder_positions` when packed).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmops_jax import losses
from lmops_jax.models import decoder_only, encoder_decoder

Batch = Mapping[str, jax.Array]
Params = Any


class BaseModel(abc.ABC):
    """Shared loss and scoring on top of `compute_logits`. Subclasses are frozen dataclasses."""

    z_loss: float = 0.0
    label_smoothing: float = 0.0

    @property
    @abc.abstractmethod
    def module(self) -> nn.Module:
        """The Flax module; `init_params` and `compute_logits` apply it."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Size of the output softmax (may exceed the data vocabulary, e.g. padded to a multiple of 128)."""

    @property
    @abc.abstractmethod
    def feature_converter_cls(self) -> type:
        """The seqio FeatureConverter class that produces this model's batches."""

    @abc.abstractmethod
    def input_shapes(self, batch_size: int, task_feature_lengths: Mapping[str, int]) -> dict[str, tuple]:
        """Shapes of the model features (as the feature converter produces them) for a batch."""

    @abc.abstractmethod
    def init_params(self, rng: jax.Array, input_shapes: Mapping[str, tuple]) -> Params:
        """Parameters with logical-axis metadata (`nn.Partitioned` boxes) for the given input shapes."""

    @abc.abstractmethod
    def compute_logits(self, params: Params, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        """Logits [B, L, V] for the decoder targets of `batch`."""

    @abc.abstractmethod
    def training_flops_per_token(self, task_feature_lengths: Mapping[str, int]) -> float:
        """Model FLOPs per target token of a training step (forward + backward)."""

    # Hooks for models that train or save only part of their params (LoRA: `peft.LoraModel`).
    @property
    def trainable_patterns(self) -> tuple[str, ...]:
        """Regexes of the param paths the Trainer trains when the optimizer names none; () = all."""
        return ()

    def checkpoint_params(self, params: Params) -> Params:
        """The params (or a tree of their shapes or shardings) that checkpoints hold: all of them,
        returned as the same object, unless a subclass keeps a subset."""
        return params

    def loss_fn(
        self, params: Params, batch: Batch, rng: jax.Array | None = None, *, loss_normalizer: Any = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Weighted token cross-entropy.

        The loss is sum(weights * token_loss) / loss_normalizer, where the normalizer defaults to
        sum(weights); a trainer that splits a batch into microbatches passes the whole batch's weight so
        that the accumulated gradient equals the large-batch gradient exactly. Metrics are sums
        (`loss_sum`, `z_loss_sum`, `correct_sum`, `weight_sum`) so that they add across microbatches
        and devices.
        """
        logits = self.compute_logits(params, batch, rng)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        weights = weights.astype(jnp.float32)
        token_loss, z_term = losses.cross_entropy_with_logits(
            logits, targets, z_loss=self.z_loss, label_smoothing=self.label_smoothing)
        weight_sum = jnp.sum(weights)
        loss_sum = jnp.sum(token_loss * weights)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        metrics = {
            "loss_sum": loss_sum,
            "z_loss_sum": jnp.sum(z_term * weights),
            "correct_sum": jnp.sum(correct * weights),
            "weight_sum": weight_sum,
        }
        normalizer = jnp.maximum(weight_sum, 1.0) if loss_normalizer is None else loss_normalizer
        return loss_sum / normalizer, metrics

    def score_batch(self, params: Params, batch: Batch) -> jax.Array:
        """Per-sequence log-likelihood [B] of the weighted targets (no z-loss, no smoothing)."""
        logits = self.compute_logits(params, batch).astype(jnp.float32)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        token_logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(token_logp * weights.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class DecoderOnlyModel(BaseModel):
    """A Llama-style decoder trained with next-token cross-entropy on (packed) decoder batches."""

    config: decoder_only.LlamaConfig = dataclasses.field(default_factory=decoder_only.LlamaConfig)
    z_loss: float = 1e-4
    label_smoothing: float = 0.0

    @property
    def module(self) -> nn.Module:
        return decoder_only.LlamaDecoder(self.config)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def feature_converter_cls(self) -> type:
        import seqio  # imported lazily: the model is usable without the data extra
        return seqio.DecoderFeatureConverter

    def input_shapes(self, batch_size, task_feature_lengths):
        shape = (batch_size, int(task_feature_lengths["targets"]))
        names = ["decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                 "decoder_segment_ids", "decoder_positions"]
        return {name: shape for name in names}

    def init_params(self, rng, input_shapes):
        tokens = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
        return self.module.init(rng, tokens)["params"]

    def compute_logits(self, params, batch, rng=None):
        return self.module.apply(
            {"params": params}, batch["decoder_input_tokens"], positions=batch.get("decoder_positions"),
            segment_ids=batch.get("decoder_segment_ids"))

    def training_flops_per_token(self, task_feature_lengths):
        return decoder_only.training_flops_per_token(self.config, int(task_feature_lengths["targets"]))


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel(BaseModel):
    """A T5 1.1 encoder-decoder trained with teacher-forced cross-entropy on (packed) seqio batches.

    Batches come from `seqio.EncDecFeatureConverter`: `encoder_input_tokens` [B, Le] and
    `decoder_{input,target}_tokens`, `decoder_loss_weights` [B, Ld], plus `{encoder,decoder}_segment_ids`
    and `{encoder,decoder}_positions` when packed. Params are initialized with the T5 query scaling
    (`encoder_decoder.scale_query_init`).
    """

    config: encoder_decoder.T5Config = dataclasses.field(default_factory=encoder_decoder.T5Config)
    z_loss: float = 1e-4
    label_smoothing: float = 0.0

    @property
    def module(self) -> nn.Module:
        return encoder_decoder.T5EncoderDecoder(self.config)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def feature_converter_cls(self) -> type:
        import seqio  # imported lazily: the model is usable without the data extra
        return seqio.EncDecFeatureConverter

    def input_shapes(self, batch_size, task_feature_lengths):
        encoder = (batch_size, int(task_feature_lengths["inputs"]))
        decoder = (batch_size, int(task_feature_lengths["targets"]))
        shapes = {name: encoder for name in ["encoder_input_tokens", "encoder_segment_ids", "encoder_positions"]}
        shapes.update({name: decoder for name in ["decoder_input_tokens", "decoder_target_tokens",
                                                  "decoder_loss_weights", "decoder_segment_ids",
                                                  "decoder_positions"]})
        return shapes

    def init_params(self, rng, input_shapes):
        encoder_tokens = jnp.ones(input_shapes["encoder_input_tokens"], jnp.int32)
        decoder_tokens = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
        params = self.module.init(rng, encoder_tokens, decoder_tokens)["params"]
        return encoder_decoder.scale_query_init(params, self.config.head_dim)

    def compute_logits(self, params, batch, rng=None):
        return self.module.apply(
            {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"), decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"), decoder_positions=batch.get("decoder_positions"))

    def training_flops_per_token(self, task_feature_lengths):
        """Per target token; see `encoder_decoder.training_flops_per_token`."""
        return encoder_decoder.training_flops_per_token(
            self.config, int(task_feature_lengths["inputs"]), int(task_feature_lengths["targets"]))
