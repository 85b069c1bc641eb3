"""The tasks of the `[t5]` extra with t5 installed: span corruption (the data and the pretraining recipe) and the
TSV seq2seq task's T5 metrics in `lmops_jax.infer` and in the trainer's evaluation.

Skipped where t5 is not installed; tests/data/test_t5_extra.py then runs this file in a venv that has it.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio

pytest.importorskip("t5")

from lmops_jax.data import tasks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _examples(name, lengths, n):
    task = seqio.get_mixture_or_task(name)
    return list(task.get_dataset(lengths, split="validation", shuffle=False, seed=0).take(n).as_numpy_iterator())


def _sentinel_counts(noise_density):
    tasks.register_span_corruption(noise_density=noise_density, name="span_corruption_probe")
    examples = _examples("span_corruption_probe", {"inputs": 128, "targets": 128}, 8)
    return [int(np.sum(ex["inputs"] >= 259)) for ex in examples], examples


def test_span_corruption_replaces_spans_with_sentinels_the_targets_restore():
    counts, examples = _sentinel_counts(0.15)
    vocab = seqio.get_mixture_or_task(tasks.SPAN_CORRUPTION).output_features["targets"].vocabulary
    last = vocab.vocab_size - 1
    assert vocab.vocab_size == 259 + tasks.SPAN_CORRUPTION_EXTRA_IDS
    for ex in examples:
        inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
        assert inputs[-1] == targets[-1] == 1  # EOS
        sentinels = [t for t in inputs if t >= 259]
        assert sentinels == list(range(last, last - len(sentinels), -1))  # one per span, counting down
        assert [t for t in targets if t >= 259] == sentinels and targets[0] == last  # each span after its sentinel
    dense, _ = _sentinel_counts(0.4)
    assert np.mean(dense) > np.mean(counts) > 0  # NOISE_DENSITY reaches the preprocessor


def test_span_corruption_lengths_are_checked_by_name():
    task = seqio.get_mixture_or_task(tasks.SPAN_CORRUPTION)
    with pytest.raises(ValueError, match=r"targets of up to \d+ tokens; raise 'targets' to at least that"):
        task.get_dataset({"inputs": 128, "targets": 16}, split="validation", shuffle=False)
    with pytest.raises(ValueError, match="needs 'inputs' and 'targets' lengths in TASK_FEATURE_LENGTHS"):
        task.get_dataset({"targets": 32}, split="validation", shuffle=False)


def _run(args, cwd):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _records(model_dir):
    return [json.loads(line) for line in open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8")]


def test_span_corruption_recipe_pretrains_t5_tiny_with_the_loss_falling(tmp_path):
    model_dir = str(tmp_path / "run")
    _run(["lmops_jax.train", "--gin_file=gin_configs/runs/pretrain_span_corruption.gin",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=40", "--gin.BATCH_SIZE=8", "--gin.LOG_PERIOD=5",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 32}", "--gin.WARMUP_STEPS=5",
          "--gin.EVAL_STEPS=1", "--gin.NOISE_DENSITY=0.2", "--gin.MEAN_NOISE_SPAN_LENGTH=2.0"], tmp_path)
    losses = [r["loss"] for r in _records(model_dir) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < 0.6 * losses[0], losses
    config = open(os.path.join(model_dir, "config.gin"), encoding="utf-8").read()
    assert "NOISE_DENSITY = 0.2" in config and "MEAN_NOISE_SPAN_LENGTH = 2.0" in config


def test_tsv_seq2seq_logs_t5_metrics_in_training_and_infer(tmp_path):
    model_dir = str(tmp_path / "run")
    _run(["lmops_jax.train", "--gin_file=gin_configs/runs/seq2seq_tsv.gin", f"--gin.MODEL_DIR='{model_dir}'",
          "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=2", "--gin.EVAL_STEPS=1",
          "--gin.EVAL_EXAMPLES=4", "--gin.EVAL_MAX_NEW_TOKENS=8", "--gin.TASK_METRICS=['accuracy', 'bleu', 'rouge']"],
         tmp_path)
    evaluations = [r for r in _records(model_dir) if "eval/loss" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    for record in evaluations:
        # T5's accuracy on generated text sits beside the teacher-forced token accuracy, not over it.
        for key in ("eval/accuracy", "eval/text_accuracy", "eval/bleu", "eval/rouge1", "eval/rougeLsum"):
            assert 0.0 <= record[key] <= 100.0, (key, record)
    out_dir = str(tmp_path / "infer")
    _run(["lmops_jax.infer", "--gin_file=gin_configs/runs/infer.gin", f"--gin.CHECKPOINT_PATH='{model_dir}'",
          "--gin.MIXTURE_OR_TASK_NAME='tsv_seq2seq'", "--gin.NUM_EXAMPLES=4", "--gin.MAX_NEW_TOKENS=8",
          f"--gin.INFER_OUTPUT_DIR='{out_dir}'"], tmp_path)
    metrics = json.load(open(os.path.join(out_dir, "metrics.json"), encoding="utf-8"))
    assert metrics["num_examples"] == 4
    for key in ("sequence_accuracy", "bleu", "rouge1", "rouge2", "rougeLsum"):
        assert 0.0 <= metrics[key] <= 100.0, (key, metrics)
    first = json.loads(open(os.path.join(out_dir, "predict.jsonl"), encoding="utf-8").readline())
    assert (first["inputs"], first["targets"]) == ("5", "five")
