"""DistillationTrainer: frozen teacher, KD loss limits, vocabulary check, CLI recipe."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import flax.linen as nn
import jax.numpy as jnp
import optax

from lmops_jax import checkpoints, losses, partitioning
from lmops_jax.distillation import topk_store as distillation_store
from lmops_jax.distillation import trainer as distillation
from lmops_jax.losses import vocab_parallel
from lmops_jax.training import optimizers, trainer
from tests.helpers import lm_batch, model_gin, tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    teacher = tiny_llama(vocab_size=512, num_layers=2)
    params = jax.device_get(jax.tree.map(lambda x: x.value, teacher.init_params(
        jax.random.key(7), teacher.input_shapes(1, {"targets": 16})), is_leaf=lambda x: hasattr(x, "names")))
    checkpoints.save_params(str(path), params, model_gin(teacher))
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
    # The loss has no gradient with respect to the teacher's params (stop_gradient on its forward).
    batch = jax.tree.map(jax.numpy.asarray, _batch())
    teacher_grads = jax.grad(lambda tp: t.loss_fn(state.params, batch, None, 1.0, tp, 0)[0])(t.teacher_params)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(teacher_grads))
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


def _in_memory_student(mesh, rules, devices=None, **kw):
    teacher = tiny_llama(vocab_size=512, num_layers=2)
    params = nn.meta.unbox(teacher.init_params(jax.random.key(7), teacher.input_shapes(1, {"targets": 16})))
    p = partitioning.Partitioner(mesh, rules, devices=devices)
    # SGD at rate 1: a step moves params by the (clipped) gradient, so comparing steps compares gradients.
    # Adam's first step, g / (|g| + eps), turns rounding in near-zero gradients into lr-sized differences.
    sgd = optimizers.OptimizerConfig(name="sgd", learning_rate=1.0, warmup_steps=0)
    return distillation.DistillationTrainer(
        tiny_llama(vocab_size=512), p, sgd, 10, 8, {"targets": 16},
        teacher_model=teacher, teacher_params=jax.device_get(params), **{"kd_alpha": 0.6, "kd_temperature": 2.0, **kw})


def _assert_same_step(a, b, rtol=1e-5, atol=2e-6):
    (state_a, metrics_a), (state_b, metrics_b) = a, b
    for key in metrics_a:
        np.testing.assert_allclose(float(metrics_a[key]), float(metrics_b[key]), rtol=rtol, err_msg=key)
    for x, y in zip(jax.tree.leaves(jax.device_get(state_a.params)), jax.tree.leaves(jax.device_get(state_b.params))):
        np.testing.assert_allclose(x, y, atol=atol)


@pytest.fixture(scope="module")
def single_device_distill_step():
    t = _in_memory_student({"data": 1}, "dp", jax.devices()[:1])
    return t.train_step(t.init_state(), _batch())


def test_vocab_parallel_step_equals_unsharded(single_device_distill_step):
    t = _in_memory_student({"data": 2, "model": 4}, "tp")
    assert t.token_losses == vocab_parallel.VocabParallelTokenLosses(t.partitioner.mesh, "model", ("data", "fsdp"))
    batch = {k: jax.device_put(v, t.batch_sharding) for k, v in _batch().items()}
    with t.partitioner.context():
        hlo = t._jit_train_step.lower(t.init_state(), batch, t.teacher_params).compile().as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather" in line and "512]" in line]
    assert not gathers, gathers[:3]  # full-vocabulary logits are never gathered
    _assert_same_step(t.train_step(t.init_state(), batch), single_device_distill_step)


def test_gradient_accumulation_matches_the_large_batch(single_device_distill_step):
    t = _in_memory_student({"data": 1}, "dp", jax.devices()[:1], num_microbatches=2)
    _assert_same_step(t.train_step(t.init_state(), _batch()), single_device_distill_step)


@pytest.mark.parametrize("mesh,rules", [({"data": 1}, "dp"), ({"data": 2, "model": 4}, "tp")])
def test_trainer_loss_is_losses_kd_loss(mesh, rules):
    """What trains is what test_losses checks: the trainer's KD term over a batch equals losses.kd_loss on
    the same logits (plain and vocabulary-parallel); alpha and T follow their schedules; z-loss stays
    outside the alpha mix."""
    schedules = dict(kd_alpha=optax.linear_schedule(1.0, 0.0, 10), kd_temperature=optax.linear_schedule(4.0, 1.0, 10))
    t = _in_memory_student(mesh, rules, jax.devices()[:1] if rules == "dp" else None, kd_loss="jsd", kd_beta=0.3,
                           **schedules)
    assert isinstance(t.token_losses, vocab_parallel.VocabParallelTokenLosses) == (rules == "tp")
    state = t.init_state()
    batch = {k: jax.device_put(v, t.batch_sharding) for k, v in _batch().items()}
    with t.partitioner.context():
        _, sums = jax.jit(t.loss_fn)(state.params, batch, None, 1.0, t.teacher_params, 5)  # alpha 0.5, T 2.5
        student = jax.jit(t.model.compute_logits)(state.params, batch)
        teacher = jax.jit(t.teacher_model.compute_logits)(t.teacher_params, batch)
    weights, targets = batch["decoder_loss_weights"], batch["decoder_target_tokens"]
    kd = losses.kd_loss(student, teacher, weights, kind="jsd", temperature=2.5, beta=0.3)
    np.testing.assert_allclose(sums["kd_loss_sum"] / sums["weight_sum"], kd, rtol=1e-5)
    ce_and_z, z = losses.cross_entropy_with_logits(student, targets, z_loss=t.model.z_loss,
                                                   label_smoothing=t.model.label_smoothing)
    np.testing.assert_allclose(sums["ce_loss_sum"], jnp.sum((ce_and_z - z) * weights), rtol=1e-5)
    np.testing.assert_allclose(sums["loss_sum"], 0.5 * sums["kd_loss_sum"] + 0.5 * sums["ce_loss_sum"]
                               + sums["z_loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(sums["teacher_agreement_sum"],
                               jnp.sum((student.argmax(-1) == teacher.argmax(-1)) * weights), rtol=1e-6)


def test_on_policy_step_samples_from_the_student():
    t = _in_memory_student({"data": 1}, "dp", jax.devices()[:1], gkd_lambda=1.0, gkd_prompt_length=4)
    state, metrics = t.train_step(t.init_state(), _batch())
    assert float(metrics["on_policy"]) == 1.0
    assert float(metrics["weight_sum"]) == 8 * 12  # the sampled tokens only
    assert np.isfinite(float(metrics["loss_sum"])) and float(metrics["loss_sum"]) == pytest.approx(
        float(metrics["kd_loss_sum"]) + float(metrics["z_loss_sum"]), rel=1e-5)  # KD only on sampled rows
    # The sampler (the model's decode API over the KV cache) and a full-recompute sampler draw the same
    # tokens from the same key.
    batch = jax.tree.map(jnp.asarray, _batch())
    kw = dict(prompt_length=4, temperature=1.0, eos_id=-1)
    cached = distillation.sample_from_student(t.model, state.params, batch, jax.random.key(3), **kw)
    full = _recompute_sampler(t.model, state.params, batch, jax.random.key(3), **kw)
    np.testing.assert_array_equal(cached["decoder_target_tokens"][:, 4:], full)
    np.testing.assert_array_equal(cached["decoder_target_tokens"][:, :4], batch["decoder_target_tokens"][:, :4])
    np.testing.assert_array_equal(cached["decoder_input_tokens"][:, 1:], cached["decoder_target_tokens"][:, :-1])
    # A LoRA student samples with its adapters, as its merged base model does.
    from lmops_jax.peft import lora
    adapted = lora.LoraModel(t.model, rank=2, alpha=4.0, targets=r".*/(q_proj|v_proj)")
    params = nn.meta.unbox(adapted.init_params(jax.random.key(5), adapted.input_shapes(1, {"targets": 16})))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, 0.3) if "lora_b" in jax.tree_util.keystr(path) else x, params)
    lora_sampled = distillation.sample_from_student(adapted, params, batch, jax.random.key(3), **kw)
    merged = distillation.sample_from_student(t.model, adapted.merge(params), batch, jax.random.key(3), **kw)
    base = distillation.sample_from_student(t.model, lora.base_params(params), batch, jax.random.key(3), **kw)
    np.testing.assert_array_equal(lora_sampled["decoder_target_tokens"], merged["decoder_target_tokens"])
    assert not np.array_equal(lora_sampled["decoder_target_tokens"], base["decoder_target_tokens"])


def _recompute_sampler(model, params, batch, rng, *, prompt_length, temperature, eos_id):
    """Reference for `sample_from_student`: each token recomputes the full forward pass over the row."""
    from lmops_jax.inference import decoding
    targets = batch["decoder_target_tokens"]

    def logits_at(buffer, index):
        inputs = jnp.pad(buffer, ((0, 0), (1, 0)))[:, :-1]
        logits = model.compute_logits(params, {"decoder_input_tokens": inputs})
        return jax.lax.dynamic_index_in_dim(logits, index, 1, keepdims=False)

    def step(tokens, state):
        buffer, index = state
        buffer = jax.lax.dynamic_update_index_in_dim(buffer, tokens.astype(buffer.dtype), index, 1)
        return logits_at(buffer, index + 1), (buffer, index + 1)

    buffer = targets.at[:, prompt_length:].set(0)
    out = decoding.generate(logits_at(buffer, prompt_length), (buffer, jnp.asarray(prompt_length)), step,
                            max_new_tokens=targets.shape[1] - prompt_length, eos_id=eos_id, method="sample", rng=rng,
                            temperature=temperature)
    return out.tokens


def test_offline_topk_with_full_vocabulary_equals_online_teacher(teacher_dir, tmp_path, caplog):
    from lmops_jax.training import train as train_lib  # noqa: F401  registers the tasks through the data pipeline
    from lmops_jax.data import pipeline
    import seqio
    p = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
    store_dir = str(tmp_path / "topk")
    caplog.set_level("INFO", logger="lmops_jax")
    distillation_store.dump_teacher_topk(
        teacher_checkpoint=teacher_dir[0], output_dir=store_dir, mixture_or_task_name="synthetic_lm",
        task_feature_lengths={"targets": 16}, batch_size=8, num_batches=2, k=512, partitioner=p, shard_size=1)
    assert caplog.messages[-1] == (f"outputs in {store_dir}: meta.json, logprobs-*.npy, ids-*.npy, "
                                   "target_logprob-*.npy, targets-*.npy (2 shards; the teacher's top-512 log-probs "
                                   "of 2 batches)")
    ds = pipeline.get_dataset("synthetic_lm", {"targets": 16}, seqio.DecoderFeatureConverter(pack=True),
                              global_batch_size=8, seed=0)
    batches = pipeline.GlobalBatchIterator(lambda: ds, p.data_sharding())

    def student(steps=2, **kw):
        return distillation.DistillationTrainer(
            tiny_llama(vocab_size=512), p, optimizers.OptimizerConfig(warmup_steps=0), steps, 8, {"targets": 16},
            teacher_checkpoint=teacher_dir[0], kd_alpha=0.5, kd_temperature=2.0, **kw)

    offline = student(topk_dir=store_dir)
    offline.check_data("synthetic_lm", {"targets": 16})
    online = student()
    wrapped = distillation_store.TopKBatches(batches, offline.store, offline.batch_sharding)
    first = next(wrapped)
    assert first[distillation_store.TOPK_IDS].shape == (8, 16, 512)
    plain = {k: v for k, v in first.items() if not k.startswith("teacher_")}
    _assert_same_step(offline.train_step(offline.init_state(), first), online.train_step(online.init_state(), plain),
                      rtol=2e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not match the training data"):
        offline.store.attach(1, plain, offline.batch_sharding)
    with pytest.raises(ValueError, match="dumped with seed=0, this run has seed=5"):
        student(topk_dir=store_dir, seed=5).check_data("synthetic_lm", {"targets": 16})
    with pytest.raises(ValueError, match="holds 2 batches, fewer than the run's 10 steps"):
        student(10, topk_dir=store_dir)
    with pytest.raises(ValueError, match="supports KD_LOSS='forward_kl' only"):
        student(topk_dir=store_dir, kd_loss="jsd")
