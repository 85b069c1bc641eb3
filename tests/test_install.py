"""Installed, not only editable: a wheel of the checkout, installed offline into a fresh venv, runs the
quickstart from another working directory with the gin configs it ships."""
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_wheel_installed_in_a_venv_runs_the_quickstart_from_anywhere(tmp_path):
    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    source.mkdir()
    shutil.copy(os.path.join(REPO, "setup.py"), source / "setup.py")
    shutil.copytree(os.path.join(REPO, "lmops_jax"), source / "lmops_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
            "--wheel-dir", str(tmp_path / "dist"), str(source)])
    (wheel,) = (tmp_path / "dist").glob("lmops_jax-*.whl")
    # The venv sees the installed dependencies (and pip) but gets its own lmops_jax, ahead of the editable one.
    venv = tmp_path / "venv"
    _check([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    _check([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    probe = "import json, sys, lmops_jax; print(json.dumps([lmops_jax.__file__, sys.path]))"
    package_file, sys_path = json.loads(_check([python, "-c", probe], cwd=elsewhere, env=env))
    assert package_file.startswith(str(venv)) and REPO not in sys_path, (package_file, sys_path)

    model_dir = tmp_path / "run"
    out = _check([python, "-m", "lmops_jax.train", "--gin_file=gin_configs/examples/quickstart.gin",
                  f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4",
                  "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.WARMUP_STEPS=0", "--gin.LOG_PERIOD=1",
                  "--gin.EVAL_STEPS=1"], cwd=elsewhere, env=env)
    installed = os.path.join(os.path.dirname(package_file), "gin_configs", "examples", "quickstart.gin")
    assert f"gin files: {installed}" in out, out[-3000:]
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
