"""LoRA fine-tuning through qwix: `LoraModel` wraps any model; only the adapters train and are saved.

    model = LoraModel(base=DecoderOnlyModel(cfg), rank=8, alpha=16.0, targets=r".*/(q_proj|v_proj)")

`qwix.apply_lora_to_model` intercepts the `dot_general` of every module whose path (e.g.
`layers_0/self_attn/q_proj`) fully matches `targets` and adds `kernel_lora_a` [prod(in), r] and
`kernel_lora_b` [r, prod(out)] beside its `kernel` (A he-uniform, B zeros, so training starts exactly at
the base model); the output becomes x @ kernel + (x @ A) @ B * alpha / rank. The adapters inherit the
kernel's logical axes, so they shard with the same rules.

- Frozen base: `trainable_patterns` makes the Trainer restrict its optimizer to the adapters (an optax
  mask: no optimizer state for the base) and differentiate only them.
- Adapter-only checkpoints: `checkpoint_params` keeps only the adapters; a resume takes the base from
  INITIAL_CHECKPOINT_PATH again (train.py), so a run's checkpoints are small.
- Merging: `merge_lora(params, rank, alpha)` folds the adapters into the kernels and returns params of
  the base model; `python -m lmops_jax.peft.lora merge ADAPTER_RUN OUT_DIR [BASE_CHECKPOINT]` writes a
  params-only checkpoint of the merged model that `InferenceModule.from_checkpoint` loads.
Adapter dropout (qwix) applies only when `compute_logits` gets a PRNG key (training); evaluation and
scoring (rng=None) run without it. Decoding (`prefill`, `decode_step`) is the base model's decode API run
through the adapted module, so `InferenceModule` and on-policy sampling decode with the adapters.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmops_jax.cli import runner
from lmops_jax.models import spec
from lmops_jax.models.quantized import QuantizedModel, QuantRule, dequantize, is_quantized_leaf
from lmops_jax.models.wrapper import WrapperModel, device_params
from lmops_jax.training.train_state import overlay_params

if __name__ == "__main__":  # before anything is defined or registered twice (see cli.runner.run_as_main)
    runner.run_as_main("lmops_jax.peft.lora")

LORA_A, LORA_B = "_lora_a", "_lora_b"
TRAINABLE_PATTERNS = (r"_lora_[ab]$",)
DEFAULT_TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj)"


def is_adapter(name: str) -> bool:
    return name.endswith(LORA_A) or name.endswith(LORA_B)


def _filter(tree: Mapping[str, Any], keep) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub = _filter(value, keep)
            if sub:
                out[key] = sub
        elif keep(str(key)):
            out[key] = value
    return out


def adapter_params(params: Mapping[str, Any]) -> dict:
    """The adapter leaves of a param tree (or of any tree with its structure, e.g. shardings)."""
    return _filter(params, is_adapter)


def base_params(params: Mapping[str, Any]) -> dict:
    """The param tree without its adapters."""
    return _filter(params, lambda name: not is_adapter(name))


def _input_rank(kernel_shape: Sequence[int], in_size: int) -> int | None:
    """How many leading kernel dims the adapter's input (A's rows, `in_size` = their product) spans."""
    return next((i for i in range(len(kernel_shape) + 1) if math.prod(kernel_shape[:i]) == in_size), None)


def merge_lora(params: Mapping[str, Any], rank: int, alpha: float, *,
               requantize: QuantizedModel | None = None) -> dict:
    """Base-model params with every adapter pair folded into its kernel: W + (A @ B) * alpha / rank.

    Args:
      params: a LoraModel param tree (unboxed arrays).
      rank, alpha: the LoraModel's; the scale is alpha / rank as in qwix.
      requantize: the quantized base model (QLoRA), to fold the adapters into its int weights: they
        are dequantized, merged and quantized again by its rules. Without it an adapted int kernel is
        refused: float adapters do not fold into int weights.

    Returns:
      The base model's param tree (same structure as `base_params(params)`, kernels updated).
    """
    scale = alpha / rank
    if requantize is not None:
        return requantize.quantize(merge_lora(dequantize(params), rank, alpha))

    def merge(tree: Mapping[str, Any], path: str) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, Mapping):
                out[key] = merge(value, f"{path}{key}/")
            elif not is_adapter(key):
                a, b = tree.get(key + LORA_A), tree.get(key + LORA_B)
                if a is None and b is None:
                    out[key] = value
                    continue
                if is_quantized_leaf(value):
                    raise ValueError(f"{path}{key} holds quantized (int) weights: float LoRA adapters do not fold "
                                     "into them; ask to re-quantize (merge --requantize: dequantize, merge, "
                                     "quantize again by the base's rules) or keep the adapters unmerged")
                if a is None or b is None or key != "kernel" or a.ndim != 2 or b.ndim != 2:
                    raise NotImplementedError(
                        f"cannot merge the adapters of {path}{key}: only DenseGeneral kernels (2-D A and B "
                        "beside a `kernel`) are supported")
                lead = _input_rank(value.shape, a.shape[0])
                if lead is None or math.prod(value.shape[lead:]) != b.shape[1]:
                    raise ValueError(f"adapters of {path}{key} with shapes {a.shape}, {b.shape} do not fit the "
                                     f"kernel {value.shape}")
                delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)).reshape(value.shape) * scale
                out[key] = (value.astype(jnp.float32) + delta).astype(value.dtype)
        return out

    return merge(params, "")


@dataclasses.dataclass(frozen=True)
class LoraModel(WrapperModel):
    """`base` with LoRA adapters on the modules whose path fully matches `targets` (a regex).

    QLoRA: a `QuantizedModel` base (a quantized checkpoint, `qlora.gin`) keeps its int weights frozen
    and the adapters train in float; one qwix LoraProvider runs both (`_qlora_rules`).

    Attributes:
      base: the model to adapt (any BaseModel over a linen module: Llama, T5, a quantized model).
      rank: adapter rank r (LORA_RANK).
      alpha: scale numerator; the update is (x @ A) @ B * alpha / rank (LORA_ALPHA).
      targets: regex over module paths such as 'layers_0/self_attn/q_proj' (LORA_TARGETS).
      dropout: dropout on the adapters' input during training.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str = DEFAULT_TARGETS
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LORA_RANK must be an int >= 1, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except (re.error, TypeError) as e:
            raise ValueError(f"LORA_TARGETS {self.targets!r} is not a regex: {e}") from e
        if isinstance(self.base, QuantizedModel) and self.base.method == "awq":
            raise ValueError("QLoRA needs a 'ptq' or 'gptq' quantized base: AWQ's per-channel scales run "
                             "through qwix's AwqInferenceProvider, which its LoRA provider does not extend")

    # The adapted module.
    def _lora_module(self, dropout: float) -> nn.Module:
        import qwix
        lora = dict(rank=self.rank, alpha=float(self.alpha), dropout=dropout)
        if isinstance(self.base, QuantizedModel):
            return qwix.apply_lora_to_model(self.base.base.module,
                                            qwix.LoraProvider(_qlora_rules(self.targets, self.base.rules, lora)))
        return qwix.apply_lora_to_model(self.base.module, qwix.LoraProvider(module_path=self.targets, **lora))

    @functools.cached_property
    def module(self) -> nn.Module:
        """The base module with adapters and without dropout (init, evaluation, scoring)."""
        return self._lora_module(0.0)

    @functools.cached_property
    def _train_module(self) -> nn.Module:
        return self._lora_module(self.dropout) if self.dropout else self.module

    def init_params(self, rng, input_shapes):
        """Base params (initialized as the base model does) plus adapters; fails if `targets` adapts nothing.

        The adapters are created by applying the adapted module to the unboxed base params, then boxed
        with logical axes taken from their kernel: A (kernel's first input axis, None), B (None, kernel's
        first output axis), as qwix derives them. (qwix re-boxing flax's LogicallyPartitioned kernels
        itself applies the kernel's sharding constraint to the rank-2 adapters, which fails under a mesh.)
        """
        base_rng, lora_rng = jax.random.split(rng)
        base = self.base.init_params(base_rng, input_shapes)
        _, variables = self.module.apply({"params": nn.meta.unbox(base)}, *self._example_inputs(input_shapes),
                                         rngs={"params": lora_rng}, mutable=["params"])
        lora = adapter_params(variables["params"])
        if not lora:
            raise ValueError(f"LORA_TARGETS {self.targets!r} matches no module with a matmul weight; module paths "
                             "look like 'layers_0/self_attn/q_proj' or 'encoder/layers_0/mlp/up_proj'")
        return overlay_params(base, _box_adapters(lora, base))

    def _example_inputs(self, input_shapes) -> tuple:
        tokens = lambda name: jnp.ones(input_shapes[name], jnp.int32)  # noqa: E731
        if "encoder_input_tokens" in input_shapes:
            return tokens("encoder_input_tokens"), tokens("decoder_input_tokens")
        return (tokens("decoder_input_tokens"),)

    def compute_logits(self, params, batch, rng=None):
        """The base model's `compute_logits` run through the adapted module (adapter dropout only with `rng`)."""
        if rng is not None and self.dropout > 0:
            view = self.view(rngs={"dropout": rng}, module=self._train_module)
            return type(self.base).compute_logits(view, device_params(params), batch)
        return super().compute_logits(params, batch)

    # Hooks the Trainer and train() use.
    @property
    def trainable_patterns(self) -> tuple[str, ...]:
        return TRAINABLE_PATTERNS

    def checkpoint_params(self, params: Mapping[str, Any]) -> dict:
        """Adapter-only checkpoints: the base comes back from INITIAL_CHECKPOINT_PATH."""
        return adapter_params(params)

    def merge(self, params: Mapping[str, Any], requantize: bool = False) -> dict:
        """Params of `self.base` with the adapters folded in (for inference without LoRA).

        A quantized base refuses unless `requantize`: its weights are dequantized, merged in float and
        quantized again by its rules (plain rounding, whatever its method was).
        """
        return merge_lora(params, self.rank, self.alpha,
                          requantize=self.base if requantize and isinstance(self.base, QuantizedModel) else None)


spec.register_family("lora", LoraModel)  # so checkpoints of LoRA runs name their model (models.spec)


def _qlora_rules(targets: str, rules: Sequence[QuantRule], lora: Mapping[str, Any]) -> list:
    """One qwix LoraProvider's rules for LoRA over quantized modules, first match wins: adapted modules
    take their first quantization rule's scheme (the regexes intersected with a lookahead), then adapted
    float modules, then the quantized modules without adapters."""
    import qwix
    both = [dataclasses.replace(r, module_path=f"(?=(?:{targets})$)(?:{r.module_path})").qwix_rule(
        qwix.LoraRule, **lora) for r in rules]
    return [*both, qwix.LoraRule(module_path=targets, **lora), *(r.qwix_rule() for r in rules)]


def _box_adapters(lora: Mapping[str, Any], base: Mapping[str, Any]) -> dict:
    """Adapters as LogicallyPartitioned boxes with names derived from the boxed kernel beside them."""
    out = {}
    for key, value in lora.items():
        if isinstance(value, Mapping):
            out[key] = _box_adapters(value, base.get(key, {}))
            continue
        kernel = base.get(key[:-len(LORA_A)])
        if is_quantized_leaf(kernel):  # QLoRA: the int values carry the kernel's logical axes
            kernel = kernel.array.qvalue
        names = getattr(kernel, "names", None)
        if names is None or value.ndim != 2:
            out[key] = value
            continue
        shape = kernel.value.shape
        lead = _input_rank(shape, lora_in_size(lora, key))
        if lead is None or lead == 0 or lead == len(shape):
            out[key] = value
        elif key.endswith(LORA_A):
            out[key] = nn.LogicallyPartitioned(value, (names[0], None))
        else:
            out[key] = nn.LogicallyPartitioned(value, (None, names[lead]))
    return out


def lora_in_size(lora: Mapping[str, Any], key: str) -> int:
    """Input size (rows of A) of the adapter pair that `key` belongs to."""
    return lora[key[:-len(LORA_A)] + LORA_A].shape[0]


# ----------------------------------------------------------------------------------- merge and export
def _initial_checkpoint(run_checkpoint: str) -> str | None:
    """INITIAL_CHECKPOINT_PATH of the gin config stored with a run's checkpoint (None without one)."""
    from lmops_jax import checkpoints
    from lmops_jax.models import loading

    text = checkpoints.read_config(run_checkpoint)
    initial = loading.parse_gin(text, repr(run_checkpoint), lambda: loading.gin_macro("INITIAL_CHECKPOINT_PATH"))
    return initial if isinstance(initial, str) else None


def export_merged(adapter_checkpoint: str, output_dir: str, base_checkpoint: str | None = None,
                  requantize: bool = False) -> str:
    """Writes base + merged adapters of a LoRA run as a params-only checkpoint of the base model.

    The LoraModel comes from the run's model spec (older runs: its gin config), the base params from
    `base_checkpoint` (default: the run's INITIAL_CHECKPOINT_PATH). The output stores the base model's
    spec with the run's vocabulary and the base checkpoint's gin text, so
    `InferenceModule.from_checkpoint(output_dir)` loads it. A quantized base (QLoRA) needs `requantize`
    (see `LoraModel.merge`); the output is then a quantized checkpoint.
    """
    from lmops_jax import checkpoints
    from lmops_jax.models import loading
    from lmops_jax.partitioning import Partitioner

    run = loading.read_spec(adapter_checkpoint)
    model = run.model
    if not isinstance(model, LoraModel):
        raise checkpoints.CheckpointError(f"the run stored with {adapter_checkpoint} trains "
                                          f"{type(model).__name__}, not a LoraModel")
    base_checkpoint = base_checkpoint or _initial_checkpoint(adapter_checkpoint)
    if not base_checkpoint:
        raise ValueError(f"the run stored with {adapter_checkpoint} names no INITIAL_CHECKPOINT_PATH; pass the "
                         "base checkpoint")
    abstract, shardings = loading.param_shardings(model, Partitioner())
    base = checkpoints.restore_params(base_checkpoint, base_params(abstract), base_params(shardings))
    adapters = checkpoints.restore_params(adapter_checkpoint, adapter_params(abstract), adapter_params(shardings))
    merged = jax.device_get(model.merge(overlay_params(base, adapters), requantize=requantize))
    merged_spec = spec.ModelSpec(model.base, run.vocabulary).to_json()
    return checkpoints.save_params(output_dir, merged, checkpoints.read_config(base_checkpoint),
                                   model_spec=merged_spec)


def _merge_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_run", help="MODEL_DIR (or a checkpoint) of the LoRA run")
    parser.add_argument("out_dir", help="where the merged params-only checkpoint goes")
    parser.add_argument("base_checkpoint", nargs="?", default=None,
                        help="the base model (default: the run's INITIAL_CHECKPOINT_PATH)")
    parser.add_argument("--requantize", action="store_true",
                        help="QLoRA: dequantize the quantized base, merge, and quantize again by its rules")


def _merge(args: argparse.Namespace) -> None:
    print(f"merged params written to {export_merged(args.adapter_run, args.out_dir, args.base_checkpoint, args.requantize)}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lmops_jax.peft.lora merge ADAPTER_RUN OUT_DIR [BASE_CHECKPOINT]` through the CLI runner."""
    merge = runner.ArgsJob("fold a LoRA run's adapters into its base model and write a plain params-only "
                           "checkpoint", _merge_flags, _merge)
    return runner.run("python -m lmops_jax.peft.lora", "LoRA adapters (see lmops_jax.peft.lora).", {"merge": merge},
                      argv)
