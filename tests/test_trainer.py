import jax
import numpy as np
import pytest

from lmops_jax import partitioning
from lmops_jax.training import optimizers
from lmops_jax.training import trainer
from tests.helpers import lm_batch, tiny_llama

MESHES = {
    "dp": {"data": 8, "fsdp": 1, "model": 1},
    "fsdp": {"data": 1, "fsdp": 8, "model": 1},
    "tp": {"data": 2, "fsdp": 1, "model": 4},
    "fsdp_tp": {"data": 1, "fsdp": 2, "model": 4},
}


def _one_step(mesh_shape, rules, devices=None, num_microbatches=1, batch=None, opt=None):
    p = partitioning.Partitioner(mesh_shape, rules, devices=devices)
    opt = opt or optimizers.OptimizerConfig(warmup_steps=0, weight_decay=0.01)
    t = trainer.Trainer(tiny_llama(), p, opt, num_train_steps=10, batch_size=8,
                        task_feature_lengths={"targets": 16}, num_microbatches=num_microbatches)
    state = t.init_state()
    batch = batch if batch is not None else lm_batch(8, 16, ragged=True)
    new_state, metrics = t.train_step(state, {k: jax.device_put(v, t.batch_sharding) for k, v in batch.items()})
    return new_state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device_step():
    return _one_step({"data": 1}, "dp", devices=jax.devices()[:1])


@pytest.mark.parametrize("preset", sorted(MESHES))
def test_sharded_step_equals_single_device_step(single_device_step, preset):
    ref_state, ref_metrics = single_device_step
    state, metrics = _one_step(MESHES[preset], preset)
    np.testing.assert_allclose(metrics["loss_sum"], ref_metrics["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
    if preset in ("fsdp", "fsdp_tp"):
        kernel = state.params["layers_0"]["mlp"]["gate_proj"]["kernel"]
        assert "fsdp" in str(kernel.sharding.spec)


def test_gradient_accumulation_equals_large_batch(single_device_step):
    ref_state, ref_metrics = single_device_step
    state, metrics = _one_step({"data": 1}, "dp", devices=jax.devices()[:1], num_microbatches=4)
    np.testing.assert_allclose(metrics["loss_sum"], ref_metrics["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(metrics["weight_sum"], ref_metrics["weight_sum"])
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_loss_decreases_on_repeated_batch():
    p = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
    t = trainer.Trainer(tiny_llama(), p, optimizers.OptimizerConfig(learning_rate=1e-2, warmup_steps=0),
                        num_train_steps=20, batch_size=4, task_feature_lengths={"targets": 16})
    state = t.init_state()
    batch = lm_batch(4, 16)
    losses = []
    for _ in range(15):
        state, m = t.train_step(state, batch)
        losses.append(float(m["loss_sum"] / m["weight_sum"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 15


def test_batch_not_divisible_by_mesh_is_named():
    p = partitioning.Partitioner({"data": 8})
    with pytest.raises(ValueError, match=r"BATCH_SIZE=12.*divisible by the 8 batch shards"):
        trainer.Trainer(tiny_llama(), p, optimizers.OptimizerConfig(), 10, 12, {"targets": 16})


def test_frozen_parameters_do_not_move():
    opt = optimizers.OptimizerConfig(warmup_steps=0, frozen=["embed_tokens", "layers_0/mlp"])
    p = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
    t = trainer.Trainer(tiny_llama(), p, opt, 10, 8, {"targets": 16})
    state = t.init_state()
    before = jax.device_get(state.params)
    state, _ = t.train_step(state, lm_batch(8, 16))
    after = jax.device_get(state.params)
    np.testing.assert_array_equal(after["embed_tokens"]["embedding"], before["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(after["layers_0"]["mlp"]["up_proj"]["kernel"],
                                  before["layers_0"]["mlp"]["up_proj"]["kernel"])
    assert not np.array_equal(after["lm_head"]["kernel"], before["lm_head"]["kernel"])


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "rsqrt"])
def test_schedules_warm_up_then_decay(name):
    fn = optimizers.make_schedule(name, 1.0, warmup_steps=10, decay_steps=110, end_value_factor=0.1)
    assert float(fn(0)) == 0.0 and abs(float(fn(10)) - 1.0) < 1e-6
    end = float(fn(110))
    expected = {"constant": 1.0, "linear": 0.1, "cosine": 0.1, "rsqrt": (10 / 110) ** 0.5}[name]
    assert abs(end - expected) < 1e-4


def test_weight_decay_skips_vectors_and_excluded_paths():
    params = {"a": {"kernel": np.ones((2, 2))}, "norm": {"scale": np.ones(2)}, "emb": {"embedding": np.ones((2, 2))}}
    mask = optimizers.OptimizerConfig(weight_decay_exclude=["emb"])._decay_mask(params)
    assert mask == {"a": {"kernel": True}, "norm": {"scale": False}, "emb": {"embedding": False}}


def test_unknown_optimizer_and_schedule_are_named():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        optimizers.OptimizerConfig(name="lion")
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        optimizers.OptimizerConfig(schedule="step")


def test_adafactor_state_is_sharded_or_replicated_consistently():
    p = partitioning.Partitioner({"fsdp": 8}, "fsdp")
    t = trainer.Trainer(tiny_llama(), p, optimizers.OptimizerConfig(name="adafactor", warmup_steps=0), 10, 8,
                        {"targets": 16})
    state = t.init_state()
    state, m = t.train_step(state, lm_batch(8, 16))
    assert np.isfinite(m["loss_sum"])


def test_adam_moments_take_their_parameter_sharding():
    p = partitioning.Partitioner({"fsdp": 8}, "fsdp")
    t = trainer.Trainer(tiny_llama(), p, optimizers.OptimizerConfig(frozen=["embed_tokens"]), 10, 8,
                        {"targets": 16})
    specs = [s.spec for s in jax.tree.leaves(t.state_shardings.opt_state)]
    param_specs = [s.spec for s in jax.tree.leaves(t.state_shardings.params)]
    fsdp_params = sum("fsdp" in str(s) for s in param_specs)
    # mu and nu of every trained fsdp-sharded parameter (the frozen embedding has no state).
    assert sum("fsdp" in str(s) for s in specs) == 2 * (fsdp_params - 1)
