"""Losses: token cross-entropy and distillation divergences (`token_losses`, whose public functions are
re-exported here, e.g. `losses.kd_loss`) and their vocabulary-parallel forms under shard_map
(`vocab_parallel`)."""
from lmops_jax.losses.token_losses import (KD_KINDS, cross_entropy_with_logits, distillation_loss,
                                           divergence_from_log_probs, kd_loss, kd_loss_from_topk, kd_token_loss,
                                           kd_token_loss_from_topk, resolve_schedule, topk_teacher_logprobs,
                                           weighted_mean)

__all__ = ["KD_KINDS", "cross_entropy_with_logits", "distillation_loss", "divergence_from_log_probs", "kd_loss",
           "kd_loss_from_topk", "kd_token_loss", "kd_token_loss_from_topk", "resolve_schedule",
           "topk_teacher_logprobs", "weighted_mean"]
