"""The train state pytree and its initialization directly in sharded form."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from lmops_jax.models import loading
from lmops_jax.partitioning import Partitioner


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: the model's parameter tree; opt_state: the optax state."""

    step: jax.Array
    params: Any
    opt_state: Any


def overlay_params(base: Mapping[str, Any], partial: Mapping[str, Any]) -> dict:
    """`base` with the leaves that `partial` (a nested dict holding a subset of its paths) replaced."""
    out = dict(base)
    for key, value in partial.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = overlay_params(out[key], value)
        else:
            out[key] = value
    return out


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _opt_state_shardings(abstract_opt_state: Any, params: Any, param_shardings: Any, partitioner: Partitioner) -> Any:
    """Optimizer-state leaves that mirror a parameter (same dict-key path suffix and shape, e.g. Adam's
    moments) take its sharding; the rest are replicated (step counts, Adafactor's factored statistics)."""
    by_path = {}
    for (path, param), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                       jax.tree.leaves(param_shardings)):
        by_path[_dict_keys(path)] = (param.shape, sharding)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            shape, sharding = by_path.get(keys[start:], (None, None))
            if sharding is not None:
                return sharding if getattr(leaf, "shape", None) == shape else partitioner.replicated
        return partitioner.replicated
    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def state_shardings(
    partitioner: Partitioner, tx: optax.GradientTransformation, init_params: Callable[[jax.Array], Any],
) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, its NamedShardings) from a boxed parameter initializer, with no FLOPs."""
    params, param_shardings = loading.abstract_params(init_params, partitioner)
    opt_state = jax.eval_shape(tx.init, params)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
    shardings = TrainState(
        step=partitioner.replicated, params=param_shardings,
        opt_state=_opt_state_shardings(opt_state, params, param_shardings, partitioner))
    return abstract, shardings


def init_train_state(
    rng: jax.Array, partitioner: Partitioner, tx: optax.GradientTransformation,
    init_params: Callable[[jax.Array], Any], shardings: TrainState,
) -> TrainState:
    """Initializes params and optimizer state inside one jit whose outputs are already sharded, so the
    full state never exists on a single device."""
    def init(key):
        params = nn.meta.unbox(init_params(key))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    with partitioner.context():
        return jax.jit(init, out_shardings=shardings)(rng)


def param_count(params: Mapping[str, Any]) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
