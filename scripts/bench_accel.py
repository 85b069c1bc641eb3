"""Training throughput and MFU of a ~1B Llama in bfloat16 at 2k context on whatever accelerator is present.

Model (accelerators): TinyLlama-1.1B's shape, vocab 32000, d_model 2048, 22 layers, 32 heads (4 KV heads),
MLP 5632, untied, 2048 positions; bfloat16 compute with float32 params and Adam state (the mixed-precision
preset), scanned layers, `jax.nn.dot_product_attention` (cuDNN / splash where they apply). On CPU it runs a
scaled-down config instead (vocab 4096, d_model 256, 4 layers, 4 heads, 2 KV heads, MLP 704, 512
positions) and says so. Random tokens, `Trainer.train_step` (jitted once, state donated) over all local
devices on a data-parallel mesh ('fsdp' rules when there are several: the 1B state then fits more easily).

MFU = tokens/s x model FLOPs per token / peak, FLOPs counted with the MaxText convention the library uses
(`BaseModel.training_flops_per_token`: 6 x matmul weights incl. the unembedding, the embedding lookup
excluded, causal attention counted half; remat's recomputation not counted). Peak: the device's published
dense bfloat16 FLOP/s (PUBLISHED_PEAKS, per chip, x the device count); on CPU, or an accelerator the table
lacks, a jitted 2048^3 matmul in the compute dtype measured in the same run (as bench_train.py does).
Peak memory: XLA's compiled memory analysis of the step (bench_train.compiled_memory), and the allocator's
peak bytes in use where the device reports them.

    python scripts/bench_accel.py [--steps 10] [--warmup 2] [--batch N] [--remat_policy none|full|minimal|...]
                                  [--no_scan] [--param_dtype float32|bfloat16] [--cpu_full_size]

Ends with one JSON line: device_kind, scaled_down, tokens_per_s, mfu, peak_flops, peak_source,
model_flops_per_token, step_peak_bytes, compile_s, ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import bench_train  # noqa: E402  the random batches and the compile / memory probes
from lmops_jax import partitioning  # noqa: E402
from lmops_jax.models import decoder_only, model  # noqa: E402
from lmops_jax.training import flops, optimizers, trainer  # noqa: E402

# Published dense bfloat16 peak FLOP/s per chip (vendor datasheets, without sparsity), matched in order
# as lower-case substrings of `jax.Device.device_kind`.
PUBLISHED_PEAKS = (
    ("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("gh200", 989e12), ("b200", 2250e12),
    ("a100", 312e12), ("l40s", 362e12), ("l4", 121e12), ("a10", 125e12),
    ("tpu v6", 918e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12), ("tpu v3", 123e12),
)
ONE_B = dict(vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, mlp_dim=5632,
             max_length=2048)
CPU_SCALED = dict(vocab_size=4096, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=704,
                  max_length=512)


def published_peak(device_kind: str) -> float | None:
    """The per-chip dense bfloat16 peak of a device kind, or None when the table does not know it."""
    kind = device_kind.lower()
    return next((peak for name, peak in PUBLISHED_PEAKS if name in kind), None)


def job_peak(compute_dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of all local devices, where it came from)."""
    kind = jax.devices()[0].device_kind
    per_chip = None if jax.default_backend() == "cpu" else published_peak(kind)
    if per_chip is not None:
        return per_chip * jax.local_device_count(), f"published ({kind}, {per_chip / 1e12:.0f} TFLOP/s per chip)"
    measured = flops.measure_matmul_peak(dtype=compute_dtype)
    return measured, f"measured now ({compute_dtype} 2048^3 matmul on {kind})"


def build(args: argparse.Namespace, scaled_down: bool) -> trainer.Trainer:
    shape = CPU_SCALED if scaled_down else ONE_B
    config = decoder_only.LlamaConfig(
        **shape, tie_embeddings=False, dtype="bfloat16", param_dtype=args.param_dtype, scan_layers=not args.no_scan,
        remat=args.remat_policy != "none", remat_policy="full" if args.remat_policy == "none" else args.remat_policy)
    devices = jax.local_device_count()
    partitioner = partitioning.Partitioner({"data": 1, "fsdp": devices, "model": 1}, "fsdp" if devices > 1 else "dp")
    batch = args.batch or (2 if scaled_down else 8) * devices
    return trainer.Trainer(model.DecoderOnlyModel(config), partitioner,
                           optimizers.OptimizerConfig(name="adamw", warmup_steps=0), 10**6, batch,
                           {"targets": shape["max_length"]})


def device_peak_bytes() -> int | None:
    """The allocator's peak bytes in use on device 0 (GPU/TPU), or None where it keeps no statistics."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, allocator)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 8 per device; 2 on CPU)")
    parser.add_argument("--remat_policy", default="none", help="'none' or a layers.REMAT_POLICIES name")
    parser.add_argument("--no_scan", action="store_true", help="unrolled layers instead of nn.scan")
    parser.add_argument("--param_dtype", default="float32", help="master weights and Adam state dtype")
    parser.add_argument("--cpu_full_size", action="store_true", help="run the 1B config on CPU too (slow)")
    args = parser.parse_args()
    backend = jax.default_backend()
    scaled_down = backend == "cpu" and not args.cpu_full_size
    if scaled_down:
        print("CPU backend: running a SCALED-DOWN config (d_model 256, 4 layers, 512 positions), not the 1B "
              "model at 2k context; MFU is against a matmul peak measured in this run")
    t = build(args, scaled_down)
    length = t.task_feature_lengths["targets"]
    data = bench_train.batches(0, t.batch_size, length, t.model.vocab_size)
    device_batches = [jax.device_put(next(data), t.batch_sharding) for _ in range(2)]
    compile_s, memory = bench_train.compile_step(t, next(data))
    state = t.init_state()
    for i in range(args.warmup):
        state, metrics = t.train_step(state, device_batches[i % 2])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = t.train_step(state, device_batches[i % 2])
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps
    peak, peak_source = job_peak(t.model.config.dtype)
    flops_per_token = t.model.training_flops_per_token(t.task_feature_lengths)
    tokens_per_s = t.batch_size * length / step_s
    params = sum(x.size for x in jax.tree.leaves(state.params))
    result = {
        "backend": backend, "device_kind": jax.devices()[0].device_kind, "devices": jax.local_device_count(),
        "scaled_down": scaled_down, "params": params, "batch": t.batch_size, "seq_len": length,
        "scan_layers": t.model.config.scan_layers, "remat_policy": args.remat_policy,
        "compute_dtype": t.model.config.dtype, "param_dtype": t.model.config.param_dtype,
        "tokens_per_s": tokens_per_s, "step_time_s": step_s, "model_flops_per_token": flops_per_token,
        "mfu": tokens_per_s * flops_per_token / peak, "peak_flops": peak, "peak_source": peak_source,
        "compile_s": compile_s, **memory, "device_peak_bytes_in_use": device_peak_bytes(),
        "loss": float(metrics["loss_sum"] / metrics["weight_sum"]), "jax_version": jax.__version__,
    }
    print(f"{params / 1e6:.1f}M params, batch {t.batch_size} x {length}, bfloat16 compute on "
          f"{result['devices']} x {result['device_kind']}: {tokens_per_s:,.0f} tokens/s, MFU "
          f"{100 * result['mfu']:.1f}% of {peak / 1e12:.2f} TFLOP/s ({peak_source}); step peak "
          f"{memory['step_peak_bytes'] / 2**30:.2f} GiB (XLA), compiled in {compile_s:.1f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
