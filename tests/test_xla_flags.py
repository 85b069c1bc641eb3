"""The CPU XLA flags a job sets for its workload (`lmops_jax.cli.xla_flags`): added unless the user set them or
turned them off, none for decoding, and a training run gives the same losses with and without them."""
import json
import os
import subprocess
import sys

import pytest

from lmops_jax.cli import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = xla_flags.CPU_FLAGS[xla_flags.TRAINING][0]


@pytest.mark.parametrize("before, after, added", [
    ("", FLAG, [FLAG]),
    ("--xla_force_host_platform_device_count=2", f"--xla_force_host_platform_device_count=2 {FLAG}", [FLAG]),
    ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_experimental_ynn_fusion_type=", []),  # the user's own
])
def test_flags_are_added_unless_the_user_set_them(monkeypatch, before, after, added):
    monkeypatch.setenv("XLA_FLAGS", before)
    monkeypatch.delenv(xla_flags.ENV, raising=False)
    assert xla_flags.configure(xla_flags.TRAINING) == added
    assert os.environ["XLA_FLAGS"] == after


def test_off_adds_nothing(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(xla_flags.ENV, "off")
    assert xla_flags.configure(xla_flags.TRAINING) == [] and os.environ["XLA_FLAGS"] == ""


def test_decoding_jobs_get_no_flags_and_unknown_workloads_are_named(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv(xla_flags.ENV, raising=False)
    assert xla_flags.configure(xla_flags.INFERENCE) == [] and os.environ["XLA_FLAGS"] == ""
    with pytest.raises(ValueError, match="unknown workload 'serving'"):
        xla_flags.configure("serving")


def _train(model_dir, **env):
    cmd = [sys.executable, "-m", "lmops_jax.train", "--gin_file=gin_configs/models/llama_tiny.gin",
           "--gin_file=gin_configs/runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=8",
           "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.LOG_PERIOD=8",
           "--gin.EVAL_PERIOD=8", "--gin.EVAL_STEPS=1", "--gin.WARMUP_STEPS=2"]
    full_env = dict(os.environ, XLA_FLAGS="", LMOPS_JAX_COMPILATION_CACHE="off", **env)
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((model_dir / "metrics.jsonl").read_text().splitlines()[-1]), proc.stdout + proc.stderr


def test_training_gives_the_same_losses_with_and_without_the_flags(tmp_path):
    with_flags, log = _train(tmp_path / "default")
    without, log_off = _train(tmp_path / "off", **{xla_flags.ENV: "off"})
    assert f"XLA flags for the CPU backend (LMOPS_JAX_XLA_DEFAULTS=off: none): {FLAG}" in log
    assert "XLA flags for the CPU backend" not in log_off
    for key in ("loss", "eval/loss", "grad_norm"):
        assert with_flags[key] == pytest.approx(without[key], rel=1e-4), key
