"""A quantized model: a base model whose matching projections hold int8 / int4 weights (qwix PTQ).

    model = QuantizedModel(base, rules=(QuantRule(".*/mlp/.*", "int4", tile_size=64),
                                        QuantRule(".*(_proj|lm_head)", "int8")))

Each rule's `module_path` regex fully matches module paths such as `layers_0/self_attn/o_proj` or
`lm_head`; the first matching rule decides a module's scheme ("float" keeps it unquantized). The
network is `qwix.quantize_model(base.module, PtqProvider(rules))`: a matched kernel is a
`WithAux(QArray(qvalue int8/int4 [kernel shape], scale float [kernel shape, reduced axes 1 (a tiled
contraction axis: its number of tiles)]))` leaf; "w8a8" also quantizes the matmul's input to int8 per
token, dynamically. Method "awq" stores the leaves qwix.contrib.awq writes (`WithAwqScale`: an extra
per-input-channel scale [in]) and runs through its `AwqInferenceProvider`; "gptq" and "ptq" share the
plain leaves.

The model is a family of the model spec ("quantized": its base record and rules), so a checkpoint of
quantized params rebuilds its model, and `loading.restore_params` its abstract tree, with no flag.
Quantizing float params (calibration, GPTQ, AWQ) is `lmops_jax.compression.quantize`'s job.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmops_jax.models.wrapper import WrapperModel

SCHEMES = ("int8", "int4", "w8a8", "float")
METHODS = ("ptq", "gptq", "awq")
_WEIGHT_QTYPE = {"int8": "int8", "int4": "int4", "w8a8": "int8", "float": None}


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """How the modules whose path fully matches `module_path` are quantized.

    Attributes:
      module_path: regex over module paths, e.g. '.*/mlp/(up|gate|down)_proj' or 'lm_head'.
      scheme: 'int8' (weights, per output channel), 'int4' (weights; give a tile), 'w8a8' (int8
        weights and dynamic int8 activations) or 'float' (left unquantized).
      tile_size: quantize the innermost contraction axis in tiles (groups) of this many values, each
        with its own scale; None: one scale per output channel. It must divide that axis.
    """

    module_path: str
    scheme: str = "int8"
    tile_size: int | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme must be one of {SCHEMES}, got {self.scheme!r} (rule for "
                             f"{self.module_path!r})")
        if self.tile_size is not None and (not isinstance(self.tile_size, int) or isinstance(self.tile_size, bool)
                                           or self.tile_size < 1):
            raise ValueError(f"tile_size must be None or an int >= 1, got {self.tile_size!r} (rule for "
                             f"{self.module_path!r})")
        try:
            re.compile(self.module_path)
        except (re.error, TypeError) as e:
            raise ValueError(f"quantization rule module_path {self.module_path!r} is not a regex: {e}") from e

    def qwix_rule(self, rule_cls: type | None = None, **extra) -> Any:
        """This rule as a qwix rule (`qwix.QtRule` unless `rule_cls`, e.g. a GPTQ or LoRA rule)."""
        import qwix
        act = "int8" if self.scheme == "w8a8" else None
        return (rule_cls or qwix.QtRule)(module_path=self.module_path, weight_qtype=_WEIGHT_QTYPE[self.scheme],
                                         act_qtype=act, tile_size=self.tile_size, **extra)


def is_quantized_leaf(x: Any) -> bool:
    """Whether `x` is a qwix quantized param (`WithAux`, AWQ's subclass included)."""
    from qwix._src.providers import ptq
    return isinstance(x, ptq.WithAux)


def contracting_axis(leaf: Any) -> int | None:
    """The one kernel axis a quantized leaf's matmul contracts, or None when it contracts several
    (e.g. o_proj [heads, head_dim, embed]); GPTQ and AWQ fall back to plain PTQ for those."""
    axes = set(range(len(leaf.shape))) - set(leaf.how.channelwise_axes)
    return axes.pop() if len(axes) == 1 else None


@dataclasses.dataclass(frozen=True)
class QuantizedModel(WrapperModel):
    """`base` with the weights its `rules` match quantized (module docstring).

    Attributes:
      base: the float model (Llama, T5, or one imported from Hugging Face).
      rules: QuantRules in order of precedence; modules no rule matches stay float.
      method: how the weights were quantized: 'ptq' (round to nearest), 'gptq' or 'awq'.
    """

    rules: tuple[QuantRule, ...] = ()
    method: str = "ptq"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "rules", tuple(self.rules))
        if not self.rules or not all(isinstance(r, QuantRule) for r in self.rules):
            raise ValueError(f"QuantizedModel needs a non-empty sequence of QuantRules, got {self.rules!r}")
        if self.method not in METHODS:
            raise ValueError(f"quantization method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.base, QuantizedModel):
            raise ValueError("the model is already quantized: quantize its float checkpoint instead")

    def provider(self) -> Any:
        """The qwix provider that runs the quantized params (AWQ's for method 'awq')."""
        import qwix
        rules = [r.qwix_rule() for r in self.rules]
        if self.method == "awq":
            from qwix.contrib import awq
            return awq.AwqInferenceProvider(rules)
        return qwix.PtqProvider(rules)

    @functools.cached_property
    def module(self) -> nn.Module:
        import qwix
        return qwix.quantize_model(self.base.module, self.provider())

    def abstract_params(self, input_shapes: Mapping[str, tuple] | None = None) -> Any:
        """The boxed quantized parameter tree as ShapeDtypeStructs (with qwix's `how` per leaf); no FLOPs."""
        shapes = input_shapes or self.input_shapes(1, {"inputs": 8, "targets": 8})
        return jax.eval_shape(lambda key: type(self.base).init_params(self.view(), key, shapes), jax.random.key(0))

    def quantize(self, float_params: Any) -> Any:
        """Unboxed float params of `base` rounded to nearest by the rules (plain PTQ leaves)."""
        import qwix
        return qwix.quantize_params(nn.meta.unbox(float_params), nn.meta.unbox(self.abstract_params()))

    def init_params(self, rng, input_shapes):
        """The base model's init, quantized by the rules (plain PTQ), boxed with the kernels' logical axes.

        For method 'awq' the leaves that contract one axis carry AWQ scales of ones (no rescaling).
        """
        boxed = self.abstract_params(input_shapes)
        params = self.quantize(self.base.init_params(rng, input_shapes))
        if self.method == "awq":
            params = jax.tree.map(_with_awq_scale, params, is_leaf=is_quantized_leaf)
        return rebox(params, boxed)


def _with_awq_scale(leaf: Any) -> Any:
    from qwix.contrib import awq
    axis = contracting_axis(leaf) if is_quantized_leaf(leaf) else None
    if axis is None:
        return leaf
    return awq.WithAwqScale(array=leaf.array, awq_scale=jnp.ones((leaf.shape[axis],), jnp.float32),
                            contracting_axis=axis, how=leaf.how)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def rebox(params: Any, boxed: Any) -> Any:
    """`params` with each leaf put back in the box (logical axes) of the same path in `boxed`; leaves
    `boxed` lacks (AWQ scales) stay unboxed, so they are replicated."""
    boxes = {jax.tree_util.keystr(p): b for p, b in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=_is_box)[0]}

    def put(path, value):
        box = boxes.get(jax.tree_util.keystr(path))
        return box.replace_boxed(value) if _is_box(box) else value
    return jax.tree_util.tree_map_with_path(put, params)


def quantization_of(model: Any) -> QuantizedModel | None:
    """The QuantizedModel inside `model` (itself, or the base of a wrapper such as LoRA), or None."""
    while model is not None:
        if isinstance(model, QuantizedModel):
            return model
        model = getattr(model, "base", None)
    return None



def dequantize(params: Any) -> Any:
    """`params` with every quantized leaf replaced by its float weights (AWQ scales divided out)."""
    import qwix

    def leaf(x):
        if not is_quantized_leaf(x):
            return x
        w = qwix.dequantize(x.array)
        scale = getattr(x, "awq_scale", None)
        if scale is None:
            return w
        shape = [1] * w.ndim
        shape[x.contracting_axis] = scale.shape[0]
        return w / scale.reshape(shape)
    return jax.tree.map(leaf, params, is_leaf=is_quantized_leaf)
