"""How checkpoints become served models: engines, schedulers and adapters, from the `serve` job's options.

    options = ServingOptions(max_slots=8, max_queue=64, ...)
    sources = read_adapters({"legal": "/runs/lora_legal"})                 # AdapterSource per name
    by_model = assign_adapters(sources, {"tiny": "/runs/base"})            # model name -> its adapters
    entry = lazy_model("other", "/runs/other", options, partitioner, by_model.get("other", {}))

The default model is built by `serve.build_server` (replicas, a draft model) with the same options and
`adapter_layout` / `scheduler`; the other models (MODELS) become `lazy_model` entries that the model
cache loads on demand (`serving.model_cache`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import numpy as np

from lmops_jax import checkpoints
from lmops_jax.checkpoints import CheckpointError
from lmops_jax.models import loading
from lmops_jax.models.model import BaseModel
from lmops_jax.models.multi_lora import Adapter, AdapterLayout
from lmops_jax.partitioning import Partitioner
from lmops_jax.serving import chat_template as chat_template_lib
from lmops_jax.serving.adapters import AdapterResidency, AdapterSource, model_dir_of
from lmops_jax.serving.engine import Engine, kv_bytes_per_row
from lmops_jax.serving.model_cache import ServedModel
from lmops_jax.serving.scheduler import Scheduler
from lmops_jax.serving.tokenizer import Tokenizer

DEFAULT_MAX_LENGTH = 2048


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    """What every served model's engine and scheduler share (the `serve` job's arguments of those names)."""

    max_slots: int = 8
    max_queue: int = 64
    max_length: int | None = None
    prefix_cache: bool = True
    kv_cache: str = "dense"
    kv_cache_bytes: int | None = None
    block_size: int = 16
    prefill_chunk: int | None = 512
    request_timeout_s: float | None = None
    dtype: str | None = None
    max_resident_adapters: int = 4
    max_lora_rank: int | None = None

    def length_for(self, model: BaseModel) -> int:
        """MAX_LENGTH, else the model's, else 2048."""
        return self.max_length or model.max_length or DEFAULT_MAX_LENGTH

    def engine_args(self, model: BaseModel) -> dict[str, Any]:
        return dict(max_slots=self.max_slots, max_length=self.length_for(model), kv_cache=self.kv_cache,
                    kv_cache_bytes=self.kv_cache_bytes, block_size=self.block_size,
                    prefix_cache=self.prefix_cache and model.prompt_shares_cache)

    def scheduler(self, engine: Engine, tokenizer: Tokenizer, model_id: str, adapters: Mapping[str, AdapterSource],
                  host_adapters: dict[str, Adapter]) -> Scheduler:
        """A scheduler (not started) over `engine`, serving `adapters` when there are any."""
        residency = AdapterResidency(engine, adapters, host_adapters) if adapters else None
        return Scheduler(engine, max_queue=self.max_queue, eos_id=tokenizer.stop_id, detokenize=tokenizer.decode,
                         prefill_chunk=self.prefill_chunk, request_timeout_s=self.request_timeout_s,
                         model_id=model_id, adapters=residency)


def chat_template(spec_vocabulary: Any) -> chat_template_lib.ChatTemplate:
    """The model's own template when its Hugging Face tokenizer files carry one, else SIMPLE."""
    if spec_vocabulary is not None and spec_vocabulary.kind == "hf_tokenizer":
        own = chat_template_lib.from_tokenizer_dir(os.path.dirname(spec_vocabulary.path))
        if own is not None:
            return own
    return chat_template_lib.SIMPLE


# ------------------------------------------------------------------------------------------- adapters
def read_adapters(adapters: Mapping[str, str] | None) -> dict[str, AdapterSource]:
    """ADAPTERS (name -> a LoRA run's MODEL_DIR) read from disk (specs only, no arrays)."""
    if adapters is None:
        return {}
    if not isinstance(adapters, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in adapters.items()):
        raise ValueError(f"ADAPTERS must be a dict of name -> LoRA run directory, got {adapters!r}")
    return {name: AdapterSource.read(name, path) for name, path in adapters.items()}


def assign_adapters(sources: Mapping[str, AdapterSource],
                    model_dirs: Mapping[str, str]) -> dict[str, dict[str, AdapterSource]]:
    """{served model name: {adapter name: source}}: each adapter goes to the served model whose directory
    is its run's INITIAL_CHECKPOINT_PATH; CheckpointError names an adapter whose base is not served."""
    by_dir = {os.path.realpath(d): name for name, d in model_dirs.items()}
    out: dict[str, dict[str, AdapterSource]] = {}
    for name, source in sources.items():
        model = by_dir.get(os.path.realpath(source.base_dir)) if source.base_dir else None
        if model is None:
            raise CheckpointError(
                f"ADAPTERS[{name!r}]: its base model ({source.base_dir or 'no INITIAL_CHECKPOINT_PATH in its run'}) "
                f"is not served; serve it as CHECKPOINT_PATH or in MODELS (served: {dict(model_dirs)})")
        out.setdefault(model, {})[name] = source
    return out


def adapter_layout(model: BaseModel, partitioner: Partitioner, sources: Mapping[str, AdapterSource],
                   options: ServingOptions) -> AdapterLayout | None:
    """The stack serving `sources` on `model` (None without adapters), checked from the adapters'
    checkpoint metadata: an adapter that does not fit is refused here, at start, by name."""
    if not sources:
        return None
    abstract, _ = loading.param_shardings(model, partitioner)
    shapes = []
    for name, source in sources.items():
        tree = checkpoints.unflatten({n: jax.ShapeDtypeStruct(s, np.dtype(d))
                                      for n, (s, d) in checkpoints.checkpoint_param_shapes(source.path).items()})
        shapes.append(Adapter.from_params(name, tree, source.rank, source.alpha))
    dtype = jax.tree.leaves(abstract)[0].dtype
    return AdapterLayout.of(abstract, shapes, options.max_resident_adapters, options.max_lora_rank, dtype)


# --------------------------------------------------------------------------------- models on demand
def estimated_bytes(model: BaseModel, options: ServingOptions, partitioner: Partitioner) -> int:
    """Device bytes a model's engine will take: its params plus max_slots dense KV rows (or the paged pool)."""
    abstract, _ = loading.param_shardings(model, partitioner)
    params = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
    if options.kv_cache == "paged" and options.kv_cache_bytes:
        return params + options.kv_cache_bytes
    return params + options.max_slots * kv_bytes_per_row(model, options.length_for(model))


def lazy_model(name: str, checkpoint: str, options: ServingOptions, partitioner: Partitioner,
               adapters: Mapping[str, AdapterSource]) -> ServedModel:
    """A MODELS entry: read its spec now (a bad checkpoint fails the start), load it on demand."""
    spec = loading.read_spec(checkpoint)
    model = loading.with_dtype(spec.model, options.dtype)
    tokenizer = Tokenizer.from_spec(spec, model)
    layout = adapter_layout(model, partitioner, adapters, options)
    host_adapters: dict[str, Adapter] = {}
    model_id = model_dir_of(checkpoint)
    return ServedModel(
        name, checkpoint, tokenizer, chat_template(spec.vocabulary), options.length_for(model),
        make_engine=lambda params: Engine(model, params, partitioner, **options.engine_args(model), adapters=layout),
        make_scheduler=lambda engine: options.scheduler(engine, tokenizer, model_id, adapters, host_adapters),
        read_params=lambda: loading.restore_params(checkpoint, model, partitioner), adapters=dict(adapters),
        estimated_bytes=estimated_bytes(model, options, partitioner))
