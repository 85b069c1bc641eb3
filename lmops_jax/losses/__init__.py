"""Losses: per-token cross-entropy, distillation divergences and argmax written once (`token_losses`,
whose public names are re-exported here, e.g. `losses.kd_loss`, `losses.TokenLosses`), and the same
losses per vocabulary shard under shard_map (`vocab_parallel.VocabParallelTokenLosses`); the
cross-tokenizer ULD distance (`uld`: `losses.uld`, `losses.uld_from_topk`)."""
from lmops_jax.losses.token_losses import (KD_KINDS, TokenLosses, check_kd_args, cross_entropy_with_logits, kd_loss,
                                           resolve_schedule, topk_teacher_logprobs)
from lmops_jax.losses.uld import uld, uld_from_topk

__all__ = ["KD_KINDS", "TokenLosses", "check_kd_args", "cross_entropy_with_logits", "kd_loss", "resolve_schedule",
           "topk_teacher_logprobs", "uld", "uld_from_topk"]
