"""Distillation beyond logits: hidden-state pairs (learned maps, saved, dropped at export) and
cross-tokenizer distillation (offset alignment, the ULD loss, online and from an offline top-k store)."""
import functools
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from lmops_jax import checkpoints, losses, partitioning
from lmops_jax.distillation import hidden_states as hs
from lmops_jax.distillation import token_alignment as ta
from lmops_jax.distillation import topk_store
from lmops_jax.distillation import trainer as distillation
from lmops_jax.models import loading
from lmops_jax.training import optimizers, train as train_lib
from tests.helpers import lm_batch, tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "lmops_jax", "data", "corpus", "train.txt")


def _params(m, seed=7):
    return nn.meta.unbox(m.init_params(jax.random.key(seed), m.input_shapes(1, {"targets": 16})))


def _one_device():
    return partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])


def _trainer(student, teacher, teacher_params, **kw):
    return distillation.DistillationTrainer(student, _one_device(), optimizers.OptimizerConfig(warmup_steps=0), 10, 8,
                                            {"targets": 16}, teacher_model=teacher, teacher_params=teacher_params, **kw)


# ------------------------------------------------------------------------------------------ hidden states
@pytest.mark.parametrize("kind", hs.HIDDEN_LOSSES)
def test_hidden_loss_is_zero_when_student_is_teacher(kind):
    teacher = tiny_llama(vocab_size=512, num_layers=2)
    params = _params(teacher)
    t = _trainer(teacher, teacher, params, hidden_layer_pairs=[("layers_0", "layers_0"), ("layers_1", "layers_1")],
                 hidden_loss=kind, hidden_weights=[1.0, 2.0])
    assert hs.MAPS not in t.abstract_state.params  # equal widths: the map is the identity, no parameter
    batch = jax.tree.map(jnp.asarray, lm_batch(8, 16, vocab=512))
    _, metrics = t.loss_fn(params, batch, None, 1.0, t.teacher_params, 0)
    assert float(metrics["hidden_loss_sum"]) == pytest.approx(0.0, abs=1e-4)
    other = _params(teacher, seed=8)
    _, metrics = t.loss_fn(other, batch, None, 1.0, t.teacher_params, 0)
    assert float(metrics["hidden_loss_sum"]) > 1.0
    h = jax.random.normal(jax.random.key(0), (2, 3, 8))
    np.testing.assert_allclose(hs.hidden_state_loss(h, h, jnp.eye(8), kind), 0.0, atol=1e-6)


def test_hidden_maps_train_are_saved_and_dropped_at_export(tmp_path):
    teacher = tiny_llama(vocab_size=512, num_layers=2, d_model=64)
    student = tiny_llama(vocab_size=512, num_layers=1, d_model=32, mlp_dim=64)
    trainer_cls = functools.partial(distillation.DistillationTrainer, teacher_model=teacher,
                                    teacher_params=_params(teacher), hidden_layer_pairs=[("layers_0", "layers_1")])
    trainer, state = train_lib.train(model=student, model_dir=str(tmp_path), train_steps=2,
                                     mixture_or_task_name="synthetic_lm", task_feature_lengths={"targets": 16},
                                     batch_size=4, trainer_cls=trainer_cls, log_period=1, eval_steps=1,
                                     partitioner=_one_device(), optimizer=optimizers.OptimizerConfig(warmup_steps=0))
    kernel = state.params[hs.MAPS]["pair_0"]["kernel"]
    assert kernel.shape == (32, 64)
    fresh = nn.meta.unbox(trainer.model.init_params(jax.random.key(0), student.input_shapes(1, {"targets": 16})))
    assert not np.allclose(kernel, fresh[hs.MAPS]["pair_0"]["kernel"])  # the map trained
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["hidden_loss"] > 0
    # The run's checkpoint holds the map (a resume needs it) ...
    saved = checkpoints.restore_params(str(tmp_path), trainer.abstract_state.params, trainer.state_shardings.params)
    np.testing.assert_array_equal(saved[hs.MAPS]["pair_0"]["kernel"], kernel)
    # ... and loading it for inference / export gives the plain student.
    model = loading.model_from_checkpoint(str(tmp_path))
    assert model == student
    plain = loading.restore_params(str(tmp_path), model, loading.default_partitioner())
    assert hs.MAPS not in plain
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(hs.HiddenMapsModel.student_params(state.params))):
        np.testing.assert_array_equal(a, b)


def test_hidden_pair_naming_no_module_fails_with_the_path():
    teacher = tiny_llama(vocab_size=512, num_layers=2)
    with pytest.raises(ValueError, match="no module at path 'layers_7'"):
        _trainer(teacher, teacher, _params(teacher), hidden_layer_pairs=[("layers_0", "layers_7")])
    with pytest.raises(ValueError, match="HIDDEN_WEIGHTS"):
        _trainer(teacher, teacher, _params(teacher), hidden_layer_pairs=[("layers_0", "layers_1")],
                 hidden_weights=[1.0, 2.0])


# --------------------------------------------------------------------------------------- cross-tokenizer
def test_uld_is_zero_for_a_permutation_and_topk_with_the_whole_vocabulary_equals_it():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(2, 3, 5))
    perm = rng.permutation(8)
    teacher = np.concatenate([student, np.full((2, 3, 3), -np.inf)], axis=-1)[..., perm]  # 8 ids, 3 never used
    np.testing.assert_allclose(losses.uld(jnp.asarray(student), jnp.asarray(teacher)), 0.0, atol=1e-6)
    other = rng.normal(size=(2, 3, 8))
    full = losses.uld(jnp.asarray(student), jnp.asarray(other), temperature=2.0)
    assert np.all(np.asarray(full) > 0.01)
    logprobs, _ = losses.topk_teacher_logprobs(jnp.asarray(other), 8)
    np.testing.assert_allclose(losses.uld_from_topk(jnp.asarray(student), logprobs, temperature=2.0), full, atol=1e-6)
    grad = jax.grad(lambda s: losses.uld(s, jnp.asarray(other)).sum())(jnp.asarray(student))
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import train_sentencepiece
    return train_sentencepiece.train_sentencepiece([CORPUS], str(tmp_path_factory.mktemp("spm") / "spm"), 300)


def _word_level_vocabulary(tmp_path):
    """A Hugging Face word-level tokenizer over whitespace-split words: offsets checkable by hand."""
    import tokenizers
    from lmops_jax.data import hf_tokenizer
    words = ["<pad>", "</s>", "<unk>", "The", "river", "ran", "café", "!"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return hf_tokenizer.HFTokenizerVocabulary(str(tmp_path / "tokenizer.json"), eos_id=1)


def test_alignment_of_hand_made_strings(tmp_path, spm_path):
    byte = seqio.ByteVocabulary()
    aligner = ta.TokenAligner(byte, _word_level_vocabulary(tmp_path), 8)
    first, second = byte.encode("The river") + [1], byte.encode("café!") + [1]  # é is 2 bytes
    targets = np.array(first + second + [0] * 4, np.int32)
    segments = np.array([1] * len(first) + [2] * len(second) + [0] * 4, np.int32)
    out = aligner.row(targets, segments)
    assert out["teacher_decoder_target_tokens"].tolist() == [3, 4, 1, 6, 7, 1, 0, 0]
    assert out["teacher_decoder_input_tokens"].tolist() == [0, 3, 4, 0, 6, 7, 0, 0]
    assert out["teacher_decoder_segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 0, 0]
    # 'T' (byte 0), 'r' (byte 4), EOS (byte 9); 'c' (byte 0 of segment 2), '!' (byte 5), EOS (byte 6).
    aligned = {i: int(out[ta.ALIGNED_INDEX][i]) for i in np.flatnonzero(out[ta.ALIGNED])}
    assert aligned == {0: 0, 4: 1, 9: 2, 10: 3, 15: 4, 16: 5}
    # A SentencePiece teacher: every aligned pair starts at the same byte of the same text.
    spm = seqio.SentencePieceVocabulary(spm_path)
    text = "The river ran low, café."
    ids = byte.encode(text) + [1]
    out = ta.TokenAligner(byte, spm, 32).row(np.array(ids, np.int32), None)
    teacher_ids, starts, _ = ta.token_offsets(spm, text)
    assert out["teacher_decoder_target_tokens"][:len(teacher_ids) + 1].tolist() == teacher_ids + [1]
    for i in np.flatnonzero(out[ta.ALIGNED][:-1]):
        assert starts[out[ta.ALIGNED_INDEX][i]] == i
    assert out[ta.ALIGNED][len(ids) - 1] == 1 and out[ta.ALIGNED_INDEX][len(ids) - 1] == len(teacher_ids)
    assert 0.2 < out[ta.ALIGNED].mean() < 0.8


def test_cross_tokenizer_runs_online_and_from_an_offline_store(tmp_path, spm_path):
    teacher = tiny_llama(vocab_size=320, num_layers=1)
    student = tiny_llama(vocab_size=259, num_layers=1, d_model=32, mlp_dim=64)
    teacher_params = _params(teacher)
    common = dict(mixture_or_task_name="text_lm", task_feature_lengths={"targets": 64}, batch_size=4,
                  log_period=1, eval_steps=1, optimizer=optimizers.OptimizerConfig(warmup_steps=0),
                  partitioner=_one_device())
    cross = dict(kd_loss="uld", teacher_model=teacher, teacher_vocabulary=spm_path, teacher_length=32, kd_alpha=0.5)
    online, _ = train_lib.train(model=student, model_dir=str(tmp_path / "online"), train_steps=2, trainer_cls=functools.partial(
        distillation.DistillationTrainer, teacher_params=teacher_params, **cross), **common)
    first = json.loads((tmp_path / "online" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.1 < first["aligned"] < 0.9 and first["kd_loss"] > 0
    assert "teacher_agreement" not in first
    # Offline: the teacher's aligned top-k over its whole vocabulary gives the online KD term.
    ckpt = str(tmp_path / "teacher")
    checkpoints.save_params(ckpt, jax.device_get(teacher_params), "")
    topk_store.dump_teacher_topk(teacher_checkpoint=ckpt, output_dir=str(tmp_path / "topk"), num_batches=2, k=320,
                                 kd_loss="uld", teacher_length=32, teacher_vocab=spm_path, teacher_model=teacher,
                                 mixture_or_task_name="text_lm", task_feature_lengths={"targets": 64}, batch_size=4,
                                 partitioner=_one_device())
    train_lib.train(model=student, model_dir=str(tmp_path / "offline"), train_steps=2, trainer_cls=functools.partial(
        distillation.DistillationTrainer, topk_dir=str(tmp_path / "topk"), **cross), **common)
    offline = json.loads((tmp_path / "offline" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("kd_loss", "ce_loss", "aligned", "loss"):
        assert offline[key] == pytest.approx(first[key], rel=1e-4, abs=1e-5), key
