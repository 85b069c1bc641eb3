"""Throughput accounting: a matmul peak probe and model FLOP utilization (MFU).

MFU = model FLOPs per second / peak FLOPs per second, where model FLOPs are counted as the field does
(see `BaseModel.training_flops_per_token`) and the peak is either given (a datasheet number for the
accelerator) or measured by timing a large jitted matmul, which is the honest ceiling on a CPU whose
vendor peak is never reached.

A measured peak is noisy (15-50% between runs on a shared CPU), so MFU of identical runs would differ by
the probe alone: `job_peak_flops` measures once per host, backend, device kind, device count and dtype,
keeps the result in `peak_flops.json` under $XDG_CACHE_HOME/lmops_jax (default ~/.cache/lmops_jax), and
reuses it after. Delete that file (or one entry) to measure again; pin a value with `peak_flops`
(gin macro PEAK_FLOPS) to compare across hosts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp

from lmops_jax.cli import compile_cache

logger = logging.getLogger(__name__)

CACHE_FILE = "peak_flops.json"


def measure_matmul_peak(size: int = 2048, dtype: str = "float32", repeats: int = 10,
                        device: jax.Device | None = None) -> float:
    """Best-of-`repeats` FLOP/s of one jitted [size, size] @ [size, size] matmul on one device."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    b = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    return 2.0 * size**3 / best_seconds(lambda: matmul(a, b), repeats)


def best_seconds(call: Callable[[], jax.Array], repeats: int) -> float:
    """Shortest wall time of `repeats` calls of `call`, each waited for; the caller runs it once before
    (compiling it)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call().block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def _per_probe_to_job(per_probe: float) -> float:
    """Peak FLOP/s of all devices of this job from one probe's FLOP/s.

    On CPU the host devices of a process share the same cores, so the probe (which already uses all
    cores) counts once per process; on accelerators it counts once per device.
    """
    if jax.default_backend() == "cpu":
        return per_probe * jax.process_count()
    return per_probe * jax.device_count()


@dataclasses.dataclass(frozen=True)
class PeakFlops:
    """The MFU denominator of a run and where it came from ("given", "measured now", "cached from PATH")."""

    flops: float
    source: str


def probe_key(dtype: str) -> str:
    """What a probe result depends on: host, backend, device kind, local device count and dtype."""
    device = jax.local_devices()[0]
    return "|".join([socket.gethostname(), jax.default_backend(), device.device_kind,
                     f"{jax.local_device_count()} devices", str(dtype)])


def _read_cache(path: str) -> dict:
    """The cache's {key: {"flops_per_probe": float, ...}}; an unreadable file reads as empty (and is rewritten)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("ignoring the unreadable peak FLOP/s cache %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: str, data: dict) -> None:
    """Writes `data` atomically (processes of one host may share the file); a failure only warns."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".peak_flops.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not write the peak FLOP/s cache %s (%s); the next run measures again", path, e)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def job_peak_flops(peak_flops: float | None, dtype: str = "float32", cache_dir: str | None = None) -> PeakFlops:
    """The job's peak FLOP/s for MFU: `peak_flops` when given, else this host's cached probe, else a probe
    measured now and cached (`cache_dir`, default `cli.compile_cache.default_cache_dir()`). A cache that cannot be read or
    written never fails the run."""
    if peak_flops is not None:
        if isinstance(peak_flops, bool) or not isinstance(peak_flops, (int, float)) or not peak_flops > 0:
            raise ValueError(f"peak_flops (gin macro PEAK_FLOPS) must be a positive FLOP/s number or None, "
                             f"got {peak_flops!r}")
        return PeakFlops(float(peak_flops), "given")
    path = os.path.join(cache_dir or compile_cache.default_cache_dir(), CACHE_FILE)
    key = probe_key(dtype)
    cache = _read_cache(path)
    cached = cache.get(key)
    if isinstance(cached, dict) and isinstance(cached.get("flops_per_probe"), (int, float)):
        return PeakFlops(_per_probe_to_job(float(cached["flops_per_probe"])), f"cached from {path}")
    per_probe = measure_matmul_peak(dtype=dtype)
    cache[key] = {"flops_per_probe": per_probe, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_cache(path, cache)
    return PeakFlops(_per_probe_to_job(per_probe), "measured now")
