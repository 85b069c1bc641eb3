"""The infer CLI on a tiny checkpoint: predictions and scores as JSONL, task metrics, config errors."""
import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from lmops_jax import checkpoints
from lmops_jax.inference import infer as infer_lib
from lmops_jax.inference import prompt_file
from lmops_jax.inference.inference_module import InferenceModule
from lmops_jax.models.spec import ModelSpec, VocabularySpec
from tests.test_inference import CONFIG, LLAMA, _params
from tests.test_multiprocess import _two_processes

TASK = "infer_cli_test"
LINES = ["abcabcabcabc", "hello world!", "0123456789", "the cat sat", "zzzzzzzz", "unused line"]


def _exact(targets, predictions):
    return {"exact": float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def _mean_score(targets, scores):
    return {"score_mean": float(np.mean(scores))}


def _register_task():
    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({"targets": LINES})
    seqio.TaskRegistry.remove(TASK)
    seqio.TaskRegistry.add(
        TASK, source=seqio.FunctionDataSource(dataset_fn, splits=("validation",)),
        output_features={"targets": seqio.Feature(seqio.ByteVocabulary(), add_eos=False)},
        preprocessors=[seqio.preprocessors.tokenize], metric_fns=[_exact, _mean_score])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "run"
    checkpoints.save_params(str(path), _params(LLAMA, 5), CONFIG)
    _register_task()
    return str(path)


def _run(checkpoint, out_dir, mode):
    try:
        code = infer_lib.main(["--gin_file=gin_configs/runs/infer.gin", f"--gin.CHECKPOINT_PATH='{checkpoint}'",
                               f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", f"--gin.INFER_OUTPUT_DIR='{out_dir}'",
                               f"--gin.MODE='{mode}'", "--gin.NUM_EXAMPLES=5", "--gin.BATCH_SIZE=2",
                               "--gin.PROMPT_LENGTH=3", "--gin.MAX_NEW_TOKENS=4"])
    finally:
        gin.clear_config()
    assert code == 0
    records = [json.loads(line) for line in (out_dir / f"{mode}.jsonl").read_text().splitlines()]
    return records, json.loads((out_dir / "metrics.json").read_text())


def test_predict_and_score_write_jsonl_and_metrics(checkpoint, tmp_path):
    records, metrics = _run(checkpoint, tmp_path, "predict")
    assert [r["inputs"] for r in records] == [line[:3] for line in LINES[:5]]
    assert [r["targets"] for r in records] == [line[3:] for line in LINES[:5]]
    assert all(isinstance(r["prediction"], str) and r["log_prob"] < 0 for r in records)
    assert metrics["num_examples"] == 5 and metrics["mode"] == "predict" and 0 <= metrics["exact"] <= 1
    assert not list(tmp_path.glob("predict-*-of-*.jsonl"))  # shards merged

    records, metrics = _run(checkpoint, tmp_path, "score")
    module = InferenceModule.from_checkpoint(checkpoint)
    vocab = seqio.ByteVocabulary()
    expected = module.score([vocab.encode(line[:3]) for line in LINES[:5]],
                            [vocab.encode(line[3:]) for line in LINES[:5]])
    np.testing.assert_allclose([r["score"] for r in records], expected, rtol=1e-5)
    assert metrics["score_mean"] == pytest.approx(float(np.mean(expected)), rel=1e-5)
    assert jax.process_count() == 1


def test_missing_checkpoint_path_exits_2(capsys):
    try:
        code = infer_lib.main(["--gin_file=gin_configs/runs/infer.gin", f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'"])
    finally:
        gin.clear_config()
    assert code == 2
    assert "CHECKPOINT_PATH" in capsys.readouterr().err


# ------------------------------------------------------------------------------ INPUT_FILE (prompt files)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_ROWS = [{"id": 1, "prompt": "abc", "targets": "abc", "meta": {"k": [1, 2]}},
               {"id": 2, "inputs": "hello", "targets": " world"},
               {"id": 3, "prompt": "", "targets": "x"},
               {"id": 4, "prompt": "0123", "targets": "456"},
               {"id": 5, "prompt": "the cat", "targets": " sat"}]


@pytest.fixture(scope="module")
def spec_checkpoint(tmp_path_factory):
    """A checkpoint whose model spec names a byte vocabulary: the CLI needs no task to tokenize."""
    path = str(tmp_path_factory.mktemp("spec_ckpt") / "run")
    checkpoints.save_params(path, _params(LLAMA, 5), CONFIG,
                            model_spec=ModelSpec(LLAMA, VocabularySpec("byte")).to_json())
    return path


def _infer_cmd(checkpoint, input_file, *flags):
    return [sys.executable, "-m", "lmops_jax.infer", "--gin_file=gin_configs/runs/infer.gin",
            f"--gin.CHECKPOINT_PATH='{checkpoint}'", f"--gin.INPUT_FILE='{input_file}'", "--gin.BATCH_SIZE=2",
            "--gin.MAX_NEW_TOKENS=4", *flags]


def _infer_subprocess(checkpoint, input_file, *flags):
    return subprocess.run(_infer_cmd(checkpoint, input_file, *flags), cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))


def _read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a trailing blank line is skipped
    return path


def test_input_file_jsonl_predict_keeps_fields_in_order(spec_checkpoint, tmp_path):
    """Without MIXTURE_OR_TASK_NAME or INFER_OUTPUT_DIR: the spec's vocabulary, MODEL_DIR/infer/<stem>."""
    run = _infer_subprocess(spec_checkpoint, _write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out_dir = os.path.join(spec_checkpoint, "infer", "prompts")
    records = _read_jsonl(os.path.join(out_dir, "predict.jsonl"))
    assert [{k: v for k, v in r.items() if k not in ("prediction", "log_prob")} for r in records] == PROMPT_ROWS
    module = InferenceModule.from_checkpoint(spec_checkpoint)
    expected = module.generate([r.get("prompt", r.get("inputs")) for r in PROMPT_ROWS], max_new_tokens=4)
    assert [r["prediction"] for r in records] == expected.texts
    np.testing.assert_allclose([r["log_prob"] for r in records], expected.log_probs, rtol=1e-4, atol=1e-5)
    metrics = json.loads(open(os.path.join(out_dir, "metrics.json")).read())
    assert metrics["input_file"] == str(tmp_path / "prompts.jsonl") and metrics["num_examples"] == 5


def test_input_file_plain_text_predict(spec_checkpoint, tmp_path):
    lines = ["first prompt", "", "  second, with spaces ", '{"not": "json, a .txt is text"}']
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    out_dir = tmp_path / "out"
    run = _infer_subprocess(spec_checkpoint, tmp_path / "lines.txt", f"--gin.INFER_OUTPUT_DIR='{out_dir}'")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = _read_jsonl(out_dir / "predict.jsonl")
    assert [r["prompt"] for r in records] == [line for line in lines if line]
    assert all(isinstance(r["prediction"], str) and r["log_prob"] < 0 for r in records)


def test_input_file_score_mode_scores_targets(spec_checkpoint, tmp_path):
    out_dir = tmp_path / "out"
    run = _infer_subprocess(spec_checkpoint, _write_jsonl(tmp_path / "pairs.data", PROMPT_ROWS),  # JSONL by content
                            "--gin.MODE='score'", f"--gin.INFER_OUTPUT_DIR='{out_dir}'")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = _read_jsonl(out_dir / "score.jsonl")
    assert [r["id"] for r in records] == [1, 2, 3, 4, 5]
    module = InferenceModule.from_checkpoint(spec_checkpoint)
    expected = module.score([r.get("prompt", r.get("inputs")) for r in PROMPT_ROWS],
                            [r["targets"] for r in PROMPT_ROWS])
    np.testing.assert_allclose([r["score"] for r in records], expected, rtol=1e-4, atol=1e-5)


def test_input_file_over_two_processes_keeps_the_file_order(spec_checkpoint, tmp_path):
    """Each process takes a contiguous block (3 and 2 lines); on a mesh spanning both, process 1 pads its
    third batch with a dummy row. The merged output equals a one-process run's, in the file's order."""
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    _two_processes(_infer_cmd(spec_checkpoint, prompts, f"--gin.INFER_OUTPUT_DIR='{tmp_path / 'multi'}'",
                              "--gin.MESH_SHAPE={'data': -1, 'fsdp': 1, 'model': 1}"))
    multi = _read_jsonl(tmp_path / "multi" / "predict.jsonl")
    assert [r["id"] for r in multi] == [1, 2, 3, 4, 5]
    assert not list((tmp_path / "multi").glob("predict-*-of-*.jsonl"))
    module = InferenceModule.from_checkpoint(spec_checkpoint)
    expected = module.generate([r.get("prompt", r.get("inputs")) for r in PROMPT_ROWS], max_new_tokens=4)
    assert [r["prediction"] for r in multi] == expected.texts
    np.testing.assert_allclose([r["log_prob"] for r in multi], expected.log_probs, rtol=1e-4, atol=1e-5)


def test_input_file_bad_lines_exit_2_naming_the_line(spec_checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n\n{"text": "no prompt key"}\n')
    run = _infer_subprocess(spec_checkpoint, bad)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"error: {bad} line 3 needs one of 'prompt' or 'inputs'" in run.stderr
    assert "Traceback" not in run.stderr

    no_targets = _write_jsonl(tmp_path / "no_targets.jsonl", [{"prompt": "a", "targets": "b"}, {"prompt": "c"}])
    run = _infer_subprocess(spec_checkpoint, no_targets, "--gin.MODE='score'")
    assert run.returncode == 2 and f"error: {no_targets} line 2 has no 'targets'" in run.stderr, run.stderr[-3000:]


def test_prompt_file_errors_name_file_and_line(tmp_path):
    """The reader's other refusals, in-process (each would exit 2 like the subprocess test's)."""
    cases = {"x.jsonl": ('{"prompt": 3}\n', "line 1: 'prompt' must be a string"),
             "y.jsonl": ('{"prompt": "a"}\n{"prompt": "a", "inputs": "b"}\n', "line 2 needs one of"),
             "z.jsonl": ('{"prompt": "a"\n', "line 1 is not valid JSON"),
             "w.jsonl": ("[1, 2]\n", "line 1 is a JSON list"),
             "v.txt": ("\n \n", "has no examples")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(prompt_file.InputFileError, match=message):
            prompt_file.read_examples(str(tmp_path / name), need_targets=False)
    (tmp_path / "t.txt").write_text("hi\n")
    with pytest.raises(prompt_file.InputFileError, match="t.txt line 1 has no 'targets'.*plain-text file"):
        prompt_file.read_examples(str(tmp_path / "t.txt"), need_targets=True)
    with pytest.raises(prompt_file.InputFileError, match="cannot read INPUT_FILE"):
        prompt_file.read_examples(str(tmp_path / "missing.jsonl"), need_targets=False)


def test_neither_task_nor_input_file_exits_2(capsys):
    try:
        code = infer_lib.main(["--gin_file=gin_configs/runs/infer.gin", "--gin.CHECKPOINT_PATH='/nonexistent'"])
    finally:
        gin.clear_config()
    assert code == 2
    assert "MIXTURE_OR_TASK_NAME" in capsys.readouterr().err
