"""A served model and a draft distilled from it, for the speculative run of `scripts/bench_serve.py`.

Speculation pays only when the draft agrees with the served model, and a draft agrees only when it
learned the same data. Both are made the way a user would make them, with the library's documented
commands (docs/quickstart.md, docs/distillation.md) as subprocesses, on `synthetic_lm` (an order-2
Markov source over 16 symbols, byte vocabulary):

1. served: `gin_configs/examples/quickstart.gin` (llama_tiny: d_model 128, MLP 512) with
   `--served_layers` layers, rows of `--length` tokens;
2. draft: `gin_configs/runs/distill.gin` from the served checkpoint (online teacher, KD_ALPHA 1: forward
   KL to the served model only), the docs' student shape (d_model 64, 2 layers, MLP 192) at a learning
   rate of 1e-2: at the served model's 3e-3 (or with one layer) it stayed on the unigram plateau for
   the step budget (teacher agreement 0.35 after 150 steps; 0.9 by step 200 at 1e-2).

    python scripts/make_spec_pair.py [--out /tmp/lmops_spec_pair] [--served_steps 200] [--draft_steps 250]

Prints each command and, last, one JSON line {"served": DIR, "draft": DIR, "served_s": .., "draft_s": ..};
pass the two directories to bench_serve.py as --spec_checkpoint and --spec_draft_checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.distill_story import run  # noqa: E402

DRAFT = ["--gin.decoder_only.LlamaConfig.d_model=64", "--gin.decoder_only.LlamaConfig.num_layers=2",
         "--gin.decoder_only.LlamaConfig.mlp_dim=192", "--gin.LEARNING_RATE=1e-2"]


def commands(out: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """The two training commands (served first: the draft's distillation reads its checkpoint)."""
    served, draft = os.path.join(out, "served"), os.path.join(out, "draft")
    common = [f"--gin.TASK_FEATURE_LENGTHS={{'targets': {args.length}}}", "--gin.EVAL_PERIOD=0",
              "--gin.EVAL_STEPS=1", "--gin.CHECKPOINT_PERIOD=100000", "--gin.LOG_PERIOD=25",
              f"--gin.BATCH_SIZE={args.batch}"]
    train = [sys.executable, "-m", "lmops_jax.train"]
    return {
        served: train + ["--gin_file=gin_configs/examples/quickstart.gin", f"--gin.MODEL_DIR='{served}'",
                         f"--gin.decoder_only.LlamaConfig.num_layers={args.served_layers}", "--gin.LEARNING_RATE=3e-3",
                         f"--gin.TRAIN_STEPS={args.served_steps}",
                         f"--gin.WARMUP_STEPS={max(1, args.served_steps // 10)}", "--gin.SEED=0"] + common,
        draft: train + ["--gin_file=gin_configs/models/llama_tiny.gin", "--gin_file=gin_configs/runs/distill.gin",
                        f"--gin.MODEL_DIR='{draft}'", f"--gin.TEACHER_CHECKPOINT='{served}'", "--gin.KD_ALPHA=1.0",
                        f"--gin.TRAIN_STEPS={args.draft_steps}",
                        f"--gin.WARMUP_STEPS={max(1, args.draft_steps // 10)}", "--gin.SEED=1"] + DRAFT + common}


def make_pair(out: str, args: argparse.Namespace) -> dict:
    """Trains the pair under `out/served` and `out/draft` (the CLI resumes a run already there);
    returns their paths and wall seconds."""
    os.makedirs(out, exist_ok=True)
    (served, served_cmd), (draft, draft_cmd) = commands(out, args).items()
    return {"served": served, "draft": draft, "served_s": round(run(served_cmd, served + ".log"), 1),
            "draft_s": round(run(draft_cmd, draft + ".log"), 1)}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The pair's flags, shared with bench_serve.py (which makes a pair when given none)."""
    parser.add_argument("--served_layers", type=int, default=6)
    parser.add_argument("--served_steps", type=int, default=200)
    parser.add_argument("--draft_steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=8, help="rows per training step (served and draft)")
    parser.add_argument("--length", type=int, default=128, help="tokens per training row")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/lmops_spec_pair")
    add_flags(parser)
    args = parser.parse_args(argv)
    print(json.dumps(make_pair(args.out, args)))


if __name__ == "__main__":
    main()
