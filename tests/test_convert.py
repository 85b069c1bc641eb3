"""Hugging Face bridge: logits and greedy parity with transformers, exact round trip, refusals."""
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmops_jax import checkpoints, convert, inference  # noqa: E402
from lmops_jax.convert import __main__ as convert_cli  # noqa: E402


def _llama(tmp_path, **overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
               max_position_embeddings=128)
    cfg.update(overrides)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    path = tmp_path / "hf_llama"
    hf.save_pretrained(path, safe_serialization=True)
    return hf, str(path)


def _t5(tmp_path):
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)).eval()
    path = tmp_path / "hf_t5"
    hf.save_pretrained(path, safe_serialization=True)
    return hf, str(path)


def test_llama_gqa_logits_and_greedy_match_hf(tmp_path):
    hf, hf_dir = _llama(tmp_path)
    assert convert_cli.main(["from_hf", f"--hf_dir={hf_dir}", f"--out_dir={tmp_path / 'ours'}"]) == 0
    module = inference.InferenceModule.from_checkpoint(str(tmp_path / "ours"), bos_id=None)
    tokens = np.random.default_rng(0).integers(1, 128, (2, 20))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(module.logits(tokens), want, atol=1e-4 * np.abs(want).max())
    prompt = tokens[:1, :6]
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0).numpy()[0, 6:]
    ours = module.generate(prompt.tolist(), max_new_tokens=8, eos_id=-1).tokens[0]
    np.testing.assert_array_equal(np.asarray(ours)[:8], hf_out)


def test_t5_logits_and_greedy_match_hf(tmp_path):
    hf, hf_dir = _t5(tmp_path)
    convert.import_hf(hf_dir, str(tmp_path / "ours"))
    module = inference.InferenceModule.from_checkpoint(str(tmp_path / "ours"))
    rng = np.random.default_rng(1)
    enc, dec = rng.integers(2, 128, (2, 12)), rng.integers(2, 128, (2, 7))
    dec[:, 0] = 0
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
    np.testing.assert_allclose(module.logits(enc, dec), want, atol=1e-4 * np.abs(want).max())
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor(enc[:1]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             decoder_start_token_id=0).numpy()[0, 1:]
    ours = module.generate(enc[:1].tolist(), max_new_tokens=8, eos_id=-1).tokens[0]
    np.testing.assert_array_equal(np.asarray(ours)[:8], hf_out)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_export_reproduces_hf_tensors_exactly(tmp_path, arch):
    from safetensors.numpy import load_file
    _, hf_dir = (_llama if arch == "llama" else _t5)(tmp_path)
    convert.import_hf(hf_dir, str(tmp_path / "ours"))
    assert convert_cli.main(["to_hf", f"--checkpoint={tmp_path / 'ours'}", f"--out_dir={tmp_path / 'back'}"]) == 0
    original, back = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) >= set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    reloaded = (transformers.LlamaForCausalLM if arch == "llama" else transformers.T5ForConditionalGeneration
                ).from_pretrained(str(tmp_path / "back"))
    assert reloaded.config.vocab_size == 128


def test_unsupported_inputs_are_refused_by_name(tmp_path):
    _, hf_dir = _llama(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(convert.ConversionError, match="rope"):
        convert.hf_to_params(hf_dir)
    _, hf_dir = _llama(tmp_path)
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    json.dump({**cfg, "architectures": ["GPT2LMHeadModel"]}, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(convert.ConversionError, match="unsupported architecture 'GPT2LMHeadModel'"):
        convert.hf_to_params(hf_dir)
    json.dump(cfg, open(os.path.join(hf_dir, "config.json"), "w"))
    from safetensors.numpy import load_file, save_file
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(hf_dir, "model.safetensors"))
    with pytest.raises(convert.ConversionError, match="missing .*model.layers.1.mlp.up_proj.weight"):
        convert.hf_to_params(hf_dir)
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    open(os.path.join(hf_dir, "pytorch_model.bin"), "wb").write(b"\x80\x04 not unpickled")
    with pytest.raises(convert.ConversionError, match="no \\*.safetensors.*never loaded"):
        convert.hf_to_params(hf_dir)
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint"):
        convert.export_hf(str(tmp_path / "nothing"), str(tmp_path / "out"))
