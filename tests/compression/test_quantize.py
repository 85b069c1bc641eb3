"""Quantization through qwix (lmops_jax.compression.quantize, models.quantized): closeness to the float
model, checkpoints that round-trip bit for bit and load everywhere, GPTQ / AWQ, and clear errors."""
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from lmops_jax import checkpoints
from lmops_jax.compression import quantize as q
from lmops_jax.inference.inference_module import InferenceModule
from lmops_jax.models import loading, spec
from lmops_jax.models.quantized import QuantizedModel, QuantRule
from tests.helpers import lm_batch, serve_greedy, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL = r".*_proj|lm_head"


@pytest.fixture(scope="module")
def float_model():
    model = tiny_llama(vocab_size=512)
    params = nn.unbox(model.init_params(jax.random.key(0), model.input_shapes(1, {"targets": 8})))
    return model, params


@pytest.fixture(scope="module")
def float_checkpoint(float_model, tmp_path_factory):
    model, params = float_model
    path = str(tmp_path_factory.mktemp("float"))
    checkpoints.save_params(path, jax.device_get(params), "",
                            model_spec=spec.ModelSpec(model, spec.VocabularySpec("byte")).to_json())
    return path


def _save(model, params, path):
    checkpoints.save_params(str(path), jax.device_get(params), "",
                            model_spec=spec.ModelSpec(model, spec.VocabularySpec("byte")).to_json())
    return str(path)


@pytest.mark.parametrize("rule, max_dlogit, min_agreement", [
    (QuantRule(ALL, "int8"), 0.1, 0.95),          # per channel: tight
    (QuantRule(ALL, "w8a8"), 0.2, 0.9),           # + dynamic int8 activations
    (QuantRule(ALL, "int4", tile_size=16), 1.0, 0.6),  # 16 levels: looser
])
def test_quantized_logits_are_close_to_float(float_model, rule, max_dlogit, min_agreement):
    model, params = float_model
    batch = lm_batch(4, 16, vocab=512)
    ref = np.asarray(model.compute_logits(params, batch))
    qmodel = QuantizedModel(model, (rule,))
    out = np.asarray(qmodel.compute_logits(qmodel.quantize(params), batch))
    assert np.max(np.abs(out - ref)) < max_dlogit
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= min_agreement


@pytest.mark.parametrize("method", ["ptq", "awq"])
def test_a_quantized_checkpoint_round_trips_and_loads_everywhere(float_model, tmp_path, method):
    model, params = float_model
    qmodel = QuantizedModel(model, (QuantRule(".*/mlp/.*", "int4", 16), QuantRule(ALL, "int8")), method)
    qparams = nn.unbox(qmodel.init_params(jax.random.key(1), model.input_shapes(1, {"targets": 8})))
    qparams = qmodel.quantize(params) if method == "ptq" else qparams
    path = _save(qmodel, qparams, tmp_path / "q")

    module = InferenceModule.from_checkpoint(path)
    assert module.model == qmodel
    same = jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)),
                        jax.device_get(module.params), jax.device_get(qparams))
    assert jax.tree.structure(same) == jax.tree.structure(qparams) and all(jax.tree.leaves(same))
    expected = InferenceModule(qmodel, qparams).generate([[5, 6, 7]], max_new_tokens=6).tokens
    assert module.generate([[5, 6, 7]], max_new_tokens=6).tokens == expected

    assert serve_greedy(path, [0, 5, 6, 7], 6) == list(expected[0])

    text = checkpoints.inspect(path)
    assert f"quantization: method {method}, rules (first match wins): int4/16 .*/mlp/.*; int8 {ALL}" in text
    bytes_per_param = float(re.search(r"\(([\d.]+) bytes/param", text).group(1))
    assert 1.0 < bytes_per_param < 2.0  # int8/int4 kernels, float32 embeddings and norms


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_run_on_a_tiny_model(float_model, method):
    model, params = float_model
    qmodel = QuantizedModel(model, (QuantRule(".*/mlp/up_proj", "int4", 16),), method)  # qwix's GPTQ loops in Python
    batches = [lm_batch(2, 16, vocab=512, seed=s) for s in range(2)]
    qparams = q.quantize_params(qmodel, params, iter(batches))
    abstract = jax.eval_shape(lambda: nn.unbox(qmodel.init_params(jax.random.key(0), model.input_shapes(1, {"targets": 8}))))
    assert jax.tree.structure(qparams) == jax.tree.structure(abstract)  # what a checkpoint of it restores into
    ptq = q.mean_loss(QuantizedModel(model, qmodel.rules), QuantizedModel(model, qmodel.rules).quantize(params), batches)
    assert abs(q.mean_loss(qmodel, qparams, batches) - ptq) < 0.1


def test_rules_are_checked_against_the_modules(float_model):
    model, params = float_model
    uses = q.module_uses(model, params)
    assert {u.path for u in uses} >= {"layers_0/self_attn/o_proj", "layers_0/mlp/up_proj", "lm_head"}
    with pytest.raises(q.QuantizationError, match=re.escape(
            "does not divide the contraction axis of layers_0/self_attn/o_proj: kernel (4, 16, 64) contracts axes "
            "(0, 1), the innermost of size 16")):
        q.check_rules(q.build_rules("int4", 32, None), uses, "ptq")
    with pytest.raises(q.QuantizationError, match=r"rules \['.*/attn/.*'\] match no module"):
        q.check_rules(q.build_rules("int8", None, [(".*/attn/.*", "int8")]), uses, "ptq")
    with pytest.raises(q.QuantizationError, match="unknown quantization scheme 'int3'"):
        q.build_rules("int3", None, None)
    with pytest.raises(q.QuantizationError, match="QUANT_METHOD must be one of"):
        q.check_rules(q.build_rules("int8", None, None), uses, "gptq4")
    with pytest.raises(q.QuantizationError, match=r"QUANT_RULES\[0\] must be a \(module regex, scheme\) pair"):
        q.build_rules("int8", None, ["lm_head"])
    rules = q.build_rules("int8", 64, [(".*o_proj", "int4/16"), (".*/mlp/.*", "float"), (ALL, "int4")])
    assert rules == (QuantRule(".*o_proj", "int4", 16), QuantRule(".*/mlp/.*", "float"), QuantRule(ALL, "int4", 64))


def test_a_quantized_model_spec_round_trips(float_model):
    model, _ = float_model
    qmodel = QuantizedModel(model, (QuantRule(".*/mlp/.*", "int4", 32), QuantRule(ALL, "w8a8")), "gptq")
    data = json.loads(json.dumps(spec.ModelSpec(qmodel).to_json()))
    assert data["family"] == "quantized" and data["model"]["rules"][0] == {
        "module_path": ".*/mlp/.*", "scheme": "int4", "tile_size": 32}
    assert spec.ModelSpec.from_json(data, "test").model == qmodel
    assert loading.with_dtype(qmodel, "bfloat16").base.config.dtype == "bfloat16"


def _quantize_cli(*flags):
    return subprocess.run([sys.executable, "-m", "lmops_jax.compress", "quantize",
                           "--gin_file=gin_configs/runs/quantize.gin", "--gin.BATCH_SIZE=2", "--gin.EVAL_BATCHES=1",
                           "--gin.CALIBRATION_BATCHES=1", "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_quantize_command_prints_its_json_line_and_refuses_bad_inputs(float_checkpoint, tmp_path):
    out = str(tmp_path / "int8")
    proc = _quantize_cli(f"--gin.CHECKPOINT_PATH='{float_checkpoint}'", f"--gin.OUTPUT_DIR='{out}'",
                         "--gin.QUANT_SCHEME='int8'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["scheme"], summary["method"]) == ("int8", "ptq")
    assert summary["bytes_after"] < summary["bytes_before"] and summary["matmul_bytes_ratio"] < 0.3
    assert abs(summary["eval_loss_change"]) < 0.01
    assert isinstance(loading.read_spec(out).model, QuantizedModel)

    bad = [(["--gin.QUANT_SCHEME='int4'", "--gin.QUANT_TILE_SIZE=32"], "does not divide the contraction axis of "
            "layers_0/self_attn/o_proj: kernel (4, 16, 64)"),
           (["--gin.CHECKPOINT_PATH='%s'" % out], "is already quantized")]
    for flags, message in bad:
        target = str(tmp_path / "bad")
        proc = _quantize_cli(f"--gin.CHECKPOINT_PATH='{float_checkpoint}'", f"--gin.OUTPUT_DIR='{target}'", *flags)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert re.search(r"^error: .*" + re.escape(message), proc.stderr, re.M), proc.stderr[-3000:]
        assert not os.path.exists(target)
