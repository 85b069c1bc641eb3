"""A Hugging Face tokenizer.json as a seqio vocabulary: ids, round trips in Python and TF, a seqio task,
a training run through the CLI, and a crashed pipeline process that still exits."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio
import tensorflow as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmops_jax.data import tasks
from lmops_jax.data.hf_tokenizer import HFTokenizerVocabulary
from lmops_jax.models import loading

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINES = ["The quick brown fox jumps over the lazy dog.", "Tokenizers turn text into ids!",
         "A small corpus, with punctuation; and ünïcödé."]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # Llama-2 order: unk 0, bos 1, eos 2; pad 3


def _byte_level_bpe(directory) -> Tokenizer:
    """A GPT-2-style byte-level BPE of 300 ids trained on LINES, saved as directory/tokenizer.json."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(LINES * 4, trainer)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return tokenizer


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    return str(directory), _byte_level_bpe(directory)


def _word_level(directory, vocab: dict, **json_files) -> str:
    """A whitespace WordLevel tokenizer over `vocab` ({token: id}) plus JSON config files beside it."""
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]" if "[UNK]" in vocab else None))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    for name, data in json_files.items():
        with open(os.path.join(directory, f"{name}.json"), "w") as f:
            json.dump(data, f)
    return str(directory)


def test_special_ids_come_from_the_tokenizer_and_round_trip_in_python(bpe):
    path, tokenizer = bpe
    vocab = HFTokenizerVocabulary(path)
    assert (vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.pad_id) == (0, 1, 2, 3)
    assert vocab.vocab_size == tokenizer.get_vocab_size() == 300
    for line in LINES + ["text the tokenizer never saw: 123 \u2603"]:
        ids = vocab.encode(line)
        assert ids == tokenizer.encode(line, add_special_tokens=False).ids
        assert vocab.decode(ids) == line
        assert vocab.decode(ids + [vocab.eos_id, 40, 41]) == line  # stops at EOS, as seqio vocabularies do


def test_tf_encode_and_decode_match_python(bpe):
    path, tokenizer = bpe
    vocab = HFTokenizerVocabulary(path)
    expected = [tokenizer.encode(line, add_special_tokens=False).ids for line in LINES]
    assert vocab.encode_tf(tf.constant(LINES[0])).numpy().tolist() == expected[0]
    ragged = vocab.encode_tf(tf.constant(LINES))
    assert ragged.to_list() == expected
    width = max(map(len, expected)) + 2
    padded = np.full((len(LINES), width), vocab.pad_id, np.int32)
    for row, ids in zip(padded, expected):
        row[:len(ids) + 1] = ids + [vocab.eos_id]
    texts = vocab.decode_tf(tf.constant(padded)).numpy().tolist()
    assert [t.decode("utf-8") for t in texts] == LINES
    assert vocab.decode_tf(tf.constant(padded[0])).numpy().decode("utf-8") == LINES[0]

    @tf.function
    def encode_in_graph(s):  # as seqio's tokenize preprocessor calls it inside tf.data
        return vocab.encode_tf(s)

    assert encode_in_graph(tf.constant(LINES[1])).numpy().tolist() == expected[1]


def test_configs_then_arguments_override_the_special_ids(tmp_path, caplog):
    vocab = {"hello": 0, "world": 1, "[UNK]": 2, "<eos>": 3, "<|eot|>": 4, "<blank>": 5}
    plain = _word_level(tmp_path / "plain", vocab)
    with caplog.at_level(logging.WARNING):
        v = HFTokenizerVocabulary(plain)
    assert (v.eos_id, v.unk_id, v.pad_id, v.bos_id) == (3, 2, 0, None)  # conventional names; pad seqio's 0
    assert "ordinary token 'hello'" in caplog.text  # id 0 would get no loss weight
    configured = _word_level(tmp_path / "configured", vocab, tokenizer_config={"eos_token": {"content": "<|eot|>"}},
                             config={"eos_token_id": [3, 4], "pad_token_id": 5, "bos_token_id": 1})
    v = HFTokenizerVocabulary(os.path.join(configured, "tokenizer.json"))
    assert (v.eos_id, v.pad_id, v.bos_id) == (4, 5, 1)  # tokenizer_config.json before config.json
    assert HFTokenizerVocabulary(configured, eos_id=3, pad_id=0).eos_id == 3
    assert v.encode("hello world") == [0, 1] and v.decode([0, 1, 4, 0]) == "hello world"


def test_padding_and_truncation_saved_in_the_file_are_ignored(tmp_path):
    tokenizer = Tokenizer(models.WordLevel(vocab={"<pad>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.enable_padding(length=8)
    tokenizer.enable_truncation(max_length=2)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert HFTokenizerVocabulary(str(tmp_path)).encode("a b a b") == [2, 3, 2, 3]  # seqio trims and pads


def test_bad_tokenizers_and_ids_are_named(tmp_path):
    no_eos = _word_level(tmp_path / "no_eos", {"<pad>": 0, "a": 1})
    with pytest.raises(ValueError, match="no EOS token.*pass eos_id"):
        HFTokenizerVocabulary(no_eos)
    assert HFTokenizerVocabulary(no_eos, eos_id=1).eos_id == 1
    with pytest.raises(ValueError, match="eos_id=7 is not an id"):
        HFTokenizerVocabulary(no_eos, eos_id=7)
    unknown = _word_level(tmp_path / "unknown", {"<pad>": 0, "</s>": 1}, tokenizer_config={"eos_token": "<end>"})
    with pytest.raises(ValueError, match="eos_token names '<end>'"):
        HFTokenizerVocabulary(unknown)
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        HFTokenizerVocabulary(str(tmp_path / "missing"))
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer file"):
        HFTokenizerVocabulary(str(tmp_path / "broken.json"))


def test_equality_extra_ids_and_vocabulary_from(bpe):
    path, _ = bpe
    vocab = HFTokenizerVocabulary(path)
    assert vocab == HFTokenizerVocabulary(os.path.join(path, "tokenizer.json"))
    assert vocab != HFTokenizerVocabulary(path, eos_id=1) and vocab != seqio.ByteVocabulary()
    sentinels = HFTokenizerVocabulary(path, extra_ids=4)
    assert sentinels.vocab_size == 304 and sentinels.decode(vocab.encode("dog") + [303]) == "dog"
    assert tasks.vocabulary_from(path) == vocab
    assert isinstance(tasks.vocabulary_from(None), seqio.ByteVocabulary)
    with pytest.raises(TypeError, match="VOCABULARY"):
        tasks.vocabulary_from(3)


def test_text_lm_with_the_tokenizer_yields_its_ids(bpe, tmp_path):
    path, tokenizer = bpe
    text = tmp_path / "text.txt"
    text.write_text("\n".join(LINES) + "\n")
    name = "hf_tokenizer_text_lm_test"
    try:
        task = tasks.register_text_lm(str(text), str(text), vocabulary=path, name=name)
        ds = task.get_dataset({"targets": 64}, split="validation", shuffle=False)
        got = [ex["targets"].tolist() for ex in ds.as_numpy_iterator()]
    finally:
        seqio.TaskRegistry.remove(name)
    assert got == [tokenizer.encode(line, add_special_tokens=False).ids + [2] for line in LINES]


def test_cli_trains_text_lm_with_a_tokenizer_path(bpe, tmp_path):
    path, _ = bpe
    text = tmp_path / "text.txt"
    text.write_text("\n".join(LINES * 8) + "\n")
    model_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmops_jax.train", "--gin_file=gin_configs/models/llama_tiny.gin",
           "--gin_file=gin_configs/runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2",
           "--gin.BATCH_SIZE=2", "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.WARMUP_STEPS=0",
           "--gin.LOG_PERIOD=1", "--gin.EVAL_STEPS=1", "--gin.MIXTURE_OR_TASK_NAME='text_lm'",
           f"--gin.TEXT_FILES='{text}'", f"--gin.VALIDATION_TEXT_FILES='{text}'", f"--gin.VOCABULARY='{path}'"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert f"VOCABULARY = '{path}'" in (model_dir / "config.gin").read_text()
    # The checkpoint names the tokenizer itself, not task text_lm (in a fresh process: the byte vocabulary).
    assert loading.read_spec(str(model_dir)).vocabulary.build() == HFTokenizerVocabulary(path)


def test_a_crash_with_a_live_pipeline_exits_instead_of_hanging(bpe, tmp_path):
    """The traceback of an uncaught exception holds a tf.data iterator whose pipeline calls the
    tokenizer through py_function; without the atexit hook the process never exits."""
    path, _ = bpe
    script = f"""
import seqio
from lmops_jax.data import tasks
def main():
    task = tasks.register_text_lm(vocabulary={path!r})
    iterator = task.get_dataset({{"targets": 64}}, split="train", shuffle=False).prefetch(2).as_numpy_iterator()
    next(iterator)
    raise RuntimeError("crash while the pipeline runs")
main()
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "crash while the pipeline runs" in proc.stderr, proc.stderr[-3000:]
