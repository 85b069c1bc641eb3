"""JAX's persistent compilation cache, which every `python -m lmops_jax.<job>` turns on: the same training
command run with the cache off, with an empty cache (it compiles and writes), and again (it reads).

Each run is a subprocess of `python -m lmops_jax.train` on the tiny Llama (2 steps, one eval), so its wall
time is mostly start-up and compilation; the difference between the cold and warm runs is the compile
time the cache saves. The last line printed is one JSON object.

    python scripts/bench_compile_cache.py [--model gin_configs/models/llama_small.gin]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(model_gin: str, model_dir: str, cache: str) -> float:
    """Wall seconds of one short training run with LMOPS_JAX_COMPILATION_CACHE=cache."""
    cmd = [sys.executable, "-m", "lmops_jax.train", f"--gin_file={model_gin}",
           "--gin_file=gin_configs/runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2",
           "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'targets': 128}", "--gin.EVAL_PERIOD=2",
           "--gin.EVAL_STEPS=1", "--gin.WARMUP_STEPS=1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, LMOPS_JAX_COMPILATION_CACHE=cache),
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gin_configs/models/llama_tiny.gin")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        seconds = {name: run_train(args.model, os.path.join(tmp, name), setting)
                   for name, setting in (("off", "off"), ("cold", cache), ("warm", cache))}
        files = len(os.listdir(cache))
    print(json.dumps({"model": args.model, "wall_s_cache_off": round(seconds["off"], 1),
                      "wall_s_cache_cold": round(seconds["cold"], 1), "wall_s_cache_warm": round(seconds["warm"], 1),
                      "warm_over_cold": round(seconds["warm"] / seconds["cold"], 3), "cache_files": files}))


if __name__ == "__main__":
    main()
