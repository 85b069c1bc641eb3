"""Many LoRA adapters in one batch: every row runs through its own adapter (Punica's / S-LoRA's batched
gather-matmul), so requests for different adapters of one base model share a decode step.

    layout = AdapterLayout.of(base_params, adapters, slots=4)      # which modules, what rank, how many
    stack = layout.empty()                                          # device pytree, every slot zeros
    stack = write_slot(stack, 1, layout.padded(adapter))           # adapter resident in slot 1
    with per_row_adapters(stack, ids):                              # ids int32 [B]: each row's slot
        logits, cache = model.decode_step(params, tokens, cache)

The stack holds, per adapted module path (e.g. 'layers_0/self_attn/q_proj'), A [slots + 1, in, R] and
B [slots + 1, R, out]; slot 0 is all zeros (no adapter), an adapter of rank r < R is zero-padded, and its
scale alpha / r is folded into B. `per_row_adapters` intercepts every adapted module's call (flax
`nn.intercept_methods`) and adds (x @ A[ids[b]]) @ B[ids[b]] to row b of its output, which is what qwix's
LoRA adds for one adapter (`peft.lora`), so row b equals its adapter merged into the base and served
alone. Adapters never touch the base params: loading one is a write of its slot (no recompilation;
shapes are fixed by the layout).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmops_jax import checkpoints

LORA_A, LORA_B = "kernel_lora_a", "kernel_lora_b"  # qwix's names beside a module's `kernel`
Stack = dict[str, tuple[jax.Array, jax.Array]]  # module path -> (A [S, in, R], B [S, R, out])


class AdapterMismatch(ValueError):
    """An adapter that does not fit the base model it is served on (names the adapter and the module)."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One LoRA adapter on the host: {module path: (A [in, r], B [r, out])} and its scale alpha / rank."""

    name: str
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]]
    rank: int
    alpha: float

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any], rank: int, alpha: float) -> Adapter:
        """From a LoRA run's adapter params (a nested tree whose leaves are '<module>/kernel_lora_a|b': host
        arrays, or ShapeDtypeStructs to check a layout before reading any)."""
        flat = checkpoints.flatten(params)
        pairs = {}
        for key in flat:
            if key.endswith("/" + LORA_A):
                path = key[:-len(LORA_A) - 1]
                b = flat.get(f"{path}/{LORA_B}")
                if b is None:
                    raise AdapterMismatch(f"adapter {name!r}: {key} has no {LORA_B} beside it")
                pairs[path] = (flat[key], b)
        if not pairs:
            raise AdapterMismatch(f"adapter {name!r} holds no LoRA pairs ('<module>/{LORA_A}' params)")
        return cls(name, pairs, rank, alpha)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.pairs.values())


def kernel_sizes(base_params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{module path: kernel shape} of every matmul weight of a base param tree (int kernels included)."""
    out = {}
    for name, leaf in checkpoints.flatten(base_params).items():
        if name.endswith("/kernel"):
            out[name[:-len("/kernel")]] = tuple(leaf.shape)
        elif name.endswith("/kernel/array/qvalue"):  # a quantized kernel (models.quantized)
            out[name[:-len("/kernel/array/qvalue")]] = tuple(leaf.shape)
    return out


def _split(shape: tuple[int, ...], in_size: int, out_size: int) -> bool:
    """Whether a kernel of `shape` maps in_size inputs to out_size outputs (some leading dims in)."""
    return any(math.prod(shape[:i]) == in_size and math.prod(shape[i:]) == out_size for i in range(1, len(shape)))


@dataclasses.dataclass(frozen=True)
class AdapterLayout:
    """The stack's shapes: adapted module paths with their (in, out) sizes, resident slots, max rank, dtype."""

    sizes: Mapping[str, tuple[int, int]]
    slots: int
    rank: int
    dtype: Any = jnp.float32

    @classmethod
    def of(cls, base_params: Mapping[str, Any], adapters: list[Adapter], slots: int,
           max_rank: int | None = None, dtype: Any = jnp.float32) -> AdapterLayout:
        """The layout serving `adapters` on a base model with these params; AdapterMismatch names an
        adapter whose modules the base lacks, whose shapes do not fit them, or whose rank exceeds max_rank."""
        if slots < 1:
            raise ValueError(f"MAX_RESIDENT_ADAPTERS must be >= 1, got {slots}")
        kernels, sizes = kernel_sizes(base_params), {}
        for adapter in adapters:
            if max_rank is not None and adapter.rank > max_rank:
                raise AdapterMismatch(f"adapter {adapter.name!r} has rank {adapter.rank}, more than "
                                      f"MAX_LORA_RANK={max_rank}")
            for path, (a, b) in adapter.pairs.items():
                shape = kernels.get(path)
                if shape is None:
                    raise AdapterMismatch(f"adapter {adapter.name!r} adapts {path!r}, which its base model does not "
                                          f"have (its matmul modules look like {sorted(kernels)[:3]})")
                if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or not _split(shape, a.shape[0], b.shape[1]):
                    raise AdapterMismatch(f"adapter {adapter.name!r}: {path} has A {a.shape} and B {b.shape}, which do "
                                          f"not fit the base kernel {shape}")
                if b.shape[0] > adapter.rank:
                    raise AdapterMismatch(f"adapter {adapter.name!r}: {path} has rank {b.shape[0]}, its spec says "
                                          f"{adapter.rank}")
                sizes[path] = (a.shape[0], b.shape[1])
        rank = max_rank or max((a.rank for a in adapters), default=1)
        return cls(dict(sorted(sizes.items())), slots, rank, dtype)

    def empty(self) -> Stack:
        """Every slot zero (slot 0 stays so: no adapter)."""
        return {path: (jnp.zeros((self.slots + 1, i, self.rank), self.dtype),
                       jnp.zeros((self.slots + 1, self.rank, o), self.dtype))
                for path, (i, o) in self.sizes.items()}

    def padded(self, adapter: Adapter) -> Stack:
        """The adapter as one slot's arrays (host numpy): A [in, R], B [R, out] scaled by alpha / rank;
        modules it does not adapt are zeros."""
        scale = adapter.alpha / adapter.rank
        out = {}
        for path, (i, o) in self.sizes.items():
            a, b = np.zeros((i, self.rank), np.float32), np.zeros((self.rank, o), np.float32)
            if path in adapter.pairs:
                pa, pb = adapter.pairs[path]
                a[:, :pa.shape[1]] = pa
                b[:pb.shape[0]] = pb * scale
            out[path] = (a.astype(self.dtype), b.astype(self.dtype))
        return out

    def bytes_per_slot(self) -> int:
        return sum((i + o) * self.rank for i, o in self.sizes.values()) * np.dtype(self.dtype).itemsize


def write_slot(stack: Stack, slot: jax.Array, arrays: Stack) -> Stack:
    """The stack with slot `slot` holding `arrays` (one slot's A, B per module, as `padded` gives)."""
    return {path: (a.at[slot].set(arrays[path][0]), b.at[slot].set(arrays[path][1])) for path, (a, b) in stack.items()}


def _lora_delta(x: jax.Array, y: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array) -> jax.Array:
    """Row b of y plus (x_b @ a[ids_b]) @ b[ids_b]; x [B, ..., in dims], y [B, ..., out dims]."""
    rows = x.shape[0]
    xs = x.reshape(rows, -1, a.shape[1]).astype(a.dtype)
    low = jnp.einsum("bmi,bir->bmr", xs, a[ids])
    delta = jnp.einsum("bmr,bro->bmo", low, b[ids])
    return y + delta.reshape(y.shape).astype(y.dtype)


@contextlib.contextmanager
def per_row_adapters(stack: Stack | None, ids: jax.Array | None) -> Iterator[None]:
    """Within: each adapted module's output row b gets adapter slot ids[b]'s update (module docstring).
    Enter it inside the traced function (under jit) around the model call; None does nothing."""
    if not stack:
        yield
        return

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        pair = stack.get("/".join(context.module.path))
        if pair is None:
            return out
        return _lora_delta(args[0], out, pair[0], pair[1], ids)

    with nn.intercept_methods(intercept):
        yield
