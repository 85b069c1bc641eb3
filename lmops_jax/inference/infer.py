"""Inference entry point: predictions or scores over a seqio task's split or a prompt file, as JSONL.

    python -m lmops_jax.infer --gin_file=gin_configs/runs/infer.gin \\
      --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME="'synthetic_lm'" \\
      [--gin.INFER_OUTPUT_DIR="'/tmp/out'"] [--gin.MODE="'score'"] [--gin.NUM_EXAMPLES=256]
    python -m lmops_jax.infer --gin_file=gin_configs/runs/infer.gin \\
      --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.INPUT_FILE="'/tmp/prompts.jsonl'"

`infer(...)` is also the Python API. The model comes from the model spec stored with the checkpoint
(`InferenceModule.from_checkpoint` through `models.loading`), so no model flags are repeated.

Examples. Tasks with an "inputs" feature use it as the prompt and "targets" as the reference. Tasks
with only "targets" (plain language modelling) split each example: its first `prompt_length` tokens
are the prompt (an encoder-decoder model reads it with its encoder), the rest the reference. MODE='predict'
generates a continuation (`prediction`, its `log_prob`); MODE='score' gives the log-likelihood of the
reference given the prompt (`score`). Each record also holds the detokenized `inputs` and `targets`.

Prompt files. With INPUT_FILE (JSONL of {"prompt": ...} or {"inputs": ...} lines, "targets" for score
mode, or plain text; see `prompt_file`) the examples are the file's lines, whole (NUM_EXAMPLES, SPLIT
and PROMPT_LENGTH are a task's), tokenized as `InferenceModule` tokenizes strings. Each record is the
input line's fields with the results added (a result field replaces an input field of its name). The
task is then optional: the vocabulary is the one the checkpoint's model spec names, or the task's
when MIXTURE_OR_TASK_NAME is set too.

Outputs in `output_dir` (default MODEL_DIR/infer/<task>_<split>, or MODEL_DIR/infer/<file name without
extension> for INPUT_FILE): `<mode>.jsonl` and `metrics.json`
(example count, mean log-prob or score, and the task's seqio metrics: `predict_metric_fns` on the
postprocessed targets and predictions, or `score_metric_fns` on targets and scores).

Multi-process: each process reads its own shard of the split (`seqio.ShardInfo`), or its contiguous
block of the prompt file's examples (so the merged output keeps the file's order), runs its examples
(on a mesh spanning processes, all processes run the same number of batches, padding with dummy
prompts) and writes `<mode>-<process>-of-<count>.jsonl`; after a barrier, process 0 concatenates the
shards in process order into `<mode>.jsonl`, removes them and computes the metrics. `output_dir`
must therefore be on a file system all processes share.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmops_jax import checkpoints
from lmops_jax.cli import gin_flags
from lmops_jax.cli import runner
from lmops_jax.inference import prompt_file
from lmops_jax.inference.inference_module import InferenceModule
from lmops_jax.models import loading

MODES = ("predict", "score")
# One example to run: (prompt, reference or None, the fields its output record repeats). Prompt and reference are
# token lists for a task's examples and strings for a prompt file's.
Row = tuple[Any, Any, dict]


def _local_count(total: int) -> int:
    """This process's share of `total` examples (the first `total % n` processes get one more)."""
    n, i = jax.process_count(), jax.process_index()
    return total // n + (1 if i < total % n else 0)


def _examples(task: Any, split: str, num_examples: int | None, task_feature_lengths, seed: int,
              shard: bool = True) -> list[dict]:
    """This process's shard of the split's first `num_examples` examples; all of them when not `shard`."""
    import seqio
    index, count = (jax.process_index(), jax.process_count()) if shard else (0, 1)
    ds = task.get_dataset(sequence_length=None if task_feature_lengths is None else dict(task_feature_lengths),
                          split=split, shuffle=False, num_epochs=1, seed=seed, use_cached=False,
                          shard_info=seqio.ShardInfo(index=index, num_shards=count))
    if num_examples is not None:
        ds = ds.take(_local_count(num_examples) if shard else num_examples)
    return list(ds.as_numpy_iterator())


def _split_example(example: Mapping[str, Any], prompt_length: int) -> tuple[list, list]:
    """(prompt tokens, reference tokens) of one preprocessed example (module docstring)."""
    targets = [int(t) for t in example["targets"]]
    if "inputs" in example:
        return [int(t) for t in example["inputs"]], targets
    return targets[:prompt_length], targets[prompt_length:]


def _task_examples(task: Any, vocab: Any, split: str, num_examples: int | None, task_feature_lengths,
                   prompt_length: int, seed: int, shard: bool = True) -> list[Row]:
    """This process's examples of the task split as token lists, with their detokenized text as fields."""
    rows = [_split_example(ex, prompt_length)
            for ex in _examples(task, split, num_examples, task_feature_lengths, seed, shard)]
    return [(p, r, {"inputs": vocab.decode(p), "targets": vocab.decode(r)}) for p, r in rows]


def _file_examples(path: str, mode: str) -> list[Row]:
    """This process's contiguous block of the prompt file's examples (all of them on one process)."""
    examples = prompt_file.read_examples(path, need_targets=mode == "score")
    n, i = jax.process_count(), jax.process_index()
    start = i * (len(examples) // n) + min(i, len(examples) % n)
    return [(e.prompt, e.target, e.fields) for e in examples[start:start + _local_count(len(examples))]]


def _run_batches(module: InferenceModule, examples: list[Row], mode: str, batch_size: int, seed: int,
                 decode_args: Mapping[str, Any]) -> list[dict]:
    """One output record per example: its fields plus `prediction` and `log_prob`, or `score`.

    On a mesh spanning processes every process runs as many batches as the busiest one, padding with a
    dummy row (its results are dropped).
    """
    vocab = module.vocabulary
    local_batch = max(1, batch_size // jax.process_count())
    num_batches = -(-len(examples) // local_batch)
    if module.spans_processes:  # every process must join every jitted call
        num_batches = int(np.max(multihost_utils.process_allgather(np.array(num_batches))))
    records: list[dict] = []
    for b in range(num_batches):
        chunk = examples[b * local_batch:(b + 1) * local_batch]
        run = chunk or [([1], [1], {})]  # a dummy row for a process whose share ran out
        prompts, references = [p for p, _, _ in run], [r for _, r, _ in run]
        if mode == "predict":
            out = module.generate(prompts, seed=seed + b, **decode_args)
            values = [{"prediction": vocab.decode(t), "log_prob": float(lp)}
                      for t, lp in zip(out.tokens, out.log_probs)]
        else:
            values = [{"score": float(s)} for s in module.score(prompts, references)]
        records.extend({**fields, **value} for (_, _, fields), value in zip(chunk, values))
    return records


def _to_json(value: Any) -> Any:
    value = getattr(value, "value", value)  # seqio.metrics.Scalar and friends
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _metrics(task: Any, mode: str, records: list[dict]) -> dict[str, Any]:
    import seqio
    out: dict[str, Any] = {"num_examples": len(records)}
    key = "log_prob" if mode == "predict" else "score"
    if records:
        out[f"mean_{key}"] = float(np.mean([r[key] for r in records]))
    if not isinstance(task, seqio.Task) or not records:
        return out
    return {**out, **task_metrics(task, mode, records)}


def task_metrics(task: Any, mode: str, records: list[dict]) -> dict[str, Any]:
    """The seqio task's metrics of output records: `predict_metric_fns` (e.g. the T5 metrics of
    `tsv_seq2seq`) on the postprocessed targets and predictions, or `score_metric_fns` on targets and scores."""
    out: dict[str, Any] = {}
    targets = [task.postprocess_fn(r["targets"], example=None, is_target=True) for r in records]
    if mode == "predict":
        predictions = [task.postprocess_fn(r["prediction"], example=None, is_target=False) for r in records]
        for fn in task.predict_metric_fns:
            out.update({k: _to_json(v) for k, v in fn(targets, predictions).items()})
    else:
        for fn in task.score_metric_fns:
            out.update({k: _to_json(v) for k, v in fn(targets, [r["score"] for r in records]).items()})
    return out


@dataclasses.dataclass
class PredictionMetrics:
    """The trainer's evaluation by generation: greedy predictions for the first `num_examples` examples of
    a task split, scored with the task's seqio predict-metric functions (`task_metrics`).

    Bound by gin as `train.eval_metrics = @infer.PredictionMetrics()` (training never imports inference)
    and called at every evaluation with the current params; `trainer.task_metrics_record` logs the values
    as `eval/<name>`. Every process runs the same examples, so all agree on the values. The jitted
    generation is built once per (model, partitioner) and reused with each evaluation's params.

    Attributes:
      num_examples, batch_size, split, task_feature_lengths, prompt_length, max_new_tokens: as for `infer`.
    """

    num_examples: int = 32
    batch_size: int = 8
    split: str = "validation"
    task_feature_lengths: Mapping[str, int] | None = None
    prompt_length: int = 16
    max_new_tokens: int = 32
    _module: InferenceModule | None = dataclasses.field(default=None, init=False, repr=False)

    def __call__(self, params: Any, *, model: Any, partitioner: Any, mixture_or_task_name: str) -> dict[str, Any]:
        task = _task(mixture_or_task_name)
        vocabulary = task.output_features["targets"].vocabulary
        module = self._module
        if module is None or module.model is not model or module.partitioner is not partitioner:
            module = self._module = InferenceModule(model, params, partitioner, vocabulary)
        else:
            module.params = loading.place_params(model, params, partitioner)
        examples = _task_examples(task, vocabulary, self.split, self.num_examples, self.task_feature_lengths,
                                  self.prompt_length, seed=0, shard=False)
        records = _run_batches(module, examples, "predict", self.batch_size, 0,
                               {"max_new_tokens": self.max_new_tokens, "method": "greedy"})
        return task_metrics(task, "predict", records)


def _task(name: str) -> Any:
    import seqio
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError as e:
        raise ValueError(f"unknown seqio task or mixture {name!r} (MIXTURE_OR_TASK_NAME)") from e


def _unset(value: Any) -> bool:
    return value is None or gin_flags.is_required_sentinel(value)


def _check_args(checkpoint_path: Any, mixture_or_task_name: Any, input_file: Any) -> None:
    if _unset(checkpoint_path):
        raise gin_flags.GinConfigError("infer(): required argument checkpoint_path not set (CHECKPOINT_PATH in "
                                       "infer.gin)")
    if _unset(mixture_or_task_name) and _unset(input_file):
        raise gin_flags.GinConfigError("infer(): nothing to run on: set mixture_or_task_name (MIXTURE_OR_TASK_NAME, "
                                       "a seqio task) or input_file (INPUT_FILE, a JSONL or text prompt file)")


def infer(
    *,
    checkpoint_path: str,
    mixture_or_task_name: str | None = None,
    input_file: str | None = None,
    output_dir: str | None = None,
    mode: str = "predict",
    split: str = "validation",
    num_examples: int | None = 64,
    batch_size: int = 8,
    task_feature_lengths: Mapping[str, int] | None = None,
    prompt_length: int = 16,
    max_new_tokens: int = 64,
    method: str = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    seed: int = 0,
    dtype: str | None = None,
    mesh_shape: Mapping[str, int] | None = None,
    logical_axis_rules: Any = "tp",
    setup_fns: Sequence[Callable[[], Any]] = (),
) -> dict[str, Any]:
    """Runs the checkpoint's model over a task split or a prompt file; returns the metrics (also in metrics.json).

    Args:
      checkpoint_path: MODEL_DIR, checkpoints folder or step folder (CHECKPOINT_PATH).
      mixture_or_task_name: registered seqio task or mixture (MIXTURE_OR_TASK_NAME); with input_file it
        only supplies the vocabulary.
      input_file: a JSONL or plain-text prompt file (INPUT_FILE; module docstring); None: the task's split.
      output_dir: where the JSONL and metrics go (INFER_OUTPUT_DIR); default MODEL_DIR/infer/<task>_<split>,
        or MODEL_DIR/infer/<input file name without extension>.
      mode: 'predict' or 'score' (MODE).
      split: task split (SPLIT).
      num_examples: a task's examples over all processes (NUM_EXAMPLES); None reads the whole split, which
        never ends for the synthetic tasks. A prompt file is always read whole.
      batch_size: examples per batch over all processes (BATCH_SIZE).
      task_feature_lengths: seqio trimming lengths, e.g. {'inputs': 256, 'targets': 256}; None: no trimming.
      prompt_length: prompt tokens of target-only examples (PROMPT_LENGTH).
      max_new_tokens, method, temperature, top_k, top_p, num_beams, length_penalty, seed: decoding
        (see `InferenceModule.generate`); predict mode only.
      dtype, mesh_shape, logical_axis_rules: see `InferenceModule.from_checkpoint`.
      setup_fns: called first, e.g. task registrations (the built-in tasks register on importing
        `lmops_jax.data.tasks`, as `lmops_jax.infer` and infer.gin do).
    """
    _check_args(checkpoint_path, mixture_or_task_name, input_file)
    if mode not in MODES:
        raise ValueError(f"MODE must be one of {MODES}, got {mode!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"BATCH_SIZE must be a positive int, got {batch_size!r}")
    file_examples = None if input_file is None else _file_examples(input_file, mode)  # bad lines fail first
    for fn in setup_fns:
        fn()
    task = None if mixture_or_task_name is None else _task(mixture_or_task_name)
    if output_dir is None:
        model_dir = os.path.dirname(checkpoints.resolve(checkpoint_path)[0])
        name = (f"{mixture_or_task_name}_{split}" if input_file is None
                else os.path.splitext(os.path.basename(input_file))[0])
        output_dir = os.path.join(model_dir, "infer", name)
    module = InferenceModule.from_checkpoint(
        checkpoint_path, dtype=dtype, mesh_shape=mesh_shape, logical_axis_rules=logical_axis_rules,
        vocabulary=None if task is None else task.output_features["targets"].vocabulary)
    start = time.time()
    examples = file_examples if file_examples is not None else _task_examples(
        task, module.vocabulary, split, num_examples, task_feature_lengths, prompt_length, seed)
    decode_args = dict(max_new_tokens=max_new_tokens, method=method, temperature=temperature, top_k=top_k,
                       top_p=top_p, num_beams=num_beams, length_penalty=length_penalty)
    records = _run_batches(module, examples, mode, batch_size, seed, decode_args)
    logging.info("%s: %d examples in %.1f s", mode, len(records), time.time() - start)

    os.makedirs(output_dir, exist_ok=True)
    count, index = jax.process_count(), jax.process_index()
    shard = os.path.join(output_dir, f"{mode}-{index:05d}-of-{count:05d}.jsonl")
    with open(shard, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if count > 1:
        multihost_utils.sync_global_devices("lmops_jax.inference.infer: shards written")
    metrics: dict[str, Any] = {}
    if index == 0:
        merged: list[dict] = []
        shards = [os.path.join(output_dir, f"{mode}-{i:05d}-of-{count:05d}.jsonl") for i in range(count)]
        with open(os.path.join(output_dir, f"{mode}.jsonl"), "w", encoding="utf-8") as out_file:
            for path in shards:
                with open(path, encoding="utf-8") as f:
                    lines = f.readlines()
                out_file.writelines(lines)
                merged.extend(json.loads(line) for line in lines)
                os.remove(path)
        source = {"task": mixture_or_task_name, "split": split} if input_file is None else {"input_file": input_file}
        metrics = {**source, "mode": mode, "checkpoint": checkpoint_path,
                   **_metrics(task if input_file is None else None, mode, merged)}
        with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        logging.info("outputs in %s: %s.jsonl, metrics.json (%s)", output_dir, mode, metrics)
    if count > 1:
        multihost_utils.sync_global_devices("lmops_jax.inference.infer: merged")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lmops_jax.infer`: the gin-configured `infer` through the CLI runner (exit codes there)."""
    return runner.run("python -m lmops_jax.infer", __doc__, runner.GinJob(infer, "gin_configs/runs/infer.gin"), argv)
