"""Optimizers: optax chains built from a small config (schedule, clipping, weight-decay and freeze masks).

Everything numerical comes from optax; this module only picks and composes it, so that gin can
configure a run with flat values (`LEARNING_RATE`, `OptimizerConfig.name = 'adafactor'`, ...).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
OPTIMIZERS = ("adamw", "adafactor", "sgd")


def param_path(path: Sequence[Any]) -> str:
    """'layers_0/self_attn/q_proj/kernel' from a jax tree path (dict keys and attributes)."""
    parts = []
    for key in path:
        name = getattr(key, "key", None) or getattr(key, "name", None)
        if name is None and hasattr(key, "idx"):
            name = str(key.idx)
        if name is not None and name != "value":
            parts.append(str(name))
    return "/".join(parts)


def path_mask(params: Any, patterns: Sequence[str], *, match_value: bool = True) -> Any:
    """Bool pytree: `match_value` where any regex in `patterns` searches the parameter path."""
    compiled = [re.compile(p) for p in patterns]

    def leaf(path, _):
        hit = any(c.search(param_path(path)) for c in compiled)
        return hit if match_value else not hit
    return jax.tree_util.tree_map_with_path(leaf, params)


def make_schedule(
    name: str, peak_value: float, warmup_steps: int, decay_steps: int, end_value_factor: float = 0.1,
) -> optax.Schedule:
    """Linear warmup to `peak_value`, then `name` decay over `decay_steps` (total, warmup included).

    rsqrt: peak * sqrt(warmup / step) after warmup (T5's inverse-square-root); others end at
    `peak_value * end_value_factor`.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}; choose one of {SCHEDULES}")
    warmup_steps = max(int(warmup_steps), 0)
    decay_steps = max(int(decay_steps) - warmup_steps, 1)
    end_value = peak_value * end_value_factor
    if name == "constant":
        after = optax.constant_schedule(peak_value)
    elif name == "linear":
        after = optax.linear_schedule(peak_value, end_value, decay_steps)
    elif name == "cosine":
        after = optax.cosine_decay_schedule(peak_value, decay_steps, alpha=end_value_factor)
    else:
        offset = max(warmup_steps, 1)
        after = lambda step: peak_value * jnp.sqrt(offset / (jnp.maximum(step, 0) + offset))  # noqa: E731
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak_value, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


@dataclasses.dataclass
class OptimizerConfig:
    """What a run needs to say about its optimizer.

    Attributes:
      name: 'adamw', 'adafactor' (factored second moments, T5's default) or 'sgd' (momentum).
      learning_rate: peak learning rate (LEARNING_RATE).
      schedule: 'constant', 'linear', 'cosine' or 'rsqrt', after a linear warmup.
      warmup_steps: warmup length.
      decay_steps: schedule length; None means the run's number of train steps.
      end_learning_rate_factor: final / peak learning rate for linear and cosine.
      weight_decay: decoupled weight decay (AdamW style; scaled by the learning rate).
      weight_decay_exclude: regexes of parameter paths that are never decayed; parameters with fewer
        than 2 dimensions (norm scales) are never decayed either.
      clip_grad_norm: global-norm clipping threshold; None or 0 disables it.
      frozen: regexes of parameter paths whose updates are zero (their optimizer state is not even
        allocated), e.g. ['embed_tokens', 'layers_[0-3]/'].
      trainable: when non-empty, only parameters whose path matches one of these regexes are trained;
        all others are frozen as by `frozen` (e.g. ['_lora_[ab]$'] for LoRA adapters). Both lists
        apply: a parameter matching `trainable` and `frozen` is frozen.
      sparse_params: regexes of parameter paths whose zero weights are pruned ones (the masks of
        `python -m lmops_jax.compress prune`): their updates are zeroed, so they stay zero
        (`keep_zeros`).
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_steps: int | None = None
    end_learning_rate_factor: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.0
    weight_decay_exclude: Sequence[str] = ()
    clip_grad_norm: float | None = 1.0
    frozen: Sequence[str] = ()
    trainable: Sequence[str] = ()
    sparse_params: Sequence[str] = ()

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; choose one of {SCHEDULES}")
        for field in ("frozen", "trainable", "weight_decay_exclude", "sparse_params"):
            patterns = getattr(self, field)
            if isinstance(patterns, str):
                raise TypeError(f"OptimizerConfig.{field} must be a list of regexes, got the string {patterns!r}")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"OptimizerConfig.{field}: bad regex {pattern!r}: {e}") from e

    def learning_rate_schedule(self, num_train_steps: int) -> optax.Schedule:
        decay = self.decay_steps if self.decay_steps is not None else num_train_steps
        return make_schedule(self.schedule, self.learning_rate, self.warmup_steps, decay,
                             self.end_learning_rate_factor)

    def _decay_mask(self, params):
        excluded = path_mask(params, self.weight_decay_exclude) if self.weight_decay_exclude else None
        ndim_ok = jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
        if excluded is None:
            return ndim_ok
        return jax.tree.map(lambda ok, ex: bool(ok) and not ex, ndim_ok, excluded)

    def frozen_mask(self, params: Any) -> Any:
        """Bool pytree over `params` (arrays or shapes): True for parameters that are never updated."""
        frozen = path_mask(params, self.frozen) if self.frozen else jax.tree.map(lambda _: False, params)
        if not self.trainable:
            return frozen
        untrained = path_mask(params, self.trainable, match_value=False)
        return jax.tree.map(lambda a, b: bool(a) or bool(b), frozen, untrained)

    def trainable_count(self, params: Any) -> int:
        """Number of parameter values this optimizer updates."""
        frozen = jax.tree.leaves(self.frozen_mask(params))
        return int(sum(int(p.size) for p, f in zip(jax.tree.leaves(params), frozen) if not f))

    def make(self, num_train_steps: int) -> optax.GradientTransformation:
        """The optax transformation for a run of `num_train_steps` steps."""
        schedule = self.learning_rate_schedule(num_train_steps)
        mask = self._decay_mask
        if self.name == "adamw":
            base = optax.adamw(schedule, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay,
                               mask=mask)
        elif self.name == "adafactor":
            base = optax.adafactor(schedule, weight_decay_rate=self.weight_decay or None, weight_decay_mask=mask)
        else:
            base = optax.chain(optax.add_decayed_weights(self.weight_decay, mask),
                               optax.sgd(schedule, momentum=self.momentum))
        tx = optax.chain(optax.clip_by_global_norm(self.clip_grad_norm), base) if self.clip_grad_norm else base
        if self.frozen or self.trainable:
            labels = lambda params: jax.tree.map(  # noqa: E731
                lambda f: "frozen" if f else "trained", self.frozen_mask(params))
            tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
        return optax.chain(tx, keep_zeros(self.sparse_params)) if self.sparse_params else tx


def keep_zeros(patterns: Sequence[str]) -> optax.GradientTransformation:
    """Zeros the update of every weight that is exactly zero in the parameters matching `patterns`.

    The last transformation of the chain, so a pruned weight (zero) never moves: the mask is the zeros
    of the current params, which by induction are the pruned checkpoint's, and needs no state to save.
    """
    def update(updates, state, params=None):
        if params is None:
            raise ValueError("keep_zeros (OptimizerConfig.sparse_params) needs the params in tx.update")
        matched = path_mask(params, patterns)
        updates = jax.tree.map(lambda u, p, m: jnp.where(p == 0, jnp.zeros_like(u), u) if m else u,
                               updates, params, matched)
        return updates, state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
