"""Throughput accounting: a matmul peak probe and model FLOP utilization (MFU).

MFU = model FLOPs per second / peak FLOPs per second, where model FLOPs are counted as the field does
(see `BaseModel.training_flops_per_token`) and the peak is either given (a datasheet number for the
accelerator) or measured in the same process by timing a large jitted matmul, which is the honest
ceiling on a CPU whose vendor peak is never reached.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def measure_matmul_peak(size: int = 2048, dtype: str = "float32", repeats: int = 10,
                        device: jax.Device | None = None) -> float:
    """Best-of-`repeats` FLOP/s of one jitted [size, size] @ [size, size] matmul on one device."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    b = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def host_peak_flops(dtype: str = "float32") -> float:
    """Peak FLOP/s of all devices of this job, from the probe.

    On CPU the host devices of a process share the same cores, so the probe (which already uses all
    cores) counts once per process; on accelerators it counts once per device.
    """
    per_probe = measure_matmul_peak(dtype=dtype)
    if jax.default_backend() == "cpu":
        return per_probe * jax.process_count()
    return per_probe * jax.device_count()
