"""Transparent huge pages for the large blocks malloc maps, which `python -m lmops_jax.train` turns on when it
starts on the CPU backend.

XLA:CPU allocates all of an execution's temporaries as one buffer (357 MB for the training bench's step)
and frees it when the execution ends. glibc serves a request that large with a fresh mmap and frees it with
munmap, so every step touches its temporaries' pages anew: 87,500 minor page faults per step on the bench,
each a trap and a zeroed 4 KiB page. Where the kernel gives transparent huge pages to the memory a process
asks for (/sys/kernel/mm/transparent_hugepage/enabled is `madvise`, the common default), glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) asks for them on the blocks it maps: the same buffer then faults
in 2 MiB pages (0-20 faults per step), and the training bench ran 6-9% more tokens/s in an A/B
(docs/benchmarks.md). The memory is still returned at every step, so peak resident memory does not change.
(Keeping the buffer in the process instead, mallopt with one arena and no mmap, was as fast but fragmented
the heap: peak resident memory rose by up to 700 MB in some runs.)

glibc reads its tunables only when a process starts, so `configure()` replaces the process once: it execs
the same command line (`sys.orig_argv`, same process id) with `glibc.malloc.hugetlb=1` added to
GLIBC_TUNABLES, before the job has imported anything heavy. It does nothing when the tunable is already set
(the user's value wins), with `LMOPS_JAX_XLA_DEFAULTS=off` (as for the XLA flags, `xla_flags`), off Linux /
glibc < 2.35, where the kernel's mode is not `madvise` (`always` gives huge pages already, `never` none), or
where JAX will not pick the CPU backend (JAX_PLATFORMS names another platform first, or an accelerator
plugin is installed): accelerator jobs keep their host's defaults. Decoding allocates no such blocks (a
handful of page faults per generate), so `infer` and `serve` are left alone. From Python, set
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before starting the interpreter.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import sys

from lmops_jax.cli import xla_flags

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def cpu_backend_expected() -> bool:
    """Whether JAX will start on the CPU backend: JAX_PLATFORMS names cpu first, or it is unset and no
    accelerator plugin (a `jax_plugins` entry point, libtpu) is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not importlib.metadata.entry_points(group="jax_plugins") and importlib.util.find_spec("libtpu") is None


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise' or 'never'; None where unknown)."""
    try:
        with open(THP_MODE_FILE) as f:
            modes = f.read().split()
    except OSError:
        return None
    return next((mode.strip("[]") for mode in modes if mode.startswith("[")), None)


def tunable_set() -> bool:
    """Whether GLIBC_TUNABLES sets `glibc.malloc.hugetlb`, to any value."""
    return any(entry.split("=", 1)[0] == TUNABLE for entry in os.environ.get("GLIBC_TUNABLES", "").split(":"))


def wanted() -> bool:
    """Whether `configure` would exec the process again (module docstring)."""
    if tunable_set() or xla_flags.defaults_off():
        return False
    libc, version = platform.libc_ver()
    if not sys.platform.startswith("linux") or libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
        return False
    return thp_mode() == "madvise" and cpu_backend_expected()


def configure() -> None:
    """Execs this process's command line again with the tunable set where `wanted()`; otherwise returns.
    Call it first thing in a `__main__` block, before importing anything that starts threads."""
    if not wanted():
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def log_state() -> None:
    """One INFO line saying whether large malloc blocks get huge pages in this process."""
    if tunable_set():
        logging.info("malloc: transparent huge pages for large blocks (GLIBC_TUNABLES %s)",
                     os.environ["GLIBC_TUNABLES"])
