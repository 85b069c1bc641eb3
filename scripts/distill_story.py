"""Does distillation help? A teacher and equal students on `synthetic_lm`, whose true entropy is known.

Every run goes through the command line, as a user would run it (`python -m lmops_jax.train` with the
gin recipes, `python -m lmops_jax.distillation dump_topk`):

1. teacher: llama_tiny.gin (d_model 128, 4 layers) trained with pretrain.gin;
2. the same small student (d_model 64, 2 layers) for the same steps on the same data (same seed), with
   a small budget (few steps, small batches), trained
   a. from scratch (pretrain.gin),
   b. distilled from the online teacher (distill.gin, KD_ALPHA = 1: forward KL to the teacher only),
   c. distilled from the teacher's stored top-k (dump_topk, then distill.gin with KD_TOPK_DIR),
   d. distilled on-policy for a fraction GKD_LAMBDA of the steps (distill.gin with GKD_LAMBDA);
   e. distilled from the online teacher plus a hidden-state loss (distill.gin with HIDDEN_LAYER_PAIRS:
      the student's last layer against the teacher's, cosine through a learned 64 -> 128 map);
3. a table of held-out loss (the fixed validation split, EVAL_STEPS batches) and excess loss over the
   source's entropy (`tasks.synthetic_optimal_loss`), for the teacher and each student.

    python scripts/distill_story.py [--workdir /tmp/lmops_distill_story] [--skip_gkd] [--skip_offline] \
      [--skip_hidden]

Prints each command, a markdown table and one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT = ["--gin.decoder_only.LlamaConfig.d_model=64", "--gin.decoder_only.LlamaConfig.num_layers=2",
           "--gin.decoder_only.LlamaConfig.mlp_dim=192"]


def run(cmd: list[str], log_path: str) -> float:
    """Runs a command from the repository root; returns its wall time; fails loudly with its log."""
    print("$ " + " ".join(cmd[1:] if cmd[0] == sys.executable else cmd), flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        with open(log_path, encoding="utf-8") as log:
            sys.exit(f"command failed ({proc.returncode}); last lines of {log_path}:\n" + log.read()[-4000:])
    return time.perf_counter() - start


def last_record(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return json.loads(f.read().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/lmops_distill_story")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--teacher_steps", type=int, default=400)
    parser.add_argument("--teacher_batch", type=int, default=16)
    parser.add_argument("--student_steps", type=int, default=200)
    parser.add_argument("--student_batch", type=int, default=8)
    parser.add_argument("--eval_steps", type=int, default=8)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--gkd_lambda", type=float, default=0.5)
    parser.add_argument("--skip_gkd", action="store_true")
    parser.add_argument("--skip_offline", action="store_true")
    parser.add_argument("--skip_hidden", action="store_true")
    parser.add_argument("--hidden_pairs", default="[('layers_1', 'layers_3')]", help="HIDDEN_LAYER_PAIRS of run e")
    parser.add_argument("--hidden_weight", type=float, default=1.0)
    parser.add_argument("--reuse_teacher", action="store_true", help="keep WORKDIR/teacher from an earlier run")
    args = parser.parse_args()
    wd = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    reuse = args.reuse_teacher and os.path.exists(os.path.join(wd("teacher"), "metrics.jsonl"))
    if os.path.exists(args.workdir):
        for name in os.listdir(args.workdir):
            if not (reuse and name.startswith("teacher")):
                path = wd(name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(args.workdir, exist_ok=True)

    base = [sys.executable, "-m", "lmops_jax.train", "--gin_file=gin_configs/models/llama_tiny.gin"]
    common = [f"--gin.TASK_FEATURE_LENGTHS={{'targets': {args.length}}}", f"--gin.EVAL_STEPS={args.eval_steps}",
              "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=100000", "--gin.LOG_PERIOD=20"]
    teacher = [f"--gin.MODEL_DIR='{wd('teacher')}'", f"--gin.TRAIN_STEPS={args.teacher_steps}",
               f"--gin.BATCH_SIZE={args.teacher_batch}", "--gin.LEARNING_RATE=3e-3", "--gin.WARMUP_STEPS=40",
               "--gin.SEED=0"]
    student = STUDENT + [f"--gin.TRAIN_STEPS={args.student_steps}", f"--gin.BATCH_SIZE={args.student_batch}",
                         "--gin.LEARNING_RATE=3e-3", "--gin.WARMUP_STEPS=10", "--gin.SEED=1"]
    distill = ["--gin_file=gin_configs/runs/distill.gin", f"--gin.TEACHER_CHECKPOINT='{wd('teacher')}'",
               "--gin.KD_ALPHA=1.0", "--gin.KD_TEMPERATURE=1.0", "--gin.KD_LOSS='forward_kl'"]
    times = {}
    if reuse:
        times["teacher"] = float("nan")
        print(f"reusing the teacher in {wd('teacher')}")
    else:
        times["teacher"] = run(base + ["--gin_file=gin_configs/runs/pretrain.gin"] + common + teacher,
                               wd("teacher.log"))
    runs = {"student, scratch": ["--gin_file=gin_configs/runs/pretrain.gin"],
            "student, KD online": distill}
    if not args.skip_offline:
        topk = [f"--gin.KD_TOPK_DIR='{wd('topk')}'", f"--gin.KD_TOPK={args.topk}"]
        dump = [sys.executable, "-m", "lmops_jax.distillation", "dump_topk",
                "--gin_file=gin_configs/models/llama_tiny.gin"] + distill + common + student + topk + [
                    f"--gin.MODEL_DIR='{wd('unused')}'"]
        times["dump top-k"] = run(dump, wd("dump.log"))
        runs[f"student, KD offline top-{args.topk}"] = distill + topk
    if not args.skip_gkd:
        runs[f"student, GKD lambda={args.gkd_lambda}"] = distill + [f"--gin.GKD_LAMBDA={args.gkd_lambda}",
                                                                   "--gin.GKD_PROMPT_LENGTH=8"]
    if not args.skip_hidden:
        runs[f"student, KD online + hidden states {args.hidden_pairs}"] = distill + [
            f"--gin.HIDDEN_LAYER_PAIRS={args.hidden_pairs}", f"--gin.HIDDEN_WEIGHTS={args.hidden_weight}"]
    records = {"teacher": last_record(wd("teacher"))}
    for i, (name, flags) in enumerate(runs.items()):
        model_dir = wd(f"student{i}")
        times[name] = run(base + flags + common + student + [f"--gin.MODEL_DIR='{model_dir}'"], model_dir + ".log")
        records[name] = last_record(model_dir)

    sys.path.insert(0, REPO)  # run as a script from a checkout: the package is the repository's
    from lmops_jax.data import tasks
    optimal = tasks.synthetic_optimal_loss({"targets": args.length})
    print(f"\nsynthetic_lm, {args.length} tokens per row; true entropy (optimal loss) {optimal:.4f} nats/token")
    print(f"teacher: llama_tiny (d_model 128, 4 layers), {args.teacher_steps} steps x {args.teacher_batch} rows; "
          f"students: d_model 64, 2 layers, {args.student_steps} steps x {args.student_batch} rows, seed 1\n")
    print("| run | held-out loss | excess over entropy | teacher agreement | wall s |")
    print("|---|---:|---:|---:|---:|")
    figures = {"optimal_loss": optimal}
    for name, record in records.items():
        loss = record["eval/loss"]
        agreement = record.get("teacher_agreement")
        agreement = f"{agreement:.3f}" if agreement is not None else "-"
        print(f"| {name} | {loss:.4f} | {loss - optimal:.4f} | {agreement} | {times[name]:.0f} |")
        figures[name] = {"eval_loss": loss, "excess": loss - optimal}
    scratch = records["student, scratch"]["eval/loss"] - optimal
    online = records["student, KD online"]["eval/loss"] - optimal
    print(f"\nexcess loss, KD online / scratch: {online / scratch:.3f}")
    if "dump top-k" in times:
        print(f"dump of the teacher's top-{args.topk}: {times['dump top-k']:.0f} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
