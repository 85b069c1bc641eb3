"""The `[t5]` extra: its tasks are refused without it, naming the extra; with it, installed after `[all]` as the
README says, `pip check` stays clean and the t5 tasks and docs/data.md run (tests/data/test_t5_tasks.py and
that page's docs test, in a venv layered on this environment, so this environment keeps the seqio and
tensorflow-datasets of `[all]`)."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import seqio

from lmops_jax.data import t5_extra, tasks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T5_TASKS = {tasks.SPAN_CORRUPTION: {"inputs": 64, "targets": 32}, tasks.TSV_SEQ2SEQ: {"inputs": 8, "targets": 32}}
HAS_T5 = importlib.util.find_spec("t5") is not None


@pytest.fixture
def without_t5(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "t5" else find_spec(name, *a))


@pytest.mark.parametrize("name", sorted(T5_TASKS))
def test_t5_tasks_are_refused_without_the_extra_naming_it(name, without_t5):
    task = seqio.get_mixture_or_task(name)
    with pytest.raises(t5_extra.MissingExtraError, match=re.escape(f"task {name!r}") + ".*" +
                       re.escape('pip install -e ".[t5]"')):
        task.get_dataset(T5_TASKS[name], split="validation", shuffle=False)


def test_t5_metrics_are_refused_without_the_extra(without_t5):
    (fn,) = t5_extra.metric_fns(["bleu"], "my_task")
    with pytest.raises(t5_extra.MissingExtraError, match=re.escape("metric 'bleu' needs the t5 package")):
        fn(["a b"], ["a b"])


def test_task_arguments_are_checked_when_registering():
    with pytest.raises(ValueError, match=r"unknown metrics \['f1'\] for task 'bad'"):
        tasks.register_tsv_seq2seq(metrics=["bleu", "f1"], name="bad")
    with pytest.raises(ValueError, match="NOISE_DENSITY must lie in"):
        tasks.register_span_corruption(noise_density=1.5, name="bad")
    with pytest.raises(FileNotFoundError, match="gin macro TSV_FILES"):
        tasks.register_tsv_seq2seq(train_files="/nonexistent/*.tsv", name="bad")
    assert "bad" not in seqio.TaskRegistry.names()


def test_shipped_tsv_pairs_parse():
    examples = list(seqio.get_mixture_or_task(tasks.TSV_SEQ2SEQ).source.get_dataset("validation").take(2)
                    .as_numpy_iterator())
    assert [e.decode() for e in examples] == ["5\tfive", "16\tsixteen"]
    dataset = tasks._parse_tsv(seqio.get_mixture_or_task(tasks.TSV_SEQ2SEQ).source.get_dataset("train"))
    first = next(dataset.as_numpy_iterator())
    assert (first["inputs"], first["targets"]) == (b"0", b"zero")


@pytest.mark.skipif(HAS_T5, reason="the refusal of a job is checked where t5 is not installed")
@pytest.mark.parametrize("recipe", ["pretrain_span_corruption.gin", "seq2seq_tsv.gin"])
def test_train_job_refuses_t5_recipes_with_one_error_line(recipe, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmops_jax.train", f"--gin_file=gin_configs/runs/{recipe}",
                           f"--gin.MODEL_DIR='{tmp_path}'"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and 'needs the t5 package, which is not installed: run pip install -e ".[t5]"' in error[0]


def _check(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.skipif(HAS_T5, reason="t5 is installed here: tests/data/test_t5_tasks.py runs directly")
def test_t5_extra_installed_after_all_keeps_pip_check_clean_and_runs_the_t5_tasks(tmp_path):
    """The README's order: `[all]` (this environment), then `pip install -e ".[t5]"`, here into a venv that sees
    this environment's packages, from a copy of the checkout (the build writes nothing into the checkout)."""
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(os.path.join(REPO, "setup.py"), source / "setup.py")
    shutil.copytree(os.path.join(REPO, "lmops_jax"), source / "lmops_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    _check([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    # --no-compile: pip would byte-compile every installed file (22 s against 55 s here); imports compile what they use
    _check([python, "-m", "pip", "install", "--no-compile", "--no-build-isolation", f"{source}[t5]"], cwd=tmp_path)
    _check([python, "-m", "pip", "check"])
    modules = "import seqio, t5, tensorflow_datasets as tfds; print(seqio.__file__, tfds.__version__)"
    assert _check([python, "-c", modules]).startswith(str(venv))  # the nightlies t5 pins, in the venv only
    out = _check([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/data/test_t5_tasks.py",
                  "tests/test_docs.py::test_page_runs[data.md]"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert re.search(r"\b\d+ passed\b", out) and "skipped" not in out, out[-3000:]
