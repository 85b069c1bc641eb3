"""The CPU XLA flags a job sets for its workload (`lmops_jax.cli.xla_flags`): added unless the user set them or
turned them off, none for decoding, and a training run gives the same losses with and without them; and the
huge pages `python -m lmops_jax.train` asks glibc for (`lmops_jax.cli.host_memory`)."""
import json
import os
import subprocess
import sys

import pytest

from lmops_jax.cli import host_memory, xla_flags

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
    full_env = dict(os.environ, XLA_FLAGS="", LMOPS_JAX_COMPILATION_CACHE="off", GLIBC_TUNABLES="", **env)
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((model_dir / "metrics.jsonl").read_text().splitlines()[-1]), proc.stdout + proc.stderr


def test_training_gives_the_same_losses_with_and_without_the_flags(tmp_path):
    with_flags, log = _train(tmp_path / "default")
    without, log_off = _train(tmp_path / "off", **{xla_flags.ENV: "off"})
    assert f"XLA flags for the CPU backend (LMOPS_JAX_XLA_DEFAULTS=off: none): {FLAG}" in log
    assert "XLA flags for the CPU backend" not in log_off
    with pytest.MonkeyPatch.context() as env:  # what the CLI decides in this environment, defaults on
        for name in ("GLIBC_TUNABLES", "JAX_PLATFORMS", xla_flags.ENV):
            env.delenv(name, raising=False)
        huge_pages = host_memory.wanted()
    assert ("malloc: transparent huge pages for large blocks" in log) is huge_pages
    assert "malloc: transparent huge pages" not in log_off
    for key in ("loss", "eval/loss", "grad_norm"):
        assert with_flags[key] == pytest.approx(without[key], rel=1e-4), key


@pytest.mark.parametrize("env, thp, wanted", [
    ({}, "always [madvise] never", True),
    ({}, "[always] madvise never", False),  # the kernel gives huge pages already
    ({}, "always madvise [never]", False),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "always [madvise] never", False),  # the user's value wins
    ({xla_flags.ENV: "off"}, "always [madvise] never", False),
    ({"JAX_PLATFORMS": "cuda,cpu"}, "always [madvise] never", False),  # an accelerator job keeps the defaults
    ({"JAX_PLATFORMS": "cpu"}, "always [madvise] never", True),
])
def test_training_asks_for_huge_pages_only_where_they_help(monkeypatch, tmp_path, env, thp, wanted):
    if host_memory.platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    for name in ("GLIBC_TUNABLES", "JAX_PLATFORMS", xla_flags.ENV):
        monkeypatch.delenv(name, raising=False)
    mode_file = tmp_path / "enabled"
    mode_file.write_text(thp + "\n")
    monkeypatch.setattr(host_memory, "THP_MODE_FILE", str(mode_file))
    monkeypatch.setattr(host_memory.importlib.metadata, "entry_points", lambda group: [])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert host_memory.thp_mode() == thp.split("[")[1].split("]")[0]
    assert host_memory.wanted() is wanted


def test_huge_pages_remove_the_page_faults_of_xla_cpus_large_buffers():
    """The mechanism `python -m lmops_jax.train` relies on: each call's 128 MiB output is a fresh mmap that
    glibc unmaps when it is freed; with the tunable its pages are 2 MiB ones."""
    if host_memory.thp_mode() != "madvise" or host_memory.platform.libc_ver()[0] != "glibc":
        pytest.skip("needs glibc and the kernel's transparent huge pages in madvise mode")
    code = ("import resource, jax, jax.numpy as jnp\n"
            "f = jax.jit(lambda x: x * 2.0)\n"
            "x = jnp.ones((32 * 2**20,), jnp.float32)\n"
            "f(x).block_until_ready()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(4):\n"
            "    f(x).block_until_ready()\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)\n")
    faults = {}
    for tunables in ("", f"{host_memory.TUNABLE}=1"):
        env = dict(os.environ, GLIBC_TUNABLES=tunables, JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        faults[tunables] = int(out.stdout.split()[-1])
    assert faults[""] > 20_000  # 128 MiB in 4 KiB pages: 32,768 per call
    assert faults[f"{host_memory.TUNABLE}=1"] < faults[""] / 20
