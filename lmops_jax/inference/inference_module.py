"""Decode-only inference: `InferenceModule` turns a model and its params into generate / score / logits.

    module = InferenceModule.from_checkpoint("/tmp/run", dtype="bfloat16")
    out = module.generate(["The cat"], max_new_tokens=32, method="sample", top_p=0.9, seed=1)
    out.texts, out.tokens, out.log_probs

Prompts. Strings are tokenized with the vocabulary (the checkpoint task's, else `seqio.ByteVocabulary`);
int token lists / arrays are used as given. The model formats them (`BaseModel.prompt_tokens`,
`score_features`, `logits_features`): decoder-only prompts get `bos_id` prepended, and encoder-decoder
string prompts get EOS appended as seqio tasks do. `from_checkpoint` takes both defaults from the
checkpoint's model spec: a model imported from Hugging Face stores its own ids
(`models.spec.SpecialTokens`); models trained here follow seqio's convention (BOS 0, because
`seqio.DecoderFeatureConverter` shifts targets right with 0, so they saw 0 before every sequence; EOS
the vocabulary's, 1 for seqio's), which is also the constructor's default. This module only calls the
model contract (`models.model`): it never branches on the model family, so any `BaseModel` (e.g.
`peft.LoraModel`) runs through it.

Batching and the KV cache. Prompts of a batch are right-padded; each example's true length goes to
`model.prefill`, which writes the whole padded prompt into the cache (`model.init_cache(batch, prompt
+ max_new_tokens, prompt)`) and returns the first-token logits at the example's own last position.
Every later `model.decode_step` writes one token per example at its own position, so examples of
different lengths decode in one batch with exact positions. One jit holds the prefill and the
`lax.while_loop` of `decoding.generate` / `beam_search.beam_search`.

Compilation. Batch sizes round up to a power of two (and a multiple of the batch shards) and lengths
to a power of two >= `min_length_bucket` (at most max_length), padding with dummy rows, so a stream of
requests of varying sizes compiles once per bucket. `max_new_tokens`, method, top_k, num_beams,
num_decodes and eos_id are static (part of the compile key); temperature, top_p, length_penalty and
the seed are not. `trace_counts` counts traces per function.

Multi-process. With a mesh that spans processes, every process calls the same methods in the same
order with its own prompts (possibly none); buckets are agreed across processes and each process
gets back the results for its own rows.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import numbers
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lmops_jax.inference import beam_search as beam_lib
from lmops_jax.inference import decoding
from lmops_jax.models import loading
from lmops_jax.models.model import BaseModel
from lmops_jax.models.spec import SEQIO_CONVENTION
from lmops_jax.partitioning import Partitioner

METHODS = ("greedy", "sample", "beam")
DEFAULT_MAX_LENGTH = 2048
Tokens = Sequence[Sequence[int]] | np.ndarray


class _FromCheckpoint(enum.Enum):
    """The type of `FROM_CHECKPOINT`, the default that `from_checkpoint` replaces by the checkpoint's id
    (None already means "no token")."""

    TOKEN = "the checkpoint's"


FROM_CHECKPOINT = _FromCheckpoint.TOKEN


@dataclasses.dataclass
class GenerateOutput:
    """Result of `InferenceModule.generate`.

    Attributes:
      tokens: N rows of new tokens (EOS included when emitted). N = prompts * num_decodes for greedy
        and sampling (row b * num_decodes + i is decode i of prompt b); one row per prompt, the best
        hypothesis, for beam search.
      log_probs: float32 [N], summed log-probabilities of the rows under the model.
      scores: float32 [N]: the length-penalized beam score for beam search, else log_probs.
      texts: the rows detokenized (up to EOS) when the prompts were strings, else None.
      beam_tokens: beam search only: per prompt, all num_beams hypotheses, best first.
      beam_scores: beam search only: float32 [prompts, num_beams], sorted descending.
    """

    tokens: list[list[int]]
    log_probs: np.ndarray
    scores: np.ndarray
    texts: list[str] | None = None
    beam_tokens: list[list[list[int]]] | None = None
    beam_scores: np.ndarray | None = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class InferenceModule:
    """Jitted generation, scoring and logits for any `BaseModel` (through its decode API and request formats).

    Args:
      model: the model wrapper.
      params: its parameters (boxed or not); placed with the partitioner's shardings.
      partitioner: mesh and rules; default one local device.
      vocabulary: seqio vocabulary for string prompts (default `seqio.ByteVocabulary()`).
      max_length: most tokens of a request: prompt + new tokens for `generate`, each row of a
        `score` / `logits` batch; default the model's `max_length`, else 2048.
      bos_id: token prepended to decoder-only prompts (None: nothing); see the module docstring.
      eos_id: the default of `generate`'s eos_id and the EOS appended to encoder-decoder string prompts;
        None: the vocabulary's EOS (1 without a vocabulary).
      min_length_bucket: smallest padded length.
    """

    def __init__(self, model: BaseModel, params: Any, partitioner: Partitioner | None = None, vocabulary: Any = None,
                 *, max_length: int | None = None, bos_id: int | None = 0, eos_id: int | None = None,
                 min_length_bucket: int = 8):
        if not isinstance(model, BaseModel):
            raise TypeError(f"model must be a BaseModel, got {type(model).__name__}")
        self.model = model
        self.partitioner = partitioner or loading.default_partitioner()
        self._vocabulary = vocabulary
        self.max_length = _check_int("max_length", max_length or model.max_length or DEFAULT_MAX_LENGTH, 1)
        self.bos_id = None if bos_id is None else _check_int("bos_id", bos_id, 0)
        self.eos_id = None if eos_id is None else _check_int("eos_id", eos_id, 0)
        self.min_length_bucket = _check_int("min_length_bucket", min_length_bucket, 1)
        self.trace_counts: collections.Counter = collections.Counter()
        self.params = loading.place_params(model, params, self.partitioner)
        mesh = self.partitioner.mesh
        self._spans_processes = any(d.process_index != jax.process_index() for d in mesh.devices.flat)
        self._data_sharding = self.partitioner.data_sharding()
        shards = self.partitioner.batch_size_divisor
        self._batch_multiple = max(1, shards // jax.process_count()) if self._spans_processes else shards
        out = self._data_sharding
        self._generate_jit = jax.jit(self._generate_fn, out_shardings=out, static_argnames=(
            "method", "max_new_tokens", "top_k", "num_beams", "num_decodes", "eos_id"))
        self._score_jit = jax.jit(self._score_fn, out_shardings=out)
        self._logits_jit = jax.jit(self._logits_fn, out_shardings=out)

    @classmethod
    def from_checkpoint(cls, path: str, *, dtype: str | None = None, mesh_shape: Mapping[str, int] | None = None,
                        logical_axis_rules: Any = "tp", max_length: int | None = None, vocabulary: Any = None,
                        bos_id: int | None | _FromCheckpoint = FROM_CHECKPOINT,
                        eos_id: int | None = None) -> InferenceModule:
        """Rebuilds the model from the checkpoint's model spec (`models.loading`) and restores its params only.

        Args:
          path: MODEL_DIR, its checkpoints folder or a step folder.
          dtype: None keeps the checkpoint's dtypes; "bfloat16" casts params and computes in bf16.
          mesh_shape: e.g. {'data': 1, 'fsdp': 1, 'model': -1}; None: one local device.
          logical_axis_rules: rules used with `mesh_shape` (default tensor parallel, 'tp').
          max_length, vocabulary, bos_id, eos_id: as for the constructor; the vocabulary defaults to the
            one the checkpoint describes (a byte vocabulary, the default, is built only when text is
            tokenized), bos_id and eos_id to the checkpoint's special tokens (seqio's convention when it
            stores none: BOS 0, the vocabulary's EOS).
        """
        loaded = loading.read_spec(path)
        model = loading.with_dtype(loaded.model, dtype)
        partitioner = (loading.default_partitioner() if mesh_shape is None
                       else Partitioner(mesh_shape, logical_axis_rules))
        params = loading.restore_params(path, model, partitioner)
        if vocabulary is None and loaded.vocabulary is not None and loaded.vocabulary.kind != "byte":
            vocabulary = loaded.vocabulary.build()
        special = loaded.special_tokens or SEQIO_CONVENTION
        return cls(model, params, partitioner, vocabulary, max_length=max_length,
                   bos_id=special.bos_id if bos_id is FROM_CHECKPOINT else bos_id,
                   eos_id=special.eos_id if eos_id is None else eos_id)

    # ------------------------------------------------------------------------------------ helpers
    @property
    def spans_processes(self) -> bool:
        """Whether the mesh spans processes (then every process must join every call; module docstring)."""
        return self._spans_processes

    @property
    def vocabulary(self):
        if self._vocabulary is None:
            import seqio
            self._vocabulary = seqio.ByteVocabulary()
        return self._vocabulary

    def _tokenize(self, items: Any, name: str) -> tuple[list[list[int]], bool]:
        """(token lists, whether they came from strings) from strings, int lists or an int array."""
        if isinstance(items, str):
            items = [items]
        elif isinstance(items, np.ndarray) or isinstance(items, jax.Array):
            items = np.asarray(items)
            if items.ndim == 1:
                items = items[None]
            if items.ndim != 2 or not np.issubdtype(items.dtype, np.integer):
                raise ValueError(f"{name} as an array must be int [batch, length], got {items.dtype} {items.shape}")
            items = items.tolist()
        if not isinstance(items, Sequence) or not items:
            raise ValueError(f"{name} must be a non-empty list of strings or token lists, got {items!r}")
        is_text = all(isinstance(x, str) for x in items)
        rows = []
        for i, item in enumerate(items):
            if is_text:
                row = list(self.vocabulary.encode(item))
            elif isinstance(item, (Sequence, np.ndarray)) and not isinstance(item, str):
                row = [int(t) for t in item]
            else:
                raise ValueError(f"{name}[{i}] is {type(item).__name__}; give all strings or all token lists")
            bad = [t for t in row if not 0 <= t < self.model.vocab_size]
            if bad:
                raise ValueError(
                    f"{name}[{i}] has token ids {bad[:5]} outside [0, vocab_size={self.model.vocab_size})")
            rows.append(row)
        return rows, is_text

    def _buckets(self, batch: int, *lengths: int) -> tuple[int, ...]:
        """Padded (batch, *lengths), agreed across processes when the mesh spans them."""
        m = self._batch_multiple
        padded_batch = -(-_next_pow2(max(batch, 1)) // m) * m
        padded = [min(max(self.min_length_bucket, _next_pow2(n)), max(self.max_length, n)) for n in lengths]
        sizes = np.array([padded_batch] + padded, np.int64)
        if self._spans_processes:
            sizes = np.max(multihost_utils.process_allgather(sizes), axis=0)
        return tuple(int(s) for s in sizes)

    def _put(self, x: np.ndarray) -> jax.Array:
        if self._spans_processes:
            return jax.make_array_from_process_local_data(self._data_sharding, x)
        return jax.device_put(x, self._data_sharding)

    def _fetch(self, x: jax.Array) -> np.ndarray:
        if self._spans_processes:
            spec = self._data_sharding.spec
            return np.asarray(multihost_utils.global_array_to_host_local_array(x, self.partitioner.mesh, spec))
        return np.asarray(x)

    @staticmethod
    def _pad(rows: Sequence[Sequence[int]], shape: tuple[int, int]) -> np.ndarray:
        out = np.zeros(shape, np.int32)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out

    def _padded(self, features: Mapping[str, Sequence[Sequence[int]]], what: str) -> dict[str, np.ndarray]:
        """The model's feature rows as int32 arrays, each feature padded to its own length bucket.

        `what` names request row i in errors, e.g. "tokens[{i}]".
        """
        for name, rows in features.items():
            for i, row in enumerate(rows):
                if len(row) > self.max_length:
                    raise ValueError(f"{what.format(i=i)} make a {name} row of {len(row)} tokens, more than "
                                     f"max_length={self.max_length}")
        rows_per_feature = list(features.values())
        batch, *lengths = self._buckets(len(rows_per_feature[0]), *(max(map(len, r)) for r in rows_per_feature))
        return {name: self._pad(rows, (batch, length)) for (name, rows), length in zip(features.items(), lengths)}

    @property
    def default_eos_id(self) -> int:
        """`eos_id` when given, else the vocabulary's EOS (1 without a vocabulary)."""
        if self.eos_id is not None:
            return self.eos_id
        return int(self.vocabulary.eos_id) if self._vocabulary is not None else 1

    def _eos(self, eos_id: int | None) -> int:
        if eos_id is None:
            return self.default_eos_id
        if not isinstance(eos_id, numbers.Integral) or eos_id < -1:
            raise ValueError(f"eos_id must be a token id or -1 (never stop), got {eos_id!r}")
        return int(eos_id)

    # ----------------------------------------------------------------------------------- generate
    def generate(self, prompts: str | Sequence[str] | Tokens, *, max_new_tokens: int = 32, method: str = "greedy",
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 4,
                 length_penalty: float = 1.0, num_decodes: int = 1, seed: int = 0, rng: jax.Array | None = None,
                 eos_id: int | None = None) -> GenerateOutput:
        """Continues each prompt by up to `max_new_tokens` tokens (stopping at `eos_id`, -1: never).

        method: "greedy", "sample" (temperature, top_k, top_p, num_decodes samples per prompt; `rng`
        or else `seed` fixes the draws) or "beam" (num_beams, length_penalty; see beam_search).
        eos_id defaults to `default_eos_id` (the checkpoint's EOS, else the vocabulary's: 1 for seqio's).
        """
        if method not in METHODS:
            raise ValueError(f"unknown decoding method {method!r}; choose one of {METHODS}")
        max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
        num_beams = _check_int("num_beams", num_beams, 1) if method == "beam" else 1
        num_decodes = _check_int("num_decodes", num_decodes, 1) if method != "beam" else 1
        if method == "sample":
            decoding.check_sampling_args(temperature, top_k, top_p)
        eos_id = self._eos(eos_id)
        rows, is_text = self._tokenize(prompts, "prompts")
        text_eos = self.default_eos_id if is_text else None
        rows = [self.model.prompt_tokens(row, bos_id=self.bos_id, eos_id=text_eos) for row in rows]
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"prompts[{i}] is empty (give it a token, or set bos_id)")
            if len(row) + max_new_tokens > self.max_length:
                raise ValueError(
                    f"prompts[{i}] has {len(row)} tokens; with max_new_tokens={max_new_tokens} it needs "
                    f"{len(row) + max_new_tokens} positions, more than max_length={self.max_length}")
        batch, length = self._buckets(len(rows), max(len(r) for r in rows))
        tokens = self._pad(rows, (batch, length))
        lengths = np.ones((batch,), np.int32)
        lengths[:len(rows)] = [len(r) for r in rows]
        key = jax.random.key(seed) if rng is None else rng
        key_data = np.asarray(jax.random.key_data(key))
        with self.partitioner.context():
            out = self._generate_jit(
                self.params, self._put(tokens), self._put(lengths), key_data, np.float32(temperature),
                np.float32(top_p), np.float32(length_penalty), method=method, max_new_tokens=max_new_tokens,
                top_k=int(top_k), num_beams=num_beams, num_decodes=num_decodes, eos_id=eos_id)
        out = jax.tree.map(self._fetch, out)
        n = len(rows)
        if method == "beam":
            beams = [[list(out.tokens[b, k, :out.lengths[b, k]]) for k in range(num_beams)] for b in range(n)]
            result = GenerateOutput(tokens=[b[0] for b in beams], log_probs=out.log_probs[:n, 0],
                                    scores=out.scores[:n, 0], beam_tokens=beams, beam_scores=out.scores[:n])
        else:
            n *= num_decodes
            result = GenerateOutput(tokens=[list(out.tokens[i, :out.lengths[i]]) for i in range(n)],
                                    log_probs=out.log_probs[:n], scores=out.log_probs[:n])
        result.tokens = [[int(t) for t in row] for row in result.tokens]
        if is_text:
            result.texts = [self.vocabulary.decode(row) for row in result.tokens]
        return result

    def _generate_fn(self, params, tokens, lengths, key_data, temperature, top_p, length_penalty, *, method,
                     max_new_tokens, top_k, num_beams, num_decodes, eos_id):
        self.trace_counts["generate"] += 1
        batch, prompt_length = tokens.shape
        cache = self.model.init_cache(batch, prompt_length + max_new_tokens, prompt_length)
        initial, cache = self.model.prefill(params, tokens, lengths, cache)
        tokens_to_logits = functools.partial(self.model.decode_step, params)
        if method == "beam":
            return beam_lib.beam_search(initial, cache, tokens_to_logits, max_new_tokens=max_new_tokens,
                                        eos_id=eos_id, num_beams=num_beams, length_penalty=length_penalty)
        return decoding.generate(
            initial, cache, tokens_to_logits, max_new_tokens=max_new_tokens, eos_id=eos_id, method=method,
            rng=jax.random.wrap_key_data(key_data), temperature=temperature, top_k=top_k, top_p=top_p,
            num_decodes=num_decodes)

    # ------------------------------------------------------------------------------- score, logits
    def score(self, inputs: Sequence[str] | Tokens, targets: Sequence[str] | Tokens) -> np.ndarray:
        """Log-likelihood float32 [B] of each target given its input (`model.score_batch`).

        Strings are tokenized without EOS (encoder inputs of encoder-decoders get EOS); pass token lists
        to control exactly what is scored. Decoder-only rows are [bos] + input + target with loss weight
        on the target tokens only; an input may be empty. Rows come from `model.score_features`.
        """
        in_rows, in_text = self._tokenize(inputs, "inputs")
        tgt_rows, _ = self._tokenize(targets, "targets")
        if len(in_rows) != len(tgt_rows):
            raise ValueError(f"got {len(in_rows)} inputs but {len(tgt_rows)} targets")
        features = self.model.score_features(in_rows, tgt_rows, bos_id=self.bos_id,
                                             eos_id=self.default_eos_id if in_text else None)
        arrays = self._padded(features, "inputs[{i}] / targets[{i}]")
        with self.partitioner.context():
            scores = self._score_jit(self.params, {k: self._put(v) for k, v in arrays.items()})
        return self._fetch(scores)[:len(tgt_rows)]

    def _score_fn(self, params, batch):
        self.trace_counts["score"] += 1
        return self.model.score_batch(params, batch)

    def logits(self, tokens: Tokens, decoder_tokens: Tokens | None = None) -> np.ndarray:
        """float32 logits [B, L, V] of int tokens [B, L] (as given: no BOS added).

        Encoder-decoder models take the encoder tokens and `decoder_tokens` [B, Ld] (-> [B, Ld, V]);
        `model.logits_features` says which the model needs.
        """
        rows, _ = self._tokenize(np.asarray(tokens), "tokens")
        dec_rows = None
        if decoder_tokens is not None:
            dec_rows, _ = self._tokenize(np.asarray(decoder_tokens), "decoder_tokens")
            if len(dec_rows) != len(rows):
                raise ValueError(f"tokens has {len(rows)} rows but decoder_tokens {len(dec_rows)}")
        features = self.model.logits_features(rows, dec_rows)
        out_len = len(features["decoder_input_tokens"][0])
        arrays = self._padded(features, "tokens[{i}]")
        with self.partitioner.context():
            logits = self._logits_jit(self.params, {k: self._put(v) for k, v in arrays.items()})
        return self._fetch(logits)[:len(rows), :out_len]

    def _logits_fn(self, params, batch):
        self.trace_counts["logits"] += 1
        return self.model.compute_logits(params, batch).astype(jnp.float32)
