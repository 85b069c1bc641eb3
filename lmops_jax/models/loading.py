"""One way to load a model: rebuild it from a checkpoint, cast its dtype, place its params on a mesh.

    loaded = loading.read_spec(path)                     # ModelSpec: model + vocabulary description
    model = loading.with_dtype(loaded.model, "bfloat16")
    params = loading.restore_params(path, model, loading.default_partitioner())

A checkpoint names its model by the typed spec stored beside its gin text (`models.spec`), so loading
reads JSON and touches no gin state: several threads can load different checkpoints at once. Older
checkpoints hold only the gin text; for them the text is parsed on an empty global gin config, under
a lock, and the caller's config is put back exactly afterwards (gin has one process-wide config).
Nothing here imports seqio or TensorFlow; `VocabularySpec.build` does, when a vocabulary is asked for.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Any, Callable, Iterator, Mapping, TypeVar

import flax.linen as nn
import jax

from lmops_jax import checkpoints
from lmops_jax.checkpoints import CheckpointError
from lmops_jax.models.model import BaseModel
from lmops_jax.models.spec import ModelSpec, VocabularySpec
from lmops_jax.models.wrapper import WrapperModel
from lmops_jax.partitioning import Partitioner

DTYPES = ("float32", "bfloat16", "float16")
T = TypeVar("T")
_GIN_LOCK = threading.Lock()


@contextlib.contextmanager
def _isolated_gin() -> Iterator[None]:
    """Runs the body alone (a lock) on an empty global gin config, then restores the previous one exactly.

    Uses gin's module-level state, which has no public API.
    """
    import gin
    import gin.config as gin_config
    with _GIN_LOCK:
        saved = ({k: dict(v) for k, v in gin_config._CONFIG.items()}, set(gin_config._IMPORTS),
                 dict(gin_config._SINGLETONS), dict(gin_config._OPERATIVE_CONFIG), gin_config._CONFIG_IS_LOCKED)
        gin.clear_config()
        try:
            yield
        finally:
            gin.clear_config()
            gin_config._CONFIG.update(saved[0])
            gin_config._IMPORTS.update(saved[1])
            gin_config._SINGLETONS.update(saved[2])
            gin_config._OPERATIVE_CONFIG.update(saved[3])
            gin_config._set_config_is_locked(saved[4])


def parse_gin(config_text: str, source: str, read: Callable[[], T]) -> T:
    """`read()`'s result with `config_text` as the only gin config (see the module docstring)."""
    import gin
    with _isolated_gin():
        try:
            gin.parse_config(config_text)
        except Exception as e:  # gin raises many types, with the location in the message
            raise CheckpointError(f"cannot parse the gin config stored with {source}: {e}") from e
        return read()


def gin_macro(name: str) -> Any:
    """The value of macro `name` in the current gin config (inside `parse_gin`), or None when unset."""
    import gin
    try:
        return gin.query_parameter(f"{name}/gin.macro.value")
    except ValueError:
        return None


def _gin_model(source: str) -> BaseModel:
    """The model a run trained (`train.model`: LoRA runs bind their LoraModel there), else MODEL."""
    import gin
    for selector in ("train.model", "MODEL/gin.macro.value"):
        try:
            ref = gin.query_parameter(selector)
        except ValueError:
            continue
        try:
            model = ref.scoped_configurable_fn() if isinstance(ref, gin.config.ConfigurableReference) else ref
        except Exception as e:  # a binding that fails to build, with gin's location in the message
            raise CheckpointError(f"cannot build {selector} of the gin config stored with {source}: {e}") from e
        if not isinstance(model, BaseModel):
            raise CheckpointError(f"{selector} in the gin config stored with {source} is {model!r}, not a model")
        return model
    raise CheckpointError(f"the gin config stored with {source} defines no MODEL macro")


def spec_from_gin(config_text: str, source: str = "<gin config>") -> ModelSpec:
    """The model (and MIXTURE_OR_TASK_NAME's vocabulary) of a gin config text, e.g. an old checkpoint's."""
    def read() -> ModelSpec:
        task = gin_macro("MIXTURE_OR_TASK_NAME")
        return ModelSpec(_gin_model(source), VocabularySpec("task", task=task) if isinstance(task, str) else None)
    return parse_gin(config_text, source, read)


def read_spec(path: str) -> ModelSpec:
    """The model spec stored with a checkpoint, else (older checkpoints) the one its gin text gives.

    A relative vocabulary path (a tokenizer copied into the model directory) is rooted at the model
    directory. Raises CheckpointError naming the checkpoint when it holds neither, or a spec this code
    cannot read.
    """
    stored = checkpoints.read_model_spec(path)
    if stored is not None:
        loaded = ModelSpec.from_json(stored, repr(path))
        if loaded.vocabulary is None:
            return loaded
        model_dir = os.path.dirname(checkpoints.resolve(path)[0])
        return dataclasses.replace(loaded, vocabulary=loaded.vocabulary.under(model_dir))
    config_text = checkpoints.read_config(path)
    if not config_text.strip():
        raise CheckpointError(f"checkpoint {path!r} has no gin config and no model spec, so its model cannot be "
                              "rebuilt; build the model yourself and pass it")
    return spec_from_gin(config_text, repr(path))


def model_from_checkpoint(path: str) -> BaseModel:
    """The model of a checkpoint (`read_spec(path).model`)."""
    return read_spec(path).model


def with_dtype(model: BaseModel, dtype: str | None) -> BaseModel:
    """`model` (a wrapper with a `config` field, or one wrapping such a model) computing and holding params
    in `dtype` (None: unchanged)."""
    if dtype is None:
        return model
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be None or one of {DTYPES}, got {dtype!r}")
    if isinstance(model, WrapperModel):  # LoRA, quantized: the float parts (and scales) take the dtype
        return dataclasses.replace(model, base=with_dtype(model.base, dtype))
    config = dataclasses.replace(model.config, dtype=dtype, param_dtype=dtype)
    return dataclasses.replace(model, config=config)


def default_partitioner() -> Partitioner:
    """One local device, data-parallel rules: what loading uses when no mesh is asked for."""
    return Partitioner({"data": 1, "fsdp": 1, "model": 1}, "dp", devices=jax.local_devices()[:1])


def abstract_params(init_params: Callable[[jax.Array], Any], partitioner: Partitioner) -> tuple[Any, Any]:
    """(abstract unboxed params, their NamedShardings) of a boxed param initializer, with no FLOPs."""
    boxed = jax.eval_shape(init_params, jax.random.key(0))
    return nn.meta.unbox(boxed), partitioner.shardings_of_boxed(boxed)


def param_shardings(model: BaseModel, partitioner: Partitioner) -> tuple[Any, Any]:
    """(abstract unboxed params, their NamedShardings) of `model` under the partitioner's rules."""
    shapes = model.input_shapes(1, {"inputs": 8, "targets": 8})  # param shapes do not depend on lengths
    return abstract_params(lambda key: model.init_params(key, shapes), partitioner)


def place_params(model: BaseModel, params: Any, partitioner: Partitioner) -> Any:
    """`params` (boxed or not, on host or device) checked against `model`'s parameter tree, cast to its
    param dtype and placed on its shardings. Raises ValueError naming the first param that does not fit."""
    abstract, shardings = param_shardings(model, partitioner)
    params = nn.meta.unbox(params)
    if jax.tree.structure(params) != jax.tree.structure(abstract):
        given = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"params do not match the model's parameter tree (top-level keys {sorted(abstract)}, "
                         f"got {given}); pass the 'params' collection itself")
    for (path, p), a in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(abstract)):
        if tuple(p.shape) != tuple(a.shape):
            raise ValueError(f"param {jax.tree_util.keystr(path)} has shape {tuple(p.shape)}, the model "
                             f"expects {tuple(a.shape)}")
    params = jax.tree.map(lambda p, a: p if p.dtype == a.dtype else p.astype(a.dtype), params, abstract)
    return jax.device_put(params, shardings)


def restore_params(path: str, model: BaseModel, partitioner: Partitioner) -> Any:
    """The checkpoint's params read directly onto `model`'s shardings, cast to its param dtype."""
    abstract, shardings = param_shardings(model, partitioner)
    return checkpoints.restore_params(path, abstract, shardings)
