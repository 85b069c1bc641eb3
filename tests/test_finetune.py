"""Full fine-tuning: params-only start from a checkpoint with a fresh step and optimizer; finetune.gin."""
import json

import gin
import jax
import numpy as np

from lmops_jax import checkpoints, partitioning
from lmops_jax.training import optimizers
from lmops_jax.training import trainer
from lmops_jax.training import train as train_lib
from tests.helpers import lm_batch, tiny_llama


def _trainer():
    p = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
    return trainer.Trainer(tiny_llama(vocab_size=512), p, optimizers.OptimizerConfig(warmup_steps=0), 10, 8,
                           {"targets": 16})


def test_finetune_starts_from_checkpoint_params_with_fresh_step_and_optimizer(tmp_path):
    t = _trainer()
    state = t.init_state()
    for _ in range(2):
        state, _ = t.train_step(state, lm_batch(8, 16, vocab=512))
    pretrained = checkpoints.Checkpointer(str(tmp_path / "pretrained"))
    pretrained.save(2, state, force=True)
    pretrained.wait()
    pretrained.close()
    expected_params = jax.device_get(state.params)

    fresh = _trainer()
    ckpt = checkpoints.Checkpointer(str(tmp_path / "finetune"))
    start, message = train_lib._initial_state(fresh, ckpt, None, str(tmp_path / "pretrained"), (), False)
    ckpt.close()
    assert message.startswith("params restored from") and int(start.step) == 0
    for a, b in zip(jax.tree.leaves(jax.device_get(start.params)), jax.tree.leaves(expected_params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(jax.device_get(start.opt_state)),
                    jax.tree.leaves(jax.device_get(fresh.init_state().opt_state))):
        np.testing.assert_array_equal(a, b)  # Adam moments and counts start over
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(jax.device_get(state.opt_state)))


def test_finetune_recipe_runs_from_the_cli(tmp_path):
    model = tiny_llama(vocab_size=512)
    params = jax.device_get(jax.tree.map(lambda x: x.value, model.init_params(
        jax.random.key(5), model.input_shapes(1, {"targets": 16})), is_leaf=lambda x: hasattr(x, "names")))
    checkpoints.save_params(str(tmp_path / "pretrained"), params, "")
    run = tmp_path / "ft"
    try:
        train_lib.main([
            "--gin_file=gin_configs/models/llama_tiny.gin", "--gin_file=gin_configs/runs/finetune.gin",
            f"--gin.MODEL_DIR='{run}'", f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path / 'pretrained'}'",
            "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}",
            "--gin.EVAL_STEPS=1", "--gin.LOG_PERIOD=1", "--gin.WARMUP_STEPS=0",
            "--gin.decoder_only.LlamaConfig.num_layers=1", "--gin.decoder_only.LlamaConfig.d_model=64",
            "--gin.decoder_only.LlamaConfig.mlp_dim=128"])
    finally:
        gin.clear_config()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "eval/loss" in records[-1]
    assert records[0]["learning_rate"] > records[-1]["learning_rate"]  # finetune.gin: linear decay to 0
    final = checkpoints.restore_params(
        str(run), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
        jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params))
    moved = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(params)))
    assert 0 < moved < 0.05  # two small steps away from the pretrained weights, not a fresh init
