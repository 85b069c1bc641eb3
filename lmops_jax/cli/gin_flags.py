"""Command-line gin handling: --gin_file, --gin.NAME=VALUE, --gin_search_paths, and clear errors.

Library code carries no gin decorators: gin files use `from __gin__ import dynamic_registration` and
bind plain functions and dataclasses (T5X style). `--gin.NAME=VALUE` is shorthand for the binding
`NAME = VALUE`, so `--gin.TRAIN_STEPS=100` sets a macro and `--gin.train.seed=1` a parameter.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import gin
import gin.config

# The configs installed with the package; "gin_configs/x.gin" resolves here from any working directory.
PACKAGE_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs")


class GinConfigError(ValueError):
    """A gin file or binding that cannot be used; the message names it."""


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
    """Splits argv into gin files, bindings and search paths (other flags are rejected by name)."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument("--gin_search_paths", default="", help="comma-separated folders for gin files/includes")
    parser.add_argument("--multihost", action="store_true", help="jax.distributed.initialize() with auto-detection")
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--cpu_collectives", default=None, help="e.g. 'gloo' for multi-process CPU runs")
    args, rest = parser.parse_known_args(list(argv))
    bindings, unknown = [], []
    for arg in rest:
        if arg.startswith("--gin."):
            if "=" not in arg:
                raise GinConfigError(f"flag {arg!r} must look like --gin.NAME=VALUE")
            name, value = arg[len("--gin."):].split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            unknown.append(arg)
    if unknown:
        raise GinConfigError(f"unknown flags {unknown}; use --gin_file=..., --gin.NAME=VALUE, --gin_search_paths=...")
    args.gin_bindings = bindings
    return args


def _resolve_file(path: str, search_paths: Sequence[str]) -> str:
    if os.path.exists(path):
        return path
    for folder in search_paths:
        candidate = os.path.join(folder, path)
        if os.path.exists(candidate):
            return candidate
    raise GinConfigError(f"gin file {path!r} not found (searched: {', '.join(search_paths)})")


def missing_required_macros() -> list[str]:
    """Macros still set to %gin.REQUIRED after parsing (gin itself passes a sentinel silently)."""
    missing = []
    for (scope, selector), params in gin.config._CONFIG.items():  # gin exposes no public macro listing
        if selector == "gin.macro" and str(params.get("value")) == "%gin.REQUIRED":
            missing.append(scope)
    return sorted(missing)


def parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()) -> None:
    """Parses files then bindings; errors name the offending file, binding or macro."""
    candidates = [p for p in search_paths if p] + [os.getcwd(), os.path.dirname(PACKAGE_CONFIG_DIR),
                                                   PACKAGE_CONFIG_DIR]
    search_paths = list(dict.fromkeys(os.path.abspath(p) for p in candidates))
    for path in search_paths:
        gin.add_config_file_search_path(path)
    files = [_resolve_file(f, search_paths) for f in gin_files]
    if not files:
        raise GinConfigError("no --gin_file given")
    try:
        gin.parse_config_files_and_bindings(files, None, finalize_config=False)
    except Exception as e:  # gin raises ValueError/ImportError/... with the location inside
        raise GinConfigError(f"while parsing gin files {files}: {e}") from e
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except Exception as e:
            raise GinConfigError(f"bad gin binding --gin.{binding.replace(' = ', '=', 1)}: {e}") from e
    missing = missing_required_macros()
    if missing:
        raise GinConfigError(
            "required gin macros are not set: " + ", ".join(missing)
            + " (set them in a gin file or with --gin.NAME=VALUE)")
    gin.finalize()


def is_required_sentinel(value: object) -> bool:
    """True for what gin passes when a %gin.REQUIRED parameter was never bound."""
    return type(value).__name__ == "_GinRequired" or str(value) == "%gin.REQUIRED"
