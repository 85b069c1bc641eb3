"""DistillationTrainer: frozen teacher, KD loss limits, vocabulary check, CLI recipe."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lmops_jax import checkpoints, distillation, optimizers, partitioning, trainer
from tests.helpers import lm_batch, tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_GIN = """from __gin__ import dynamic_registration
from lmops_jax.models import decoder_only
from lmops_jax.models import model
MODEL = @model.DecoderOnlyModel()
model.DecoderOnlyModel.config = @decoder_only.LlamaConfig()
decoder_only.LlamaConfig.vocab_size = 512
decoder_only.LlamaConfig.d_model = 64
decoder_only.LlamaConfig.num_layers = 2
decoder_only.LlamaConfig.num_heads = 4
decoder_only.LlamaConfig.num_kv_heads = 2
decoder_only.LlamaConfig.mlp_dim = 128
MIXTURE_OR_TASK_NAME = 'synthetic_lm'
"""


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    teacher = tiny_llama(vocab_size=512, num_layers=2)
    params = jax.device_get(jax.tree.map(lambda x: x.value, teacher.init_params(
        jax.random.key(7), teacher.input_shapes(1, {"targets": 16})), is_leaf=lambda x: hasattr(x, "names")))
    checkpoints.save_params(str(path), params, TEACHER_GIN)
    return str(path), params


def _student(teacher_path, **kw):
    p = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
    return distillation.DistillationTrainer(
        tiny_llama(vocab_size=512), p, optimizers.OptimizerConfig(warmup_steps=0), 10, 8, {"targets": 16},
        teacher_checkpoint=teacher_path, **kw)


def _batch():
    return lm_batch(8, 16, vocab=512, ragged=True)


def test_teacher_gets_no_update_and_metrics_are_reported(teacher_dir):
    path, params = teacher_dir
    t = _student(path, kd_alpha=0.7, kd_temperature=2.0)
    state = t.init_state()
    for _ in range(2):
        state, metrics = t.train_step(state, _batch())
    for a, b in zip(jax.tree.leaves(jax.device_get(t.teacher_params)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    summary = trainer.summarize(jax.device_get(metrics))
    for key in ("loss", "kd_loss", "ce_loss", "teacher_agreement", "teacher_loss", "accuracy"):
        assert np.isfinite(summary[key]), key
    assert 0.0 <= summary["teacher_agreement"] <= 1.0


def test_teacher_params_are_an_argument_not_a_constant(teacher_dir):
    t = _student(teacher_dir[0])
    state = t.init_state()
    with t.partitioner.context():
        lowered = t._jit_train_step.lower(state, _batch(), t.teacher_params)
    teacher_args = lowered.args_info[0][2]
    assert len(jax.tree.leaves(teacher_args)) == len(jax.tree.leaves(t.teacher_params))


def test_alpha_zero_equals_plain_training_step(teacher_dir):
    d = _student(teacher_dir[0], kd_alpha=0.0)
    plain = trainer.Trainer(d.model, d.partitioner, d.optimizer, 10, 8, {"targets": 16})
    batch = _batch()
    s1, m1 = d.train_step(d.init_state(), batch)
    s2, m2 = plain.train_step(plain.init_state(), batch)
    np.testing.assert_allclose(m1["loss_sum"], m2["loss_sum"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_vocabulary_mismatch_fails_before_training(teacher_dir):
    p = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="share a vocabulary: teacher vocab_size=512, student vocab_size=256"):
        distillation.DistillationTrainer(tiny_llama(vocab_size=256), p, optimizers.OptimizerConfig(), 10, 8,
                                         {"targets": 16}, teacher_checkpoint=teacher_dir[0])
    with pytest.raises(ValueError, match="TEACHER_CHECKPOINT"):
        distillation.DistillationTrainer(tiny_llama(vocab_size=512), p, optimizers.OptimizerConfig(), 10, 8,
                                         {"targets": 16})


def test_distill_recipe_runs_from_the_cli(teacher_dir, tmp_path):
    cmd = [sys.executable, "-m", "lmops_jax.train", "--gin_file=gin_configs/models/llama_tiny.gin",
           "--gin_file=gin_configs/runs/distill.gin", f"--gin.MODEL_DIR='{tmp_path}'",
           f"--gin.TEACHER_CHECKPOINT='{teacher_dir[0]}'", "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=8",
           "--gin.TASK_FEATURE_LENGTHS={'targets': 16}", "--gin.LOG_PERIOD=1", "--gin.EVAL_STEPS=1",
           "--gin.KD_LOSS='jsd'", "--gin.decoder_only.LlamaConfig.num_layers=1"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("kd_loss", "ce_loss", "teacher_agreement", "teacher_loss", "eval/loss"):
        assert key in last, key
