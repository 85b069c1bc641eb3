"""What CPU a benchmark ran on, for its JSON line: the figures of `bench_train.py` and `bench_decode.py` move
by 2x and more between the VMs this project runs on (docs/benchmarks.md), and which side wins can flip with
the CPU's vector width, so each run records the CPU it measured.

`describe()` reads Linux's /proc/cpuinfo and sysfs (elsewhere the fields it cannot read are None):
vendor, family and model numbers (a VM often hides the model name; AMD family 25 model 17 is Zen 4,
family 26 is Zen 5), the vector ISA that decides which matmul kernels XLA and PyTorch pick, the
last-level cache size, and the cores this process may use. `matvec_read_gbps()` measures how fast XLA:CPU's
matrix-vector products read their matrices when they fit in the cache and when they do not: batch-1 decoding
reads every weight once a step, so the second figure bounds its tokens/s (9.6 GB/s on the Zen 4 VM of
2026-12-02, docs/benchmarks.md).
"""
from __future__ import annotations

import os
import platform

VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _l3_bytes() -> int | None:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            size = f.read().strip()
    except OSError:
        return None
    scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
    return int(size.rstrip("KM")) * scale


def num_cores() -> int:
    """The cores this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def matvec_read_gbps(total_mib: int, steps: int = 10, repeats: int = 3) -> float:
    """GB/s of float32 [256, 256] matrices read by a jitted chain of [1, 256] x [256, 256] products (each
    output, through tanh, the next input) over `total_mib` MiB of distinct matrices, `steps` times over; the
    best of `repeats` runs after a compiling one. The chain is unrolled: a scanned one slices each matrix
    out of a stacked array first and measures the copy too."""
    import jax
    import jax.numpy as jnp

    from lmops_jax.training import flops

    matrix_bytes = 256 * 256 * 4
    count = max(1, total_mib * 2**20 // matrix_bytes)
    matrices = [jax.random.normal(jax.random.key(i), (256, 256)) / 16 for i in range(count)]

    def chain(matrices, x):
        def step(_, x):
            for m in matrices:
                x = jnp.tanh(x @ m)
            return x
        return jax.lax.fori_loop(0, steps, step, x)

    run, x = jax.jit(chain), jnp.ones((1, 256))
    run(matrices, x).block_until_ready()
    return count * matrix_bytes * steps / flops.best_seconds(lambda: run(matrices, x), repeats) / 1e9


def describe() -> dict:
    """{'cpu': model name, 'cpu_vendor', 'cpu_family', 'cpu_model', 'cpu_vector': [ISA flags present],
    'l3_bytes', 'cores'}."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_vendor": info.get("vendor_id"),
            "cpu_family": int(info["cpu family"]) if "cpu family" in info else None,
            "cpu_model": int(info["model"]) if info.get("model", "").isdigit() else None,
            "cpu_vector": [flag for flag in VECTOR_FLAGS if flag in flags],
            "l3_bytes": _l3_bytes(), "cores": num_cores()}
