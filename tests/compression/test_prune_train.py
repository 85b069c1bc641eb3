"""Pruning masks through training: `OptimizerConfig.sparse_params` keeps pruned (zero) weights at zero in
fine-tuning and distillation steps, and the prune_distill.gin recipe distils a pruned student."""
import json

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from lmops_jax import checkpoints, partitioning
from lmops_jax.compression import prune as prune_lib, prune_job
from lmops_jax.compression.quantize import DataConfig
from lmops_jax.distillation.trainer import DistillationTrainer
from lmops_jax.models import loading
from lmops_jax.models.spec import ModelSpec, VocabularySpec
from lmops_jax.training import optimizers, trainer
from lmops_jax.training import train as train_lib
from tests.helpers import lm_batch, tiny_llama

KERNELS = prune_lib.DEFAULT_KERNELS


def _steps(trainer_obj, params, steps=3):
    state = trainer_obj.init_state()
    state = state.replace(params=jax.device_put(params, trainer_obj.state_shardings.params))
    for seed in range(steps):
        state, _ = trainer_obj.train_step(state, lm_batch(8, 16, vocab=128, seed=seed))
    return checkpoints.flatten(jax.device_get(state.params))


def _init(model, seed):
    return jax.tree.map(np.asarray, jax.device_get(nn.unbox(model.init_params(
        jax.random.key(seed), model.input_shapes(1, {"targets": 8})))))


@pytest.mark.parametrize("kind", ["finetune", "distill"])
def test_pruned_weights_stay_zero_through_training_steps(kind):
    model = tiny_llama()
    start = prune_lib.sparsify(_init(model, 3), "2:4", KERNELS, None)
    zeros = {name: np.asarray(w) == 0 for name, w in checkpoints.flatten(start).items()
             if name.endswith("_proj/kernel")}
    partitioner = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])

    def run(sparse_params):
        opt = optimizers.OptimizerConfig(warmup_steps=0, learning_rate=1e-2, weight_decay=0.1,
                                         sparse_params=sparse_params)
        args = (model, partitioner, opt, 10, 8, {"targets": 16})
        if kind == "finetune":
            return _steps(trainer.Trainer(*args), start)
        teacher = tiny_llama(num_layers=2)
        return _steps(DistillationTrainer(*args, teacher_model=teacher, teacher_params=_init(teacher, 9)), start)

    kept = run([KERNELS])
    free = run([]) if kind == "finetune" else None  # the control: once is enough
    for name, mask in zeros.items():
        assert np.all(kept[name][mask] == 0), name                   # the mask survives
        assert np.all(kept[name][~mask] != np.asarray(checkpoints.flatten(start)[name])[~mask]), name  # the rest trains
        assert free is None or np.any(free[name][mask] != 0), name   # without sparse_params the zeros move
    np.testing.assert_array_equal(checkpoints.flatten(start)["embed_tokens/embedding"] == 0,
                                  kept["embed_tokens/embedding"] == 0)


def test_sparse_params_are_checked_regexes():
    with pytest.raises(ValueError, match="sparse_params: bad regex"):
        optimizers.OptimizerConfig(sparse_params=["(unclosed"])


def test_the_prune_distill_recipe_distils_a_pruned_student_keeping_its_masks(tmp_path):
    teacher = tiny_llama(vocab_size=512, num_layers=2)
    params = _init(teacher, 0)
    teacher_path = str(tmp_path / "teacher")
    checkpoints.save_params(teacher_path, params, "", model_spec=ModelSpec(teacher, VocabularySpec("byte")).to_json())
    pruned_path = str(tmp_path / "pruned")
    data = DataConfig(task_feature_lengths={"targets": 16}, batch_size=2, calibration_batches=1, eval_batches=1)
    prune_job.prune(checkpoint_path=teacher_path, output_dir=pruned_path, method="2:4", data=data)
    run = tmp_path / "student"
    try:
        assert train_lib.main([
            "--gin_file=gin_configs/runs/prune_distill.gin", f"--gin.MODEL_DIR='{run}'",
            f"--gin.TEACHER_CHECKPOINT='{teacher_path}'", f"--gin.PRUNED_CHECKPOINT='{pruned_path}'",
            "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}",
            "--gin.EVAL_STEPS=1", "--gin.LOG_PERIOD=1", "--gin.WARMUP_STEPS=0"]) == 0
    finally:
        gin.clear_config()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["kd_alpha"] == 1.0
    student = loading.model_from_checkpoint(str(run))
    partitioner = loading.default_partitioner()
    start, end = (checkpoints.flatten(jax.device_get(loading.restore_params(p, student, partitioner)))
                  for p in (pruned_path, str(run)))
    for name in (n for n in start if n.endswith("_proj/kernel")):
        assert np.all(end[name][start[name] == 0] == 0) and np.mean(end[name] == 0) == 0.5, name
    assert any(np.any(end[n] != start[n]) for n in start)
