"""scripts/train_sentencepiece.py trains a seqio-compatible model that round-trips text."""
import os
import subprocess
import sys

from lmops_jax.data import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "train_sentencepiece.py")


def test_trains_and_round_trips(tmp_path):
    prefix = str(tmp_path / "spm")
    subprocess.run([sys.executable, SCRIPT, "--input", os.path.join(tasks.CORPUS_DIR, "train.txt"),
                    "--model_prefix", prefix, "--vocab_size", "200"], check=True, capture_output=True)
    vocab = tasks.sentencepiece_vocabulary(prefix + ".model")
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.vocab_size) == (0, 1, 2, 200)
    text = "The river ran low that summer."
    ids = vocab.encode(text)
    assert ids and min(ids) > 2 and vocab.decode(ids) == text


def test_missing_input_fails_with_its_name(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--input", str(tmp_path / "absent.txt"),
                             "--model_prefix", str(tmp_path / "spm"), "--vocab_size", "100"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "absent.txt" in result.stderr
