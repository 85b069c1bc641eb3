"""Checkpoints: exact resume, preemption, corrupt-step fallback, params-only restore, resharding, errors."""
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmops_jax import checkpoints, partitioning
from lmops_jax.training import optimizers
from lmops_jax.training import train as train_lib
from lmops_jax.training import trainer
from tests.helpers import lm_batch, tiny_llama

STEPS = 6
FEATURES = {"targets": 16}


def _run(model_dir, trainer_cls=trainer.Trainer, steps=STEPS, **kw):
    return train_lib.train(
        model=tiny_llama(vocab_size=512), model_dir=str(model_dir), train_steps=steps, batch_size=8,
        mixture_or_task_name="synthetic_lm", task_feature_lengths=FEATURES, log_period=100, peak_flops=1e12,
        partitioner=partitioning.Partitioner({"data": 2}, devices=jax.devices()[:2]),
        optimizer=optimizers.OptimizerConfig(warmup_steps=2), trainer_cls=trainer_cls,
        checkpoint=checkpoints.CheckpointConfig(period=2, keep=None), **kw)


class _SigtermAtStep3(trainer.Trainer):
    """Sends this process SIGTERM while step 3 runs, as a cluster scheduler would."""

    def train_step(self, state, batch):
        out = super().train_step(state, batch)
        if int(out[0].step) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("uninterrupted")
    _, state = _run(model_dir)
    return model_dir, jax.device_get(state.params)


def test_preempted_run_resumes_bitwise(uninterrupted, tmp_path):
    _, reference = uninterrupted
    with pytest.raises(train_lib.Preempted, match="SIGTERM received: saved a checkpoint at step 3"):
        _run(tmp_path, trainer_cls=_SigtermAtStep3)
    assert checkpoints.Checkpointer(str(tmp_path)).all_steps() == [2, 3]  # periodic 2, preemption 3
    _, state = _run(tmp_path)
    assert int(state.step) == STEPS
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)


def test_corrupt_latest_step_falls_back_is_moved_aside_and_saved_again(uninterrupted, tmp_path, caplog):
    model_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], model_dir)
    t = trainer.Trainer(tiny_llama(vocab_size=512), partitioning.Partitioner({"data": 2}, devices=jax.devices()[:2]),
                        optimizers.OptimizerConfig(warmup_steps=2), STEPS, 8, FEATURES)
    ckpt = checkpoints.Checkpointer(str(model_dir))
    assert ckpt.all_steps() == [2, 4, 6]
    # Truncate every data file of the newest step, as a crash during a copy would.
    state_dir = os.path.join(ckpt.directory, "6", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            if "manifest" in name or name.startswith("d") or root.endswith("d"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(7)
    assert "step 6: UNREADABLE" in checkpoints.inspect(str(model_dir), verify=True)
    assert "step 4: UNREADABLE" not in checkpoints.inspect(str(model_dir), verify=True)
    with caplog.at_level(logging.ERROR):
        state, data_state, step = ckpt.restore_latest(t.abstract_state, t.state_shardings)
    assert step == 4 and int(state.step) == 4 and data_state == {"batches_consumed": 4}
    assert "checkpoint step 6" in caplog.text and "unreadable" in caplog.text
    # The damaged step is kept under another name, out of the step list, so step 6 is saved again.
    assert ckpt.all_steps() == [2, 4]
    assert os.path.isdir(os.path.join(ckpt.directory, "6.unreadable", "state"))
    assert "6.unreadable" in checkpoints.inspect(str(model_dir))
    assert ckpt.save(6, state, data_state=data_state, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 6]
    _, _, step = ckpt.restore_latest(t.abstract_state, t.state_shardings)
    assert step == 6
    # A second failure of the same step does not overwrite the first copy.
    assert checkpoints.unreadable_name(ckpt.directory, 6).endswith("6.unreadable-1")


def test_params_only_restore_reshards_onto_fsdp_mesh(uninterrupted):
    model_dir, reference = uninterrupted
    t = trainer.Trainer(tiny_llama(vocab_size=512), partitioning.Partitioner({"fsdp": 8}, "fsdp"),
                        optimizers.OptimizerConfig(), 10, 8, FEATURES)
    params = checkpoints.restore_params(str(model_dir), t.abstract_state.params, t.state_shardings.params)
    kernel = params["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp")
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (8, 128)
    for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)


def test_full_state_restores_onto_another_mesh(uninterrupted):
    model_dir, reference = uninterrupted
    t = trainer.Trainer(tiny_llama(vocab_size=512), partitioning.Partitioner({"fsdp": 2, "model": 4}, "fsdp_tp"),
                        optimizers.OptimizerConfig(warmup_steps=2), STEPS, 8, FEATURES)
    state, _, step = checkpoints.Checkpointer(str(model_dir)).restore_latest(t.abstract_state, t.state_shardings)
    assert step == STEPS
    assert state.params["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec("fsdp", "model")
    np.testing.assert_array_equal(jax.device_get(state.params["lm_head"]["kernel"]), reference["lm_head"]["kernel"])
    state, _ = t.train_step(state, lm_batch(8, 16))  # the restored optimizer state is usable as is
    assert int(state.step) == STEPS + 1


def _abstract(model):
    t = trainer.Trainer(model, partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1]),
                        optimizers.OptimizerConfig(), 10, 8, FEATURES)
    return t


def test_shape_mismatch_lists_each_parameter_with_both_shapes(uninterrupted):
    model_dir, _ = uninterrupted
    t = _abstract(tiny_llama(vocab_size=512, mlp_dim=96))
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.restore_params(str(model_dir), t.abstract_state.params, t.state_shardings.params)
    message = str(err.value)
    for name, shape in [("gate_proj", "(64, 128)"), ("up_proj", "(64, 128)"), ("down_proj", "(128, 64)")]:
        assert f"layers_0/mlp/{name}/kernel: checkpoint 'layers_0/mlp/{name}/kernel' has shape {shape}" in message
    assert "model expects (64, 96)" in message and "model expects (96, 64)" in message


def test_assignment_map_and_init_missing(uninterrupted):
    model_dir, reference = uninterrupted
    t = _abstract(tiny_llama(vocab_size=512, num_layers=2))
    rules = [(r"^layers_0/", "layers_1/")]  # the checkpoint's only layer becomes the model's second
    with pytest.raises(checkpoints.CheckpointError, match="missing in checkpoint: layers_0/mlp/down_proj/kernel"):
        checkpoints.restore_params(str(model_dir), t.abstract_state.params, t.state_shardings.params,
                                   assignment_map=rules)
    fresh = t.init_state().params
    params = checkpoints.restore_params(str(model_dir), t.abstract_state.params, t.state_shardings.params,
                                        assignment_map=rules, init_missing=lambda: fresh)
    np.testing.assert_array_equal(params["layers_1"]["mlp"]["up_proj"]["kernel"],
                                  reference["layers_0"]["mlp"]["up_proj"]["kernel"])
    np.testing.assert_array_equal(params["layers_0"]["mlp"]["up_proj"]["kernel"],
                                  fresh["layers_0"]["mlp"]["up_proj"]["kernel"])


def test_dtype_cast_on_restore(uninterrupted):
    model_dir, reference = uninterrupted
    t = _abstract(tiny_llama(vocab_size=512, param_dtype="bfloat16"))
    params = checkpoints.restore_params(str(model_dir), t.abstract_state.params, t.state_shardings.params)
    assert params["lm_head"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]),
                                  reference["lm_head"]["kernel"].astype(jnp.bfloat16))


def test_fine_tuning_starts_from_checkpoint_params_with_fresh_step(uninterrupted, tmp_path):
    model_dir, reference = uninterrupted
    trained, state = _run(tmp_path, steps=1, initial_checkpoint_path=str(model_dir))
    assert int(state.step) == 1
    # One step away from the checkpoint, far from a fresh init.
    moved = np.abs(np.asarray(state.params["lm_head"]["kernel"]) - reference["lm_head"]["kernel"]).max()
    fresh = trained.init_state().params["lm_head"]["kernel"]
    assert moved < 0.1 * np.abs(np.asarray(fresh) - reference["lm_head"]["kernel"]).max()


def test_inspect_lists_steps_and_shapes(uninterrupted, capsys):
    model_dir, _ = uninterrupted
    assert checkpoints.main(["inspect", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "steps [2, 4, 6]" in out and "layers_0/self_attn/k_proj/kernel" in out and "(64, 2, 16)" in out
    assert checkpoints.main(["inspect", str(model_dir / "nothing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_checkpoint_stores_gin_config(tmp_path):
    _run(tmp_path, steps=2, config_str="TRAIN_STEPS = 2\n")
    assert checkpoints.read_config(str(tmp_path)) == "TRAIN_STEPS = 2\n"
