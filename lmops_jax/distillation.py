"""DistillationTrainer: a student trained on a frozen teacher's logits in one jitted step.

The teacher is any model the library supports, rebuilt from the gin config stored with its Orbax
checkpoint and restored params-only onto the student's mesh with its own logical-axis shardings. Its
params enter the jitted train step as an argument (never closed over as constants), run forward only
under `stop_gradient`, and are never updated.

Per weighted token the student minimizes
    alpha * KD(teacher, student; kind, temperature, beta)  +  (1 - alpha) * CE(student, targets)  +  z-loss
with KD from `lmops_jax.losses.kd_token_loss` (T^2-scaled forward KL, reverse KL or generalized JSD);
`alpha` and `temperature` may be optax schedules of the step. Metrics (per weighted token):
`kd_loss`, `ce_loss`, `teacher_agreement` (top-1), `teacher_loss` (the teacher's CE on the batch).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lmops_jax import checkpoints, losses
from lmops_jax.models.model import BaseModel
from lmops_jax.trainer import Trainer

ScalarOrSchedule = float | Callable[[Any], Any]


@dataclasses.dataclass
class DistillationTrainer(Trainer):
    """Trainer whose loss mixes a KD term against a frozen teacher with the hard-label loss.

    Attributes (beyond Trainer's):
      teacher_checkpoint: Orbax checkpoint of the teacher (TEACHER_CHECKPOINT); its stored gin config
        builds the teacher model.
      kd_loss: 'forward_kl', 'reverse_kl' or 'jsd' (KD_LOSS).
      kd_temperature: softmax temperature, constant or schedule (KD_TEMPERATURE).
      kd_alpha: weight of the KD term, constant or schedule (KD_ALPHA).
      kd_beta: JSD mixture weight of the teacher (KD_BETA).
      teacher_model: overrides the model built from the checkpoint's config.
    """

    teacher_checkpoint: str | None = None
    kd_loss: str = "forward_kl"
    kd_temperature: ScalarOrSchedule = 1.0
    kd_alpha: ScalarOrSchedule = 0.5
    kd_beta: float = 0.5
    teacher_model: BaseModel | None = None

    def __post_init__(self):
        from lmops_jax import inference  # the checkpoint's gin config -> model

        if not self.teacher_checkpoint:
            raise ValueError("DistillationTrainer needs teacher_checkpoint (gin macro TEACHER_CHECKPOINT)")
        if self.kd_loss not in losses.KD_KINDS:
            raise ValueError(f"unknown KD_LOSS {self.kd_loss!r}; choose one of {losses.KD_KINDS}")
        if self.teacher_model is None:
            config = checkpoints.read_config(self.teacher_checkpoint)
            if not config.strip():
                raise checkpoints.CheckpointError(
                    f"teacher checkpoint {self.teacher_checkpoint!r} stores no gin config; pass teacher_model")
            self.teacher_model, _ = inference.model_from_gin(config, self.teacher_checkpoint)
        if self.teacher_model.vocab_size != self.model.vocab_size:
            raise ValueError(
                f"teacher and student must share a vocabulary: teacher vocab_size={self.teacher_model.vocab_size}, "
                f"student vocab_size={self.model.vocab_size}")
        abstract, self._teacher_shardings = inference.param_shardings(self.teacher_model, self.partitioner)
        self.teacher_params = checkpoints.restore_params(self.teacher_checkpoint, abstract, self._teacher_shardings)
        super().__post_init__()

    def step_inputs(self) -> Any:
        return self.teacher_params

    def step_input_shardings(self) -> Any:
        return self._teacher_shardings

    def loss_fn(self, params, batch, rng, loss_normalizer, inputs, step):
        teacher_logits = jax.lax.stop_gradient(self.teacher_model.compute_logits(inputs, batch))
        student_logits = self.model.compute_logits(params, batch, rng)
        targets = batch["decoder_target_tokens"]
        weights = batch["decoder_loss_weights"].astype(jnp.float32)
        alpha = losses.resolve_schedule(self.kd_alpha, step)
        temperature = losses.resolve_schedule(self.kd_temperature, step)
        kd = losses.kd_token_loss(student_logits, teacher_logits, kind=self.kd_loss, temperature=temperature,
                                  beta=self.kd_beta)
        ce_and_z, z = losses.cross_entropy_with_logits(
            student_logits, targets, z_loss=self.model.z_loss, label_smoothing=self.model.label_smoothing)
        ce = ce_and_z - z
        token_loss = alpha * kd + (1.0 - alpha) * ce + z
        teacher_ce, _ = losses.cross_entropy_with_logits(teacher_logits, targets)
        student_top1 = jnp.argmax(student_logits, axis=-1)
        sums = lambda x: jnp.sum(x * weights)  # noqa: E731
        metrics = {
            "loss_sum": sums(token_loss),
            "kd_loss_sum": sums(kd),
            "ce_loss_sum": sums(ce),
            "z_loss_sum": sums(z),
            "correct_sum": sums((student_top1 == targets).astype(jnp.float32)),
            "teacher_agreement_sum": sums((student_top1 == jnp.argmax(teacher_logits, -1)).astype(jnp.float32)),
            "teacher_loss_sum": sums(teacher_ce),
            "weight_sum": jnp.sum(weights),
        }
        return metrics["loss_sum"] / loss_normalizer, metrics
