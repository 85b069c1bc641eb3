"""JAX's persistent compilation cache, on by default for every `python -m lmops_jax.<job>`.

The second run of the same command (a resumed training run, a restarted server, a sweep's next point
with the same shapes) loads its compiled executables from disk instead of compiling them again.
`LMOPS_JAX_COMPILATION_CACHE` chooses: unset, a folder under the user cache directory
($XDG_CACHE_HOME/lmops_jax/jax_compilation_cache, default ~/.cache/...); a path, that folder;
`off`, no cache. Executables that compile in under `MIN_COMPILE_TIME_S` are not worth a file and
are not stored (JAX's own default is 1 s, which leaves out most of a small model's functions).
The Python API never turns it on by itself: a notebook calls `configure()` when it wants it.
"""
from __future__ import annotations

import logging
import os

import jax

ENV = "LMOPS_JAX_COMPILATION_CACHE"
MIN_COMPILE_TIME_S = 0.2


def default_cache_dir() -> str:
    """The library's folder for things worth keeping between runs ($XDG_CACHE_HOME/lmops_jax)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmops_jax")


def cache_dir() -> str | None:
    """The folder `LMOPS_JAX_COMPILATION_CACHE` chooses (module docstring), or None when it is off."""
    choice = os.environ.get(ENV, "").strip()
    if choice.lower() == "off":
        return None
    return os.path.abspath(os.path.expanduser(choice)) if choice else os.path.join(default_cache_dir(),
                                                                                   "jax_compilation_cache")


def configure() -> str | None:
    """Points JAX's persistent compilation cache at `cache_dir()`; returns the folder, or None when it is off."""
    path = cache_dir()
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    logging.debug("JAX compilation cache: %s", path)
    return path
