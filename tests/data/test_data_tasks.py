"""Built-in seqio tasks: features, determinism, text files and their errors, vocabularies."""
import numpy as np
import pytest
import seqio

from lmops_jax.data import tasks
from lmops_jax.data.synthetic import MarkovSource

DECODER_FEATURES = {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                    "decoder_segment_ids", "decoder_positions"}


def _examples(name, lengths, n, converter=None, split="train", seed=0, shuffle=False):
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split=split, shuffle=shuffle, seed=seed)
    if converter is not None:
        ds = converter(ds, lengths)
    return list(ds.take(n).as_numpy_iterator())


def test_builtin_tasks_are_registered():
    assert set(tasks.BUILTIN_TASKS) <= set(seqio.TaskRegistry.names())


def test_synthetic_lm_packed_rows_are_one_full_sequence():
    rows = _examples("synthetic_lm", {"targets": 32}, 3, seqio.DecoderFeatureConverter(pack=True))
    for row in rows:
        assert set(row) == DECODER_FEATURES
        assert all(v.shape == (32,) and v.dtype == np.int32 for v in row.values())
        np.testing.assert_array_equal(row["decoder_loss_weights"], 1)
        np.testing.assert_array_equal(row["decoder_segment_ids"], 1)
        np.testing.assert_array_equal(row["decoder_positions"], np.arange(32))
        np.testing.assert_array_equal(row["decoder_input_tokens"][1:], row["decoder_target_tokens"][:-1])
        text = seqio.ByteVocabulary().decode(row["decoder_target_tokens"].tolist())
        assert len(text) == 32 and set(text) <= set(MarkovSource().alphabet)


def test_synthetic_streams_are_deterministic_and_split_dependent():
    def targets(**kw):
        return [ex["targets"].tolist() for ex in _examples("synthetic_lm", {"targets": 16}, 4, **kw)]

    assert targets(seed=0) == targets(seed=0)
    assert targets(seed=0) != targets(seed=1)
    assert targets(split="validation", seed=0) == targets(split="validation", seed=1)  # fixed held-out stream
    assert targets(split="validation") != targets(split="train")


def test_tf_sampler_follows_the_source_law():
    import tensorflow as tf
    source = MarkovSource()
    symbols = tasks.sample_symbols_tf(source, tf.constant([1, 2], tf.int64), 4000, 32).numpy()
    assert symbols.shape == (4000, 32) and symbols.min() >= 0 and symbols.max() < 16
    assert -source.token_log_probs(symbols).mean() == pytest.approx(source.optimal_loss(32), abs=0.02)
    first = np.bincount(symbols[:, 0], minlength=16) / 4000
    np.testing.assert_allclose(first, source.stationary.reshape(16, 16).sum(1), atol=0.03)
    assert tasks.sample_symbols_tf(source, tf.constant([1, 2], tf.int64), 3, 1).shape == (3, 1)


def test_synthetic_optimal_loss_is_the_source_floor():
    assert tasks.synthetic_optimal_loss({"targets": 128}) == pytest.approx(MarkovSource().optimal_loss(128))
    with pytest.raises(ValueError, match="example_length=512"):
        tasks.synthetic_optimal_loss({"targets": 1024})
    with pytest.raises(ValueError, match="not a registered synthetic LM task"):
        tasks.synthetic_optimal_loss({"targets": 8}, name="nope")


def test_register_synthetic_lm_with_custom_length():
    try:
        tasks.register_synthetic_lm(MarkovSource(alphabet="xy", order=1), example_length=8, name="synth_test")
        (row,) = _examples("synth_test", {"targets": 8}, 1)
        assert row["targets"].shape == (8,) and set(row["targets_pretokenized"].decode()) <= {"x", "y"}
        assert tasks.synthetic_optimal_loss({"targets": 8}, name="synth_test") == pytest.approx(
            MarkovSource(alphabet="xy", order=1).optimal_loss(8))
    finally:
        seqio.TaskRegistry.remove("synth_test")


def test_text_lm_over_tmp_files(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("hello world\n\n   \nsecond line\n")
    valid = tmp_path / "valid.txt"
    valid.write_text("held out\n")
    try:
        tasks.register_text_lm(train_files=[str(train)], validation_files=str(valid), name="text_test")
        vocab = seqio.ByteVocabulary()
        got = [ex["targets"].tolist() for ex in _examples("text_test", {"targets": 64}, 10)]
        assert [vocab.decode(t) for t in got] == ["hello world", "second line"]
        assert all(t[-1] == vocab.eos_id for t in got)
        (held,) = _examples("text_test", {"targets": 64}, 10, split="validation")
        assert vocab.decode(held["targets"].tolist()) == "held out"
    finally:
        seqio.TaskRegistry.remove("text_test")


def test_text_lm_default_corpus_packs():
    rows = _examples("text_lm", {"targets": 256}, 2, seqio.DecoderFeatureConverter(pack=True))
    assert set(rows[0]) == DECODER_FEATURES and rows[0]["decoder_target_tokens"].shape == (256,)
    assert rows[0]["decoder_loss_weights"].sum() > 200


def test_text_lm_missing_file_names_file_and_macro(tmp_path):
    missing = str(tmp_path / "absent.txt")
    with pytest.raises(FileNotFoundError, match=r"absent\.txt.*TEXT_FILES"):
        tasks.register_text_lm(train_files=[missing], name="text_test")
    with pytest.raises(FileNotFoundError, match="VALIDATION_TEXT_FILES"):
        tasks.register_text_lm(validation_files=missing, name="text_test")
    with pytest.raises(TypeError, match="TEXT_FILES"):
        tasks.register_text_lm(train_files=object(), name="text_test")  # e.g. an unset gin macro
    assert "text_test" not in seqio.TaskRegistry.names()


def test_synthetic_seq2seq_reverses_through_encdec_converter():
    lengths = {"inputs": 40, "targets": 40}
    rows = _examples("synthetic_seq2seq", lengths, 4, seqio.EncDecFeatureConverter(pack=False))
    vocab = seqio.ByteVocabulary()
    for row in rows:
        assert set(row) == {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                            "decoder_loss_weights"}
        assert all(v.shape == (40,) for v in row.values())
        inputs, targets = row["encoder_input_tokens"].tolist(), row["decoder_target_tokens"].tolist()
        n = inputs.index(vocab.eos_id)
        assert 8 <= n <= 32 and targets.index(vocab.eos_id) == n
        assert vocab.decode(targets[:n]) == vocab.decode(inputs[:n])[::-1]
        assert row["decoder_loss_weights"].sum() == n + 1  # the EOS is a target too


def test_sentencepiece_vocabulary_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.model"):
        tasks.sentencepiece_vocabulary("/nowhere.model")
