"""LoRA through qwix: frozen base, merged logits, adapter-only checkpoints from the lora.gin CLI recipe."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmops_jax import checkpoints, partitioning
from lmops_jax.training import optimizers
from lmops_jax.training import trainer
from lmops_jax.peft import lora
from tests.helpers import lm_batch, model_gin, tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = r".*/(q_proj|v_proj|down_proj)"


def _lora(**kw):
    return lora.LoraModel(tiny_llama(), rank=4, alpha=8.0, targets=TARGETS, **kw)


def _params(model, seed=0):
    return nn.meta.unbox(model.init_params(jax.random.key(seed), model.input_shapes(1, {"targets": 16})))


def test_only_adapters_train_and_merged_logits_match():
    model = _lora()
    p = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
    t = trainer.Trainer(model, p, optimizers.OptimizerConfig(learning_rate=1e-2, warmup_steps=0), 10, 8,
                        {"targets": 16})
    state = t.init_state()
    before = jax.device_get(state.params)
    for _ in range(2):
        state, _ = t.train_step(state, lm_batch(8, 16))
    after = jax.device_get(state.params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(after)[0], jax.tree.leaves(before)):
        name = optimizers.param_path(path)
        if lora.is_adapter(name.split("/")[-1]):
            assert not np.array_equal(a, b), name  # B moves at step 1, then A (B was zero)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    # 3 adapted kernels, rank 4: q [64 -> 64], v [64 -> 32], down [128 -> 64].
    assert t.optimizer.trainable_count(after) == 4 * ((64 + 64) + (64 + 32) + (128 + 64))
    batch = {k: jnp.asarray(v) for k, v in lm_batch(2, 16).items()}
    merged = model.merge(after)
    assert jax.tree.structure(merged) == jax.tree.structure(lora.base_params(after))
    np.testing.assert_allclose(model.compute_logits(after, batch), model.base.compute_logits(merged, batch),
                               atol=2e-5)
    assert not np.allclose(model.base.compute_logits(lora.base_params(after), batch),
                           model.compute_logits(after, batch), atol=1e-4)


def test_dropout_only_with_a_key_and_bad_targets_are_named():
    model = _lora(dropout=0.5)
    params = _params(model)
    batch = {k: jnp.asarray(v) for k, v in lm_batch(2, 16).items()}
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones_like(x) if "lora_b" in jax.tree_util.keystr(path) else x, params)
    np.testing.assert_array_equal(model.compute_logits(params, batch), model.compute_logits(params, batch))
    assert not np.allclose(model.compute_logits(params, batch, jax.random.key(1)), model.compute_logits(params, batch))
    with pytest.raises(ValueError, match="LORA_TARGETS 'nothing' matches no module"):
        _params(lora.LoraModel(tiny_llama(), targets="nothing"))


def test_lora_recipe_cli_saves_adapters_only_resumes_and_merges(tmp_path):
    base_model = tiny_llama(vocab_size=512)
    base = jax.device_get(_params(base_model, seed=3))
    base_dir = str(tmp_path / "base")
    checkpoints.save_params(base_dir, base, model_gin(base_model))
    run = tmp_path / "lora"
    cmd = [sys.executable, "-m", "lmops_jax.train", "--gin_file=gin_configs/models/llama_tiny.gin",
           "--gin_file=gin_configs/runs/lora.gin", f"--gin.MODEL_DIR='{run}'", f"--gin.INITIAL_CHECKPOINT_PATH='{base_dir}'",
           "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}", "--gin.EVAL_STEPS=1",
           "--gin.LOG_PERIOD=1", "--gin.WARMUP_STEPS=0", "--gin.decoder_only.LlamaConfig.num_layers=1",
           "--gin.decoder_only.LlamaConfig.d_model=64", "--gin.decoder_only.LlamaConfig.mlp_dim=128",
           f"--gin.LORA_TARGETS='{TARGETS}'", "--gin.LORA_RANK=4", "--gin.LORA_ALPHA=8.0"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parameters (1,664 trainable)" in proc.stdout
    saved = checkpoints.checkpoint_param_shapes(str(run))
    assert saved and all(lora.is_adapter(name.split("/")[-1]) for name in saved), sorted(saved)
    # Resume (Python API) for one more step: base from INITIAL_CHECKPOINT_PATH, adapters from the run.
    from lmops_jax.training import train as train_lib
    model = lora.LoraModel(base_model, rank=4, alpha=8.0, targets=TARGETS)
    restored_adapters = checkpoints.restore_params(
        str(run), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora.adapter_params(_params(model))),
        jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), lora.adapter_params(_params(model))))
    tr, state = train_lib.train(
        model=model, model_dir=str(run), train_steps=3, mixture_or_task_name="synthetic_lm",
        task_feature_lengths={"targets": 16}, batch_size=8, initial_checkpoint_path=base_dir, init_missing_params=True,
        partitioner=partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1]),
        optimizer=optimizers.OptimizerConfig(learning_rate=1e-3, warmup_steps=0), eval_steps=1, peak_flops=1e12,
        config_str=(run / "config.gin").read_text())
    assert int(state.step) == 3
    final = jax.device_get(state.params)
    for a, b in zip(jax.tree.leaves(lora.base_params(final)), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora.adapter_params(final)),
                                                         jax.tree.leaves(jax.device_get(restored_adapters))))
    # Merge the CLI run's adapters (step 3 now) into a plain checkpoint of the base model, as a user runs it.
    out = tmp_path / "merged"
    merge = subprocess.run([sys.executable, "-m", "lmops_jax.peft.lora", "merge", str(run), str(out)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
    assert merge.returncode == 0, merge.stdout[-3000:] + merge.stderr[-3000:]
    merged = checkpoints.restore_params(
        str(out), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base),
        jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), base))
    expected = model.merge(final)
    for a, b in zip(jax.tree.leaves(jax.device_get(merged)), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert "MODEL = @model.DecoderOnlyModel()" in checkpoints.read_config(str(out))


def test_t5_adapters_on_encoder_and_decoder_merge_to_the_same_logits():
    from lmops_jax.models import encoder_decoder, model as model_lib
    base = model_lib.EncoderDecoderModel(encoder_decoder.T5Config(
        vocab_size=64, d_model=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=2, head_dim=16, mlp_dim=64))
    adapted = lora.LoraModel(base, rank=2, alpha=4.0, targets=r"(encoder|decoder)/.*/(q_proj|v_proj|up_proj)")
    shapes = adapted.input_shapes(1, {"inputs": 8, "targets": 8})
    params = nn.meta.unbox(adapted.init_params(jax.random.key(0), shapes))
    names = [optimizers.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(lora.adapter_params(params))[0]]
    assert any(n.startswith("encoder/") for n in names) and any(n.startswith("decoder/") for n in names), names
    params = jax.tree_util.tree_map_with_path(  # B starts at zero; make the adapters matter
        lambda path, x: jnp.full_like(x, 0.1) if "lora_b" in jax.tree_util.keystr(path) else x, params)
    rng = np.random.default_rng(0)
    batch = {"encoder_input_tokens": jnp.asarray(rng.integers(1, 64, (2, 8)), jnp.int32),
             "decoder_input_tokens": jnp.asarray(rng.integers(1, 64, (2, 8)), jnp.int32),
             "decoder_target_tokens": jnp.asarray(rng.integers(1, 64, (2, 8)), jnp.int32),
             "decoder_loss_weights": jnp.ones((2, 8), jnp.int32)}
    adapted_logits = adapted.compute_logits(params, batch)
    np.testing.assert_allclose(adapted_logits, base.compute_logits(adapted.merge(params), batch), atol=2e-5)
    assert not np.allclose(adapted_logits, base.compute_logits(lora.base_params(params), batch), atol=1e-3)
