"""Quantization table: bytes, validation loss, greedy agreement and decode speed of one trained model.

A teacher (gin_configs/models/llama_tiny.gin: d_model 128, 4 layers, byte vocabulary) is trained on
`synthetic_lm` (a Markov source with an endless validation stream; the shipped text_lm corpus is 8 KB,
which a teacher memorizes and whose validation split fills less than one batch) for `--train_steps` steps, then quantized by
`python -m lmops_jax.compress quantize`'s Python API into int8, int4 (tile 32; o_proj int8, its
head_dim being 32), GPTQ int4, AWQ int4 and w8a8, all on the same calibration and validation batches.
Each variant is loaded back from its checkpoint with `InferenceModule.from_checkpoint` (bf16: the
float checkpoint at dtype bfloat16). Reported per variant: matmul-weight bytes (the quantized
kernels with their scales) and their ratio to float32, validation loss and its relative change,
greedy agreement with float32 (fraction of equal tokens over `--prompts` validation prompts of 16
tokens, 32 new tokens each), and greedy decode tokens/s at batch 1 and 8 (`--new_tokens` 64 new tokens,
best of `--repeats` 3 after a warm-up; ratio to float32 measured in the same run). `--variants` picks
a subset of the quantized rows (float32 and bf16 are always measured); `--batches` sets the calibration
and validation batches (8). The last line is one JSON object.

    python scripts/bench_compression.py [--train_steps 300] [--workdir /tmp/bench_compression] \
      [--variants 'int8,int4,gptq int4,awq int4,w8a8'] [--batches 8] [--new_tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from lmops_jax.compression import calibration  # noqa: E402
from lmops_jax.compression import quantize as q  # noqa: E402
from lmops_jax.data import tasks  # noqa: E402,F401  registers synthetic_lm
from lmops_jax.inference.inference_module import InferenceModule  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"targets": 128}
INT4_RULES = [(".*/o_proj", "int8"), (".*_proj|lm_head", "int4/32")]
VARIANTS = {  # name: (scheme, method, rules)
    "int8": ("int8", "ptq", None), "int4": ("int4", "ptq", INT4_RULES), "gptq int4": ("int4", "gptq", INT4_RULES),
    "awq int4": ("int4", "awq", INT4_RULES), "w8a8": ("w8a8", "ptq", None)}


def train_teacher(model_dir: str, steps: int) -> None:
    cmd = [sys.executable, "-m", "lmops_jax.train", "--gin_file=gin_configs/models/llama_tiny.gin",
           "--gin_file=gin_configs/runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'",
           "--gin.MIXTURE_OR_TASK_NAME='synthetic_lm'", f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8",
           f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.EVAL_STEPS=1"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def decode_speed(module: InferenceModule, prompts: list, batch: int, new_tokens: int, repeats: int) -> float:
    rows = (prompts * batch)[:batch]
    module.generate(rows, max_new_tokens=new_tokens)  # compile
    best = min(_timed(lambda: module.generate(rows, max_new_tokens=new_tokens)) for _ in range(repeats))
    return batch * new_tokens / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(module: InferenceModule, prompts: list, reference: np.ndarray | None,
            args: argparse.Namespace) -> tuple[dict, np.ndarray]:
    """Greedy agreement with `reference` and decode tokens/s at batch 1 and 8; and the greedy tokens."""
    tokens = np.asarray(module.generate(prompts, max_new_tokens=32).tokens)
    agreement = 1.0 if reference is None else float(np.mean(tokens == reference))
    speeds = {f"decode_tok_s_b{b}": decode_speed(module, prompts, b, args.new_tokens, args.repeats) for b in (1, 8)}
    return {"greedy_agreement": agreement, **speeds}, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--workdir", default="/tmp/bench_compression")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--batches", type=int, default=8, help="calibration and validation batches")
    parser.add_argument("--new_tokens", type=int, default=64, help="new tokens of each timed decode")
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes per batch size (the best counts)")
    args = parser.parse_args()
    variants = [name.strip() for name in args.variants.split(",")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose among {list(VARIANTS)}")
    shutil.rmtree(args.workdir, ignore_errors=True)
    teacher = os.path.join(args.workdir, "teacher")
    train_teacher(teacher, args.train_steps)
    data = q.DataConfig(task="synthetic_lm", task_feature_lengths=LENGTHS, batch_size=8,
                        calibration_batches=args.batches, eval_batches=args.batches)
    float32 = InferenceModule.from_checkpoint(teacher)
    eval_data = list(calibration.batches(float32.model, data.task, LENGTHS, data.batch_size, "validation",
                                         data.eval_batches))
    prompts = [[int(t) for t in b[:16]] for b in eval_data[0]["decoder_target_tokens"][:args.prompts]]
    rows, reference = {}, None
    for name, dtype in (("float32", None), ("bf16", "bfloat16")):
        module = float32 if dtype is None else InferenceModule.from_checkpoint(teacher, dtype=dtype)
        loss = calibration.mean_loss(module.model, module.params, eval_data)
        figures, tokens = measure(module, prompts, reference, args)
        reference = tokens if reference is None else reference
        rows[name] = {"eval_loss": loss, **figures}
    for name in variants:
        scheme, method, rules = VARIANTS[name]
        out = os.path.join(args.workdir, name.replace(" ", "_"))
        summary = q.quantize(checkpoint_path=teacher, output_dir=out, scheme=scheme, method=method, tile_size=32,
                             rules=rules, data=data)
        figures, _ = measure(InferenceModule.from_checkpoint(out), prompts, reference, args)
        rows[name] = {"eval_loss": summary["eval_loss_after"], "matmul_bytes": summary["matmul_bytes_after"],
                      "matmul_bytes_ratio": summary["matmul_bytes_ratio"], **figures}
        rows["float32"]["matmul_bytes"] = summary["matmul_bytes_float32"]
    base = rows["float32"]
    rows["float32"]["matmul_bytes_ratio"] = 1.0
    rows["bf16"].update(matmul_bytes=base["matmul_bytes"] / 2, matmul_bytes_ratio=0.5)
    for row in rows.values():
        row["eval_loss_change"] = (row["eval_loss"] - base["eval_loss"]) / base["eval_loss"]
        for b in ("b1", "b8"):
            row[f"decode_ratio_{b}"] = row[f"decode_tok_s_{b}"] / base[f"decode_tok_s_{b}"]
    print("| variant | matmul bytes (ratio) | val loss (change) | greedy agreement | tok/s b1 (ratio) | tok/s b8 (ratio) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['matmul_bytes']:,.0f} ({r['matmul_bytes_ratio']:.3f}x) | {r['eval_loss']:.4f} "
              f"({100 * r['eval_loss_change']:+.2f}%) | {r['greedy_agreement']:.3f} | {r['decode_tok_s_b1']:.0f} "
              f"({r['decode_ratio_b1']:.2f}x) | {r['decode_tok_s_b8']:.0f} ({r['decode_ratio_b8']:.2f}x) |")
    print(json.dumps({"date": datetime.date.today().isoformat(), "train_steps": args.train_steps,
                      "new_tokens": args.new_tokens, "repeats": args.repeats, "batches": args.batches, "rows": rows}))


if __name__ == "__main__":
    main()
