"""Trains a SentencePiece model on local text files, with the ids seqio and T5 expect.

    python scripts/train_sentencepiece.py --input a.txt b.txt --model_prefix /tmp/spm --vocab_size 1000

writes /tmp/spm.model and /tmp/spm.vocab. Ids: pad=0, eos=1, unk=2 and no bos, as
`seqio.SentencePieceVocabulary` assumes; load it with `lmops_jax.data.tasks.sentencepiece_vocabulary`.
Needs only the `sentencepiece` package (no TensorFlow).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import sentencepiece as spm


def train_sentencepiece(
    input_files: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    hard_vocab_limit: bool = True,
) -> str:
    """Trains the model and returns the path of the .model file.

    With `hard_vocab_limit=False` SentencePiece may return fewer pieces than `vocab_size` when the
    text is too small to support that many, instead of failing.
    """
    missing = [f for f in input_files if not os.path.isfile(f)]
    if not input_files or missing:
        raise FileNotFoundError(f"input text files missing: {missing or 'none given'}")
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (pad, eos, unk and one piece), got {vocab_size}")
    spm.SentencePieceTrainer.train(
        input=",".join(input_files),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        hard_vocab_limit=hard_vocab_limit,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return model_prefix + ".model"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="text files, one sentence or paragraph a line")
    parser.add_argument("--model_prefix", required=True, help="output path without extension")
    parser.add_argument("--vocab_size", type=int, required=True)
    parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    parser.add_argument("--character_coverage", type=float, default=1.0)
    parser.add_argument("--soft_vocab_limit", action="store_true",
                        help="allow fewer pieces than --vocab_size on small inputs")
    args = parser.parse_args(argv)
    path = train_sentencepiece(args.input, args.model_prefix, args.vocab_size, args.model_type,
                               args.character_coverage, hard_vocab_limit=not args.soft_vocab_limit)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
