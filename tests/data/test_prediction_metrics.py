"""The trainer's evaluation by generation (`inference.infer.PredictionMetrics` bound as `train(eval_metrics=...)`):
the task's seqio metric functions see the greedy predictions of the current params, logged as `eval/<name>`."""
import json
import os

import numpy as np
import pytest
import seqio

from lmops_jax import partitioning
from lmops_jax.data import tasks
from lmops_jax.inference import InferenceModule
from lmops_jax.inference.infer import PredictionMetrics
from lmops_jax.models import encoder_decoder, model
from lmops_jax.training import optimizers, train, trainer

TASK = "seq2seq_with_metrics"
LENGTHS = {"inputs": 16, "targets": 16}


@pytest.fixture
def seen():
    """Registers TASK: synthetic_seq2seq with a metric function that records what it is given."""
    calls = []

    def metric(targets, predictions):
        calls.append((list(targets), list(predictions)))
        return {"accuracy": 100 * float(np.mean([t == p for t, p in zip(targets, predictions)])),
                "count": len(targets)}

    base = seqio.get_mixture_or_task(tasks.SYNTHETIC_SEQ2SEQ)
    seqio.TaskRegistry.remove(TASK)
    seqio.TaskRegistry.add(TASK, source=base.source, output_features=base.output_features,
                           preprocessors=base.preprocessors, metric_fns=[metric])
    yield calls
    seqio.TaskRegistry.remove(TASK)


def test_evaluations_log_the_task_metrics_of_greedy_predictions(seen, tmp_path):
    m = model.EncoderDecoderModel(encoder_decoder.T5Config(
        vocab_size=260, d_model=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=2, head_dim=16, mlp_dim=64))
    partitioner = partitioning.Partitioner({"data": -1}, "dp")
    hook = PredictionMetrics(num_examples=4, batch_size=4, task_feature_lengths=LENGTHS, max_new_tokens=4)
    _, state = train.train(model=m, model_dir=str(tmp_path), train_steps=2, batch_size=8, mixture_or_task_name=TASK,
                           task_feature_lengths=LENGTHS, partitioner=partitioner, eval_period=1, eval_steps=1,
                           optimizer=optimizers.OptimizerConfig(warmup_steps=1), peak_flops=1e9, eval_metrics=hook)
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8")]
    assert [r["step"] for r in records if "eval/count" in r] == [1, 2]
    for r in records:
        assert r["eval/count"] == 4 and 0.0 <= r["eval/accuracy"] <= 1.0  # the token accuracy stays
        assert r["eval/text_accuracy"] in (0.0, 25.0, 50.0, 75.0, 100.0)  # the task's, renamed beside it

    vocab = seqio.ByteVocabulary()
    examples = list(seqio.get_mixture_or_task(TASK).get_dataset(LENGTHS, split="validation", shuffle=False)
                    .take(4).as_numpy_iterator())
    targets, predictions = seen[-1]
    assert targets == [vocab.decode(ex["targets"].tolist()) for ex in examples]
    greedy = InferenceModule(m, state.params, partitioner, vocab).generate(
        [ex["inputs"].tolist() for ex in examples], max_new_tokens=4)
    assert predictions == [vocab.decode(t) for t in greedy.tokens]  # the final params' greedy decodes


def test_task_metrics_record_names_entries():
    record = {"eval/loss": 1.0, "eval/accuracy": 0.5}
    assert trainer.task_metrics_record({"bleu": np.float64(3.5), "accuracy": 50}, record) == {
        "eval/bleu": 3.5, "eval/text_accuracy": 50.0}
