"""Offline teacher outputs: top-k log-probs per token, stored once and read back by batch index.

Layout of a store directory (`KD_TOPK_DIR`), for a run of B rows x L tokens per batch, k ids per token:

  meta.json                     written last: a store without it is incomplete and refused
  logprobs-00000.npy            float32 [n, B, L, k]  the teacher's top-k log-probs (temperature 1,
                                                      normalized over the full vocabulary), descending
  ids-00000.npy                 int32   [n, B, L, k]  their token ids
  target_logprob-00000.npy      float32 [n, B, L]     log-prob of the batch's target token (teacher_loss)
  targets-00000.npy             int32   [n, B, L]     the batch's targets, to check alignment
  aligned-00000.npy             int32   [n, B, L]     cross-tokenizer stores only: 1 where the position is
                                                      aligned with a teacher position (`token_alignment`)
  ... one set per shard of `shard_size` batches (the last shard holds the rest)

Batch i of the store is batch i of the deterministic training stream (`pipeline.batch_stream` with the
run's task, lengths, batch size, packing and seed), i.e. the batch of train step i + 1. Arrays are
global, in the global row order of the batch arrays; readers memory-map the shards and each process
reads only the rows of its devices (`jax.make_array_from_callback`). Per batch the store holds
B * L * (8k + 8) bytes: 16 x 256 tokens with k = 32 take 1.1 MB.

A cross-tokenizer store (KD_LOSS='uld', meta `cross_tokenizer`) is laid out over the student's
positions: at each aligned one, the top-k of the teacher position it is aligned with (ids in the
teacher's vocabulary; `losses.uld_from_topk` uses only the sorted probabilities); elsewhere zeros.

`losses.TokenLosses.kd_from_topk` turns the k stored log-probs into a (k + 1)-outcome distribution
whose last outcome is the tail mass 1 - sum(exp(logprobs)) the teacher put elsewhere, so the
student is still pushed to keep the tail's total mass right (not its shape).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmops_jax import checkpoints, losses
from lmops_jax.distillation import token_alignment as ta
from lmops_jax.models import loading
from lmops_jax.models.model import BaseModel
from lmops_jax.models.spec import VocabularySpec
from lmops_jax.partitioning import Partitioner

logger = logging.getLogger(__name__)

TOPK_LOGPROBS = "teacher_topk_logprobs"
TOPK_IDS = "teacher_topk_ids"
TARGET_LOGPROB = "teacher_target_logprob"
_ARRAYS = {"logprobs": (np.float32, True), "ids": (np.int32, True), "target_logprob": (np.float32, False),
           "targets": (np.int32, False), ta.ALIGNED: (np.int32, False)}  # name: (dtype, has a k axis)
META = "meta.json"
FORMAT_VERSION = 1


def check_teacher_vocabulary(teacher: VocabularySpec | None, mixture_or_task_name: str) -> None:
    """Raises unless the teacher's vocabulary (its checkpoint's spec; None: unknown, nothing to check) is
    the 'targets' vocabulary of the run's task; warns when either cannot be built here."""
    if teacher is None:
        return
    teacher_vocab = teacher.build()
    try:
        student_vocab = student_vocabulary(mixture_or_task_name)
    except (ValueError, KeyError):
        student_vocab = None
    if teacher_vocab is None or student_vocab is None:
        logger.warning("cannot compare the teacher's vocabulary %s with that of the student's task %r (not "
                        "registered here)", teacher, mixture_or_task_name)
    elif teacher_vocab != student_vocab:
        raise ValueError(f"teacher and student must share a vocabulary: the teacher's checkpoint uses "
                         f"{teacher_vocab!r}, the student's task {mixture_or_task_name!r} uses {student_vocab!r}")


def student_vocabulary(mixture_or_task_name: str) -> Any:
    """The 'targets' vocabulary of the student's task (registered here)."""
    import seqio
    from lmops_jax.data import tasks  # noqa: F401  registers the built-in tasks

    return seqio.get_mixture_or_task(mixture_or_task_name).output_features["targets"].vocabulary


def teacher_vocabulary(given: Any, stored: VocabularySpec | None) -> Any:
    """The teacher's seqio vocabulary for cross-tokenizer distillation: `given` (a vocabulary or a tokenizer
    path, `tasks.vocabulary_from`), else the one its checkpoint's spec describes."""
    from lmops_jax.data import tasks

    if given is not None:
        return tasks.vocabulary_from(given)
    built = None if stored is None else stored.build()
    if built is None:
        raise ValueError("KD_LOSS='uld' tokenizes the text for the teacher, but its checkpoint names no vocabulary "
                         "this process can build; pass the teacher's tokenizer (DistillationTrainer.teacher_vocabulary)")
    return built


def _file(directory: str, name: str, shard: int) -> str:
    return os.path.join(directory, f"{name}-{shard:05d}.npy")


class TopKStore:
    """Reads a store written by `dump_teacher_topk` (see the module docstring)."""

    def __init__(self, directory: str):
        self.directory = directory
        path = os.path.join(directory, META)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no top-k store at {directory!r} ({META} missing: the dump did not finish or "
                                    "never ran); run `python -m lmops_jax.distillation dump_topk` first")
        with open(path, encoding="utf-8") as f:
            self.meta = json.load(f)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"top-k store {directory!r} has format {self.meta.get('format_version')}, "
                             f"expected {FORMAT_VERSION}")
        self.num_batches = int(self.meta["num_batches"])
        self.shard_size = int(self.meta["shard_size"])
        self.k = int(self.meta["k"])
        self.names = [n for n in _ARRAYS if n != ta.ALIGNED] + ([ta.ALIGNED] if self.meta.get("cross_tokenizer") else [])
        self._open: dict[tuple[str, int], np.ndarray] = {}

    def _array(self, name: str, shard: int) -> np.ndarray:
        key = (name, shard)
        if key not in self._open:
            self._open = {k: v for k, v in self._open.items() if k[1] == shard}  # keep one shard mapped
            self._open[key] = np.load(_file(self.directory, name, shard), mmap_mode="r")
        return self._open[key]

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Global (memory-mapped) arrays of batch `index`: logprobs, ids, target_logprob, targets (aligned)."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"top-k store {self.directory!r} holds batches 0..{self.num_batches - 1}; batch "
                             f"{index} was asked for (dump with num_batches >= TRAIN_STEPS)")
        shard, row = divmod(index, self.shard_size)
        return {name: self._array(name, shard)[row] for name in self.names}

    def attach(self, index: int, batch: Mapping[str, jax.Array], sharding: jax.sharding.Sharding) -> dict:
        """`batch` plus its stored teacher arrays, sharded like it; fails unless the targets match."""
        stored = self.batch(index)
        targets = batch["decoder_target_tokens"]
        if tuple(targets.shape) != stored["targets"].shape:
            raise ValueError(f"top-k store batch {index} has targets of shape {stored['targets'].shape}, the training "
                             f"batch {tuple(targets.shape)}")
        for shard in targets.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), stored["targets"][shard.index]):
                raise ValueError(
                    f"top-k store {self.directory!r} batch {index} does not match the training data: it was dumped "
                    "from another stream (task, seed, batch size, feature lengths or packing differ)")

        def put(array: np.ndarray) -> jax.Array:
            return jax.make_array_from_callback(array.shape, sharding, lambda idx: np.asarray(array[idx]))

        out = dict(batch)
        out[TOPK_LOGPROBS] = put(stored["logprobs"])
        out[TOPK_IDS] = put(stored["ids"])
        out[TARGET_LOGPROB] = put(stored["target_logprob"])
        if ta.ALIGNED in stored:
            out[ta.ALIGNED] = put(stored[ta.ALIGNED])
        return out


class TopKBatches:
    """Wraps a batch iterator: batch i gets the store's batch i (position from `batches_consumed`)."""

    def __init__(self, batches: Iterator, store: TopKStore, sharding: jax.sharding.Sharding):
        self._batches, self._store, self._sharding = batches, store, sharding
        self._count = getattr(batches, "batches_consumed", 0)

    def __iter__(self) -> TopKBatches:
        return self

    def __next__(self) -> dict:
        index = getattr(self._batches, "batches_consumed", self._count)
        batch = next(self._batches)
        self._count = index + 1
        return self._store.attach(index, batch, self._sharding)

    def get_state(self) -> dict:
        return self._batches.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._batches.set_state(state)


def _gather(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _teacher_topk_fn(teacher_model: BaseModel, k: int, cross_tokenizer: bool) -> Callable:
    """(params, batch) -> (top-k log-probs, ids, target log-prob) per student position (jittable).

    Cross-tokenizer: the teacher reads its own features of the aligned batch and each student position
    takes the values of the teacher position it is aligned with (zeros where it is not aligned).
    """
    def fn(params, batch):
        own = ta.teacher_batch(batch) if cross_tokenizer else batch
        logits = teacher_model.compute_logits(params, own)
        logprobs, ids = losses.topk_teacher_logprobs(logits, k)
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target = jnp.take_along_axis(log_p, own["decoder_target_tokens"][..., None], axis=-1)[..., 0]
        if not cross_tokenizer:
            return logprobs, ids, target
        index, aligned = batch[ta.ALIGNED_INDEX], batch[ta.ALIGNED]
        at = lambda x: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
        return (at(logprobs) * aligned[..., None], at(ids) * aligned[..., None], at(target) * aligned)
    return fn


class _StoreWriter:
    """Writes batches into shards of `shard_size` (memory-mapped .npy files), process 0 only."""

    def __init__(self, directory: str, num_batches: int, shard_size: int):
        self.directory, self.num_batches, self.shard_size = directory, num_batches, shard_size
        self._files: dict[str, np.ndarray] = {}

    def write(self, index: int, values: Mapping[str, np.ndarray]) -> None:
        shard, row = divmod(index, self.shard_size)
        if row == 0:
            self.flush()
            rows = min(self.shard_size, self.num_batches - index)
            self._files = {name: np.lib.format.open_memmap(
                _file(self.directory, name, shard), mode="w+", dtype=_ARRAYS[name][0], shape=(rows,) + value.shape)
                for name, value in values.items()}
        for name, value in values.items():
            self._files[name][row] = value

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()


def dump_teacher_topk(
    *,
    teacher_checkpoint: str,
    output_dir: str,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    num_batches: int,
    k: int = 32,
    seed: int = 0,
    pack: bool = True,
    partitioner: Partitioner | None = None,
    setup_fns: Sequence[Callable[[], Any]] = (),
    teacher_model: BaseModel | None = None,
    shard_size: int = 256,
    kd_loss: str = "forward_kl",
    teacher_length: int | None = None,
    teacher_vocab: Any = None,
) -> str:
    """Runs the teacher once over the first `num_batches` batches of a run's training stream and stores
    its top-k log-probs (see the module docstring); returns `output_dir`.

    The stream is the one `train()` reads with the same task, lengths, batch size, packing and seed, so
    the arguments are the distillation run's gin macros (distill.gin binds them; KD_TOPK_DIR, KD_TOPK).
    With kd_loss='uld' (KD_LOSS) the teacher reads its own tokenization of the text, `teacher_length`
    tokens a row (KD_TEACHER_LENGTH; None: the targets length), in `teacher_vocab` (None: its
    checkpoint's), and the store holds its aligned top-k per student position.
    An existing complete store in `output_dir` is an error (delete it first).
    """
    from lmops_jax.cli import gin_flags
    from lmops_jax.data import pipeline

    for name, value in (("teacher_checkpoint", teacher_checkpoint), ("output_dir", output_dir)):
        if not value or gin_flags.is_required_sentinel(value):
            raise gin_flags.GinConfigError(f"dump_teacher_topk needs {name} (gin macros TEACHER_CHECKPOINT, "
                                           "KD_TOPK_DIR)")
    if num_batches < 1 or shard_size < 1:
        raise ValueError(f"num_batches and shard_size must be >= 1, got {num_batches}, {shard_size}")
    if os.path.exists(os.path.join(output_dir, META)):
        raise FileExistsError(f"{output_dir!r} already holds a top-k store; delete it to dump again")
    for fn in setup_fns:
        fn()
    partitioner = partitioner or Partitioner()
    cross_tokenizer = kd_loss == "uld"
    spec = None
    if teacher_model is None:
        spec = loading.read_spec(teacher_checkpoint)
        teacher_model = spec.model
        if not cross_tokenizer:
            check_teacher_vocabulary(spec.vocabulary, mixture_or_task_name)
    if not 1 <= k <= teacher_model.vocab_size:
        raise ValueError(f"k must lie in [1, {teacher_model.vocab_size}] (the vocabulary), got {k}")
    abstract, shardings = loading.param_shardings(teacher_model, partitioner)
    params = checkpoints.restore_params(teacher_checkpoint, abstract, shardings)
    lengths = {name: int(v) for name, v in task_feature_lengths.items()}
    data_sharding = partitioner.data_sharding()
    batches = pipeline.batch_stream(mixture_or_task_name, lengths, teacher_model.feature_converter_cls(pack=pack),
                                    global_batch_size=batch_size, sharding=data_sharding, seed=seed)
    if cross_tokenizer:
        aligner = ta.TokenAligner(student_vocabulary(mixture_or_task_name),
                                  teacher_vocabulary(teacher_vocab, spec and spec.vocabulary),
                                  teacher_length or lengths["targets"])
        batches = ta.AlignedBatches(batches, aligner, data_sharding)
    writer = _StoreWriter(output_dir, num_batches, shard_size)
    with partitioner.context():
        step = jax.jit(_teacher_topk_fn(teacher_model, k, cross_tokenizer), in_shardings=(shardings, data_sharding))
        os.makedirs(output_dir, exist_ok=True)
        for index in range(num_batches):
            batch = next(batches)
            logprobs, ids, target = (_gather(x) for x in step(params, batch))
            values = {"logprobs": logprobs, "ids": ids, "target_logprob": target,
                      "targets": _gather(batch["decoder_target_tokens"])}
            if cross_tokenizer:
                values[ta.ALIGNED] = _gather(batch[ta.ALIGNED])
            if jax.process_index() == 0:
                writer.write(index, values)
            if (index + 1) % 50 == 0:
                logger.info("dumped teacher top-%d of %d / %d batches", k, index + 1, num_batches)
    if jax.process_index() == 0:
        writer.flush()
        meta = {"format_version": FORMAT_VERSION, "num_batches": num_batches, "shard_size": shard_size, "k": k,
                "vocab_size": teacher_model.vocab_size, "batch_size": batch_size, "task_feature_lengths": lengths,
                "mixture_or_task_name": mixture_or_task_name, "seed": seed, "pack": pack,
                "cross_tokenizer": cross_tokenizer, "teacher_checkpoint": os.path.abspath(teacher_checkpoint)}
        with open(os.path.join(output_dir, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    logger.info("outputs in %s: %s, %s (%d shards; the teacher's top-%d log-probs of %d batches)", output_dir, META,
                ", ".join(f"{name}-*.npy" for name in _ARRAYS if cross_tokenizer or name != ta.ALIGNED),
                -(-num_batches // shard_size), k, num_batches)
    return output_dir
