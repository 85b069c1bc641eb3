"""Orbax checkpoints: periodic async saves, exact resume, params-only restore with name mapping.

Layout of a run's checkpoints (`MODEL_DIR/checkpoints/<step>/`), one Orbax CheckpointManager item each:
  state/   the TrainState as a pytree {'step', 'params', 'opt_state'} (tensorstore, sharded writes)
  data/    JSON: the data iterator position ({'batches_consumed': n}), so resume replays the next batch
  config/  JSON: {'gin': the gin config text (for humans and resuming), 'model_spec': the typed model spec
           that rebuilds the model without gin (`models.spec`; absent in older checkpoints)}

Orbax writes a step into a temporary folder and renames it when complete, so a save killed midway never
appears as a step; a finished step that fails to read (e.g. a truncated file) is reported, renamed
`<step>.unreadable` (kept) and the previous step is used. Restores take target shardings, so a checkpoint saved on one mesh restores onto
another without ever being gathered onto one device.

`python -m lmops_jax.checkpoints inspect PATH` lists the steps and parameter shapes of a checkpoint, its
quantization scheme (none, or the rules of a quantized model) and its stored bytes per parameter.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

if __name__ == "__main__":  # before anything is defined twice (see cli.runner.run_as_main)
    from lmops_jax.cli import runner

    runner.run_as_main("lmops_jax.checkpoints")

CHECKPOINTS_SUBDIR = "checkpoints"
STATE, DATA, CONFIG = "state", "data", "config"
UNREADABLE_SUFFIX = ".unreadable"


class CheckpointError(ValueError):
    """A checkpoint that cannot serve the request; the message names the path and keys."""


def _state_to_tree(state: Any) -> dict:
    """The saved tree of a train state (any object with step, params and opt_state attributes)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


# A model that scans its layers (`models.decoder_only.scanned_layers`) holds them in one scope named
# STACKED_LAYERS, every leaf stacked [num_layers, ...]. Checkpoints hold them per layer, `layers_0`,
# `layers_1`, ..., as an unscanned model names them: `per_layer` on save, `stacked_layers` on restore, for
# params and for optimizer states that mirror them. So any checkpoint restores into either layout.
STACKED_LAYERS = "layers"


def _num_layers(stacked: Mapping) -> int:
    return next(x.shape[0] for x in jax.tree.leaves(stacked) if getattr(x, "shape", ()))


def _layer(leaf: Any, i: int, n: int) -> Any:
    """Layer i of a stacked leaf: an array, a ShapeDtypeStruct (and its NamedSharding), or as it is."""
    if not getattr(leaf, "shape", ()):
        return leaf
    if leaf.shape[0] != n:
        raise CheckpointError(f"a leaf of shape {tuple(leaf.shape)} under the scanned '{STACKED_LAYERS}' scope does "
                              f"not stack {n} layers, so it cannot be saved per layer")
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
    return leaf[i]


def per_layer(tree: Any) -> Any:
    """`tree` (params, an optimizer state, their ShapeDtypeStructs) with every STACKED_LAYERS scope split
    into `layers_0` .. `layers_{n-1}`, through dicts, lists and named tuples; without one, `tree` itself."""
    if not has_stacked_layers(tree):
        return tree
    if isinstance(tree, (list, tuple)):
        children = [per_layer(x) for x in tree]
        return type(tree)(*children) if hasattr(tree, "_fields") else type(tree)(children)
    out = {}
    for key, value in tree.items():
        if key == STACKED_LAYERS and isinstance(value, Mapping):
            n = _num_layers(value)
            out.update({f"layers_{i}": jax.tree.map(lambda x, i=i: _layer(x, i, n), value) for i in range(n)})
        else:
            out[key] = per_layer(value)
    return out


def _stack(like_leaf: Any, *layers: Any) -> Any:
    out = jnp.stack(layers)
    sharding = getattr(like_leaf, "sharding", None)
    return out if sharding is None else jax.device_put(out, sharding)


def stacked_layers(tree: Any, like: Any) -> Any:
    """The inverse of `per_layer`: `tree`'s `layers_i` gathered into the STACKED_LAYERS scopes of `like`
    (the model's tree of ShapeDtypeStructs, whose shardings the stacked arrays take)."""
    if not has_stacked_layers(like):
        return tree
    if isinstance(like, Mapping):
        out = {}
        for key, value in like.items():
            if key == STACKED_LAYERS and isinstance(value, Mapping):
                out[key] = jax.tree.map(_stack, value, *(tree[f"layers_{i}"] for i in range(_num_layers(value))))
            else:
                out[key] = stacked_layers(tree[key], value)
        return out
    if isinstance(like, (list, tuple)):
        children = [stacked_layers(t, l) for t, l in zip(tree, like)]
        return type(like)(*children) if hasattr(like, "_fields") else type(like)(children)
    return tree


def has_stacked_layers(tree: Any) -> bool:
    """Whether a tree holds a scanned model's STACKED_LAYERS scope."""
    if isinstance(tree, Mapping):
        return any((k == STACKED_LAYERS and isinstance(v, Mapping)) or has_stacked_layers(v) for k, v in tree.items())
    return isinstance(tree, (list, tuple)) and any(has_stacked_layers(x) for x in tree)


def _typed(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their shardings (one tree to split per layer)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _manager(directory: str, *, period: int = 1, keep: int | None = None, keep_period: int | None = None,
             async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=period, max_to_keep=keep, keep_period=keep_period, create=not read_only,
        enable_async_checkpointing=async_save, read_only=read_only, cleanup_tmp_directories=not read_only)
    handlers = {STATE: ocp.PyTreeCheckpointHandler(), DATA: ocp.JsonCheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def resolve(path: str) -> tuple[str, int | None]:
    """(checkpoints folder, step or None for latest) from a MODEL_DIR, a checkpoints folder or a step folder."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, CHECKPOINTS_SUBDIR)):
        return os.path.join(path, CHECKPOINTS_SUBDIR), None
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(path, STATE)):
        return os.path.dirname(path), int(base)
    if os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path)):
        return path, None
    raise CheckpointError(f"no checkpoint at {path!r} (expected MODEL_DIR, MODEL_DIR/checkpoints or a step folder)")


@dataclasses.dataclass
class CheckpointConfig:
    """When to save and what to keep.

    Attributes:
      period: save every `period` steps (CHECKPOINT_PERIOD); the final step is always saved.
      keep: keep the newest `keep` checkpoints (None keeps all).
      keep_period: additionally keep every step that is a multiple of this (None: none extra).
      async_save: write in a background thread while training continues.
    """

    period: int = 1000
    keep: int | None = 3
    keep_period: int | None = None
    async_save: bool = True


class Checkpointer:
    """Saves and restores a run's train state, data position and gin config."""

    def __init__(self, model_dir: str, config: CheckpointConfig | None = None):
        self.config = config or CheckpointConfig()
        self.directory = os.path.join(model_dir, CHECKPOINTS_SUBDIR)
        self.manager = _manager(self.directory, period=self.config.period, keep=self.config.keep,
                                keep_period=self.config.keep_period, async_save=self.config.async_save)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, data_state: Mapping[str, Any] | None = None,
             config_str: str | None = None, model_spec: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Saves when `step` is due (or `force`); returns whether a save started. Asynchronous.

        `model_spec` is the JSON of `models.spec.ModelSpec.to_json()`, stored beside the gin text.
        """
        if step in self.manager.all_steps() or not (force or step % self.config.period == 0):
            return False
        args = ocp.args.Composite(**{
            STATE: ocp.args.PyTreeSave(per_layer(_state_to_tree(state))),
            DATA: ocp.args.JsonSave(dict(data_state or {})),
            CONFIG: _config_item(config_str, model_spec),
        })
        return self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def restore_latest(self, abstract_state: Any, shardings: Any) -> tuple[Any, dict, int] | None:
        """The newest readable checkpoint as (state, data_state, step), or None if there is none.

        A step that fails to read is logged, renamed to `<step>.unreadable` (kept, never deleted, and out of
        the manager's step list, so the run saves that step again when it reaches it) and skipped, falling
        back to the one before.
        """
        like = _typed(_state_to_tree(abstract_state), _state_to_tree(shardings))
        target = per_layer(like)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target, jax.tree.map(lambda a: a.sharding, target))
        for step in reversed(self.all_steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**{
                    STATE: ocp.args.PyTreeRestore(item=target, restore_args=restore_args),
                    DATA: ocp.args.JsonRestore()}))
            except Exception as e:  # orbax/tensorstore raise many types for unreadable data
                aside = self._move_aside(step)
                logging.error("checkpoint step %d in %s is unreadable (%s: %s); moved it to %s and falling back "
                              "to an earlier step", step, self.directory, type(e).__name__, str(e)[:300], aside)
                continue
            tree = stacked_layers(restored[STATE], like)
            state = abstract_state.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])
            return state, dict(restored[DATA] or {}), step
        if self.all_steps():
            raise CheckpointError(f"no readable checkpoint among steps {self.all_steps()} in {self.directory}")
        return None


    def _move_aside(self, step: int) -> str:
        """Renames an unreadable step folder to `<step>.unreadable[-n]` (process 0; all processes wait)."""
        aside = unreadable_name(self.directory, step)
        if jax.process_index() == 0:
            os.rename(os.path.join(self.directory, str(step)), aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint step {step} moved aside")
        self.manager.reload()
        return aside


def unreadable_name(directory: str, step: int) -> str:
    """A free `<step>.unreadable[-n]` path in `directory` for a step that failed to restore."""
    base = os.path.join(directory, f"{step}{UNREADABLE_SUFFIX}")
    candidate, n = base, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a/b/kernel': leaf} from a nested dict of params (the naming of assignment maps and errors)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """The inverse of `flatten`."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _open_step(path: str) -> tuple[ocp.CheckpointManager, str, int]:
    """(read-only manager, checkpoints folder, step) for a path; the newest step unless one is named."""
    directory, step = resolve(path)
    manager = _manager(directory, read_only=True)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {directory!r}")
    return manager, directory, step


def _param_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """{param path: array metadata}; a quantized kernel is several arrays ('.../kernel/array/qvalue',
    '.../kernel/array/scale'), and its absent zero point (None) is no array."""
    meta = manager.item_metadata(step)[STATE]
    return {name: m for name, m in flatten(getattr(meta, "tree", meta)["params"]).items() if m is not None}


def leaf_names(tree: Any) -> list[str]:
    """'a/b/kernel' names of a pytree's leaves, in its flattening order, also through pytree nodes that
    are no dicts (a quantized leaf's attributes: 'kernel/array/qvalue'), as Orbax names what it saves."""
    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return [name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def array_bytes(shape: Sequence[int], dtype: Any) -> float:
    """Stored bytes of an array: int4 / uint4 count half a byte per value."""
    dtype = np.dtype(dtype)
    bits = 4 if dtype.name in ("int4", "uint4") else 8 * dtype.itemsize
    return int(np.prod(shape)) * bits / 8


def checkpoint_param_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{param path: (shape, dtype)} of a checkpoint's parameters, read from metadata only."""
    manager, directory, step = _open_step(path)
    return {name: (tuple(m.shape), str(m.dtype)) for name, m in _param_metadata(manager, step).items()}


def _config_item(config_str: str | None, model_spec: Mapping[str, Any] | None) -> ocp.args.JsonSave:
    return ocp.args.JsonSave({"gin": config_str or "", "model_spec": None if model_spec is None else dict(model_spec)})


def _read_config_item(path: str) -> dict:
    manager, directory, step = _open_step(path)
    return dict(manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG] or {})


def read_config(path: str) -> str:
    """The gin config text stored with a checkpoint (empty if it was saved without one)."""
    return _read_config_item(path).get("gin") or ""


def read_model_spec(path: str) -> dict | None:
    """The model spec JSON stored with a checkpoint (`models.spec`), or None for one saved without it."""
    return _read_config_item(path).get("model_spec")


def map_names(checkpoint_names: Sequence[str], assignment_map: Sequence[tuple[str, str | None]]) -> dict[str, str]:
    """{model name: checkpoint name}. Each checkpoint name goes through the first rule whose regex
    matches it (`re.sub(regex, replacement)`; a None replacement drops the parameter); names that no
    rule matches keep their name."""
    rules = [(re.compile(pattern), repl) for pattern, repl in assignment_map]
    mapped = {}
    for name in checkpoint_names:
        target = name
        for pattern, repl in rules:
            if pattern.search(name):
                target = None if repl is None else pattern.sub(repl, name)
                break
        if target is not None:
            mapped[target] = name
    return mapped


def restore_params(
    path: str,
    abstract_params: Any,
    shardings: Any,
    *,
    assignment_map: Sequence[tuple[str, str | None]] = (),
    init_missing: Callable[[], Any] | None = None,
) -> Any:
    """Parameters of the model from a checkpoint's params (step, optimizer state ignored).

    Args:
      path: MODEL_DIR, its checkpoints folder or a step folder (INITIAL_CHECKPOINT_PATH).
      abstract_params: the model's parameter tree of ShapeDtypeStructs; restored arrays take these
        dtypes (a float32 checkpoint loads into bfloat16 params by casting). Any pytree: a quantized
        kernel's arrays are found under their attribute paths ('.../kernel/array/qvalue').
      shardings: matching tree of NamedShardings; arrays are read directly into them.
      assignment_map: regex rules from checkpoint names to model names (see `map_names`).
      init_missing: returns freshly initialized params, used for model params the checkpoint lacks;
        without it a missing param is an error.

    Raises:
      CheckpointError listing every parameter with mismatched shapes (both shapes) and every missing key.
    """
    if has_stacked_layers(abstract_params):  # a scanned model: restored per layer, then stacked
        like = _typed(abstract_params, shardings)
        flat = per_layer(like)
        fresh = None if init_missing is None else (lambda: per_layer(init_missing()))
        params = restore_params(path, flat, jax.tree.map(lambda a: a.sharding, flat),
                                assignment_map=assignment_map, init_missing=fresh)
        return stacked_layers(params, like)
    manager, directory, step = _open_step(path)
    ckpt = _param_metadata(manager, step)
    names, treedef = leaf_names(abstract_params), jax.tree.structure(abstract_params)
    model = dict(zip(names, jax.tree.leaves(abstract_params)))
    model_shardings = dict(zip(names, jax.tree.leaves(shardings)))
    to_ckpt = map_names(list(ckpt), assignment_map)
    mismatched, missing = [], []
    for name, target in model.items():
        source = to_ckpt.get(name)
        if source is None:
            missing.append(name)
        elif tuple(ckpt[source].shape) != tuple(target.shape):
            mismatched.append(f"  {name}: checkpoint {source!r} has shape {tuple(ckpt[source].shape)}, "
                              f"model expects {tuple(target.shape)}")
    if mismatched or (missing and init_missing is None):
        lines = [f"cannot restore params from {directory} step {step}:"] + mismatched
        if missing and init_missing is None:
            lines += [f"  missing in checkpoint: {name}" for name in missing]
            lines.append("  (map names with an assignment map, or initialize missing params from scratch)")
        raise CheckpointError("\n".join(lines))
    wanted = {to_ckpt[name]: jax.ShapeDtypeStruct(ckpt[to_ckpt[name]].shape, ckpt[to_ckpt[name]].dtype,
                                                  sharding=model_shardings[name])
              for name in model if name not in missing}
    target_tree = {"params": unflatten(wanted)}
    restore_args = ocp.checkpoint_utils.construct_restore_args(
        target_tree, jax.tree.map(lambda s: s.sharding, target_tree))
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=target_tree, restore_args=restore_args, partial_restore=True)}))
    loaded = flatten(restored[STATE]["params"])
    initialized = init_missing() if missing else {}
    fresh = dict(zip(leaf_names(initialized), jax.tree.leaves(initialized)))
    out = []
    for name, target in model.items():
        value = fresh[name] if name in missing else loaded[to_ckpt[name]]
        out.append(value.astype(target.dtype) if value.dtype != target.dtype else value)
    if missing:
        logging.info("initialized from scratch (not in checkpoint): %s", ", ".join(missing))
    return jax.tree.unflatten(treedef, out)


def save_params(model_dir: str, params: Any, config_str: str, step: int = 0, *,
                model_spec: Mapping[str, Any] | None = None) -> str:
    """Writes a params-only checkpoint (e.g. converted weights) readable by `restore_params`, with the gin
    text and the model spec JSON (`models.spec.ModelSpec.to_json()`) that rebuild its model. A scanned
    model's stacked layers are written per layer, as `Checkpointer.save` writes them."""
    manager = _manager(os.path.join(model_dir, CHECKPOINTS_SUBDIR), async_save=False)
    manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeSave({"step": np.int32(step), "params": per_layer(params)}),
        DATA: ocp.args.JsonSave({}), CONFIG: _config_item(config_str, model_spec)}), force=True)
    manager.wait_until_finished()
    manager.close()
    return os.path.join(model_dir, CHECKPOINTS_SUBDIR, str(step))


def _step_problem(manager: ocp.CheckpointManager, step: int, verify: bool) -> str | None:
    """Why `step` cannot be restored, or None. Reads its metadata, and with `verify` every array."""
    try:
        if verify:
            manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore()}))
        else:
            manager.item_metadata(step)
    except Exception as e:  # orbax/tensorstore raise many types for unreadable data
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


_QUANT_AUX = re.compile(r"/array/(scale|zero_point)$|/awq_scale$")  # a quantized kernel's scales, not params


def _quantization_record(record: Any) -> Mapping[str, Any] | None:
    """The "quantized" family record in a model spec record or the bases it wraps (models.quantized)."""
    while isinstance(record, Mapping):
        if record.get("family") == "quantized":
            return record["model"]
        record = (record.get("model") or {}).get("base")
    return None


def _compression_lines(path: str, shapes: Mapping[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """The quantization scheme the model spec names, and the stored bytes per parameter (scales included;
    parameters: every array but a quantized kernel's scales and zero points)."""
    quantized = _quantization_record(read_model_spec(path))
    if quantized is None:
        scheme = "quantization: none"
    else:
        rules = "; ".join(f"{r['scheme']}{'/' + str(r['tile_size']) if r.get('tile_size') else ''} "
                          f"{r['module_path']}" for r in quantized["rules"])
        scheme = f"quantization: method {quantized.get('method', 'ptq')}, rules (first match wins): {rules}"
    stored = sum(array_bytes(shape, dtype) for shape, dtype in shapes.values())
    params = sum(int(np.prod(shape)) for name, (shape, _) in shapes.items() if not _QUANT_AUX.search(name))
    return [scheme, f"weight bytes: {stored:,.0f} ({stored / max(params, 1):.3f} bytes/param over {params:,} "
                    "parameters)"]


def inspect(path: str, verify: bool = False) -> str:
    """Human-readable listing of a checkpoint's steps and parameter shapes.

    Steps whose metadata cannot be read are marked UNREADABLE; `verify` also reads every array of every
    step (slow for large models), which finds missing or truncated data files.
    """
    directory, requested = resolve(path)
    manager = _manager(directory, read_only=True)
    steps = sorted(manager.all_steps())
    lines = [f"checkpoints in {directory}: steps {steps}"]
    readable = []
    for step in steps:
        problem = _step_problem(manager, step, verify)
        if problem:
            lines.append(f"  step {step}: UNREADABLE ({problem})")
        else:
            readable.append(step)
    aside = sorted(name for name in os.listdir(directory) if UNREADABLE_SUFFIX in name)
    if aside:
        lines.append(f"unreadable steps moved aside by a resume (kept for inspection): {', '.join(aside)}")
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {directory!r}")
    shown = requested if requested is not None else (readable or steps)[-1]
    shapes = checkpoint_param_shapes(os.path.join(directory, str(shown)))
    total = sum(int(np.prod(s)) for s, _ in shapes.values())
    lines += _compression_lines(os.path.join(directory, str(shown)), shapes)
    lines.append(f"parameters of step {shown} ({len(shapes)} arrays, {total:,} values):")
    lines += [f"  {name:60s} {str(shape):20s} {dtype}" for name, (shape, dtype) in sorted(shapes.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lmops_jax.checkpoints inspect PATH` through the CLI runner (exit 2 for a bad PATH)."""
    from lmops_jax.cli import runner

    def add_flags(parser):
        parser.add_argument("path", help="model dir, checkpoints folder or step")
        parser.add_argument("--verify", action="store_true", help="read every array of every step (slow for "
                            "large models) to find missing or truncated data files")

    job = runner.ArgsJob("list the steps and parameter shapes of a checkpoint, marking unreadable steps",
                         add_flags, lambda args: print(inspect(args.path, verify=args.verify)))
    return runner.run("python -m lmops_jax.checkpoints", __doc__.split("\n\n")[0], {"inspect": job}, argv)
