"""The optional `t5` package (install extra `[t5]`): T5's span corruption and its text metrics for seqio tasks.

Nothing here imports `t5` when the module is imported, so the built-in tasks that use it register without
it. Building such a task's data, or computing its metrics, without the package raises
`MissingExtraError`, which names the extra to install; the data pipeline builds the data before anything
compiles, so a run is refused at once.

`t5` 0.9.4 pins `seqio-nightly` and `tfds-nightly`, which replace the `seqio` and `tensorflow_datasets`
modules of `[all]`; it is therefore not part of `[all]` and is installed last (`T5_INSTALL`).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable, Mapping, Sequence

import gin
import tensorflow as tf

T5_INSTALL = 'pip install -e ".[t5]"'
# Metric names a task may declare: functions of `t5.evaluation.metrics` taking (targets, predictions) as
# strings. `sequence_accuracy` is exact match; `accuracy` is the same per-example match through sklearn;
# `bleu` is sacreBLEU's corpus BLEU; `rouge` gives rouge1, rouge2 and rougeLsum. All are percentages.
METRICS = ("accuracy", "sequence_accuracy", "bleu", "rouge")


class MissingExtraError(ValueError):
    """A task needs an optional package that is not installed (a configuration error: the CLI exits 2)."""


def t5_module(name: str, needed_by: str) -> Any:
    """Imports `name` (a `t5` submodule), or raises `MissingExtraError` naming `needed_by` and the extra.

    Only a missing `t5` is reported this way; an installed but broken one raises its own ImportError. t5
    declares gin configurables when imported, which gin refuses once a job has locked its config, so the
    first import runs with the config unlocked.
    """
    if importlib.util.find_spec("t5") is None:
        raise MissingExtraError(f"{needed_by} needs the t5 package, which is not installed: run {T5_INSTALL} "
                                "(after the [all] extra: it replaces seqio and tensorflow-datasets with the "
                                "nightlies it pins)")
    with gin.unlock_config():
        return importlib.import_module(name)


def require_t5(task_name: str) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A seqio preprocessor that refuses task `task_name` without `t5` and passes its data through unchanged.

    It goes first, so `Task.get_dataset` fails before reading anything (for a task whose data needs no
    t5 but whose metrics do).
    """
    def check(dataset: tf.data.Dataset) -> tf.data.Dataset:
        t5_module("t5.evaluation.metrics", f"task {task_name!r}")
        return dataset

    return check


def span_corruption(noise_density: float, mean_noise_span_length: float, task_name: str) -> Callable:
    """A seqio preprocessor running `t5.data.preprocessors.span_corruption` on tokenized "targets".

    It concatenates the examples, splits them into chunks that fit the "inputs" length after corruption,
    replaces a `noise_density` fraction of each chunk's tokens, in spans of mean length
    `mean_noise_span_length`, with sentinels (ids counting down from the vocabulary's last id) in
    "inputs", and makes "targets" the dropped spans, each after its sentinel.
    """
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"NOISE_DENSITY must lie in (0, 1), got {noise_density!r}")
    if not mean_noise_span_length >= 1.0:
        raise ValueError(f"MEAN_NOISE_SPAN_LENGTH must be >= 1, got {mean_noise_span_length!r}")

    def preprocess(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                   output_features: Mapping[str, Any]) -> tf.data.Dataset:
        preprocessors = t5_module("t5.data.preprocessors", f"task {task_name!r} (span corruption)")
        if not {"inputs", "targets"} <= set(sequence_length or {}):
            raise ValueError(f"task {task_name!r} needs 'inputs' and 'targets' lengths in TASK_FEATURE_LENGTHS, "
                             f"got {sequence_length}")
        _, targets_length = preprocessors.random_spans_helper(
            inputs_length=sequence_length["inputs"], noise_density=noise_density,
            mean_noise_span_length=mean_noise_span_length, extra_tokens_per_span_inputs=1,
            extra_tokens_per_span_targets=1)
        if sequence_length["targets"] < targets_length:
            raise ValueError(f"task {task_name!r}: TASK_FEATURE_LENGTHS {dict(sequence_length)} gives span "
                             f"corruption targets of up to {targets_length} tokens; raise 'targets' to at least that")
        return preprocessors.span_corruption(dataset, sequence_length, output_features,
                                             mean_noise_span_length=mean_noise_span_length,
                                             noise_density=noise_density)

    return preprocess


def metric_fns(names: Sequence[str], task_name: str) -> list[Callable[[list, list], dict]]:
    """seqio predict-metric functions `fn(targets, predictions) -> {key: value}` for T5 metric `names`."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"metrics of task {task_name!r} must be a list of names from {METRICS}, got {names!r}")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown} for task {task_name!r}; choose from {METRICS}")

    def make(name: str) -> Callable[[list, list], dict]:
        def fn(targets: list, predictions: list) -> dict:
            return getattr(t5_module("t5.evaluation.metrics", f"metric {name!r}"), name)(targets, predictions)

        fn.__name__ = name
        return fn

    return [make(name) for name in names]
