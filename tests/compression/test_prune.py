"""Pruning (lmops_jax.compression.prune, importance, prune_job): magnitude and 2:4 masks, width and depth
cuts that keep the function when the cut units were zero, pruned checkpoints that load everywhere and
start a run with overridden sizes, the command's JSON line, and bad inputs that write nothing."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from lmops_jax import checkpoints, convert
from lmops_jax.compression import importance, prune as prune_lib, prune_job
from lmops_jax.compression.quantize import DataConfig
from lmops_jax.inference.inference_module import InferenceModule
from lmops_jax.models import loading, spec
from lmops_jax.models.quantized import QuantizedModel, QuantRule
from lmops_jax.serving import serve as serve_lib
from lmops_jax.training import train as train_lib
from tests.helpers import lm_batch, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL_DATA = DataConfig(task_feature_lengths={"targets": 16}, batch_size=2, calibration_batches=1, eval_batches=1)


def _init(model, seed=0):
    """Writable host params of `model`."""
    boxed = model.init_params(jax.random.key(seed), model.input_shapes(1, {"targets": 8}))
    return jax.tree.map(np.array, jax.device_get(nn.unbox(boxed)))


def _save(model, params, path):
    record = spec.ModelSpec(model, spec.VocabularySpec("byte")).to_json()
    checkpoints.save_params(str(path), params, "", model_spec=record)
    return str(path)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """A tiny Llama on the byte vocabulary: 2 layers, 4 heads over 2 KV heads, MLP 128."""
    model = tiny_llama(vocab_size=512, num_layers=2)
    return model, _save(model, _init(model), tmp_path_factory.mktemp("llama"))


def test_magnitude_pruning_zeros_the_smallest_fraction_of_each_kernel():
    params = _init(tiny_llama())
    pruned = prune_lib.sparsify(params, "magnitude", prune_lib.DEFAULT_KERNELS, 0.3)
    sparsity = prune_lib.sparsity_by_module(pruned, prune_lib.DEFAULT_KERNELS)
    assert len(sparsity) == 7 and all(abs(s - 0.3) < 1e-3 for s in sparsity.values())
    before, after = checkpoints.flatten(params), checkpoints.flatten(pruned)
    for name in sparsity:
        w, kept = np.abs(before[name]), after[name] != 0
        assert w[~kept].max() <= w[kept].min()
    np.testing.assert_array_equal(after["embed_tokens/embedding"], before["embed_tokens/embedding"])


def test_two_four_pruning_keeps_the_two_largest_of_every_four_inputs():
    params = _init(tiny_llama())
    pruned = checkpoints.flatten(prune_lib.sparsify(params, "2:4", prune_lib.DEFAULT_KERNELS, None))
    before = checkpoints.flatten(params)
    for name, inputs in (("layers_0/self_attn/q_proj/kernel", 64), ("layers_0/self_attn/o_proj/kernel", 64),
                         ("layers_0/mlp/down_proj/kernel", 128)):
        groups = pruned[name].reshape(inputs // 4, 4, -1)  # o_proj [H, Dh, D] contracts H * Dh
        assert np.all(np.count_nonzero(groups, axis=1) == 2)
        original = np.abs(before[name].reshape(inputs // 4, 4, -1))
        dropped = np.where(groups == 0, original, 0).max(axis=1)
        assert np.all(dropped <= np.where(groups != 0, original, np.inf).min(axis=1))


def test_width_pruning_equals_the_original_when_the_pruned_units_were_zero():
    model = tiny_llama(num_layers=2, mlp_dim=128)
    flat = checkpoints.flatten(_init(model))
    for i in range(2):  # KV group 0 (query heads 0, 1 and KV head 0) and the odd MLP channels do nothing
        for proj in ("q_proj", "k_proj", "v_proj"):
            flat[f"layers_{i}/self_attn/{proj}/kernel"][:, 0] = 0
        flat[f"layers_{i}/self_attn/q_proj/kernel"][:, 1] = 0
        for proj in ("gate_proj", "up_proj"):
            flat[f"layers_{i}/mlp/{proj}/kernel"][:, 1::2] = 0
    params = checkpoints.unflatten(flat)
    batch = lm_batch(2, 16)
    scores = importance.measure(model, params, [batch])
    small, pruned, kept = prune_lib.prune_width(model, params, scores, num_heads=2, mlp_dim=64)
    cfg = small.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (2, 1, 16, 64)
    assert kept == {"kv_groups": [[1], [1]]}
    assert jax.tree.map(np.shape, pruned) == jax.tree.map(np.shape, _init(small))
    np.testing.assert_allclose(small.compute_logits(pruned, batch), model.compute_logits(params, batch), atol=1e-5)


def test_depth_pruning_drops_the_layer_that_leaves_the_residual_unchanged():
    model = tiny_llama(num_layers=3)
    flat = checkpoints.flatten(_init(model))
    flat["layers_1/self_attn/o_proj/kernel"][:] = 0
    flat["layers_1/mlp/down_proj/kernel"][:] = 0
    params = checkpoints.unflatten(flat)
    batch = lm_batch(2, 16)
    small, pruned, kept = prune_lib.prune_depth(model, params, importance.measure(model, params, [batch]), 2)
    assert kept == {"layers": [0, 2]} and small.config.num_layers == 2 and sorted(pruned)[-1] == "norm"
    np.testing.assert_array_equal(pruned["layers_1"]["mlp"]["up_proj"]["kernel"],
                                  params["layers_2"]["mlp"]["up_proj"]["kernel"])
    np.testing.assert_allclose(small.compute_logits(pruned, batch), model.compute_logits(params, batch), atol=1e-5)


def _prune_cli(*flags):
    return subprocess.run([sys.executable, "-m", "lmops_jax.compress", "prune", "--gin_file=gin_configs/runs/prune.gin",
                           "--gin.BATCH_SIZE=2", "--gin.EVAL_BATCHES=1", "--gin.CALIBRATION_BATCHES=1",
                           "--gin.TASK_FEATURE_LENGTHS={'targets': 16}", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_width_pruned_checkpoint_loads_everywhere_and_starts_a_run_with_overridden_sizes(llama_checkpoint, tmp_path):
    model, path = llama_checkpoint
    out = str(tmp_path / "width")
    proc = _prune_cli(f"--gin.CHECKPOINT_PATH='{path}'", f"--gin.OUTPUT_DIR='{out}'", "--gin.PRUNE_METHOD='width'",
                      "--gin.PRUNE_NUM_HEADS=2", "--gin.PRUNE_MLP_DIM=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["method"] == "width" and summary["params_after"] < summary["params_before"]
    assert summary["bytes_after"] < summary["bytes_before"] and summary["eval_loss_after"] > 0
    assert summary["config"] == {"num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16, "mlp_dim": 64}
    small = loading.model_from_checkpoint(out)
    assert small.config == model.config.__class__(**{**model.config.__dict__, **summary["config"]})
    module = InferenceModule.from_checkpoint(out)
    assert len(module.generate([[5, 6, 7]], max_new_tokens=4).tokens[0]) == 4
    convert.export_hf(out, str(tmp_path / "hf"))
    assert json.load(open(tmp_path / "hf" / "config.json"))["num_key_value_heads"] == 1

    run = tmp_path / "ft"
    flags = ["--gin.decoder_only.LlamaConfig.vocab_size=512", "--gin.decoder_only.LlamaConfig.d_model=64",
             "--gin.decoder_only.LlamaConfig.num_layers=2", *summary["gin_overrides"]]
    try:
        assert train_lib.main([
            "--gin_file=gin_configs/models/llama_tiny.gin", "--gin_file=gin_configs/runs/finetune.gin",
            f"--gin.MODEL_DIR='{run}'", f"--gin.INITIAL_CHECKPOINT_PATH='{out}'", "--gin.TRAIN_STEPS=1",
            "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}", "--gin.EVAL_STEPS=1",
            "--gin.WARMUP_STEPS=0", *flags]) == 0
    finally:
        gin.clear_config()
    assert loading.model_from_checkpoint(str(run)) == small
    partitioner = loading.default_partitioner()
    start, end = (jax.device_get(loading.restore_params(p, small, partitioner)) for p in (out, str(run)))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(end)))
    assert 0 < moved < 0.05  # one step from the pruned weights, not a fresh init


def test_a_depth_pruned_checkpoint_loads_in_the_server_and_converts(llama_checkpoint, tmp_path):
    model, path = llama_checkpoint
    out = str(tmp_path / "depth")
    summary = prune_job.prune(checkpoint_path=path, output_dir=out, method="depth", num_layers=1, data=SMALL_DATA)
    assert summary["kept"]["layers"] in ([0], [1]) and summary["gin_overrides"] == [
        "--gin.decoder_only.LlamaConfig.num_layers=1"]
    expected = InferenceModule.from_checkpoint(out).generate([[5, 6, 7]], max_new_tokens=5).tokens
    server = serve_lib.build_server(out, max_slots=2, max_queue=4, max_length=32, prefix_cache=False,
                                    prefill_chunk=None, request_timeout_s=None, dtype=None, mesh_shape=None,
                                    logical_axis_rules="tp", model_name=None)
    handle = server.scheduler.submit([0, 5, 6, 7], serve_lib.SamplingParams(max_tokens=5, temperature=0.0))
    while server.scheduler.step():
        pass
    assert list(handle.result(timeout=0)[0]) == list(expected[0])
    convert.export_hf(out, str(tmp_path / "hf"))
    assert json.load(open(tmp_path / "hf" / "config.json"))["num_hidden_layers"] == 1


def test_masking_methods_report_sparsity_per_module(llama_checkpoint, tmp_path):
    _, path = llama_checkpoint
    summary = prune_job.prune(checkpoint_path=path, output_dir=str(tmp_path / "m"), method="magnitude",
                              sparsity=0.25, kernels="mlp/.*_proj/kernel$", data=SMALL_DATA)
    assert sorted(summary["sparsity_per_module"]) == [f"layers_{i}/mlp/{p}_proj/kernel" for i in range(2)
                                                      for p in ("down", "gate", "up")]
    assert summary["sparsity"] == pytest.approx(0.25, abs=1e-3) and summary["params_after"] == summary["params_before"]
    assert summary["nonzero_params_after"] < summary["params_before"]


@pytest.mark.parametrize("overrides, message", [
    ({"method": "prune_everything"}, "unknown PRUNE_METHOD"),
    ({"method": "magnitude", "sparsity": 0.0}, "PRUNE_SPARSITY in (0, 1)"),
    ({"method": "magnitude", "sparsity": 1.0}, "PRUNE_SPARSITY in (0, 1)"),
    ({"method": "width", "num_heads": 8}, "PRUNE_NUM_HEADS=8: the model has 4"),
    ({"method": "width", "num_heads": 3}, "a multiple of 2 (whole key-value groups)"),
    ({"method": "width", "mlp_dim": 0}, "PRUNE_MLP_DIM=0"),
    ({"method": "depth", "num_layers": 3}, "PRUNE_NUM_LAYERS=3: the model has 2"),
    ({"method": "depth", "num_heads": 2}, "does not use PRUNE_NUM_HEADS"),
    ({"method": "magnitude", "sparsity": 0.5, "kernels": "nothing_here"}, "matches no parameter"),
])
def test_bad_requests_are_refused_and_write_nothing(llama_checkpoint, tmp_path, overrides, message):
    _, path = llama_checkpoint
    out = tmp_path / "out"
    with pytest.raises(prune_lib.PruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prune_job.prune(**{"checkpoint_path": path, "output_dir": str(out), "data": SMALL_DATA, **overrides})
    assert not out.exists()


def test_a_quantized_checkpoint_is_refused_by_the_command(tmp_path):
    model = tiny_llama(vocab_size=512)
    qmodel = QuantizedModel(model, (QuantRule(r".*_proj", "int8"),))
    path = _save(qmodel, jax.device_get(qmodel.quantize(jax.tree.map(jax.numpy.asarray, _init(model)))), tmp_path / "q")
    out = tmp_path / "out"
    proc = _prune_cli(f"--gin.CHECKPOINT_PATH='{path}'", f"--gin.OUTPUT_DIR='{out}'", "--gin.PRUNE_METHOD='2:4'")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint")
    assert "is quantized" in proc.stderr and not out.exists()
