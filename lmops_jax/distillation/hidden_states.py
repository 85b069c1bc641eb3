"""Hidden-state (feature) distillation: losses between chosen student and teacher layers' outputs.

As in ModelOpt's `intermediate_layer_pairs` and MaxText's feature loss, a pair names a student module
and a teacher module by their path in the params tree ('layers_1' is a Llama decoder layer; 'norm' the
final norm); their outputs h_s [B, L, Ds] and h_t [B, L, Dt] are compared per token:

    cosine: 1 - cos(h_s W, h_t)          mse: mean over features of (h_s W - h_t)^2

where W [Ds, Dt] is a learned linear map when the widths differ (ModelOpt's projection layer) and the
identity when they are equal. The maps are student parameters: `HiddenMapsModel` adds them to the
student's params under the top-level key `MAPS` (one `pair_<i>/kernel` per pair that needs one), so
they train, sit in the optimizer state and in every checkpoint of the run, and are dropped at export:
a checkpoint's model spec is the plain student's, and loading restores the params that model has
(`models.loading`), so inference and the Hugging Face export see the plain student.

Outputs are read without touching the model classes: flax's `capture_intermediates` on the module a
model's `compute_logits` applies (`forward_with_hidden`), through `models.wrapper.ModuleSwap`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmops_jax.models.model import BaseModel
from lmops_jax.models.wrapper import ModuleSwap, WrapperModel

MAPS = "hidden_state_maps"  # top-level key of the student's params holding the learned maps
HIDDEN_LOSSES = ("cosine", "mse")
_MAP_AXES = ("embed", None)  # W [Ds, Dt]: the student width shards like the model's embeddings


@dataclasses.dataclass(frozen=True)
class HiddenPair:
    """One student / teacher module pair (paths in the params tree, '/'-separated) and its loss weight."""

    student: str
    teacher: str
    weight: float = 1.0


def parse_pairs(pairs: Sequence[Sequence[str]], weights: float | Sequence[float] = 1.0) -> tuple[HiddenPair, ...]:
    """HIDDEN_LAYER_PAIRS [(student path, teacher path), ...] and HIDDEN_WEIGHTS (one float for all, or
    one per pair) as HiddenPairs."""
    pairs = list(pairs or ())
    if any(not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)) for p in pairs):
        raise ValueError(f"HIDDEN_LAYER_PAIRS must be a list of (student module path, teacher module path) string "
                         f"pairs, e.g. [('layers_1', 'layers_3')], got {pairs!r}")
    if isinstance(weights, (int, float)):
        weights = [float(weights)] * len(pairs)
    weights = list(weights)
    if len(weights) != len(pairs) or any(not isinstance(w, (int, float)) or w < 0 for w in weights):
        raise ValueError(f"HIDDEN_WEIGHTS must be one float >= 0 or one per pair of HIDDEN_LAYER_PAIRS "
                         f"({len(pairs)}), got {weights!r}")
    return tuple(HiddenPair(s, t, float(w)) for (s, t), w in zip(pairs, weights))


class _CaptureApply:
    """Stands in for a model's module: `apply` also records the outputs of the modules at `paths`."""

    def __init__(self, module: nn.Module, paths: Sequence[str]):
        self.module, self.paths, self.captured = module, frozenset(paths), None

    def apply(self, variables, *args, **kwargs):
        def wanted(mdl: nn.Module, method: str) -> bool:
            return method == "__call__" and "/".join(mdl.path) in self.paths

        out, state = self.module.apply(variables, *args, capture_intermediates=wanted, mutable=["intermediates"],
                                       **kwargs)
        self.captured = state.get("intermediates", {})
        return out


def _innermost(model: BaseModel) -> BaseModel:
    """The model whose `compute_logits` finally applies the network (through wrappers: LoRA, quantized)."""
    while isinstance(model, WrapperModel):
        model = model.base
    return model


def forward_with_hidden(model: BaseModel, params: Any, batch: Mapping[str, jax.Array], paths: Sequence[str]
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(logits [B, L, V], {path: output of the module at path}) of `model` on `batch` (jittable).

    The network is `model.module` (a wrapper's, e.g. LoRA's, included), applied by the innermost model's
    own `compute_logits`, so the logits are exactly `model.compute_logits`'s.
    """
    capture = _CaptureApply(model.module, paths)
    inner = _innermost(model)
    params = jax.tree.map(jnp.asarray, params)  # qwix recognizes weights by type (wrapper.device_params)
    logits = type(inner).compute_logits(ModuleSwap(inner, capture), params, batch)
    hidden = {}
    for path in paths:
        node = capture.captured
        for key in path.split("/") + ["__call__"]:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:
            raise ValueError(f"no module at path {path!r} of {type(inner).__name__} (HIDDEN_LAYER_PAIRS name modules "
                             f"by their params path, e.g. 'layers_1'); top-level modules: {sorted(params)}")
        out = node[0]
        hidden[path] = out[0] if isinstance(out, tuple) else out
    return logits, hidden


def hidden_widths(model: BaseModel, paths: Sequence[str]) -> dict[str, int]:
    """{path: feature width} of the module outputs at `paths` (shapes only, no FLOPs)."""
    shapes = model.input_shapes(1, {"inputs": 4, "targets": 4})
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init_params(jax.random.key(0), shapes)))
    batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32) for name, shape in shapes.items()}
    _, hidden = jax.eval_shape(lambda p, b: forward_with_hidden(model, p, b, paths), params, batch)
    return {path: int(h.shape[-1]) for path, h in hidden.items()}


def hidden_state_loss(student: jax.Array, teacher: jax.Array, kernel: jax.Array | None, kind: str) -> jax.Array:
    """Per-token loss [B, L] between student outputs [B, L, Ds] (mapped by kernel [Ds, Dt] when given) and
    the teacher's [B, L, Dt] (not differentiated)."""
    s = student.astype(jnp.promote_types(student.dtype, jnp.float32))
    if kernel is not None:
        s = s @ kernel.astype(s.dtype)
    t = jax.lax.stop_gradient(teacher).astype(s.dtype)
    if s.shape != t.shape:
        raise ValueError(f"hidden states differ in shape: student {s.shape} (after its map), teacher {t.shape}; "
                         "pairs must name layers whose outputs follow the decoder targets [B, L, D]")
    if kind == "mse":
        return jnp.mean(jnp.square(s - t), axis=-1)
    norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
    return 1.0 - jnp.sum(s * t, axis=-1) / jnp.maximum(norms, 1e-8)


def map_name(index: int) -> str:
    return f"pair_{index}"


@dataclasses.dataclass(frozen=True)
class HiddenMapsModel(WrapperModel):
    """The student with the learned maps of its hidden-state pairs among its params (module docstring).

    Every method that takes params hands the base model its own params (`student_params`); the maps
    enter only the hidden-state loss. `maps` holds (pair index, Ds, Dt) per pair that needs a map.
    """

    maps: tuple[tuple[int, int, int], ...] = ()

    @property
    def module(self) -> nn.Module:
        return self.base.module

    @staticmethod
    def student_params(params: Any) -> Any:
        """The base model's params: all but the maps."""
        return {k: v for k, v in params.items() if k != MAPS} if MAPS in params else params

    def map_kernel(self, params: Any, index: int) -> jax.Array | None:
        name = map_name(index)
        return params[MAPS][name]["kernel"] if MAPS in params and name in params[MAPS] else None

    def init_params(self, rng, input_shapes):
        params = dict(self.base.init_params(rng, input_shapes))
        if self.maps:
            keys = jax.random.split(jax.random.fold_in(rng, 0x4D415053), len(self.maps))
            init = nn.initializers.lecun_normal()
            params[MAPS] = {map_name(i): {"kernel": nn.LogicallyPartitioned(init(key, (ds, dt), jnp.float32), _MAP_AXES)}
                            for key, (i, ds, dt) in zip(keys, self.maps)}
        return params

    @property
    def trainable_patterns(self) -> tuple[str, ...]:
        patterns = self.base.trainable_patterns  # e.g. LoRA: the adapters, and then the maps too
        return (*patterns, f"^{re.escape(MAPS)}/") if patterns else ()

    def checkpoint_params(self, params):
        student = self.student_params(params)
        kept = self.base.checkpoint_params(student)
        if kept is student:
            return params
        return {**kept, MAPS: params[MAPS]} if MAPS in params else kept

    def compute_logits(self, params, batch, rng=None):
        return self.base.compute_logits(self.student_params(params), batch, rng)

    def prefill(self, params, tokens, lengths, cache, **kwargs):
        return self.base.prefill(self.student_params(params), tokens, lengths, cache, **kwargs)

    def decode_step(self, params, tokens, cache, **kwargs):
        return self.base.decode_step(self.student_params(params), tokens, cache, **kwargs)

    def decode_tokens(self, params, tokens, cache, **kwargs):
        return self.base.decode_tokens(self.student_params(params), tokens, cache, **kwargs)
