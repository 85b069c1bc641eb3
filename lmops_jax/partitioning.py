"""Device mesh and logical-axis partitioning.

Models name the axes of every parameter and key activation with logical names (see
`lmops_jax.models.layers`); this module owns the only mapping from those names to mesh axes. Rules are
data: a sequence of `(logical_name, mesh_axes)` pairs, where `mesh_axes` is a mesh axis name, a tuple of
them, or None (replicated). Several rules for one logical name are fallbacks tried in order: a rule is
skipped when its mesh axes are already used by another dimension of the same array or when the mesh
axes' total size does not divide the dimension (e.g. 2 KV heads on a 4-way `model` axis are replicated
rather than padded).

Presets (`LOGICAL_AXIS_RULES = 'dp' | 'fsdp' | 'tp' | 'fsdp_tp'`), on a mesh with axes
`data`, `fsdp`, `model`; the batch is always split over `data` x `fsdp`:
  dp       parameters replicated.
  fsdp     parameters sharded over `fsdp` along `embed` (else `mlp`, `vocab`, `heads`), ZeRO-3 style.
  tp       Megatron tensor parallelism: `heads`, `kv_heads`, `mlp`, `vocab` and their activations
           over `model`.
  fsdp_tp  both.
Every preset keeps `layers`, the leading axis of a scanned model's stacked layer params, unsplit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

STANDARD_MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

_DP: Rules = (("batch", BATCH_AXES), ("layers", None))  # a scanned model's stacked layers: never split
_FSDP: Rules = (("embed", "fsdp"), ("mlp", "fsdp"), ("vocab", "fsdp"), ("heads", "fsdp"))
_TP: Rules = (
    ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "model"),
    ("act_heads", "model"), ("act_kv_heads", "model"), ("act_mlp", "model"), ("act_vocab", "model"),
)
RULE_PRESETS: dict[str, Rules] = {
    "dp": _DP,
    "fsdp": _DP + _FSDP,
    "tp": _DP + _TP,
    "fsdp_tp": _DP + _TP + _FSDP,
}


def logical_axis_rules(rules: str | Sequence[Sequence[Any]]) -> Rules:
    """Resolves a preset name or an explicit list of (logical, mesh_axes) pairs into normalized rules."""
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(f"unknown LOGICAL_AXIS_RULES preset {rules!r}; presets: {sorted(RULE_PRESETS)}")
        return RULE_PRESETS[rules]
    normalized = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"a logical axis rule must be a (logical_name, mesh_axes) pair, got {rule!r}")
        axes = rule[1]
        if isinstance(axes, list):
            axes = tuple(axes)
        normalized.append((rule[0], axes))
    return tuple(normalized)


def _axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def check_mesh_axes_used(mesh_shape: Mapping[str, int], rules: Rules) -> None:
    """Fails on a mesh axis that no rule uses, so a misspelt axis cannot silently leave work unsplit.

    An axis outside `STANDARD_MESH_AXES` must be named by a rule; a standard axis no rule names must have
    size 1 (its devices would only hold copies). `mesh_shape` is the requested {axis: size} (-1 counts
    as more than one device).
    """
    named = {axis for _, axes in rules for axis in _axes_tuple(axes)}
    for axis, size in mesh_shape.items():
        if axis in named:
            continue
        if axis not in STANDARD_MESH_AXES:
            raise ValueError(
                f"MESH_SHAPE axis {axis!r} is not a known mesh axis {STANDARD_MESH_AXES} and no logical axis rule "
                f"names it (rules name {sorted(named)}); check its spelling")
        if size != 1:
            raise ValueError(
                f"MESH_SHAPE axis {axis!r} has size {size} but no logical axis rule uses it (rules name "
                f"{sorted(named)}), so its devices would only hold copies; choose rules that use it "
                f"(e.g. LOGICAL_AXIS_RULES='tp' for 'model', 'fsdp' for 'fsdp') or give it size 1")


def validate_rules(rules: Rules, mesh_axis_names: Sequence[str]) -> None:
    """Fails if a rule names a mesh axis the mesh does not have."""
    for logical, axes in rules:
        for axis in _axes_tuple(axes):
            if axis not in mesh_axis_names:
                raise ValueError(
                    f"logical axis rule ({logical!r}, {axes!r}) names mesh axis {axis!r}, "
                    f"but the mesh has axes {tuple(mesh_axis_names)}")


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int] | None, rules: Rules, mesh_axis_sizes: Mapping[str, int],
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry the logical `names` (see module docstring).

    `shape` enables the divisibility check; with None every dimension is taken as divisible.
    """
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, name in enumerate(names):
        chosen: MeshAxes = None
        for logical, axes in rules:
            if logical != name or name is None:
                continue
            axes_t = _axes_tuple(axes)
            if any(a in used for a in axes_t):
                continue
            size = math.prod(mesh_axis_sizes[a] for a in axes_t)
            if shape is not None and shape[dim] % size:
                continue
            chosen = None if not axes_t else (axes_t[0] if len(axes_t) == 1 else axes_t)
            used.update(axes_t)
            break
        spec.append(chosen)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def constrain_logical(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names, using the rules and mesh of the current context.

    A no-op outside `Partitioner.context()` (no rules or no mesh), so models run unsharded as well.
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh is None or mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"{len(names)} logical axis names {tuple(names)} for an array of shape {x.shape}")
    spec = logical_to_spec(names, x.shape, rules, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axes from {axis: size}; one size may be -1 for "the remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(mesh_shape)
    sizes = [int(s) for s in mesh_shape.values()]
    num_devices = len(devices)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"MESH_SHAPE {dict(mesh_shape)}: axis sizes must be positive or -1")
    if sizes.count(-1) > 1:
        raise ValueError(f"MESH_SHAPE {dict(mesh_shape)}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"MESH_SHAPE {dict(mesh_shape)} does not fit {num_devices} devices: the fixed axes use {known}, "
                f"which does not divide {num_devices}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"MESH_SHAPE {dict(mesh_shape)} needs {math.prod(sizes)} devices but {num_devices} are available")
    try:
        device_array = mesh_utils.create_device_mesh(sizes, devices)
    except (ValueError, NotImplementedError, AssertionError):
        device_array = np.asarray(devices).reshape(sizes)
    return Mesh(device_array, names)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


@dataclasses.dataclass
class Partitioner:
    """Owns the mesh and the logical axis rules; turns logical names into shardings.

    Attributes:
      mesh_shape: {axis: size}, e.g. {'data': -1, 'fsdp': 1, 'model': 1} (MESH_SHAPE); standard axes
        left out get size 1.
      logical_axis_rules: preset name or explicit rules (LOGICAL_AXIS_RULES).
      devices: devices to use (default: all, across processes).
    """

    mesh_shape: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "model": 1})
    logical_axis_rules: str | Sequence[Sequence[Any]] = "dp"
    devices: Sequence[jax.Device] | None = None

    def __post_init__(self):
        shape = dict(self.mesh_shape)
        for axis in STANDARD_MESH_AXES:  # presets name all three; absent ones have size 1
            shape.setdefault(axis, 1)
        self.mesh = make_mesh(shape, self.devices)
        self.rules = logical_axis_rules(self.logical_axis_rules)
        validate_rules(self.rules, self.mesh.axis_names)
        check_mesh_axes_used(self.mesh_shape, self.rules)
        self.axis_sizes = dict(self.mesh.shape)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Mesh + rules context under which models trace their activation constraints."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        return logical_to_spec(names, shape, self.rules, self.axis_sizes)

    def sharding(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_size_divisor(self) -> int:
        """Number of shards of the batch dimension (a global batch must be a multiple)."""
        spec = self.spec(("batch",))
        return math.prod(self.axis_sizes[a] for a in _axes_tuple(spec[0] if len(spec) else None))

    def data_sharding(self, ndim: int = 2) -> NamedSharding:
        """Sharding of a [batch, ...] input array: batch over the `batch` rule's axes."""
        return self.sharding(("batch",) + (None,) * (ndim - 1))

    def shardings_of_boxed(self, tree: Any) -> Any:
        """NamedShardings for a pytree whose leaves are `nn.Partitioned` boxes (or plain arrays/shapes).

        Boxed leaves get shardings from their logical names and shape; other leaves are replicated. The
        result has the structure of the unboxed tree.
        """
        def leaf_sharding(x):
            if _is_box(x):
                value = x.value
                if len(x.names) == len(value.shape):
                    return self.sharding(x.names, value.shape)
            return self.replicated
        return jax.tree.map(leaf_sharding, tree, is_leaf=_is_box)
