"""Training entry point: `python -m lmops_jax.train --gin_file=... [--gin.NAME=VALUE ...]`.

`train(...)` is also the Python API for notebooks: every collaborator (model, partitioner, optimizer,
trainer class) is a typed argument, so it runs without gin and gin can swap any of them.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from typing import Any, Callable, Mapping, Sequence

import jax

from lmops_jax import checkpoints
from lmops_jax.training import flops, progress as progress_lib
from lmops_jax.cli import gin_flags
from lmops_jax.cli import gin_render, runner, xla_flags
from lmops_jax.cli.runner import Preempted
from lmops_jax.checkpoints import CheckpointConfig, Checkpointer
from lmops_jax.models.model import BaseModel
from lmops_jax.models.spec import ModelSpec, VocabularySpec
from lmops_jax.training.optimizers import OptimizerConfig
from lmops_jax.partitioning import Partitioner
from lmops_jax.training.summaries import MetricsWriter
from lmops_jax.training.trainer import Trainer
from lmops_jax.training.train_state import TrainState, overlay_params, param_count

logger = logging.getLogger(__name__)


def _check_required(**values: Any) -> None:
    missing = [name for name, value in values.items() if gin_flags.is_required_sentinel(value)]
    if missing:
        raise gin_flags.GinConfigError(f"train(): required arguments not bound by gin: {', '.join(missing)}")


def _check_vocabulary(task_name: str, model: BaseModel) -> None:
    import seqio
    task = seqio.get_mixture_or_task(task_name)
    for name, feature in task.output_features.items():
        if feature.vocabulary.vocab_size > model.vocab_size:
            raise ValueError(
                f"task {task_name!r} feature {name!r} has a vocabulary of {feature.vocabulary.vocab_size} "
                f"tokens, more than the model's vocab_size={model.vocab_size}")


def _model_spec(model: BaseModel, task_name: str) -> dict | None:
    """The model spec every checkpoint of the run stores (`models.spec`), with the task's vocabulary.

    A model class that no family registers gets None and a warning: its checkpoints rebuild only from gin.
    """
    import seqio
    vocabulary = seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
    try:
        return ModelSpec(model.checkpoint_model, VocabularySpec.describe(vocabulary, task_name)).to_json()
    except TypeError as e:
        logger.warning("checkpoints will hold no model spec, only the gin text: %s", e)
        return None


# train() arguments written as the macros of gin_configs/runs/pretrain.gin, so `--gin.TRAIN_STEPS=...` works
# on a config.gin written for a run started from Python.
_ARGUMENT_MACROS = {
    "model": "MODEL", "model_dir": "MODEL_DIR", "train_steps": "TRAIN_STEPS",
    "mixture_or_task_name": "MIXTURE_OR_TASK_NAME", "task_feature_lengths": "TASK_FEATURE_LENGTHS",
    "batch_size": "BATCH_SIZE", "num_microbatches": "NUM_MICROBATCHES", "seed": "SEED", "log_period": "LOG_PERIOD",
    "eval_period": "EVAL_PERIOD", "eval_steps": "EVAL_STEPS", "peak_flops": "PEAK_FLOPS",
    "initial_checkpoint_path": "INITIAL_CHECKPOINT_PATH",
}


def python_run_config(arguments: Mapping[str, Any]) -> str:
    """The gin config of a `train()` called from Python with `arguments` (all but config_str).

    It binds every argument gin can express (the others are listed as comments), so the run's
    config.gin records it and `python -m lmops_jax.train --gin_file=MODEL_DIR/config.gin` continues it.
    """
    macros = {_ARGUMENT_MACROS[k]: v for k, v in arguments.items() if k in _ARGUMENT_MACROS}
    params = {k: gin_render.Macro(_ARGUMENT_MACROS[k]) if k in _ARGUMENT_MACROS else v for k, v in arguments.items()}
    return gin_render.render(macros, {train: params}, header="Written by lmops_jax.training.train.train() called "
                             "from Python: the run's arguments\n(python -m lmops_jax.train --gin_file=<this file> "
                             "continues it).")


class _StopOnSignals:
    """Turns SIGTERM/SIGINT into a flag the training loop checks after each step (main thread only)."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _initial_state(trainer: Trainer, checkpointer: Checkpointer, train_batches: Any, initial_checkpoint_path,
                   assignment_map, init_missing_params) -> tuple[TrainState, str]:
    """Resume from MODEL_DIR if it has checkpoints, else start from INITIAL_CHECKPOINT_PATH or scratch.

    Checkpoints hold `trainer.checkpoint_view` of the state; when that is a subset of the params (LoRA
    adapters), a resume takes the rest from INITIAL_CHECKPOINT_PATH (or the seed's init).
    """
    def fresh() -> tuple[TrainState, str]:
        state = trainer.init_state()
        if not initial_checkpoint_path:
            return state, "initialized from scratch"
        params = checkpoints.restore_params(
            initial_checkpoint_path, trainer.abstract_state.params, trainer.state_shardings.params,
            assignment_map=assignment_map, init_missing=(lambda: state.params) if init_missing_params else None)
        return state.replace(params=params), f"params restored from {initial_checkpoint_path}"

    saved_abstract = trainer.checkpoint_view(trainer.abstract_state)
    restored = checkpointer.restore_latest(saved_abstract, trainer.checkpoint_view(trainer.state_shardings))
    if restored is not None:
        state, data_state, step = restored
        train_batches.set_state(data_state)
        if saved_abstract is not trainer.abstract_state:  # a partial checkpoint: complete its params
            base, _ = fresh()
            state = state.replace(params=overlay_params(base.params, state.params))
        return state, f"resumed from step {step} in {checkpointer.directory}"
    return fresh()


def train(
    *,
    model: BaseModel,
    model_dir: str,
    train_steps: int,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    partitioner: Partitioner | None = None,
    optimizer: OptimizerConfig | None = None,
    trainer_cls: Callable[..., Trainer] = Trainer,
    num_microbatches: int = 1,
    seed: int = 0,
    pack: bool = True,
    log_period: int = 50,
    eval_period: int = 0,
    eval_steps: int = 4,
    peak_flops: float | None = None,
    setup_fns: Sequence[Callable[[], Any]] = (),
    checkpoint: CheckpointConfig | None = None,
    initial_checkpoint_path: str | None = None,
    assignment_map: Sequence[tuple[str, str | None]] = (),
    init_missing_params: bool = False,
    progress: bool | None = None,
    config_str: str | None = None,
    eval_metrics: Callable[..., Mapping[str, float]] | None = None,
) -> tuple[Trainer, TrainState]:
    """Trains `model` on a seqio task or mixture and returns (trainer, final state).

    Args:
      model: model wrapper (MODEL).
      model_dir: output folder for metrics.jsonl, TensorBoard events and config.gin (MODEL_DIR).
      train_steps: total optimizer steps (TRAIN_STEPS).
      mixture_or_task_name: a registered seqio task or mixture (MIXTURE_OR_TASK_NAME).
      task_feature_lengths: e.g. {'targets': 256} or {'inputs': 64, 'targets': 64} (TASK_FEATURE_LENGTHS).
      batch_size: global batch size (BATCH_SIZE).
      partitioner: mesh and rules (MESH_SHAPE, LOGICAL_AXIS_RULES); default data parallel on all devices.
      optimizer: default AdamW with cosine schedule.
      trainer_cls: Trainer or a subclass (e.g. distillation), called with the arguments above.
      num_microbatches: gradient accumulation factor.
      seed: parameter init, data order and per-step PRNG keys.
      pack: pack several examples per row (seqio feature converter packing).
      log_period: steps between metric records (the last step is always logged).
      eval_period: steps between evaluations on the validation split (0: only at the end).
      eval_steps: batches per evaluation (EVAL_STEPS).
      peak_flops: FLOP/s of the whole job for MFU (PEAK_FLOPS); None: this host's matmul probe, measured
        once and cached (`flops.job_peak_flops`).
      setup_fns: called first, e.g. gin-bound task registrations that read TEXT_FILES.
      checkpoint: when to save and what to keep (default CheckpointConfig()). A run whose MODEL_DIR
        holds checkpoints resumes from the newest readable one, data position included.
      initial_checkpoint_path: for a fresh MODEL_DIR, params-only start (fine-tuning) from this
        checkpoint; step and optimizer state start fresh (INITIAL_CHECKPOINT_PATH).
      assignment_map: regex rules from checkpoint param names to model names (see checkpoints.map_names).
      init_missing_params: initialize model params absent from the initial checkpoint from scratch.
      progress: print the library's log lines (the progress line, a tqdm bar when tqdm is installed) on
        stdout, with no logging set up; None: only when logging would not show them (a notebook), not
        under the CLI, which logs them (`training.progress.Display`).
      config_str: gin config text, written to MODEL_DIR/config.gin and into every checkpoint; None (a call
        from Python) writes `python_run_config` of the arguments instead. Every checkpoint also stores the
        model spec, so loading never needs the gin text.
      eval_metrics: called at every evaluation as `eval_metrics(params, model=, partitioner=,
        mixture_or_task_name=)`, returning {name: value} logged as `eval/<name>` (`trainer.task_metrics_record`):
        e.g. `inference.infer.PredictionMetrics`, the task's seqio metric functions (its T5 metrics) on
        generated text, which gin binds (training never imports inference).

    SIGTERM or SIGINT during training saves a checkpoint at the current step, waits for it, and raises
    `Preempted`; running the same command again resumes with no step lost.
    """
    # Only the arguments exist yet; progress is a display choice, not part of the run.
    arguments = {name: value for name, value in locals().items() if name not in ("config_str", "progress")}
    _check_required(model=model, model_dir=model_dir, train_steps=train_steps,
                    mixture_or_task_name=mixture_or_task_name, task_feature_lengths=task_feature_lengths,
                    batch_size=batch_size)
    if config_str is None:
        config_str = python_run_config(arguments)
    from lmops_jax.data import pipeline  # TensorFlow is imported only when data is needed

    for fn in setup_fns:
        fn()
    partitioner = partitioner or Partitioner()
    optimizer = optimizer or OptimizerConfig()
    task_feature_lengths = dict(task_feature_lengths)
    converter = model.feature_converter_cls(pack=pack)

    def batches(split: str, shuffle: bool, data_seed: int) -> pipeline.GlobalBatchIterator:
        return pipeline.batch_stream(mixture_or_task_name, task_feature_lengths, converter,
                                     global_batch_size=batch_size, sharding=partitioner.data_sharding(), split=split,
                                     shuffle=shuffle, seed=data_seed)

    train_batches = batches("train", True, seed)  # fails here, before any compile, on an unknown task
    eval_batches_fn = lambda: batches("validation", False, 0)  # noqa: E731  same batches every time
    _check_vocabulary(mixture_or_task_name, model)
    model_spec = _model_spec(model, mixture_or_task_name)
    trainer = trainer_cls(model=model, partitioner=partitioner, optimizer=optimizer, num_train_steps=train_steps,
                          batch_size=batch_size, task_feature_lengths=task_feature_lengths,
                          num_microbatches=num_microbatches, seed=seed)
    trainer.check_data(mixture_or_task_name, task_feature_lengths)

    os.makedirs(model_dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(model_dir, "config.gin"), "w", encoding="utf-8") as f:
            f.write(config_str)

    def save(step: int, current: TrainState, force: bool = False) -> None:
        checkpointer.save(step, trainer.checkpoint_view(current), data_state=train_batches.get_state(),
                          config_str=config_str, model_spec=model_spec, force=force)

    def after_step(step: int, current: TrainState) -> None:
        display.advance(step)
        if stop.requested:
            save(step, current, force=True)
            checkpointer.wait()
            raise Preempted(step, stop.requested)
        save(step, current)

    eval_metrics_fn = None if eval_metrics is None else functools.partial(
        eval_metrics, model=model, partitioner=partitioner, mixture_or_task_name=mixture_or_task_name)
    checkpointer = Checkpointer(model_dir, checkpoint)
    writer = MetricsWriter(model_dir)
    try:
        with progress_lib.Display(progress, train_steps) as display:
            state, start = _initial_state(trainer, checkpointer, train_batches, initial_checkpoint_path,
                                          assignment_map, init_missing_params)
            peak_flops, optimal_loss = _log_start(start, trainer, state, peak_flops, mixture_or_task_name)
            with _StopOnSignals() as stop:
                state = trainer.fit(state, train_batches, writer=writer, log_period=log_period,
                                    eval_batches_fn=eval_batches_fn, eval_period=eval_period, eval_steps=eval_steps,
                                    peak_flops=peak_flops, after_step=after_step, optimal_loss=optimal_loss,
                                    eval_metrics_fn=eval_metrics_fn)
            save(int(jax.device_get(state.step)), state, force=True)
            checkpointer.wait()
            logger.info("%s", _outputs_line(model_dir, checkpointer))
    finally:
        writer.close()
        checkpointer.close()
    return trainer, state


def _log_start(start: str, trainer: Trainer, state: TrainState, peak_flops: float | None,
               mixture_or_task_name: str) -> tuple[float, float | None]:
    """Logs how the run starts (parameters, mesh, the MFU peak, the task's optimal loss) and returns the
    job's peak FLOP/s for MFU and the optimal loss in nats/token (None when the task has none)."""
    from lmops_jax.data import tasks

    logger.info("%s: %s parameters (%s trainable); mesh %s; rules %s", start, f"{param_count(state.params):,}",
                f"{trainer.optimizer.trainable_count(state.params):,}",
                trainer.partitioner.axis_sizes, trainer.partitioner.rules)
    compute_dtype = getattr(getattr(trainer.model, "config", None), "dtype", "float32")
    peak = flops.job_peak_flops(peak_flops, compute_dtype)
    logger.info("peak for MFU: %.3g FLOP/s (%s, %s)", peak.flops, compute_dtype, peak.source)
    optimal_loss = tasks.known_optimal_loss(mixture_or_task_name, trainer.task_feature_lengths)
    if optimal_loss is not None:
        logger.info("optimal loss of %s at these lengths (the source's entropy): %.4f nats/token",
                    mixture_or_task_name, optimal_loss)
    return peak.flops, optimal_loss


def _outputs_line(model_dir: str, checkpointer: Checkpointer) -> str:
    """'outputs in MODEL_DIR: metrics.jsonl, tensorboard/, config.gin, checkpoints/ (steps 10, 20)',
    the last line of a run, naming what exists."""
    entries = [name + ("/" if os.path.isdir(path) else "") for name in ("metrics.jsonl", "tensorboard", "config.gin")
               if os.path.exists(path := os.path.join(model_dir, name))]
    steps = ", ".join(str(step) for step in checkpointer.all_steps())
    entries.append(f"{os.path.relpath(checkpointer.directory, model_dir)}/ (steps {steps or 'none'})")
    return f"outputs in {model_dir}: {', '.join(entries)}"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lmops_jax.train`: the gin-configured `train` through the CLI runner (exit codes there)."""
    job = runner.GinJob(train, bound_by="gin_configs/runs/pretrain.gin (or bind train.* yourself)",
                        pass_config_str=True)
    return runner.run("python -m lmops_jax.train", __doc__, job, argv, workload=xla_flags.TRAINING)
