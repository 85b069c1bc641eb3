"""Where a training step's time goes: XLA op categories of the `bench_train.py` config's jitted step.

Traces `--steps` steps with `jax.profiler` after warm-up, then sums the device-side op durations by
op kind (the fusion name without its number: `ynn_fusion` and `dot` are matmuls, `copy_*` /
`transpose_*` are layout copies, ...) and prints them per step, largest first, with the largest single
ops. Also times the config's matmul shapes alone (forward and the backward's transposed-operand forms),
for comparison with their rate inside the step.

    python scripts/profile_train.py [--steps 3] [--top 12]

Set XLA_FLAGS to compare compiler options (e.g. --xla_cpu_experimental_ynn_fusion_type=dot).
Ends with one JSON line: step_time_s, matmul_ms, copy_ms, other_ms, in_step_matmul_gflops,
isolated_matmul_gflops.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lmops_jax.cli import host_memory  # noqa: E402

if __name__ == "__main__":
    host_memory.configure()  # huge pages for malloc's large blocks, as `python -m lmops_jax.train` (may exec again)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402  the same config and step

MATMUL_KINDS = ("ynn_fusion", "dot", "onednn", "xnn_fusion")
COPY_KINDS = ("copy", "transpose")
HOST_EVENTS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "end:")


def op_durations(trace_dir: str) -> list[tuple[str, float]]:
    """(op name, microseconds) of every device-side op event in a jax.profiler trace."""
    path = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))[0]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    return [(e["name"], float(e["dur"])) for e in events
            if e.get("ph") == "X" and not e["name"].startswith(HOST_EVENTS)]


def kind(name: str) -> str:
    return re.sub(r"\.\d+$", "", name)


def isolated_matmul_gflops() -> float:
    """Mean GFLOP/s of the config's matmul shapes run alone (both operand orders of the backward)."""
    d, mlp, vocab, rows = bench_train.D_MODEL, bench_train.MLP, bench_train.VOCAB, bench_train.BATCH * bench_train.LENGTH
    rates = []
    for m, k, n in ((rows, d, mlp), (rows, mlp, d), (rows, d, vocab), (d, rows, mlp), (rows, vocab, d)):
        a = jnp.asarray(np.random.rand(m, k).astype(np.float32))
        b = jnp.asarray(np.random.rand(k, n).astype(np.float32))
        for fn, x in ((jax.jit(lambda x, y: x @ y), a),
                      (jax.jit(lambda x, y: jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())))), a.T.copy())):
            fn(x, b).block_until_ready()
            start = time.perf_counter()
            for _ in range(10):
                fn(x, b).block_until_ready()
            rates.append(2 * m * k * n / ((time.perf_counter() - start) / 10) / 1e9)
    return float(np.mean(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    step, llama, _ = bench_train.jax_stepper()
    for _ in range(3):
        step()
    trace_dir = tempfile.mkdtemp(prefix="profile_train_")
    start = time.perf_counter()
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
        step()
    jax.profiler.stop_trace()
    step_time = (time.perf_counter() - start) / args.steps
    ops = op_durations(trace_dir)
    by_kind: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    for name, us in ops:
        by_kind[kind(name)] += us / args.steps / 1000
        by_op[name] += us / args.steps / 1000
    matmul = sum(v for k, v in by_kind.items() if k.startswith(MATMUL_KINDS))
    copies = sum(v for k, v in by_kind.items() if k.startswith(COPY_KINDS))
    total = sum(by_kind.values())
    flops = llama.training_flops_per_token({"targets": bench_train.LENGTH}) * bench_train.BATCH * bench_train.LENGTH
    print(f"step {step_time * 1000:.0f} ms (traced); device ops {total:.0f} ms per step")
    print(f"  matmuls      {matmul:7.1f} ms  ({matmul / total:.0%}), {flops / matmul / 1e6:.1f} GFLOP/s in the step")
    print(f"  layout copies {copies:6.1f} ms  ({copies / total:.0%})")
    print(f"  other        {total - matmul - copies:7.1f} ms")
    print("op kinds (ms per step):")
    for name, ms in by_kind.most_common(args.top):
        print(f"  {ms:7.1f}  {name}")
    print("largest ops (ms per step):")
    for name, ms in by_op.most_common(args.top):
        print(f"  {ms:7.1f}  {name}")
    isolated = isolated_matmul_gflops()
    print(f"the config's matmul shapes alone: {isolated:.1f} GFLOP/s (mean over shapes and operand orders)")
    print(json.dumps({"step_time_s": step_time, "device_ops_ms": total, "matmul_ms": matmul, "copy_ms": copies,
                      "other_ms": total - matmul - copies, "in_step_matmul_gflops": flops / matmul / 1e6,
                      "isolated_matmul_gflops": isolated, "xla_flags": os.environ.get("XLA_FLAGS", "")}))


if __name__ == "__main__":
    main()
