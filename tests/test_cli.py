"""The CLI runner: exit codes, logging, flags, and every `python -m lmops_jax.<job>` routed through it."""
import importlib
import logging
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from lmops_jax.cli import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_job(call, argv=(), add_flags=lambda parser: None):
    return runner.run("prog", "a test job", runner.ArgsJob("test", add_flags, call), list(argv))


def _error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_library_value_error_exits_2_with_one_error_line(capsys):
    from lmops_jax.data.synthetic import MarkovSource

    assert _run_job(lambda args: MarkovSource(alphabet="a")) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == ["error: alphabet must hold at least 2 distinct characters, got 'a'"]
    assert "Traceback" not in err


def test_value_error_raised_outside_the_library_keeps_its_traceback():
    with pytest.raises(ValueError, match="reshape"):
        _run_job(lambda args: np.reshape(np.zeros(2), 3))


@pytest.mark.parametrize("signal_name,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_preempted_exits_128_plus_the_signal(signal_name, code, capsys):
    def stop(args):
        raise runner.Preempted(7, signal_name)

    assert _run_job(stop) == code
    assert f"{signal_name} received: saved a checkpoint at step 7" in capsys.readouterr().out


def test_the_fast_exit_waits_for_threads_runs_atexit_flushes_and_keeps_the_code(tmp_path):
    """`run_as_main` ends a job with `exit_without_teardown`: what a normal exit does that a job relies on still
    happens (a checkpoint thread still writing, atexit handlers, unflushed output), then the code is the exit
    status."""
    marker = tmp_path / "written_by_the_thread"
    script = (
        "import atexit, logging, sys, threading, time\n"
        "from lmops_jax.cli import runner\n"
        f"def write():\n    time.sleep(0.5)\n    open({str(marker)!r}, 'w').write('saved')\n"
        "threading.Thread(target=write).start()\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "logging.info('logged')\n"
        "sys.stdout.write('no newline, not flushed')\n"
        "runner.exit_without_teardown(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert marker.read_text() == "saved"
    assert "no newline, not flushed" in proc.stdout and "atexit ran" in proc.stdout
    assert "logged" in proc.stderr


def test_logging_shows_library_progress_and_third_party_warnings_only(capsys):
    def log(args):
        logging.info("library progress")
        logging.getLogger("lmops_jax.some.module").info("module progress")
        logging.getLogger("absl").info("orbax chatter")
        logging.getLogger("absl").warning("orbax warning")

    assert _run_job(log) == 0
    out = capsys.readouterr().out
    assert "library progress" in out and "module progress" in out and "orbax warning" in out
    assert "orbax chatter" not in out


def test_argument_jobs_reject_gin_flags_and_gin_jobs_name_unknown_flags(capsys):
    assert _run_job(lambda args: None, ["--gin.X=1"]) == 2
    assert "unrecognized arguments: --gin.X=1" in capsys.readouterr().err
    job = runner.GinJob(test_gin_job_calls_the_function_gin_binds, "gin_configs/x.gin")
    assert runner.run("prog", "", job, ["--gin_file=gin_configs/runs/pretrain.gin", "--gin_fil=x"]) == 2
    assert _error_lines(capsys.readouterr().err) == [
        "error: unknown flags ['--gin_fil=x']; use --gin_file=..., --gin.NAME=VALUE, --gin_search_paths=..."]


def test_gin_job_calls_the_function_gin_binds(tmp_path, capsys):
    config = tmp_path / "job.gin"
    config.write_text("from __gin__ import dynamic_registration\nfrom lmops_jax import checkpoints\n"
                      "checkpoints.inspect.path = %CHECKPOINT\nCHECKPOINT = '/no/such/a'\n")
    from lmops_jax import checkpoints
    try:
        code = runner.run("prog", "", runner.GinJob(checkpoints.inspect, "gin_configs/x.gin"),
                          [f"--gin_file={config}", "--gin.CHECKPOINT='/no/such/b'"])
    finally:
        gin.clear_config()
    captured = capsys.readouterr()
    assert code == 2 and _error_lines(captured.err) == [
        "error: no checkpoint at '/no/such/b' (expected MODEL_DIR, MODEL_DIR/checkpoints or a step folder)"]
    assert f"gin files: {config}" in captured.out
    try:
        assert runner.run("prog", "", runner.GinJob(np.zeros, "gin_configs/x.gin"), [f"--gin_file={config}"]) == 2
    finally:
        gin.clear_config()
    assert "the gin files bind nothing to numpy.zeros; include gin_configs/x.gin" in capsys.readouterr().err


def test_coordinator_address_needs_the_process_flags(capsys):
    job = runner.GinJob(np.zeros, "gin_configs/x.gin")
    assert runner.run("prog", "", job, ["--coordinator_address=127.0.0.1:1"]) == 2
    assert "--coordinator_address needs --num_processes and --process_id" in capsys.readouterr().err


# (module whose main() the `python -m` command runs, a bad configuration, what the error names)
CLIS = {
    "lmops_jax.train": (["--gin_file=gin_configs/runs/pretrain.gin", "--gin_file=gin_configs/models/llama_tiny.gin"],
                        "required gin macros are not set: MODEL_DIR"),
    "lmops_jax.infer": (["--gin_file=gin_configs/runs/infer.gin", "--gin.MIXTURE_OR_TASK_NAME='synthetic_lm'"],
                        "CHECKPOINT_PATH"),
    "lmops_jax.distillation.trainer": (
        ["dump_topk", "--gin_file=gin_configs/models/llama_tiny.gin", "--gin_file=gin_configs/runs/distill.gin",
         "--gin.MODEL_DIR='/tmp/x'", "--gin.KD_TOPK_DIR='/tmp/y'"],
        "required gin macros are not set: TEACHER_CHECKPOINT"),
    "lmops_jax.convert.__main__": (["from_hf", "--hf_dir=/no/such/dir", "--out_dir=/tmp/x"],
                                   "no config.json in '/no/such/dir'"),
    "lmops_jax.checkpoints": (["inspect", "/no/such/dir"], "no checkpoint at '/no/such/dir'"),
    "lmops_jax.peft.lora": (["merge", "/no/such/dir", "/tmp/x"], "no checkpoint at '/no/such/dir'"),
}
# `python -m` name, its sub-command (if any), and flags its --help must list
HELP = {
    "lmops_jax.train": ([], ["--gin_file", "--gin.NAME=VALUE", "--gin_search_paths", "--coordinator_address"]),
    "lmops_jax.infer": ([], ["--gin_file", "--gin.NAME=VALUE", "--multihost"]),
    "lmops_jax.distillation": (["dump_topk"], ["--gin_file", "--gin.NAME=VALUE", "--coordinator_address"]),
    "lmops_jax.convert": (["to_hf"], ["--checkpoint", "--max_shard_gb"]),
    "lmops_jax.checkpoints": (["inspect"], ["path"]),
    "lmops_jax.peft.lora": (["merge"], ["adapter_run", "base_checkpoint"]),
}


@pytest.mark.parametrize("module", sorted(CLIS))
def test_bad_configuration_exits_2_with_one_error_line(module, capsys):
    argv, named = CLIS[module]
    try:
        code = importlib.import_module(module).main(argv)
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(_error_lines(err)) == 1 and named in _error_lines(err)[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_lists_the_flags(command):
    """As a user runs it (`python -m`), which also checks each module's `__main__` block."""
    subcommand, flags = HELP[command]
    proc = subprocess.run([sys.executable, "-m", command, *subcommand, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for flag in flags:
        assert flag in proc.stdout, (flag, proc.stdout)


def test_compilation_cache_folder_is_chosen_by_the_environment(tmp_path, monkeypatch):
    from lmops_jax.cli import compile_cache
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv(compile_cache.ENV, "off")
        assert compile_cache.configure() is None and jax.config.jax_compilation_cache_dir == before
        monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
        assert compile_cache.configure() == str(tmp_path / "cache") == jax.config.jax_compilation_cache_dir
        monkeypatch.delenv(compile_cache.ENV)
        assert compile_cache.configure() == os.path.join(os.environ["XDG_CACHE_HOME"], "lmops_jax",
                                                         "jax_compilation_cache")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
