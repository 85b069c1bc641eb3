"""Distillation: the DistillationTrainer (online, offline top-k, on-policy) and the offline teacher
top-k store. `python -m lmops_jax.distillation dump_topk ...` writes a store."""
from lmops_jax.distillation.trainer import DistillationTrainer

__all__ = ["DistillationTrainer"]
