"""QLoRA: LoRA (qlora.gin) on a quantized base checkpoint trains float adapters over frozen int weights,
resumes, and merges only when asked to re-quantize."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np

from lmops_jax import checkpoints
from lmops_jax.inference.inference_module import InferenceModule
from lmops_jax.models import loading, spec
from lmops_jax.models.quantized import QuantizedModel, QuantRule
from lmops_jax.peft import lora
from tests.helpers import tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = r".*/(q_proj|v_proj|down_proj)"
SMALL = ["--gin.decoder_only.LlamaConfig.num_layers=1", "--gin.decoder_only.LlamaConfig.d_model=64",
         "--gin.decoder_only.LlamaConfig.mlp_dim=128"]


def _run(args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_qlora_trains_resumes_and_merges_only_when_asked_to_requantize(tmp_path):
    base_model = tiny_llama(vocab_size=512)
    qmodel = QuantizedModel(base_model, (QuantRule(".*/mlp/.*", "int4", 16), QuantRule(r".*_proj|lm_head", "int8")))
    float_params = nn.unbox(base_model.init_params(jax.random.key(3), base_model.input_shapes(1, {"targets": 8})))
    qparams = jax.device_get(qmodel.quantize(float_params))
    base_dir = str(tmp_path / "base_int8")
    checkpoints.save_params(base_dir, qparams, "", model_spec=spec.ModelSpec(qmodel, spec.VocabularySpec("byte")).to_json())

    run = tmp_path / "qlora"
    train = ["lmops_jax.train", "--gin_file=gin_configs/models/llama_tiny.gin", "--gin_file=gin_configs/runs/qlora.gin",
             f"--gin.MODEL_DIR='{run}'", f"--gin.INITIAL_CHECKPOINT_PATH='{base_dir}'", "--gin.BATCH_SIZE=8",
             "--gin.TASK_FEATURE_LENGTHS={'targets': 16}", "--gin.EVAL_STEPS=1", "--gin.WARMUP_STEPS=0",
             f"--gin.LORA_TARGETS='{TARGETS}'", "--gin.LORA_RANK=4", "--gin.LORA_ALPHA=8.0", *SMALL]
    first = _run(train + ["--gin.TRAIN_STEPS=2"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "parameters (1,664 trainable)" in first.stdout
    run_model = loading.read_spec(str(run)).model
    assert isinstance(run_model, lora.LoraModel) and run_model.base == qmodel
    saved = checkpoints.checkpoint_param_shapes(str(run))
    assert saved and all(lora.is_adapter(name.split("/")[-1]) for name in saved), sorted(saved)
    resumed = _run(train + ["--gin.TRAIN_STEPS=3"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout
    assert checkpoints.checkpoint_param_shapes(str(run)) == saved

    refused = _run(["lmops_jax.peft.lora", "merge", str(run), str(tmp_path / "merged")])
    assert refused.returncode == 2
    assert "error: layers_0/mlp/down_proj/kernel holds quantized (int) weights: float LoRA adapters do not fold " \
           "into them; ask to re-quantize (merge --requantize" in refused.stderr, refused.stderr[-2000:]
    assert not os.path.exists(tmp_path / "merged")
    merged = _run(["lmops_jax.peft.lora", "merge", str(run), str(tmp_path / "merged"), "--requantize"])
    assert merged.returncode == 0, merged.stdout[-3000:] + merged.stderr[-3000:]
    module = InferenceModule.from_checkpoint(str(tmp_path / "merged"))
    assert module.model == qmodel
    # The adapters moved the weights: the re-quantized merge differs from the base it started from.
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(jax.device_get(module.params)), jax.tree.leaves(qparams))]
    assert any(changed)
