"""The CLI end to end (in a subprocess, as a user runs it) and each bad-input case (in process)."""
import json
import os
import subprocess
import sys

import gin
import pytest

from lmops_jax.cli import gin_flags as gin_utils
from lmops_jax.training import train as train_lib
from tests.helpers import tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_trains_and_writes_metrics_and_config(tmp_path):
    model_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmops_jax.train", "--gin_file=gin_configs/models/llama_tiny.gin",
           "--gin_file=gin_configs/runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=6",
           "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.LOG_PERIOD=4",
           "--gin.EVAL_PERIOD=4", "--gin.EVAL_STEPS=1", "--gin.WARMUP_STEPS=2",
           "--gin.MESH_SHAPE={'data': 2, 'fsdp': 2, 'model': 1}", "--gin.LOGICAL_AXIS_RULES='fsdp'"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               LMOPS_JAX_COMPILATION_CACHE=str(tmp_path / "jax_cache"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((tmp_path / "jax_cache").iterdir())  # the executables that took long enough to compile
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 6]  # every LOG_PERIOD and always the last step
    for key in ("loss", "learning_rate", "tokens_per_s", "mfu", "grad_norm", "accuracy", "eval/loss",
                "eval/accuracy"):
        assert key in records[-1], key
    assert isinstance(records[-1]["loss"], float) and len(repr(records[-1]["loss"])) > 8  # full precision
    config = (model_dir / "config.gin").read_text()
    assert "TRAIN_STEPS = 6" in config and "LOGICAL_AXIS_RULES = 'fsdp'" in config
    assert list((model_dir / "tensorboard").iterdir())
    assert "step 6/6" in proc.stdout
    assert proc.stdout.splitlines()[-1].endswith(
        f"INFO outputs in {model_dir}: metrics.jsonl, tensorboard/, config.gin, checkpoints/ (steps 6)")
    assert "Path not found" not in proc.stdout  # gin's include search stays quiet


def _parse(bindings, files=("gin_configs/models/llama_tiny.gin", "gin_configs/runs/pretrain.gin")):
    gin.clear_config()
    gin_utils.parse(list(files), bindings)


def test_unknown_gin_binding_is_named():
    with pytest.raises(gin_utils.GinConfigError, match="train_lib.train.bogus"):
        _parse(["MODEL_DIR = '/tmp/x'", "train_lib.train.bogus = 1"])


def test_misspelled_macro_names_the_closest_known_ones():
    with pytest.raises(gin_utils.GinConfigError, match=r"--gin.TRAIN_STEP: no loaded gin file defines or uses the "
                       r"macro TRAIN_STEP \(did you mean TRAIN_STEPS"):
        _parse(["MODEL_DIR = '/tmp/x'", "TRAIN_STEP = 10"])
    with pytest.raises(gin_utils.GinConfigError, match=r"--gin.MODEL_DRI: .*did you mean MODEL_DIR"):
        _parse(["MODEL_DIR = '/tmp/x'", "MODEL_DRI = '/tmp/y'"])
    with pytest.raises(gin_utils.GinConfigError, match=r"--gin.ZZZ: .*\(known macros: BATCH_SIZE, "):
        _parse(["MODEL_DIR = '/tmp/x'", "ZZZ = 1"])


def test_macros_used_by_a_file_or_another_binding_are_accepted(tmp_path):
    uses = tmp_path / "uses.gin"  # references a macro it leaves to the command line
    uses.write_text("include 'gin_configs/examples/quickstart.gin'\ntrain_lib.train.seed = %MY_SEED\n")
    try:
        _parse(["MY_SEED = 3"], files=(str(uses),))
        assert gin.query_parameter("MY_SEED/gin.macro.value") == 3
        _parse(["OTHER = 4", "train_lib.train.log_period = %OTHER", "train_lib.train.eval_steps = 2"],
               files=("gin_configs/examples/quickstart.gin",))
    finally:
        gin.clear_config()


@pytest.mark.parametrize("flag,message", [
    ("--gin.TRAIN_STEP=10", "--gin.TRAIN_STEP: no loaded gin file defines or uses the macro TRAIN_STEP (did you "
                            "mean TRAIN_STEPS"),
    ("--gin.MESH_SHAPE={'dat': -1}", "MESH_SHAPE axis 'dat' is not a known mesh axis"),
])
def test_cli_config_mistakes_exit_2_before_anything_runs(tmp_path, flag, message):
    model_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmops_jax.train", "--gin_file=gin_configs/examples/quickstart.gin", flag,
           f"--gin.MODEL_DIR='{model_dir}'"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0]  # gin's "In call to configurable" joins the line
    assert not model_dir.exists()


def test_missing_required_macro_is_named():
    with pytest.raises(gin_utils.GinConfigError, match="required gin macros are not set: MODEL_DIR"):
        _parse([])


def test_unknown_flag_and_missing_file_are_named():
    with pytest.raises(gin_utils.GinConfigError, match="unknown flags.*--gin_fil=x"):
        gin_utils.bindings_from_flags(["--gin_fil=x"])
    with pytest.raises(gin_utils.GinConfigError, match="nope.gin' not found"):
        _parse([], files=("nope.gin",))


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    try:
        code = train_lib.main(["--gin_file=gin_configs/runs/pretrain.gin",
                               "--gin_file=gin_configs/models/llama_tiny.gin"])
    finally:
        gin.clear_config()
    assert code == 2
    assert "MODEL_DIR" in capsys.readouterr().err


def test_unregistered_task_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown seqio task or mixture 'no_such_task'"):
        train_lib.train(model=tiny_llama(), model_dir=str(tmp_path), train_steps=1,
                        mixture_or_task_name="no_such_task", task_feature_lengths={"targets": 16}, batch_size=8)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_model_vocab_smaller_than_task_vocab_is_named(tmp_path):
    with pytest.raises(ValueError, match="more than the model's vocab_size=128"):
        train_lib.train(model=tiny_llama(vocab_size=128), model_dir=str(tmp_path), train_steps=1,
                        mixture_or_task_name="synthetic_lm", task_feature_lengths={"targets": 16}, batch_size=8)


def test_python_api_trains_without_gin(tmp_path):
    trainer, state = train_lib.train(
        model=tiny_llama(vocab_size=512), model_dir=str(tmp_path), train_steps=3, batch_size=8,
        mixture_or_task_name="synthetic_lm", task_feature_lengths={"targets": 16}, log_period=1, peak_flops=1e12)
    assert int(state.step) == 3
    assert (tmp_path / "metrics.jsonl").exists()
    assert "TRAIN_STEPS = 3" in (tmp_path / "config.gin").read_text()  # what ran, as gin (python_run_config)


def test_t5_trains_on_seq2seq_task(tmp_path):
    from lmops_jax.models import encoder_decoder, model
    t5 = model.EncoderDecoderModel(encoder_decoder.T5Config(d_model=64, num_encoder_layers=1, num_decoder_layers=1,
                                                            num_heads=2, head_dim=16, mlp_dim=128))
    _, state = train_lib.train(
        model=t5, model_dir=str(tmp_path), train_steps=2, batch_size=8, mixture_or_task_name="synthetic_seq2seq",
        task_feature_lengths={"inputs": 40, "targets": 40}, log_period=1, eval_steps=1, peak_flops=1e12)
    assert int(state.step) == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and "eval/loss" in records[-1]


@pytest.mark.parametrize("files,bindings", [
    (("gin_configs/examples/quickstart.gin",), []),
    (("gin_configs/models/llama_small.gin", "gin_configs/runs/pretrain.gin"), ["MODEL_DIR = '/tmp/x'"]),
    (("gin_configs/models/t5_small.gin", "gin_configs/runs/pretrain.gin"), ["MODEL_DIR = '/tmp/x'"]),
    (("gin_configs/models/llama_tiny.gin", "gin_configs/runs/finetune.gin"),
     ["MODEL_DIR = '/tmp/x'", "INITIAL_CHECKPOINT_PATH = '/tmp/y'"]),
    (("gin_configs/models/llama_tiny.gin", "gin_configs/runs/lora.gin"),
     ["MODEL_DIR = '/tmp/x'", "INITIAL_CHECKPOINT_PATH = '/tmp/y'"]),
    (("gin_configs/models/llama_tiny.gin", "gin_configs/runs/distill.gin"),
     ["MODEL_DIR = '/tmp/x'", "TEACHER_CHECKPOINT = '/tmp/y'"]),
])
def test_every_recipe_parses_with_its_required_macros(files, bindings):
    """The README's main line and each recipe: a model file plus a run file make a complete config."""
    try:
        _parse(bindings, files=files)
        assert gin.query_parameter("MODEL_DIR/gin.macro.value")
    finally:
        gin.clear_config()
