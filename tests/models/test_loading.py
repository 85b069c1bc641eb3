"""models.spec and models.loading: spec round trips, loading without gin, old gin-only checkpoints,
loads from several threads, and an inference path that imports no TensorFlow."""
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest
import seqio

from lmops_jax import checkpoints, partitioning
from lmops_jax.checkpoints import CheckpointError
from lmops_jax.data import tasks  # noqa: F401  registers synthetic_lm
from lmops_jax.inference.inference_module import InferenceModule
from lmops_jax.models import encoder_decoder, loading, model, spec
from lmops_jax.peft import lora
from lmops_jax.training import optimizers
from lmops_jax.training import train as train_lib
from tests.helpers import model_gin, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T5 = model.EncoderDecoderModel(encoder_decoder.T5Config(vocab_size=300, d_model=32, num_encoder_layers=1,
                                                        num_decoder_layers=1, num_heads=2, head_dim=16, mlp_dim=64))


def _params(m, seed=0):
    return jax.device_get(nn.meta.unbox(m.init_params(jax.random.key(seed), m.input_shapes(1, {"inputs": 8,
                                                                                                   "targets": 8}))))


def _logits(module: InferenceModule) -> np.ndarray:
    return module.logits([[3, 4, 5]], [[0, 3]] if isinstance(module.model, model.EncoderDecoderModel) else None)


@pytest.mark.parametrize("make", [
    lambda: dataclasses.replace(tiny_llama(head_dim=8, dtype="bfloat16"), z_loss=0.0),
    lambda: T5,
    lambda: lora.LoraModel(base=tiny_llama(), rank=2, alpha=4.0, targets=".*/q_proj")], ids=["llama", "t5", "lora"])
def test_spec_round_trips_through_json(make):
    s = spec.ModelSpec(make(), spec.VocabularySpec("sentencepiece", "/v/spm.model", extra_ids=3),
                       spec.SpecialTokens(bos_id=1, eos_id=2, pad_id=0))
    record = json.loads(json.dumps(s.to_json()))
    assert spec.ModelSpec.from_json(record, "test") == s
    if isinstance(s.model, lora.LoraModel):
        assert record["family"] == "lora" and record["model"]["base"]["family"] == "decoder_only"


def test_spec_errors_name_the_field_version_and_family():
    good = spec.ModelSpec(tiny_llama()).to_json()
    with pytest.raises(CheckpointError, match=r"model.config: LlamaConfig has no fields \['rope_scaling'\]"):
        spec.ModelSpec.from_json({**good, "model": {"config": {"rope_scaling": 2.0}}}, "ckpt")
    with pytest.raises(CheckpointError, match="ckpt has format_version 99"):
        spec.ModelSpec.from_json({**good, "format_version": 99}, "ckpt")
    with pytest.raises(CheckpointError, match="family 'moe' is not registered .* import my.moe first"):
        spec.ModelSpec.from_json({**good, "family": "moe", "module": "my.moe"}, "ckpt")
    with pytest.raises(CheckpointError, match="vocabulary: cannot build VocabularySpec: .*'task' vocabulary needs"):
        spec.ModelSpec.from_json({**good, "vocabulary": {"kind": "task"}}, "ckpt")
    with pytest.raises(CheckpointError, match=r"special_tokens: SpecialTokens has no fields \['sep_id'\]"):
        spec.ModelSpec.from_json({**good, "special_tokens": {"sep_id": 3}}, "ckpt")
    with pytest.raises(CheckpointError, match="special_tokens: cannot build SpecialTokens: .*eos_id must be"):
        spec.ModelSpec.from_json({**good, "special_tokens": {"eos_id": -1}}, "ckpt")
    v1 = {k: v for k, v in good.items() if k != "special_tokens"} | {"format_version": 1}
    assert spec.ModelSpec.from_json(v1, "ckpt").special_tokens is None  # seqio's convention

    @dataclasses.dataclass(frozen=True)
    class Unregistered(model.DecoderOnlyModel):
        pass

    with pytest.raises(TypeError, match="Unregistered is no registered model family"):
        spec.ModelSpec(Unregistered()).to_json()


def test_vocabulary_is_described_by_its_file_else_by_its_task():
    describe = spec.VocabularySpec.describe
    assert describe(seqio.ByteVocabulary(extra_ids=2), "t") == spec.VocabularySpec("byte", extra_ids=2)
    assert describe(seqio.SentencePieceVocabulary("spm.model", 4), "t") == spec.VocabularySpec(
        "sentencepiece", os.path.abspath("spm.model"), 4)
    custom = seqio.SentencePieceVocabulary("spm.model", reverse_extra_ids=False)  # an option a file cannot say
    assert describe(custom, "t") == spec.VocabularySpec("task", task="t")
    assert spec.VocabularySpec("byte", extra_ids=2).build() == seqio.ByteVocabulary(extra_ids=2)
    assert spec.VocabularySpec("task", task="never_registered").build() is None


def test_hf_tokenizer_vocabulary_is_described_by_its_file_and_ids(tmp_path, monkeypatch):
    """A checkpoint trained with --gin.VOCABULARY='/path/tokenizer.json' rebuilds that tokenizer, not the
    byte vocabulary its task has in a fresh process; a relative path is rooted at the model directory."""
    tokenizers = pytest.importorskip("tokenizers")
    from lmops_jax.data.hf_tokenizer import HFTokenizerVocabulary

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "hello", "world"])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    os.makedirs(tmp_path / "tok")
    tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))
    monkeypatch.chdir(tmp_path)
    vocabulary = HFTokenizerVocabulary("tok", extra_ids=2, eos_id=5)
    described = spec.VocabularySpec.describe(vocabulary, "text_lm")
    assert described == spec.VocabularySpec("hf_tokenizer", str(tmp_path / "tok" / "tokenizer.json"), 2, bos_id=2,
                                            eos_id=5, pad_id=0, unk_id=1)
    rebuilt = spec.ModelSpec.from_json(json.loads(json.dumps(spec.ModelSpec(T5, described).to_json())), "t")
    assert rebuilt.vocabulary.build() == vocabulary and rebuilt.vocabulary.build().encode("hello world") == [4, 5]
    relative = spec.VocabularySpec("hf_tokenizer", "tokenizer/tokenizer.json")
    assert relative.under("/m").path == "/m/tokenizer/tokenizer.json"
    assert described.under("/m") == described
    with pytest.raises(ValueError, match=r"\['eos_id'\] apply only to an 'hf_tokenizer' vocabulary"):
        spec.VocabularySpec("byte", eos_id=1)


def test_with_dtype_and_default_partitioner():
    m = loading.with_dtype(tiny_llama(), "bfloat16")
    assert (m.config.dtype, m.config.param_dtype) == ("bfloat16", "bfloat16")
    assert loading.with_dtype(m, None) is m
    with pytest.raises(ValueError, match="dtype must be None or one of"):
        loading.with_dtype(m, "int8")
    abstract, shardings = loading.param_shardings(m, loading.default_partitioner())
    assert abstract["embed_tokens"]["embedding"].dtype == np.dtype("bfloat16")
    assert jax.tree.leaves(shardings)[0].mesh.devices.size == 1


def test_checkpoint_written_by_python_train_loads_without_gin(tmp_path):
    m = tiny_llama(vocab_size=512)
    _, state = train_lib.train(
        model=m, model_dir=str(tmp_path), train_steps=2, batch_size=8, mixture_or_task_name="synthetic_lm",
        task_feature_lengths={"targets": 16}, log_period=100, peak_flops=1e12,
        partitioner=partitioning.Partitioner({"data": 2}, devices=jax.devices()[:2]),
        optimizer=optimizers.OptimizerConfig(warmup_steps=1))
    assert "called from Python" in checkpoints.read_config(str(tmp_path))  # python_run_config, for humans
    assert loading.read_spec(str(tmp_path)) == spec.ModelSpec(m, spec.VocabularySpec("byte"))
    restored = InferenceModule.from_checkpoint(str(tmp_path))
    expected = InferenceModule(m, jax.device_get(state.params))
    assert restored.model == m
    assert restored.generate(["ab", "xyz"], max_new_tokens=4).tokens == expected.generate(
        ["ab", "xyz"], max_new_tokens=4).tokens


def test_unregistered_model_trains_with_a_warning_and_no_spec(caplog):
    @dataclasses.dataclass(frozen=True)
    class Custom(model.DecoderOnlyModel):
        pass

    with caplog.at_level(logging.WARNING):
        assert train_lib._model_spec(Custom(), "synthetic_lm") is None
    assert "no model spec" in caplog.text
    assert train_lib._model_spec(tiny_llama(), "synthetic_lm")["vocabulary"]["kind"] == "byte"


def test_old_gin_only_checkpoint_loads_and_bare_one_is_refused(tmp_path):
    checkpoints.save_params(str(tmp_path / "old"), _params(T5), model_gin(T5))
    loaded = loading.read_spec(str(tmp_path / "old"))
    assert loaded == spec.ModelSpec(T5, spec.VocabularySpec("task", task="synthetic_lm"))
    params = loading.restore_params(str(tmp_path / "old"), T5, loading.default_partitioner())
    np.testing.assert_array_equal(params["shared"]["embedding"], _params(T5)["shared"]["embedding"])
    checkpoints.save_params(str(tmp_path / "bare"), _params(T5), "")
    with pytest.raises(CheckpointError, match="has no gin config and no model spec"):
        loading.read_spec(str(tmp_path / "bare"))


def test_two_threads_load_two_old_checkpoints_and_the_callers_gin_survives(tmp_path, monkeypatch):
    models = {"llama": tiny_llama(vocab_size=300, max_length=64), "t5": T5}
    for name, m in models.items():
        checkpoints.save_params(str(tmp_path / name), _params(m), model_gin(m, task=f"task_{name}"))
    # The first thread to parse its config waits until the second has parsed its own, and only then
    # reads: unless the loader serializes them (then the wait times out), it reads the other's MODEL.
    parse, order, order_lock = gin.parse_config, [], threading.Lock()
    second_parsed, first_released = threading.Event(), threading.Event()

    def parse_together(*args, **kwargs):
        result = parse(*args, **kwargs)
        with order_lock:
            order.append(threading.current_thread().name)
            first = len(order) == 1
        if first:
            second_parsed.wait(timeout=5)
            first_released.set()
        else:
            second_parsed.set()
            first_released.wait(timeout=5)
            time.sleep(0.2)  # let the first thread read before this one does
        return result

    monkeypatch.setattr(gin, "parse_config", parse_together)
    gin.clear_config()
    parse("MIXTURE_OR_TASK_NAME = 'caller_task'")
    results, errors = {}, []

    def load(name):
        try:
            module = InferenceModule.from_checkpoint(str(tmp_path / name))
            results[name] = (module.model, _logits(module))
        except Exception as e:  # reported below with the thread's name
            errors.append(f"{name}: {e!r}")

    threads = [threading.Thread(target=load, args=(name,)) for name in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert gin.query_parameter("MIXTURE_OR_TASK_NAME/gin.macro.value") == "caller_task"
    finally:
        gin.clear_config()
    assert not errors
    for name, m in models.items():
        expected = _logits(InferenceModule(m, _params(m)))
        assert results[name][0] == m
        np.testing.assert_allclose(results[name][1], expected, rtol=1e-5, atol=1e-5)


def test_inference_from_a_spec_checkpoint_imports_no_tensorflow(tmp_path):
    m = tiny_llama(vocab_size=300, max_length=64)
    checkpoints.save_params(str(tmp_path / "run"), _params(m), "",
                            model_spec=spec.ModelSpec(m, spec.VocabularySpec("byte")).to_json())
    code = (f"import sys\nfrom lmops_jax.inference import InferenceModule\n"
            f"module = InferenceModule.from_checkpoint({str(tmp_path / 'run')!r})\n"
            "assert len(module.generate([[5, 6, 7]], max_new_tokens=3, eos_id=-1).tokens[0]) == 3\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'tensorflow', 'seqio'}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
