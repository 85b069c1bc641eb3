"""A run started from Python (docs/quickstart.md's `train.train(...)`) is usable by every downstream tool.

Its MODEL_DIR holds what a CLI run writes (config.gin, metrics.jsonl, checkpoints with the model spec), and
the documented commands run on it as subprocesses: infer, convert to_hf, distillation with it as the teacher,
and `python -m lmops_jax.train --gin_file=MODEL_DIR/config.gin` continuing it.
"""
import json
import os
import subprocess
import sys

import pytest

from lmops_jax import partitioning, train
from lmops_jax.inference import InferenceModule
from lmops_jax.training import optimizers
from tests.helpers import tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = {"targets": 16}


@pytest.fixture(scope="module")
def python_run(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("python_run"))
    train.train(model=tiny_llama(vocab_size=512), model_dir=model_dir, train_steps=2, batch_size=8,
                mixture_or_task_name="synthetic_lm", task_feature_lengths=FEATURES,
                partitioner=partitioning.Partitioner({"data": -1}, "dp"),
                optimizer=optimizers.OptimizerConfig(learning_rate=3e-3, warmup_steps=1), peak_flops=1e9)
    return model_dir


def _run(args, cwd):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_python_run_writes_what_a_cli_run_writes(python_run):
    names = set(os.listdir(python_run))
    assert {"config.gin", "metrics.jsonl", "checkpoints", "tensorboard"} <= names
    config = open(os.path.join(python_run, "config.gin")).read()
    assert "TRAIN_STEPS = 2" in config and "decoder_only.LlamaConfig.vocab_size = 512" in config
    module = InferenceModule.from_checkpoint(python_run)
    assert len(module.generate([[5, 6, 7]], max_new_tokens=3, eos_id=-1).tokens[0]) == 3


def test_infer_and_convert_run_on_a_python_run(python_run, tmp_path):
    _run(["lmops_jax.infer", "--gin_file=gin_configs/runs/infer.gin", f"--gin.CHECKPOINT_PATH='{python_run}'",
          "--gin.MIXTURE_OR_TASK_NAME='synthetic_lm'", "--gin.NUM_EXAMPLES=2", "--gin.MAX_NEW_TOKENS=2",
          f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'infer'}'"], cwd=tmp_path)
    assert len((tmp_path / "infer" / "predict.jsonl").read_text().splitlines()) == 2
    _run(["lmops_jax.convert", "to_hf", f"--checkpoint={python_run}", f"--out_dir={tmp_path / 'hf'}"], cwd=tmp_path)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 512


def test_python_run_is_a_teacher_and_continues_from_its_config(python_run, tmp_path):
    _run(["lmops_jax.train", "--gin_file=gin_configs/models/llama_tiny.gin", "--gin_file=gin_configs/runs/distill.gin",
          f"--gin.MODEL_DIR='{tmp_path / 'student'}'", f"--gin.TEACHER_CHECKPOINT='{python_run}'",
          "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}",
          "--gin.EVAL_STEPS=1", "--gin.decoder_only.LlamaConfig.num_layers=1"], cwd=tmp_path)
    continued = _run(["lmops_jax.train", f"--gin_file={python_run}/config.gin", "--gin.TRAIN_STEPS=3"], cwd=tmp_path)
    assert "resumed from step 2" in continued.stdout
    steps = [json.loads(line)["step"] for line in open(os.path.join(python_run, "metrics.jsonl"))]
    assert steps[-1] == 3
