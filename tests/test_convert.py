"""Hugging Face bridge: logits and greedy parity with transformers, exact round trips, refusals by name."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmops_jax import checkpoints, convert  # noqa: E402
from lmops_jax.inference import inference_module as inference
from lmops_jax.convert import __main__ as convert_cli  # noqa: E402
from lmops_jax.convert import hf_llama, hf_t5, safetensors_io, tokens  # noqa: E402
from lmops_jax.models import spec  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
             max_position_embeddings=128)
T5 = dict(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
          feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
          pad_token_id=0, eos_token_id=1)


def _save(hf, path, **kwargs):
    hf.save_pretrained(path, safe_serialization=True, **kwargs)
    return str(path)


def _llama(tmp_path, dtype=None, **save_kwargs):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    if dtype is not None:
        hf = hf.to(dtype)
    return hf, _save(hf, tmp_path / "hf_llama", **save_kwargs)


def _t5(tmp_path):
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5)).eval()
    return hf, _save(hf, tmp_path / "hf_t5")


def _restored_logits(out_dir, *tokens):
    """Our logits from the converted Orbax checkpoint (restore_params, replicated on one device)."""
    model, params = convert.load_checkpoint(out_dir)
    if len(tokens) == 1:
        batch = {"decoder_input_tokens": tokens[0]}
    else:
        batch = {"encoder_input_tokens": tokens[0], "decoder_input_tokens": tokens[1]}
    return np.asarray(jax.jit(model.compute_logits)(params, batch))


def test_llama_gqa_logits_and_greedy_match_hf(tmp_path):
    hf, hf_dir = _llama(tmp_path)
    out = str(tmp_path / "ours")
    assert convert_cli.main(["from_hf", f"--hf_dir={hf_dir}", f"--out_dir={out}"]) == 0
    assert "MODEL = @model.DecoderOnlyModel()" in open(os.path.join(out, "model.gin")).read()
    tokens = np.random.default_rng(0).integers(1, 128, (2, 20))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(_restored_logits(out, tokens), want, atol=1e-4 * np.abs(want).max())
    prompt = tokens[:1, :6]
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0).numpy()[0, 6:]
    module = inference.InferenceModule.from_checkpoint(out, bos_id=None)  # KV-cache decoding
    ours = module.generate(prompt.tolist(), max_new_tokens=8, eos_id=-1).tokens[0]
    np.testing.assert_array_equal(np.asarray(ours)[:8], hf_out)


def test_t5_logits_and_greedy_match_hf(tmp_path):
    hf, hf_dir = _t5(tmp_path)
    out = str(tmp_path / "ours")
    convert.import_hf(hf_dir, out)
    rng = np.random.default_rng(1)
    enc, dec = rng.integers(2, 128, (2, 12)), rng.integers(2, 128, (2, 7))
    dec[:, 0] = 0
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
    np.testing.assert_allclose(_restored_logits(out, enc, dec), want, atol=1e-4 * np.abs(want).max())
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor(enc[:1]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             decoder_start_token_id=0).numpy()[0, 1:]
    module = inference.InferenceModule.from_checkpoint(out)
    ours = module.generate(enc[:1].tolist(), max_new_tokens=8, eos_id=-1).tokens[0]
    np.testing.assert_array_equal(np.asarray(ours)[:8], hf_out)


LLAMA_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
                "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias"]
T5_FIELDS = ["vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
             "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
             "feed_forward_proj", "dense_act_fn", "is_gated_act", "scale_decoder_outputs"]


@pytest.mark.parametrize("case", ["llama_sharded", "llama_bf16", "t5"])
def test_export_reproduces_hf_tensors_exactly(tmp_path, case):
    if case == "llama_sharded":  # HF writes shards + index; export shards again
        hf, hf_dir = _llama(tmp_path, max_shard_size="100KB")
        assert os.path.exists(os.path.join(hf_dir, safetensors_io.INDEX_FILE))
    elif case == "llama_bf16":
        hf, hf_dir = _llama(tmp_path, dtype=torch.bfloat16)
    else:
        hf, hf_dir = _t5(tmp_path)
    convert.import_hf(hf_dir, str(tmp_path / "ours"))
    if case == "llama_bf16":  # the stored dtype is kept without --dtype
        assert {d for _, d in checkpoints.checkpoint_param_shapes(str(tmp_path / "ours")).values()} == {"bfloat16"}
    back = str(tmp_path / "back")
    argv = ["to_hf", f"--checkpoint={tmp_path / 'ours'}", f"--out_dir={back}"]
    assert convert_cli.main(argv + (["--max_shard_gb=0.0002"] if case == "llama_sharded" else [])) == 0
    assert os.path.exists(os.path.join(back, safetensors_io.INDEX_FILE)) == (case == "llama_sharded")
    original, exported = safetensors_io.read_tensors(hf_dir), safetensors_io.read_tensors(back)
    # transformers 5 saves T5's head tied to `shared`; export always writes lm_head.weight.
    assert set(exported) - set(original) <= {"lm_head.weight"} and set(original) <= set(exported)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    # transformers loads the export exactly as it loads the original (same config fields, same logits).
    hf, reloaded = (type(hf).from_pretrained(d, dtype=hf.dtype).eval() for d in (hf_dir, back))
    for field in LLAMA_FIELDS if case != "t5" else T5_FIELDS:
        assert getattr(reloaded.config, field) == getattr(hf.config, field), field
    tokens = torch.tensor(np.random.default_rng(2).integers(2, 128, (1, 9)))
    with torch.no_grad():
        extra = {} if case != "t5" else {"decoder_input_ids": tokens[:, :4]}
        np.testing.assert_array_equal(reloaded(tokens, **extra).logits.float().numpy(),
                                      hf(tokens, **extra).logits.float().numpy())


@pytest.mark.parametrize("overrides, match", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope scaling"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
    ({"architectures": ["Qwen2ForCausalLM"]}, "unsupported architecture 'Qwen2ForCausalLM' .*biases"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 64}, "sliding_window=64"),
    ({"hidden_size": None}, "lacks the field 'hidden_size'"),
])
def test_unsupported_llama_configs_are_refused_by_field(overrides, match):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA, **overrides}
    with pytest.raises(convert.ConversionError, match=match):
        convert.model_from_hf_config(cfg)


@pytest.mark.parametrize("overrides, match", [
    ({"feed_forward_proj": "relu"}, "feed_forward_proj='relu'"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True means T5 1.0"),  # transformers 4 spelling
    ({"scale_decoder_outputs": True}, "scale_decoder_outputs=True means T5 1.0"),  # transformers 5
])
def test_t5_v1_0_is_refused_by_field(overrides, match):
    cfg = {"architectures": ["T5ForConditionalGeneration"], **T5, **overrides}
    with pytest.raises(convert.ConversionError, match=match):
        convert.model_from_hf_config(cfg)
    assert convert.model_from_hf_config({"model_type": "t5", **T5}).config.head_dim == 16


def test_bad_weights_are_listed_by_name(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file
    _, hf_dir = _llama(tmp_path)
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    broken = dict(tensors)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    broken["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 95), np.float32)
    save_file(broken, path, metadata={"format": "pt"})
    with pytest.raises(convert.ConversionError) as e:
        convert.hf_to_params(hf_dir)
    message = str(e.value)
    assert "tensors missing: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors (the model has no place for them): model.layers.0.self_attn.q_proj.bias" in message
    assert "model.layers.0.mlp.down_proj.weight (64, 95) (config.json implies (64, 96))" in message
    # Tied Llama: a stored lm_head copy must equal the embedding.
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    json.dump({**cfg, "tie_word_embeddings": True}, open(os.path.join(hf_dir, "config.json"), "w"))
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(convert.ConversionError, match="untied copies: lm_head.weight"):
        convert.hf_to_params(hf_dir)
    # Only pickled weights: refused without being opened.
    os.remove(path)
    open(os.path.join(hf_dir, "pytorch_model.bin"), "wb").write(b"\x80\x04 never unpickled")
    assert convert_cli.main(["from_hf", f"--hf_dir={hf_dir}", f"--out_dir={tmp_path / 'out'}"]) == 2
    assert "pickled .bin/.pt files are never loaded" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint"):
        convert.export_hf(str(tmp_path / "nothing"), str(tmp_path / "back"))


def _llama_stopping_at(tmp_path, bos, eos):
    """(HF dir, prompt, HF's greedy tokens stopping at eos) of a Llama whose config.json names bos / eos
    and whose greedy continuation of [bos] + prompt emits eos second: the lm_head rows of eos and of the
    token it would emit are swapped, which leaves the first step's argmax alone."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, bos_token_id=bos, eos_token_id=eos)).eval()
    for seed in range(20):
        prompt = np.random.default_rng(seed).integers(eos + 1, 128, 6).tolist()
        with torch.no_grad():
            first, second = hf.generate(torch.tensor([[bos] + prompt]), max_new_tokens=2, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0, -2:].tolist()
        if first not in (second, eos):
            break
    with torch.no_grad():
        head = hf.lm_head.weight
        head[[second, eos]] = head[[eos, second]].clone()
        want = hf.generate(torch.tensor([[bos] + prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert want[0, 1 + len(prompt):].tolist() == [first, eos]  # HF stops at the config's EOS
    return _save(hf, tmp_path / "hf_llama"), prompt, [first, eos]


def test_imported_special_tokens_are_the_inference_defaults(tmp_path):
    hf_dir, prompt, want = _llama_stopping_at(tmp_path, bos=5, eos=7)
    out = str(tmp_path / "ours")
    convert.import_hf(hf_dir, out)
    module = inference.InferenceModule.from_checkpoint(out)
    assert (module.bos_id, module.default_eos_id) == (5, 7)
    assert module.generate([prompt], max_new_tokens=8).tokens[0] == want  # BOS 5 prepended, stops at 7
    longer = module.generate([prompt], max_new_tokens=8, eos_id=-1).tokens[0]  # an explicit eos_id wins
    assert len(longer) == 8 and longer[:2] == want
    explicit = inference.InferenceModule.from_checkpoint(out, bos_id=None, eos_id=3)
    assert (explicit.bos_id, explicit.default_eos_id) == (None, 3)
    back = str(tmp_path / "back")
    convert.export_hf(out, back)
    config = json.load(open(os.path.join(back, "config.json")))
    assert (config["bos_token_id"], config["eos_token_id"], "pad_token_id" in config) == (5, 7, False)


def test_a_spec_without_special_tokens_loads_with_seqio_defaults(tmp_path):
    """A format-1 spec (before special tokens were stored): BOS 0, the vocabulary's EOS (1)."""
    hf_dir, _, _ = _llama_stopping_at(tmp_path, bos=5, eos=7)
    convert.import_hf(hf_dir, str(tmp_path / "ours"))
    stored = checkpoints.read_model_spec(str(tmp_path / "ours"))
    assert stored["format_version"] == 2 and stored["special_tokens"]["eos_id"] == 7
    old = {k: v for k, v in stored.items() if k != "special_tokens"} | {"format_version": 1}
    _, params = convert.load_checkpoint(str(tmp_path / "ours"))
    checkpoints.save_params(str(tmp_path / "old"), params, "", model_spec=old)
    module = inference.InferenceModule.from_checkpoint(str(tmp_path / "old"))
    assert (module.bos_id, module.eos_id, module.default_eos_id) == (0, None, 1)


@pytest.mark.parametrize("field, value, match", [
    ("eos_token_id", 128, "eos_token_id=128 is no token id of the model"),
    ("bos_token_id", "<s>", "bos_token_id='<s>' must be a token id"),
])
def test_bad_special_token_ids_are_refused_by_field(field, value, match):
    with pytest.raises(convert.ConversionError, match=match):
        tokens.special_tokens({field: value}, 128, hf_llama.SPECIAL_TOKENS)


def test_special_ids_of_config_json():
    cfg = {"bos_token_id": 1, "eos_token_id": [2, 9], "pad_token_id": -1, "decoder_start_token_id": 0}
    assert tokens.special_tokens(cfg, 128, hf_llama.SPECIAL_TOKENS) == spec.SpecialTokens(bos_id=1, eos_id=2)
    assert tokens.special_tokens(cfg, 128, hf_t5.SPECIAL_TOKENS) == spec.SpecialTokens(eos_id=2, decoder_start_id=0)
    assert tokens.hf_fields(spec.SEQIO_CONVENTION, hf_llama.SPECIAL_TOKENS) == {"bos_token_id": 0, "pad_token_id": 0}
    with pytest.raises(convert.ConversionError, match="decoder_start_token_id=3 is not supported"):
        convert.model_from_hf_config({"architectures": ["T5ForConditionalGeneration"], **T5,
                                      "decoder_start_token_id": 3})


def test_from_hf_cli_records_the_tokenizer_and_prints_what_it_wrote(tmp_path):
    """`python -m lmops_jax.convert from_hf` of a directory with tokenizer.json, as docs/convert.md shows
    it: the checkpoint carries the tokenizer (moved elsewhere, it still generates text with it)."""
    tokenizers = pytest.importorskip("tokenizers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, bos_token_id=1, eos_token_id=2)).eval()
    hf_dir = _save(hf, tmp_path / "hf_llama")
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(LLAMA["vocab_size"] - 3)]  # Llama-2's order
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(os.path.join(hf_dir, "tokenizer.json"))
    out = str(tmp_path / "ours")
    proc = subprocess.run([sys.executable, "-m", "lmops_jax.convert", "from_hf", f"--hf_dir={hf_dir}",
                           f"--out_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count = sum(p.numel() for p in hf.parameters())
    for line in [f"wrote {out}/checkpoints/0 and {out}/model.gin",
                 f"  model: decoder_only (LlamaConfig), {count:,} parameters, float32",
                 "  special ids: bos_id 1, eos_id 2, pad_id None, decoder_start_id None",
                 f"  tokenizer: hf_tokenizer {out}/tokenizer/tokenizer.json"]:
        assert line in proc.stdout.splitlines(), proc.stdout
    moved = str(tmp_path / "moved")
    shutil.move(out, moved)  # self-contained: the spec names the tokenizer relative to the model dir
    module = inference.InferenceModule.from_checkpoint(moved)
    assert type(module.vocabulary).__name__ == "HFTokenizerVocabulary" and module.vocabulary.eos_id == 2
    result = module.generate(["w3 w4 w5"], max_new_tokens=4)
    assert result.tokens == module.generate([[6, 7, 8]], max_new_tokens=4).tokens  # the tokenizer's ids
    text_ids = result.tokens[0][:result.tokens[0].index(2)] if 2 in result.tokens[0] else result.tokens[0]
    assert result.texts == [tokenizer.decode(text_ids)]
    back = str(tmp_path / "back")
    proc = subprocess.run([sys.executable, "-m", "lmops_jax.convert", "to_hf", f"--checkpoint={moved}",
                           f"--out_dir={back}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {back}/config.json, {back}/model.safetensors, {back}/tokenizer.json" in proc.stdout, proc.stdout
    assert "  special ids: bos_id 1, eos_id 2, pad_id None, decoder_start_id None" in proc.stdout
    assert open(os.path.join(back, "tokenizer.json")).read() == open(os.path.join(hf_dir, "tokenizer.json")).read()
