"""InferenceModule: generation against full recomputation, sampling, beams, scores, logits, compile
buckets, checkpoint round trip and the errors that name their cause."""
import flax.linen as nn
import gin
import jax
import numpy as np
import pytest
import seqio

from lmops_jax import checkpoints
from lmops_jax.inference.inference_module import InferenceModule
from lmops_jax.models import decoder_only, encoder_decoder, model

VOCAB = seqio.ByteVocabulary()
CONFIG = """
from __gin__ import dynamic_registration
from lmops_jax.models import decoder_only
from lmops_jax.models import model

MODEL = @model.DecoderOnlyModel()
MIXTURE_OR_TASK_NAME = 'synthetic_lm'
model.DecoderOnlyModel.config = @decoder_only.LlamaConfig()
decoder_only.LlamaConfig:
  vocab_size = 260
  d_model = 32
  num_layers = 2
  num_heads = 4
  num_kv_heads = 2
  mlp_dim = 64
  max_length = 64
"""
LLAMA = model.DecoderOnlyModel(decoder_only.LlamaConfig(vocab_size=260, d_model=32, num_layers=2, num_heads=4,
                                                        num_kv_heads=2, mlp_dim=64, max_length=64))
PROMPTS = ["ab", "hello there", "xyz!"]


def _params(m, seed=0):
    return nn.meta.unbox(m.init_params(jax.random.key(seed), m.input_shapes(1, {"inputs": 8, "targets": 8})))


@pytest.fixture(scope="module")
def llama():
    return InferenceModule(LLAMA, _params(LLAMA), vocabulary=VOCAB)


@pytest.fixture(scope="module")
def t5():
    m = model.EncoderDecoderModel(encoder_decoder.T5Config(
        vocab_size=260, d_model=32, num_encoder_layers=1, num_decoder_layers=2, num_heads=2, head_dim=16, mlp_dim=64))
    return InferenceModule(m, _params(m, 1), vocabulary=VOCAB)


def test_greedy_equals_argmax_of_full_recompute(llama, t5):
    out = llama.generate(PROMPTS, max_new_tokens=5, eos_id=-1)
    for prompt, generated in zip(PROMPTS, out.tokens):
        seq = [0] + VOCAB.encode(prompt)  # bos_id 0 is prepended
        for _ in range(5):
            seq.append(int(np.argmax(llama.logits([seq])[0, -1])))
        assert generated == seq[-5:]
    assert out.texts == [VOCAB.decode(t) for t in out.tokens]
    out = t5.generate(PROMPTS[:2], max_new_tokens=4, eos_id=-1)
    for prompt, generated in zip(PROMPTS, out.tokens):
        enc, dec = [VOCAB.encode(prompt) + [1]], [0]
        for _ in range(4):
            dec.append(int(np.argmax(t5.logits(enc, [dec])[0, -1])))
        assert generated == dec[1:]


def test_sampling_is_deterministic_per_seed(llama):
    kwargs = dict(max_new_tokens=6, method="sample", temperature=2.0, num_decodes=2, eos_id=-1)
    a = llama.generate(PROMPTS, seed=1, **kwargs)
    assert len(a.tokens) == 6 and all(len(t) == 6 for t in a.tokens)
    assert a.tokens == llama.generate(PROMPTS, seed=1, **kwargs).tokens
    assert a.tokens != llama.generate(PROMPTS, seed=2, **kwargs).tokens
    top1 = llama.generate(PROMPTS, seed=3, method="sample", top_k=1, max_new_tokens=6, eos_id=-1)
    assert top1.tokens == llama.generate(PROMPTS, max_new_tokens=6, eos_id=-1).tokens


def test_beam_search_sorted_and_consistent_with_score(llama):
    out = llama.generate(PROMPTS, method="beam", num_beams=3, max_new_tokens=4, length_penalty=0.0, eos_id=-1)
    assert out.beam_scores.shape == (3, 3)
    assert np.all(np.diff(out.beam_scores, axis=1) <= 0)
    assert [b[0] for b in out.beam_tokens] == out.tokens
    scores = llama.score([VOCAB.encode(p) for p in PROMPTS], out.tokens)
    np.testing.assert_allclose(scores, out.log_probs, rtol=1e-4, atol=1e-4)
    greedy = llama.generate(PROMPTS, max_new_tokens=4, eos_id=-1)
    assert np.all(out.log_probs >= greedy.log_probs - 1e-4)


def test_score_is_sum_of_log_softmax_at_targets_and_logits_are_float32(llama):
    inputs, targets = [[5, 6], [], [7]], [[8, 9, 10], [11], [12, 13]]
    scores = llama.score(inputs, targets)
    assert scores.shape == (3,)
    for x, y, s in zip(inputs, targets, scores):
        seq = [0] + x + y
        logits = llama.logits([seq[:-1]])[0]
        assert logits.shape == (len(seq) - 1, 260) and logits.dtype == np.float32
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        expected = sum(float(log_probs[len(x) + j, t]) for j, t in enumerate(y))
        np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-5)
    assert llama.logits(np.ones((2, 5), np.int32)).shape == (2, 5, 260)


def test_requests_within_a_bucket_compile_once():
    module = InferenceModule(LLAMA, _params(LLAMA), vocabulary=VOCAB)
    for prompts in (["a", "bcd", "ef"], ["abcdef", "g", "hi", "jk"], ["abc"] * 4):  # batch 3-4, length <= 8
        module.generate(prompts, max_new_tokens=3)
    assert module.trace_counts["generate"] == 1
    module.generate(["a much longer prompt"], max_new_tokens=3)  # length bucket 32
    assert module.trace_counts["generate"] == 2


def test_from_checkpoint_round_trip_tensor_parallel_and_bfloat16(tmp_path):
    params = _params(LLAMA, 3)
    checkpoints.save_params(str(tmp_path / "run"), params, CONFIG)
    gin.clear_config()
    gin.parse_config("MIXTURE_OR_TASK_NAME = 'caller_task'")  # the caller's own gin config survives
    restored = InferenceModule.from_checkpoint(str(tmp_path / "run"))
    assert gin.query_parameter("MIXTURE_OR_TASK_NAME/gin.macro.value") == "caller_task"
    gin.clear_config()
    assert restored.model == LLAMA and isinstance(restored.vocabulary, seqio.ByteVocabulary)
    expected = InferenceModule(LLAMA, params, vocabulary=VOCAB).generate(PROMPTS, max_new_tokens=4)
    out = restored.generate(PROMPTS, max_new_tokens=4)
    assert out.tokens == expected.tokens and out.texts == expected.texts
    tp = InferenceModule.from_checkpoint(str(tmp_path / "run"), mesh_shape={"data": -1, "model": 2})
    assert tp.params["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert tp.generate(PROMPTS, max_new_tokens=4).tokens == expected.tokens
    bf16 = InferenceModule.from_checkpoint(str(tmp_path / "run" / "checkpoints" / "0"), dtype="bfloat16")
    assert all(p.dtype == np.dtype("bfloat16") for p in jax.tree.leaves(bf16.params))
    assert bf16.logits([[1, 2, 3]]).dtype == np.float32
    assert len(bf16.generate(PROMPTS, max_new_tokens=4).tokens) == 3


def test_errors_name_their_cause(llama, tmp_path):
    with pytest.raises(ValueError, match=r"prompts\[1\] has 61 tokens; with max_new_tokens=8 .* max_length=64"):
        llama.generate(["a", "x" * 60], max_new_tokens=8)
    with pytest.raises(ValueError, match="unknown decoding method 'topk'"):
        llama.generate(PROMPTS, method="topk")
    with pytest.raises(ValueError, match=r"prompts\[0\] has token ids \[300\]"):
        llama.generate([[300]])
    checkpoints.save_params(str(tmp_path / "bare"), _params(LLAMA), "")
    with pytest.raises(checkpoints.CheckpointError, match="bare'? has no gin config"):
        InferenceModule.from_checkpoint(str(tmp_path / "bare"))


def test_inference_has_no_model_family_branches():
    """inference/ reaches models only through the BaseModel contract: no family classes, modules or flags."""
    import ast
    import pathlib
    forbidden = {"DecoderOnlyModel", "EncoderDecoderModel", "is_encoder_decoder", "decoder_only", "encoder_decoder",
                 "LlamaDecoder", "T5EncoderDecoder"}
    package = pathlib.Path(__file__).resolve().parents[1] / "lmops_jax" / "inference"
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                  for a in n.names}
        names |= {part for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                  for part in n.module.split(".")}
        assert not names & forbidden, f"{path.name} names {sorted(names & forbidden)}"


def test_a_lora_model_generates_and_scores_like_its_merged_base():
    """Any BaseModel runs through InferenceModule: LoRA decodes with its adapters through the model contract."""
    from lmops_jax.peft import lora
    adapted = lora.LoraModel(LLAMA, rank=2, alpha=4.0, targets=r".*/(q_proj|v_proj)")
    params = jax.tree_util.tree_map_with_path(  # B starts at zero; make the adapters matter
        lambda path, x: jax.numpy.full_like(x, 0.2) if "lora_b" in jax.tree_util.keystr(path) else x, _params(adapted))
    module = InferenceModule(adapted, params, vocabulary=VOCAB)
    merged = InferenceModule(LLAMA, adapted.merge(params), vocabulary=VOCAB)
    out = module.generate(PROMPTS, max_new_tokens=5, eos_id=-1)
    assert out.tokens == merged.generate(PROMPTS, max_new_tokens=5, eos_id=-1).tokens
    base = InferenceModule(LLAMA, lora.base_params(params), vocabulary=VOCAB)
    assert out.tokens != base.generate(PROMPTS, max_new_tokens=5, eos_id=-1).tokens
    beams = module.generate(PROMPTS, method="beam", num_beams=2, max_new_tokens=3, eos_id=-1)
    np.testing.assert_allclose(module.score(PROMPTS, beams.tokens), merged.score(PROMPTS, beams.tokens), atol=1e-4)
    np.testing.assert_allclose(module.score(PROMPTS, beams.tokens), beams.log_probs, atol=1e-4)


def test_encoder_decoder_score_reads_the_shifted_targets_and_text_inputs_end_with_eos(t5):
    inputs, targets = ["ab", "hello"], [[5, 6, 7], [8]]
    scores = t5.score(inputs, targets)
    for x, y, s in zip(inputs, targets, scores):
        log_probs = jax.nn.log_softmax(t5.logits([VOCAB.encode(x) + [1]], [[0] + y[:-1]])[0], axis=-1)
        np.testing.assert_allclose(s, sum(float(log_probs[j, t]) for j, t in enumerate(y)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs decoder_tokens"):
        t5.logits([[5, 6]])
