"""The mixed-precision preset (gin_configs/presets/mixed_precision.gin): bfloat16 compute, float32 params and
optimizer state, and a loss that follows the float32 run's."""
import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmops_jax import partitioning
from lmops_jax.cli import gin_flags
from lmops_jax.training import optimizers, trainer
from tests.helpers import lm_batch


@pytest.fixture
def preset_model():
    """MODEL of llama_tiny.gin with the preset (and SCAN_LAYERS, which composes with it) applied."""
    try:
        gin_flags.parse(["gin_configs/models/llama_tiny.gin", "gin_configs/presets/mixed_precision.gin"],
                        ["SCAN_LAYERS = True"])
        yield gin.query_parameter("%MODEL").scoped_configurable_fn()
    finally:
        gin.clear_config()  # also unlocks (inside `gin.unlock_config()` the lock would come back on exit)


def _losses(model, steps=3):
    t = trainer.Trainer(model, partitioning.Partitioner({"data": 1}, "dp", devices=jax.devices()[:1]),
                        optimizers.OptimizerConfig(learning_rate=1e-2, warmup_steps=0), num_train_steps=steps,
                        batch_size=4, task_feature_lengths={"targets": 32})
    state, losses = t.init_state(), []
    for step in range(steps):
        state, metrics = t.train_step(state, lm_batch(4, 32, vocab=model.vocab_size, seed=step))
        losses.append(float(metrics["loss_sum"] / metrics["weight_sum"]))
    return state, losses


def test_preset_trains_in_bfloat16_with_float32_params_and_optimizer_state(preset_model):
    cfg = preset_model.config
    assert (cfg.dtype, cfg.param_dtype, cfg.scan_layers) == ("bfloat16", "float32", True)
    model = dataclasses.replace(preset_model, config=dataclasses.replace(cfg, num_layers=2, d_model=64, mlp_dim=128))
    state, losses = _losses(model)
    leaves = jax.tree.leaves((state.params, state.opt_state))
    assert all(x.dtype == jnp.float32 for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
    logits = model.compute_logits(state.params, lm_batch(1, 8, vocab=model.vocab_size))
    assert logits.dtype == jnp.bfloat16
    full = dataclasses.replace(model, config=dataclasses.replace(model.config, dtype="float32"))
    _, reference = _losses(full)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, reference, rtol=2e-2)
