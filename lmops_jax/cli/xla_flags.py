"""XLA flags the library sets for the CPU backend when a `python -m lmops_jax.<job>` starts, per workload.

As MaxText sets its accelerator flags, a job adds its workload's `CPU_FLAGS` to XLA_FLAGS before JAX
starts a backend. Training (`python -m lmops_jax.train`, distillation included) gets
`--xla_cpu_experimental_ynn_fusion_type=dot`, which lets XLA:CPU fuse the operations around its YNNPACK
matmuls (the layout copies, broadcasts and elementwise ops that feed and follow them): the training bench
runs 15-20% more tokens/s with it and its step needs 83 MiB less memory (docs/benchmarks.md), with the
same losses to float32 rounding (tests/test_xla_flags.py). Decoding gets none: the same flag made the
decode bench 10-20% slower. It is an experimental XLA flag of the pinned jaxlib; XLA reads `xla_cpu_*`
flags only on the CPU backend, so GPU and TPU runs are unaffected.

A flag the user already put in XLA_FLAGS (with any value) is left as the user wrote it;
`LMOPS_JAX_XLA_DEFAULTS=off` adds none. The Python API does not set them by itself: a notebook calls
`configure('training')` before its first JAX computation if it wants them.
"""
from __future__ import annotations

import logging
import os

ENV = "LMOPS_JAX_XLA_DEFAULTS"
TRAINING = "training"
INFERENCE = "inference"
CPU_FLAGS = {TRAINING: ("--xla_cpu_experimental_ynn_fusion_type=dot",), INFERENCE: ()}


def defaults_off() -> bool:
    """Whether the user turned off the library's CPU defaults (`LMOPS_JAX_XLA_DEFAULTS=off`)."""
    return os.environ.get(ENV, "").strip().lower() == "off"


def configure(workload: str) -> list[str]:
    """Appends the workload's `CPU_FLAGS` the user has not set to XLA_FLAGS (module docstring); returns
    those added. XLA reads XLA_FLAGS once, when the first backend starts: call this before any JAX
    computation."""
    if workload not in CPU_FLAGS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {sorted(CPU_FLAGS)}")
    if defaults_off():
        return []
    current = os.environ.get("XLA_FLAGS", "")
    named = {flag.split("=", 1)[0] for flag in current.split()}
    added = [flag for flag in CPU_FLAGS[workload] if flag.split("=", 1)[0] not in named]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
        logging.info("XLA flags for the CPU backend (LMOPS_JAX_XLA_DEFAULTS=off: none): %s", " ".join(added))
    return added
