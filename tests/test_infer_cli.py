"""The infer CLI on a tiny checkpoint: predictions and scores as JSONL, task metrics, config errors."""
import json

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from lmops_jax import checkpoints
from lmops_jax.inference import infer as infer_lib
from lmops_jax.inference.inference_module import InferenceModule
from tests.test_inference import CONFIG, LLAMA, _params

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
