"""Prune + distil against the same small model trained from scratch and against the pruned model alone.

A teacher (gin_configs/models/llama_tiny.gin: d_model 128, 4 layers, 4 heads over 2 KV heads, MLP
512, byte vocabulary) is trained on `synthetic_lm` for `--teacher_steps` steps. The shipped `text_lm`
corpus is 8 KB: a model memorizes it within 100 steps, so its validation loss says little; the
synthetic task never repeats and its loss floor (the source's entropy) is known. Then, all on the
same data stream:

  width pruned    `python -m lmops_jax.compress prune` width: 2 of 4 heads (1 of 2 KV groups), MLP
                  256 of 512, ranked on 8 calibration batches: about half the parameters
  pruned+distil   that checkpoint distilled from the teacher for `--steps` steps (prune_distill.gin)
  scratch         the same small config trained from scratch for `--steps` steps (pretrain.gin)
  2:4, 2:4+distil the teacher with 2:4 masks on every projection, alone and distilled (masks kept)

Reported per model: parameters (non-zero), validation loss on 8 batches of 8 x 128 tokens and its change
against the teacher, greedy agreement with the teacher (16 validation prompts of 16 tokens, 32 new
tokens), and greedy decode tokens/s at batch 1 and 8 (`--new_tokens` 64 new tokens, best of `--repeats`
3, ratio to the teacher in the same run) for the teacher, pruned+distil and 2:4 ("-" for the others:
same shapes as one of those). The last line is one JSON object.

    python scripts/bench_prune.py [--teacher_steps 300] [--steps 150] [--workdir /tmp/bench_prune] \
      [--new_tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmops_jax.compression import calibration  # noqa: E402
from lmops_jax.data import tasks  # noqa: E402
from lmops_jax.inference.inference_module import InferenceModule  # noqa: E402
from bench_compression import decode_speed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"targets": 128}
DATA_FLAGS = ["--gin.MIXTURE_OR_TASK_NAME='synthetic_lm'", "--gin.BATCH_SIZE=8",
              f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.EVAL_STEPS=1", "--gin.LOG_PERIOD=50"]
WIDTH = ["--gin.PRUNE_METHOD='width'", "--gin.PRUNE_NUM_HEADS=2", "--gin.PRUNE_MLP_DIM=256"]


def run_module(module: str, *flags: str) -> str:
    """Runs `python -m module flags` in the repository; returns its stdout (raises on failure)."""
    proc = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{module} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def train(model_dir: str, steps: int, gin_files: list[str], *flags: str) -> None:
    run_module("lmops_jax.train", *[f"--gin_file={f}" for f in gin_files], f"--gin.MODEL_DIR='{model_dir}'",
               f"--gin.TRAIN_STEPS={steps}", f"--gin.WARMUP_STEPS={max(steps // 10, 1)}", *DATA_FLAGS, *flags)


def prune(teacher: str, out: str, *flags: str) -> dict:
    stdout = run_module("lmops_jax.compress", "prune", "--gin_file=gin_configs/runs/prune.gin",
                        f"--gin.CHECKPOINT_PATH='{teacher}'", f"--gin.OUTPUT_DIR='{out}'", "--gin.BATCH_SIZE=8",
                        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.CALIBRATION_BATCHES=8", *flags)
    return json.loads(stdout.strip().splitlines()[-1])


def measure(path: str, eval_data: list, prompts: list, reference: np.ndarray | None,
            speed: bool, args: argparse.Namespace) -> tuple[dict, np.ndarray]:
    """Figures of the checkpoint at `path` (module docstring) and its greedy tokens."""
    module = InferenceModule.from_checkpoint(path)
    leaves = jax.tree.leaves(jax.device_get(module.params))
    tokens = np.asarray(module.generate(prompts, max_new_tokens=32).tokens)
    row = {"params": sum(int(x.size) for x in leaves), "nonzero_params": sum(int(np.count_nonzero(x)) for x in leaves),
           "eval_loss": calibration.mean_loss(module.model, module.params, eval_data),
           "greedy_agreement": 1.0 if reference is None else float(np.mean(tokens == reference))}
    if speed:
        row.update({f"decode_tok_s_b{b}": decode_speed(module, prompts, b, args.new_tokens, args.repeats)
                    for b in (1, 8)})
    return row, tokens


def build(workdir: str, teacher_steps: int, steps: int) -> dict[str, str]:
    """Trains and prunes every model of the table; returns {row name: checkpoint path}."""
    paths = {name: os.path.join(workdir, name.replace(" ", "_").replace(":", "").replace("+", "_"))
             for name in ("teacher", "width pruned", "pruned+distil", "scratch", "2:4", "2:4+distil")}
    train(paths["teacher"], teacher_steps, ["gin_configs/models/llama_tiny.gin", "gin_configs/runs/pretrain.gin"])
    width = prune(paths["teacher"], paths["width pruned"], *WIDTH)
    prune(paths["teacher"], paths["2:4"], "--gin.PRUNE_METHOD='2:4'")
    for student, pruned in (("pruned+distil", "width pruned"), ("2:4+distil", "2:4")):
        train(paths[student], steps, ["gin_configs/runs/prune_distill.gin"],
              f"--gin.TEACHER_CHECKPOINT='{paths['teacher']}'", f"--gin.PRUNED_CHECKPOINT='{paths[pruned]}'")
    train(paths["scratch"], steps, ["gin_configs/models/llama_tiny.gin", "gin_configs/runs/pretrain.gin"],
          *width["gin_overrides"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher_steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workdir", default="/tmp/bench_prune")
    parser.add_argument("--new_tokens", type=int, default=64, help="new tokens of each timed decode")
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes per batch size (the best counts)")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    paths = build(args.workdir, args.teacher_steps, args.steps)
    teacher = InferenceModule.from_checkpoint(paths["teacher"])
    eval_data = list(calibration.batches(teacher.model, "synthetic_lm", LENGTHS, 8, "validation", 8))
    prompts = [[int(t) for t in row[:16]] for row in eval_data[0]["decoder_target_tokens"][:16]]
    rows, reference = {}, None
    for name, path in paths.items():
        speed = name in ("teacher", "pruned+distil", "2:4")
        rows[name], tokens = measure(path, eval_data, prompts, reference, speed, args)
        reference = tokens if reference is None else reference
    base = rows["teacher"]
    print("| model | params (non-zero) | val loss (change) | greedy agreement | tok/s b1 (ratio) | tok/s b8 (ratio) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        r["eval_loss_change"] = (r["eval_loss"] - base["eval_loss"]) / base["eval_loss"]
        speed = [f"{r[f'decode_tok_s_{b}']:.0f} ({r[f'decode_tok_s_{b}'] / base[f'decode_tok_s_{b}']:.2f}x)"
                 if f"decode_tok_s_{b}" in r else "-" for b in ("b1", "b8")]
        print(f"| {name} | {r['params']:,} ({r['nonzero_params']:,}) | {r['eval_loss']:.4f} "
              f"({100 * r['eval_loss_change']:+.1f}%) | {r['greedy_agreement']:.3f} | {speed[0]} | {speed[1]} |")
    gap = rows["scratch"]["eval_loss"] - rows["pruned+distil"]["eval_loss"]
    print(json.dumps({"date": datetime.date.today().isoformat(), "teacher_steps": args.teacher_steps,
                      "steps": args.steps, "new_tokens": args.new_tokens,
                      "optimal_loss": tasks.known_optimal_loss("synthetic_lm", LENGTHS),
                      "scratch_minus_pruned_distil_loss": gap, "rows": rows}))


if __name__ == "__main__":
    main()
