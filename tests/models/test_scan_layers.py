"""Scanned layers (`LlamaConfig.scan_layers`): the same numbers as the unrolled layers, and checkpoints that
hold the per-layer layout whichever layout trained (`checkpoints.per_layer` / `stacked_layers`)."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from lmops_jax import checkpoints, partitioning, train
from lmops_jax.models import loading
from lmops_jax.training import optimizers, trainer
from tests.helpers import lm_batch, tiny_llama

FEATURES = {"targets": 16}


def _scanned(m, **overrides):
    return dataclasses.replace(m, config=dataclasses.replace(m.config, scan_layers=True, **overrides))


def _params(m):
    return nn.meta.unbox(m.init_params(jax.random.key(0), m.input_shapes(1, FEATURES)))


def _like(params):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_give_the_unrolled_loss_and_gradients(remat):
    plain = tiny_llama(num_layers=3, remat=remat, remat_policy="minimal")
    scanned = _scanned(plain)
    params = _params(plain)
    stacked = checkpoints.stacked_layers(params, _like(_params(scanned)))
    assert stacked["layers"]["self_attn"]["q_proj"]["kernel"].shape == (3, 64, 4, 16)
    batch = lm_batch(4, 16, ragged=True)
    (loss, _), grads = jax.value_and_grad(plain.loss_fn, has_aux=True)(params, batch)
    (scan_loss, _), scan_grads = jax.value_and_grad(scanned.loss_fn, has_aux=True)(stacked, batch)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(checkpoints.per_layer(scan_grads)), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_stacked_params_name_the_layers_axis_which_no_preset_splits():
    m = _scanned(tiny_llama(num_layers=2))
    boxed = m.init_params(jax.random.key(0), m.input_shapes(1, FEATURES))
    kernel = boxed["layers"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.names == ("layers", "embed", "mlp")
    for preset, rules in partitioning.RULE_PRESETS.items():
        spec = partitioning.logical_to_spec(kernel.names, kernel.value.shape, rules, {"data": 1, "fsdp": 2, "model": 2})
        assert spec[0] is None if len(spec) else True, preset


def test_decoding_a_scanned_model_is_refused_and_its_checkpoint_model_is_unscanned():
    m = _scanned(tiny_llama(num_layers=2))
    with pytest.raises(NotImplementedError, match="scan_layers"):
        m.init_cache(1, 8)
    assert m.checkpoint_model.config == dataclasses.replace(m.config, scan_layers=False)


def test_params_checkpoints_load_across_layouts(tmp_path):
    plain = tiny_llama(num_layers=2)
    scanned = _scanned(plain)
    stacked = _params(scanned)
    path = checkpoints.save_params(str(tmp_path / "scanned"), stacked, "")
    names = checkpoints.checkpoint_param_shapes(path)
    assert "layers_1/self_attn/q_proj/kernel" in names and not any(n.startswith("layers/") for n in names)
    partitioner = loading.default_partitioner()
    unrolled = loading.restore_params(path, plain, partitioner)
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(checkpoints.per_layer(stacked))):
        np.testing.assert_array_equal(a, b)
    path = checkpoints.save_params(str(tmp_path / "plain"), unrolled, "")
    restacked = loading.restore_params(path, scanned, partitioner)
    for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(a, b)


def _trainer(m):
    return trainer.Trainer(m, partitioning.Partitioner({"data": 2, "fsdp": 2, "model": 2}, "fsdp_tp"),
                           optimizers.OptimizerConfig(warmup_steps=0), num_train_steps=4, batch_size=4,
                           task_feature_lengths=FEATURES)


def test_a_train_state_resumes_across_layouts(tmp_path):
    """Params and Adam moments are saved per layer by a scanned run and restored stacked, and vice versa."""
    plain, scanned = _trainer(tiny_llama(num_layers=2)), _trainer(_scanned(tiny_llama(num_layers=2)))
    batch = {k: jax.device_put(v, scanned.batch_sharding) for k, v in lm_batch(4, 16).items()}
    state, _ = scanned.train_step(scanned.init_state(), batch)
    saver = checkpoints.Checkpointer(str(tmp_path / "a"), checkpoints.CheckpointConfig(async_save=False))
    saver.save(1, state, force=True)
    restored, _, _ = saver.restore_latest(plain.abstract_state, plain.state_shardings)
    flat = jax.device_get(checkpoints.per_layer({"params": state.params, "opt": state.opt_state}))
    for a, b in zip(jax.tree.leaves(flat), jax.tree.leaves({"params": restored.params, "opt": restored.opt_state})):
        np.testing.assert_array_equal(a, b)
    saver = checkpoints.Checkpointer(str(tmp_path / "b"), checkpoints.CheckpointConfig(async_save=False))
    saver.save(1, restored, force=True)
    back, _, _ = saver.restore_latest(scanned.abstract_state, scanned.state_shardings)
    assert back.params["layers"]["mlp"]["up_proj"]["kernel"].sharding == \
        scanned.state_shardings.params["layers"]["mlp"]["up_proj"]["kernel"]
    for a, b in zip(jax.tree.leaves((back.params, back.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_a_scanned_run_stores_the_unscanned_model_spec(tmp_path):
    model_dir = str(tmp_path / "run")
    train.train(model=_scanned(tiny_llama(vocab_size=512, num_layers=2)), model_dir=model_dir, train_steps=1,
                batch_size=8, mixture_or_task_name="synthetic_lm", task_feature_lengths=FEATURES,
                partitioner=partitioning.Partitioner({"data": -1}, "dp"),
                optimizer=optimizers.OptimizerConfig(warmup_steps=0), peak_flops=1e9)
    model = loading.model_from_checkpoint(model_dir)
    assert not model.config.scan_layers
    params = loading.restore_params(model_dir, model, loading.default_partitioner())
    cache = model.init_cache(1, 8)
    logits, _ = model.prefill(params, np.ones((1, 4), np.int32), np.array([4], np.int32), cache)
    assert np.isfinite(logits).all()
