"""seqio task or mixture -> per-process batches (tf.data) -> global `jax.Array` batches.

Each process reads only its own shard of the examples (`seqio.ShardInfo`), batches
global_batch_size // num_shards of them, and `GlobalBatchIterator` stitches the per-process numpy
batches into global arrays with `jax.make_array_from_process_local_data`. For a given seed the
stream is deterministic, so an iterator restored with `set_state` replays it exactly from where a
checkpoint left off.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from lmops_jax.data import tasks

Sharding = jax.sharding.Sharding


def get_dataset(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    feature_converter: seqio.FeatureConverter,
    *,
    global_batch_size: int,
    split: str = "train",
    shuffle: bool = True,
    seed: int | None = 0,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    num_shards: int | None = None,
) -> tf.data.Dataset:
    """This process's batches: dicts of int32 arrays [global_batch_size // num_shards, L].

    The task (or mixture) is read with `Task.get_dataset` (trimmed to `task_feature_lengths`, repeated
    `num_epochs` times, None = forever), then converted to model features by
    `feature_converter(ds, task_feature_lengths)` (e.g. `seqio.DecoderFeatureConverter(pack=True)`
    packs examples into rows of length L and adds segment ids and positions), then batched with
    drop_remainder=True. `shard_index` / `num_shards` default to `jax.process_index()` /
    `jax.process_count()`: each process reads a disjoint shard. `seed` fixes shuffling and, for the
    synthetic tasks, the train stream; None gives a nondeterministic order.
    """
    registered = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    if mixture_or_task_name not in registered:
        raise ValueError(f"unknown seqio task or mixture {mixture_or_task_name!r}; built-in tasks are "
                         f"{list(tasks.BUILTIN_TASKS)} (register others by importing their module first)")
    if not isinstance(feature_converter, seqio.FeatureConverter):
        raise TypeError("feature_converter must be a seqio.FeatureConverter instance, e.g. "
                        f"seqio.DecoderFeatureConverter(pack=True), got {feature_converter!r}")
    num_shards = jax.process_count() if num_shards is None else num_shards
    shard_index = jax.process_index() if shard_index is None else shard_index
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, "
                         f"num_shards={num_shards}")
    if global_batch_size < 1 or global_batch_size % num_shards:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the "
                         f"number of data shards (processes) {num_shards}")

    ds = seqio.get_mixture_or_task(mixture_or_task_name).get_dataset(
        sequence_length=dict(task_feature_lengths),
        split=split,
        shuffle=shuffle,
        seed=seed,
        shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
        num_epochs=num_epochs,
    )
    ds = feature_converter(ds, task_feature_lengths)
    ds = ds.batch(global_batch_size // num_shards, drop_remainder=True)
    ds = ds.map(lambda ex: {k: tf.cast(v, tf.int32) for k, v in ex.items()})
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def batch_stream(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    feature_converter: seqio.FeatureConverter,
    *,
    global_batch_size: int,
    sharding: Sharding | Mapping[str, Sharding],
    split: str = "train",
    shuffle: bool = True,
    seed: int | None = 0,
) -> GlobalBatchIterator:
    """A run's batches as global arrays, resumable (`get_state` / `set_state`).

    The one definition of a run's stream: `train()` reads it and the offline teacher top-k store
    (`distillation.topk_store`) replays it, so stored batch i is exactly the batch of train step i + 1
    for the same task, lengths, converter (packing), batch size and seed.
    """
    lengths = {name: int(length) for name, length in task_feature_lengths.items()}
    return GlobalBatchIterator(lambda: get_dataset(
        mixture_or_task_name, lengths, feature_converter, global_batch_size=global_batch_size, split=split,
        shuffle=shuffle, seed=seed), sharding)


class GlobalBatchIterator:
    """Iterates per-process numpy batches as dicts of global `jax.Array`s, and records its position.

    `dataset` is a tf.data.Dataset or, for exact resume with shuffled pipelines, a function that builds
    it (called again by `set_state`). `sharding` shards the batch dimension (e.g.
    `NamedSharding(mesh, P("data"))`); pass one sharding for every feature or a mapping from feature
    name to sharding. Each process must feed its own rows of the global batch, as `get_dataset`
    produces them.

    The state is the number of batches consumed. `set_state` rebuilds the tf.data iterator with
    `dataset.skip(n)`, which recomputes and discards n batches (tf.data cannot seek a preprocessing
    pipeline): cheap for the built-in tasks, minutes for a long run on a heavy pipeline.
    """

    def __init__(self, dataset: tf.data.Dataset | Callable[[], tf.data.Dataset],
                 sharding: Sharding | Mapping[str, Sharding], prefetch: int = 2):
        self._dataset_fn = dataset if callable(dataset) else (lambda: dataset)
        self._sharding = sharding
        self._prefetch = prefetch
        self.batches_consumed = 0
        self._iterator = self._make_iterator(0)

    def _make_iterator(self, skip: int):
        # A fresh Dataset object: a second iterator over the same object would see a reshuffled
        # order (tf.data's reshuffle_each_iteration), not the stream the checkpoint was taken from.
        ds = self._dataset_fn()
        ds = ds.skip(skip) if skip else ds
        return ds.prefetch(self._prefetch).as_numpy_iterator()

    def _sharding_for(self, name: str) -> Sharding:
        if isinstance(self._sharding, Sharding):
            return self._sharding
        if name not in self._sharding:
            raise ValueError(f"no sharding given for feature {name!r}; shardings cover "
                             f"{sorted(self._sharding)}")
        return self._sharding[name]

    def __iter__(self) -> GlobalBatchIterator:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local: dict[str, np.ndarray] = next(self._iterator)
        # Copy out of TensorFlow-owned memory: on CPU, JAX may alias the host buffer it is given.
        batch = {name: jax.make_array_from_process_local_data(self._sharding_for(name), np.array(value))
                 for name, value in local.items()}
        self.batches_consumed += 1
        return batch

    def get_state(self) -> dict[str, int]:
        """Position to checkpoint with the train state: {"batches_consumed": n}."""
        return {"batches_consumed": self.batches_consumed}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Repositions the stream so that the next batch is batch number state["batches_consumed"]."""
        n = state.get("batches_consumed") if isinstance(state, Mapping) else None
        if isinstance(n, (np.integer, np.ndarray)) and np.ndim(n) == 0 and np.issubdtype(np.asarray(n).dtype,
                                                                                          np.integer):
            n = int(n)  # as a checkpoint may restore it
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"iterator state must be {{'batches_consumed': int >= 0}}, got {state!r}")
        self._iterator = self._make_iterator(n)
        self.batches_consumed = n
