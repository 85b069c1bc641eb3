"""What a notebook sees: `train(progress=...)` shows the library's lines on stdout, without third-party noise."""
import logging
import os
import subprocess
import sys

import pytest

from lmops_jax.training import progress
from tests.test_infer_cli import _run, checkpoint  # noqa: F401  the fixture and the in-process infer CLI

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NOTEBOOK_SCRIPT = """
import sys
from lmops_jax import train
from tests.helpers import tiny_llama

train.train(model=tiny_llama(vocab_size=512), model_dir=sys.argv[1], train_steps=2, batch_size=8,
            mixture_or_task_name="synthetic_lm", task_feature_lengths={"targets": 16}, log_period=1,
            eval_steps=1, peak_flops=1e12, progress=True)
"""


def test_python_api_prints_progress_and_outputs_without_third_party_info(tmp_path):
    model_dir = tmp_path / "nb"
    proc = subprocess.run([sys.executable, "-c", NOTEBOOK_SCRIPT, str(model_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[##########..........]  50% step 1/2 loss ") for line in lines), proc.stdout
    assert any(line.startswith("[####################] 100% step 2/2 loss ") for line in lines), proc.stdout
    assert lines[-1] == f"outputs in {model_dir}: metrics.jsonl, tensorboard/, config.gin, checkpoints/ (steps 2)"
    for line in (proc.stdout + proc.stderr).splitlines():  # orbax logs through absl at INFO
        assert not line.startswith("INFO") and "orbax" not in line.lower(), line


@pytest.fixture
def notebook_logging():
    """Logging as a fresh notebook has it (root at WARNING with a plain handler, as after a first
    `logging.warning()`; the `lmops_jax` logger unset and propagating), restored afterwards."""
    root, library = logging.getLogger(), logging.getLogger(progress.LIBRARY_LOGGER)
    saved = [(logger, logger.level, logger.propagate, list(logger.handlers)) for logger in (root, library)]
    root.handlers[:] = [logging.StreamHandler()]
    root.setLevel(logging.WARNING)
    library.handlers[:] = []
    library.setLevel(logging.NOTSET)
    library.propagate = True
    yield library
    for logger, level, propagate, handlers in saved:
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers


def test_display_prints_library_lines_only_and_restores_logging(notebook_logging, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # no tqdm: the lines are printed
    with progress.Display(True, total_steps=3) as display:
        logging.getLogger("lmops_jax.training.trainer").info("[#####] step 1/3 loss 2")
        logging.getLogger("lmops_jax.checkpoints").warning("step 2 is unreadable")
        logging.getLogger("absl").info("orbax: saved a file")
        display.advance(1)
    logging.getLogger("lmops_jax.training.trainer").info("after the call")
    assert capsys.readouterr().out == "[#####] step 1/3 loss 2\nWARNING: step 2 is unreadable\n"
    assert notebook_logging.level == logging.NOTSET and notebook_logging.propagate
    assert not notebook_logging.handlers


def test_progress_by_default_only_when_logging_hides_the_library_lines(notebook_logging):
    assert progress.Display(None, 1).enabled
    assert not progress.Display(False, 1).enabled
    logging.getLogger().setLevel(logging.INFO)  # the CLI, or logging.basicConfig(level=logging.INFO)
    assert not progress.Display(None, 1).enabled
    assert progress.Display(True, 1).enabled


def test_infer_ends_naming_its_outputs(checkpoint, tmp_path, capsys):
    _run(checkpoint, tmp_path, "predict")
    last = capsys.readouterr().out.splitlines()[-1]
    assert f"INFO outputs in {tmp_path}: predict.jsonl, metrics.json ({{'task': " in last
