"""Trainer: the jitted train/eval steps and the training loop.

`train_step(state, batch) -> (state, metrics)` is a pure function jitted once with the partitioner's
in/out shardings and the state donated. Gradient accumulation splits the batch into microbatches inside
the same jit (`lax.scan`) and normalizes every microbatch's summed loss by the whole batch's token
weight, so the accumulated gradient equals the large-batch gradient up to float summation order.
(optax.MultiSteps averages per-microbatch mean gradients across calls instead, which differs when packed
microbatches hold different token counts and spreads one optimizer step over several calls.)
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import optax

from lmops_jax.training import train_state as train_state_lib
from lmops_jax.models.model import BaseModel
from lmops_jax.training.optimizers import OptimizerConfig
from lmops_jax.partitioning import Partitioner
from lmops_jax.training.summaries import MetricsWriter
from lmops_jax.training.train_state import TrainState

logger = logging.getLogger(__name__)

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
WEIGHTS_KEY = "decoder_loss_weights"


def summarize(sums: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Per-weighted-token means of summed metrics: `X_sum` becomes `X` (`correct_sum`: `accuracy`)."""
    weight = max(float(sums["weight_sum"]), 1.0)
    out = {}
    for key, value in sums.items():
        if key.endswith("_sum") and key != "weight_sum":
            name = "accuracy" if key == "correct_sum" else key[:-len("_sum")]
            out[f"{prefix}{name}"] = float(value) / weight
    return out


def _zero_grad(x: jax.Array) -> jax.Array:
    """A frozen leaf's gradient: zeros, in float32 for integer weights (a QLoRA base's int8 / int4 values,
    which have no gradient dtype and which norms cannot reduce)."""
    return jnp.zeros(x.shape, x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.float32)


def _apply_update(param: jax.Array, update: jax.Array) -> jax.Array:
    """`optax.apply_updates` for one leaf; integer weights (frozen: a QLoRA base) stay as they are."""
    if not jnp.issubdtype(param.dtype, jnp.inexact):
        return param
    return optax.apply_updates(param, update)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


@dataclasses.dataclass
class Trainer:
    """Trains `model` with `optimizer` on the partitioner's mesh.

    Attributes:
      model: the model wrapper (loss, shapes, FLOPs).
      partitioner: mesh and logical axis rules.
      optimizer: optimizer config; the schedule spans `num_train_steps`.
      num_train_steps: total optimizer steps of the run (TRAIN_STEPS).
      batch_size: global batch size (BATCH_SIZE).
      task_feature_lengths: e.g. {'targets': 256} (TASK_FEATURE_LENGTHS).
      num_microbatches: gradient accumulation factor; batch_size / num_microbatches per forward.
      seed: seeds parameter init and the per-step PRNG keys (the step is folded in, so a resumed run
        draws the same keys).
    """

    model: BaseModel
    partitioner: Partitioner
    optimizer: OptimizerConfig
    num_train_steps: int
    batch_size: int
    task_feature_lengths: Mapping[str, int]
    num_microbatches: int = 1
    seed: int = 0

    def __post_init__(self):
        divisor = self.partitioner.batch_size_divisor
        if self.batch_size % self.num_microbatches:
            raise ValueError(f"BATCH_SIZE={self.batch_size} is not divisible by num_microbatches="
                             f"{self.num_microbatches}")
        micro = self.batch_size // self.num_microbatches
        if micro % divisor:
            raise ValueError(
                f"the (micro)batch of {micro} examples (BATCH_SIZE={self.batch_size} / num_microbatches="
                f"{self.num_microbatches}) must be divisible by the {divisor} batch shards of mesh "
                f"{self.partitioner.axis_sizes}")
        patterns = self.model.trainable_patterns  # e.g. LoRA: only the adapters train
        if patterns and not self.optimizer.trainable:
            self.optimizer = dataclasses.replace(self.optimizer, trainable=tuple(patterns))
        self.tx = self.optimizer.make(self.num_train_steps)
        self.learning_rate_fn = self.optimizer.learning_rate_schedule(self.num_train_steps)
        init_shapes = self.model.input_shapes(1, self.task_feature_lengths)
        self._init_params = lambda rng: self.model.init_params(rng, init_shapes)
        self.abstract_state, self.state_shardings = train_state_lib.state_shardings(
            self.partitioner, self.tx, self._init_params)
        # Static: which params are differentiated (frozen ones, e.g. a LoRA base, get zero gradients
        # without their weight-gradient matmuls being computed).
        self._trained_leaves = [not f for f in jax.tree.leaves(
            self.optimizer.frozen_mask(self.abstract_state.params))]
        self.batch_sharding = self.partitioner.data_sharding()
        replicated = self.partitioner.replicated
        self._jit_train_step = jax.jit(
            self._train_step, in_shardings=(self.state_shardings, self.batch_sharding, self.step_input_shardings()),
            out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
        self._jit_eval_step = jax.jit(
            self._eval_step, in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=replicated)

    # ----------------------------------------------------------------------------------------- state
    def init_state(self) -> TrainState:
        """A fresh, sharded train state (params from `seed`)."""
        return train_state_lib.init_train_state(
            jax.random.key(self.seed), self.partitioner, self.tx, self._init_params, self.state_shardings)

    def step_rng(self, step: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.seed + 1), step)

    # ------------------------------------------------------------------------------------ pure steps
    def step_inputs(self) -> Any:
        """Extra jitted arguments of every train step (e.g. a frozen teacher's params); none here.

        They are passed as arguments, never closed over, so large arrays are not baked into the program.
        """
        return ()

    def step_input_shardings(self) -> Any:
        return ()

    def check_data(self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int]) -> None:
        """Called by `train()` before training, to reject data this trainer cannot use; no check here."""

    def checkpoint_view(self, state: TrainState) -> TrainState:
        """The part of a train state (or of its abstract / sharding twin) that checkpoints hold.

        All of it (the same object), unless the model's `checkpoint_params` keeps a subset (LoRA keeps only
        its adapters; the frozen base comes back from INITIAL_CHECKPOINT_PATH on resume).
        """
        params = self.model.checkpoint_params(state.params)
        return state if params is state.params else state.replace(params=params)

    def loss_fn(self, params: Any, batch: Batch, rng: jax.Array, loss_normalizer: Any, inputs: Any,
                step: jax.Array) -> tuple[jax.Array, Metrics]:
        """Loss to differentiate and summed metrics; subclasses (distillation) override this."""
        return self.model.loss_fn(params, batch, rng, loss_normalizer=loss_normalizer)

    def _grads(self, params: Any, batch: Batch, rng: jax.Array, inputs: Any, step: jax.Array) -> tuple[Any, Metrics]:
        mask = self._trained_leaves

        def grad_fn(p, b, r, n):
            """Gradients of the trained leaves only; frozen ones (e.g. a LoRA base) get zeros, so their
            weight-gradient matmuls are never computed."""
            leaves, treedef = jax.tree.flatten(p)

            def loss(trained: list) -> tuple[jax.Array, Metrics]:
                it = iter(trained)
                full = [next(it) if m else jax.lax.stop_gradient(x) for x, m in zip(leaves, mask)]
                return self.loss_fn(jax.tree.unflatten(treedef, full), b, r, n, inputs, step)

            g, metrics = jax.grad(loss, has_aux=True)([x for x, m in zip(leaves, mask) if m])
            it = iter(g)
            return jax.tree.unflatten(treedef, [next(it) if m else _zero_grad(x)
                                                for x, m in zip(leaves, mask)]), metrics

        normalizer = jnp.maximum(jnp.sum(batch[WEIGHTS_KEY].astype(jnp.float32)), 1.0)
        n = self.num_microbatches
        if n == 1:
            return grad_fn(params, batch, rng, normalizer)
        # Microbatch i takes examples i, i + n, ...: each device keeps its own rows, nothing moves.
        micro = jax.tree.map(lambda x: x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1), batch)
        micro = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                x, jax.sharding.NamedSharding(self.partitioner.mesh, jax.sharding.PartitionSpec(
                    None, *self.batch_sharding.spec))), micro)
        zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng, normalizer)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)

        def body(acc, xs):
            i, mb = xs
            return _tree_add(acc, grad_fn(params, mb, jax.random.fold_in(rng, i), normalizer)), None
        acc, _ = jax.lax.scan(body, zeros, (jnp.arange(n), micro))
        return acc

    def _train_step(self, state: TrainState, batch: Batch, inputs: Any) -> tuple[TrainState, Metrics]:
        grads, metrics = self._grads(state.params, batch, self.step_rng(state.step), inputs, state.step)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(_apply_update, state.params, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["learning_rate"] = jnp.asarray(self.learning_rate_fn(state.step), jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval_step(self, params: Any, batch: Batch) -> Metrics:
        _, metrics = self.model.loss_fn(params, batch, None)
        return metrics

    # ----------------------------------------------------------------------------- jitted entry points
    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """One optimizer step. `state` is donated: use the returned one."""
        with self.partitioner.context():
            return self._jit_train_step(state, batch, self.step_inputs())

    def eval_step(self, params: Any, batch: Batch) -> Metrics:
        with self.partitioner.context():
            return self._jit_eval_step(params, batch)

    def evaluate(self, params: Any, batches: Iterator[Batch], num_batches: int) -> dict[str, float]:
        """`eval/loss`, `eval/accuracy` over up to `num_batches` batches (token-weighted)."""
        total = None
        for _, batch in zip(range(num_batches), batches):
            sums = self.eval_step(params, batch)
            total = sums if total is None else _tree_add(total, sums)
        if total is None:
            raise ValueError("the evaluation dataset yielded no batch")
        return summarize(jax.device_get(total), prefix="eval/")

    # ------------------------------------------------------------------------------------------ loop
    def fit(
        self,
        state: TrainState,
        train_batches: Iterator[Batch],
        *,
        writer: MetricsWriter | None = None,
        log_period: int = 100,
        eval_batches_fn: Callable[[], Iterator[Batch]] | None = None,
        eval_period: int = 0,
        eval_steps: int = 1,
        peak_flops: float | None = None,
        after_step: Callable[[int, TrainState], None] | None = None,
        optimal_loss: float | None = None,
        eval_metrics_fn: Callable[[Any], Mapping[str, float]] | None = None,
    ) -> TrainState:
        """Runs steps until `num_train_steps`, logging every `log_period` steps and at the end.

        The host only waits on the device at log steps. Throughput excludes the first step (compile).
        `after_step(step, state)` runs after every step (checkpointing hooks in here). With a known
        `optimal_loss` (the data source's entropy), evaluations also report `eval/excess_loss`. With
        `eval_metrics_fn(params) -> {name: value}` (e.g. a task's T5 metrics on generated text), each
        evaluation also logs its values (`task_metrics_record`).
        """
        start_step = int(jax.device_get(state.step))
        tokens_per_step = self.batch_size * sum(self.task_feature_lengths.get(k, 0) for k in ("targets",))
        flops_per_token = self.model.training_flops_per_token(self.task_feature_lengths)
        timer_start, timer_step = None, start_step
        step = start_step
        for step in range(start_step + 1, self.num_train_steps + 1):
            try:
                batch = next(train_batches)
            except StopIteration:
                logger.warning("training data ran out at step %d", step - 1)
                step -= 1
                break
            state, metrics = self.train_step(state, batch)
            if timer_start is None:
                jax.block_until_ready(metrics)
                timer_start, timer_step = time.perf_counter(), step
            if after_step is not None:
                after_step(step, state)
            last = step == self.num_train_steps
            record = {}
            if step % log_period == 0 or last:
                host = jax.device_get(metrics)
                elapsed = time.perf_counter() - timer_start
                record = summarize(host)
                record.update({k: float(v) for k, v in host.items() if not k.endswith("_sum")})
                if step > timer_step and elapsed > 0:
                    tokens_per_s = (step - timer_step) * tokens_per_step / elapsed
                    record["tokens_per_s"] = tokens_per_s
                    record["tokens_per_s_per_device"] = tokens_per_s / jax.device_count()
                    if peak_flops:
                        record["mfu"] = tokens_per_s * flops_per_token / peak_flops
                timer_start, timer_step = time.perf_counter(), step
            if eval_batches_fn is not None and ((eval_period and step % eval_period == 0) or last):
                record.update(self.evaluate(state.params, eval_batches_fn(), eval_steps))
                if optimal_loss is not None:
                    record["eval/excess_loss"] = record["eval/loss"] - optimal_loss
                if eval_metrics_fn is not None:
                    record.update(task_metrics_record(eval_metrics_fn(state.params), record))
            if record:
                if writer is not None:
                    writer.write(step, record)
                logger.info("%s", format_log_line(step, self.num_train_steps, record))
        return state


def task_metrics_record(metrics: Mapping[str, Any], record: Mapping[str, float]) -> dict[str, float]:
    """Task metrics as log entries: `eval/<name>`, or `eval/text_<name>` where the token-level evaluation
    already logs `eval/<name>` (T5's `accuracy` on generated text beside the teacher-forced token accuracy)."""
    out = {}
    for name, value in metrics.items():
        key = f"eval/{name}" if f"eval/{name}" not in record else f"eval/text_{name}"
        out[key] = float(getattr(value, "value", value))  # seqio.metrics.Scalar or a number
    return out


def format_log_line(step: int, total: int, record: Mapping[str, float]) -> str:
    """'[#####.....]  50% step 500/1000 loss 1.234 ...' for humans; metrics.jsonl holds full precision."""
    frac = step / max(total, 1)
    bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
    parts = [f"[{bar}] {frac:4.0%} step {step}/{total}"]
    for key in ("loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "eval/loss",
                "eval/accuracy", "eval/excess_loss"):
        if key in record:
            value = record[key]
            parts.append(f"{key} {value:.4g}" if key != "mfu" else f"mfu {100 * value:.2f}%")
    return " ".join(parts)

