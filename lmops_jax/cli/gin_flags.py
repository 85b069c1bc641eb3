"""Command-line gin handling: --gin_file, --gin.NAME=VALUE, --gin_search_paths, and clear errors.

Library code carries no gin decorators: gin files use `from __gin__ import dynamic_registration` and
bind plain functions and dataclasses (T5X style). `--gin.NAME=VALUE` is shorthand for the binding
`NAME = VALUE`, so `--gin.TRAIN_STEPS=100` sets a macro and `--gin.train.seed=1` a parameter.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
from typing import Any, Iterator, Sequence

import gin
import gin.config

# The configs installed with the package; "gin_configs/x.gin" resolves here from any working directory.
PACKAGE_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs")


class GinConfigError(ValueError):
    """A gin file or binding that cannot be used; the message names it."""


class _QuietGinFileSearch(logging.Filter):
    """Drops gin's own records (it logs on the root logger): resolving an include, gin logs every search
    path it tries, and each miss at ERROR ('Path not found'), though a miss is normal and a file found
    nowhere raises anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(os.path.dirname(gin.__file__) + os.sep)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Declares --gin_file and --gin_search_paths; --gin.NAME=VALUE (see `bindings_from_flags`) shows in --help."""
    group = parser.add_argument_group(
        "gin", "--gin.NAME=VALUE      a gin binding after the files, e.g. --gin.TRAIN_STEPS=100 or\n"
               "                      --gin.MODEL_DIR=\"'/tmp/run'\" (repeatable)")
    group.add_argument("--gin_file", action="append", default=[],
                       help="gin file (repeatable); gin_configs/... resolves to the installed configs")
    group.add_argument("--gin_search_paths", default="", help="comma-separated folders for gin files and includes")


def bindings_from_flags(flags: Sequence[str]) -> list[str]:
    """The gin bindings of `--gin.NAME=VALUE` flags; any other flag is an error naming it."""
    found, unknown = [], []
    for flag in flags:
        if flag.startswith("--gin."):
            if "=" not in flag:
                raise GinConfigError(f"flag {flag!r} must look like --gin.NAME=VALUE")
            name, value = flag[len("--gin."):].split("=", 1)
            found.append(f"{name} = {value}")
        else:
            unknown.append(flag)
    if unknown:
        raise GinConfigError(f"unknown flags {unknown}; use --gin_file=..., --gin.NAME=VALUE, --gin_search_paths=...")
    return found


def _resolve_file(path: str, search_paths: Sequence[str]) -> str:
    for candidate in [path] + [os.path.join(folder, path) for folder in search_paths]:
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    raise GinConfigError(f"gin file {path!r} not found (searched: {', '.join(search_paths)})")


def missing_required_macros() -> list[str]:
    """Macros still set to %gin.REQUIRED after parsing (gin itself passes a sentinel silently)."""
    missing = []
    for (scope, selector), params in gin.config._CONFIG.items():  # gin exposes no public macro listing
        if selector == "gin.macro" and str(params.get("value")) == "%gin.REQUIRED":
            missing.append(scope)
    return sorted(missing)


def _defined_macros() -> set[str]:
    """Macros bound so far (`NAME = ...`, including `scope/NAME`)."""
    return {scope for scope, selector in gin.config._CONFIG if selector == "gin.macro"}


def _macro_references(value: Any) -> Iterator[str]:
    """The macros a bound value refers to (`%NAME`), inside lists, tuples and dicts too."""
    if isinstance(value, gin.config.ConfigurableReference):
        if value.selector == "gin.macro":
            yield "/".join(value.scopes)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _macro_references(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _macro_references(key)
            yield from _macro_references(item)


def _check_macro_bindings(bindings: Sequence[str], file_macros: set[str]) -> None:
    """Fails on a command-line macro binding (a name without a dot) that no file defines and nothing uses.

    gin accepts `--gin.TRAIN_STEP=10` as a new, unused macro, so a typo would silently run the defaults.
    Call after parsing the bindings: `file_macros` are those the files defined, and a macro referenced
    anywhere (files or bindings, `%NAME`) counts as used.
    """
    known = set(file_macros)
    for params in gin.config._CONFIG.values():
        for value in params.values():
            known.update(_macro_references(value))
    problems = []
    for binding in bindings:
        name = binding.split("=", 1)[0].strip()
        if "." in name or name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else f"known macros: {', '.join(sorted(known))}"
        problems.append(f"--gin.{name}: no loaded gin file defines or uses the macro {name} ({hint})")
    if problems:
        raise GinConfigError("; ".join(problems))


def parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()) -> list[str]:
    """Parses files then bindings and returns the files' resolved paths; errors name the offending file,
    binding or macro (a misspelled macro too: `_check_macro_bindings`)."""
    candidates = [p for p in search_paths if p] + [os.getcwd(), os.path.dirname(PACKAGE_CONFIG_DIR),
                                                   PACKAGE_CONFIG_DIR]
    search_paths = list(dict.fromkeys(os.path.abspath(p) for p in candidates))
    for path in search_paths:
        gin.add_config_file_search_path(path)
    files = [_resolve_file(f, search_paths) for f in gin_files]
    if not files:
        raise GinConfigError("no --gin_file given")
    quiet = _QuietGinFileSearch()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(files, None, finalize_config=False)
    except Exception as e:  # gin raises ValueError/ImportError/... with the location inside
        raise GinConfigError(f"while parsing gin files {files}: {e}") from e
    finally:
        logging.getLogger().removeFilter(quiet)
    file_macros = _defined_macros()
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except Exception as e:
            raise GinConfigError(f"bad gin binding --gin.{binding.replace(' = ', '=', 1)}: {e}") from e
    _check_macro_bindings(bindings, file_macros)
    missing = missing_required_macros()
    if missing:
        raise GinConfigError(
            "required gin macros are not set: " + ", ".join(missing)
            + " (set them in a gin file or with --gin.NAME=VALUE)")
    gin.finalize()
    return files


def is_required_sentinel(value: object) -> bool:
    """True for what gin passes when a %gin.REQUIRED parameter was never bound."""
    return type(value).__name__ == "_GinRequired" or str(value) == "%gin.REQUIRED"
