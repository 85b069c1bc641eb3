"""Does cross-tokenizer distillation help? A byte-level student from a SentencePiece teacher on `text_lm`.

Every run goes through the command line (`python -m lmops_jax.train` with the gin recipes):

1. a SentencePiece model trained on the task's training text (scripts/train_sentencepiece.py);
2. teacher: llama_tiny.gin (d_model 128, 4 layers) trained on text_lm in that vocabulary (pretrain.gin);
3. the same byte-level student (d_model 64, 2 layers) for the same steps on the same data (same seed),
   a. from scratch (pretrain.gin, text_lm in bytes),
   b. distilled from the teacher (distill_cross_tokenizer.gin: ULD at byte-offset-aligned positions);
4. a table of the students' held-out loss (nats per byte on the validation split) and the aligned fraction.

    python scripts/distill_cross_tokenizer.py [--workdir /tmp/lmops_distill_xtok]

Prints each command, a markdown table and one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_story import REPO, STUDENT, last_record, run  # noqa: E402
from train_sentencepiece import train_sentencepiece  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/lmops_distill_xtok")
    parser.add_argument("--vocab_size", type=int, default=400)
    parser.add_argument("--teacher_steps", type=int, default=300)
    parser.add_argument("--student_steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--student_length", type=int, default=320)
    parser.add_argument("--teacher_length", type=int, default=128)
    parser.add_argument("--kd_alpha", type=float, default=0.5)
    args = parser.parse_args()
    wd = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    corpus = os.path.join(REPO, "lmops_jax", "data", "corpus", "train.txt")
    spm = train_sentencepiece([corpus], wd("spm"), args.vocab_size, hard_vocab_limit=False)
    print(f"SentencePiece model {spm} (vocab_size <= {args.vocab_size})")

    base = [sys.executable, "-m", "lmops_jax.train", "--gin_file=gin_configs/models/llama_tiny.gin"]
    common = ["--gin.MIXTURE_OR_TASK_NAME='text_lm'", "--gin.EVAL_STEPS=1", "--gin.EVAL_PERIOD=0",
              "--gin.CHECKPOINT_PERIOD=100000", "--gin.LOG_PERIOD=50", f"--gin.BATCH_SIZE={args.batch}",
              "--gin.LEARNING_RATE=3e-3"]
    teacher = ["--gin_file=gin_configs/runs/pretrain.gin", f"--gin.MODEL_DIR='{wd('teacher')}'",
               f"--gin.VOCABULARY='{spm}'", f"--gin.TASK_FEATURE_LENGTHS={{'targets': {args.teacher_length}}}",
               f"--gin.TRAIN_STEPS={args.teacher_steps}", "--gin.WARMUP_STEPS=30", "--gin.SEED=0"]
    times = {"teacher": run(base + common + teacher, wd("teacher.log"))}
    student = STUDENT + [f"--gin.TASK_FEATURE_LENGTHS={{'targets': {args.student_length}}}",
                         f"--gin.TRAIN_STEPS={args.student_steps}", "--gin.WARMUP_STEPS=30", "--gin.SEED=1"]
    runs = {"byte student, scratch": ["--gin_file=gin_configs/runs/pretrain.gin"],
            "byte student, ULD from the SentencePiece teacher": [
                "--gin_file=gin_configs/runs/distill_cross_tokenizer.gin", f"--gin.TEACHER_CHECKPOINT='{wd('teacher')}'",
                f"--gin.KD_TEACHER_LENGTH={args.teacher_length}", f"--gin.KD_ALPHA={args.kd_alpha}"]}
    records = {"teacher": last_record(wd("teacher"))}
    for i, (name, flags) in enumerate(runs.items()):
        model_dir = wd(f"student{i}")
        times[name] = run(base + flags + common + student + [f"--gin.MODEL_DIR='{model_dir}'"], model_dir + ".log")
        records[name] = last_record(model_dir)

    print(f"\ntext_lm (the shipped corpus); teacher: llama_tiny (d_model 128, 4 layers) in a {args.vocab_size}-piece "
          f"SentencePiece vocabulary, {args.teacher_steps} steps x {args.batch} rows of {args.teacher_length} tokens; "
          f"students: bytes, d_model 64, 2 layers, {args.student_steps} steps x {args.batch} rows of "
          f"{args.student_length} bytes, seed 1\n")
    print("| run | held-out loss | unit | aligned fraction | wall s |")
    print("|---|---:|---|---:|---:|")
    figures = {}
    for name, record in records.items():
        unit = "nats/piece" if name == "teacher" else "nats/byte"
        aligned = f"{record['aligned']:.3f}" if "aligned" in record else "-"
        print(f"| {name} | {record['eval/loss']:.4f} | {unit} | {aligned} | {times[name]:.0f} |")
        figures[name] = {"eval_loss": record["eval/loss"]}
        if "aligned" in record:
            figures[name]["aligned"] = record["aligned"]
    names = list(runs)
    ratio = records[names[1]]["eval/loss"] / records[names[0]]["eval/loss"]
    print(f"\nheld-out loss, distilled / scratch: {ratio:.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
