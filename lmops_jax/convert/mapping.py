"""Shared pieces of the Hugging Face bridge: the error type, name-table entries and tensor layouts.

A name table lists (our path, HF name, layout) triples; one table serves both directions, so export is
the exact inverse of import. The layout says how an HF tensor (PyTorch [out, in] order) becomes ours:

    "same"     identical (embeddings, norm scales, T5 relative-position tables)
    "t"        transposed [out, in] -> [in, out]
    "t_heads"  q/k/v projections: [H*Dh, D] -> [D, H, Dh] (transpose, then split the head dimension)
    "t_out"    output projection:  [D, H*Dh] -> [H, Dh, D]

Transposes and reshapes move values without arithmetic, so a round trip is bitwise exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

LAYOUTS = ("same", "t", "t_heads", "t_out")


class ConversionError(ValueError):
    """A Hugging Face directory, config or checkpoint that cannot be converted; the message says why."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: our '/'-joined path, the Hugging Face tensor name, and the layout between them."""

    ours: str
    hf: str
    layout: str

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"Entry {self.hf!r}: layout {self.layout!r} is not one of {LAYOUTS}")


@dataclasses.dataclass(frozen=True)
class ImportSpec:
    """What an architecture module derives from a Hugging Face config.json.

    Attributes:
      model: our model wrapper (a `BaseModel`), float32 until the stored dtype is known.
      table: the name table; every entry's HF tensor is required.
      aliases: {HF name: HF name it duplicates}. A table name missing from the files is read from its
        alias (e.g. T5's lm_head saved tied to `shared`); a non-table name present in the files must
        equal its alias bitwise (a tied copy), else the model cannot represent it.
      ignored_suffixes: HF tensors that carry no weights (rotary caches, unused buffers).
    """

    model: Any
    table: list[Entry]
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ignored_suffixes: tuple[str, ...] = ()


def require(cfg: Mapping[str, Any], field: str, kind: type | tuple[type, ...] = int) -> Any:
    """cfg[field], checked for presence and type; raises ConversionError naming the field."""
    if field not in cfg or cfg[field] is None:
        raise ConversionError(f"config.json lacks the field {field!r}")
    value = cfg[field]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ConversionError(f"config.json field {field}={value!r} has the wrong type (want {kind})")
    return value


def refuse_unless(cfg: Mapping[str, Any], field: str, allowed: tuple, default: Any, why: str = "") -> None:
    """Raises ConversionError naming `field` when its value (or `default`) is not in `allowed`."""
    value = cfg.get(field, default)
    if value not in allowed:
        raise ConversionError(f"config.json field {field}={value!r} is not supported (supported: "
                              f"{', '.join(repr(a) for a in allowed)}){': ' + why if why else ''}")


def hf_shape(our_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The shape of the Hugging Face tensor that maps onto a parameter of `our_shape`."""
    if layout == "same":
        return tuple(our_shape)
    if layout == "t":
        return tuple(reversed(our_shape))
    if layout == "t_heads":
        d, h, dh = our_shape
        return (h * dh, d)
    h, dh, d = our_shape
    return (d, h * dh)


def to_ours(x: np.ndarray, layout: str, our_shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> our layout (`our_shape` gives the head split)."""
    if layout == "same":
        return x
    return x.T.reshape(our_shape)


def to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    """Our parameter -> the HF tensor (C-contiguous, ready to serialize)."""
    if layout == "same":
        out = x
    elif layout == "t":
        out = x.T
    elif layout == "t_heads":
        out = x.reshape(x.shape[0], -1).T
    else:
        out = x.reshape(-1, x.shape[-1]).T
    return np.ascontiguousarray(out)
