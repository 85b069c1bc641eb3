"""Built-in seqio tasks that work offline; importing this module registers them.

- `synthetic_lm`: decoder-only LM on samples of a `MarkovSource`, whose loss floor is known exactly
  (`synthetic_optimal_loss`), so a run reports its excess loss over the true entropy.
- `text_lm`: decoder-only LM on local text files, one example per non-empty line (by default the small
  English corpus shipped in `lmops_jax/data/corpus/`).
- `synthetic_seq2seq`: encoder-decoder task; "inputs" are Markov strings of 8-32 symbols and "targets"
  the same string reversed, which a small T5 learns quickly.
- `span_corruption`: T5's pretraining objective over local text files (by default the shipped corpus),
  through `t5.data.preprocessors.span_corruption` (needs the `[t5]` extra, see `t5_extra`).
- `tsv_seq2seq`: encoder-decoder task over TSV files of (input, target) lines (by default the shipped
  numbers-to-words pairs in `lmops_jax/data/seq2seq/`), evaluated with `t5.evaluation.metrics` (needs `[t5]`).

All tasks default to `seqio.ByteVocabulary()` (no file needed; token id = byte + 3, with pad=0, eos=1,
unk=2); every register function takes an optional `vocabulary` (see `vocabulary_from`): a seqio
vocabulary, e.g. `sentencepiece_vocabulary(path)` for a model trained with
`scripts/train_sentencepiece.py`, or a path (gin macro VOCABULARY of `text_lm`): a SentencePiece
`*.model` file, or a Hugging Face `tokenizer.json` or model directory (`hf_tokenizer.HFTokenizerVocabulary`).
The register functions are plain functions, so gin binds them (`from __gin__ import
dynamic_registration`) and calls them to re-register a task.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from lmops_jax.data import t5_extra
from lmops_jax.data.synthetic import MarkovSource

SYNTHETIC_LM = "synthetic_lm"
TEXT_LM = "text_lm"
SYNTHETIC_SEQ2SEQ = "synthetic_seq2seq"
SPAN_CORRUPTION = "span_corruption"
TSV_SEQ2SEQ = "tsv_seq2seq"
BUILTIN_TASKS = (SYNTHETIC_LM, TEXT_LM, SYNTHETIC_SEQ2SEQ, SPAN_CORRUPTION, TSV_SEQ2SEQ)

_DATA_DIR = os.path.dirname(os.path.abspath(__file__))
CORPUS_DIR = os.path.join(_DATA_DIR, "corpus")
DEFAULT_TRAIN_FILES = (os.path.join(CORPUS_DIR, "train.txt"),)
DEFAULT_VALIDATION_FILES = (os.path.join(CORPUS_DIR, "validation.txt"),)
SEQ2SEQ_DIR = os.path.join(_DATA_DIR, "seq2seq")
DEFAULT_TRAIN_TSV = (os.path.join(SEQ2SEQ_DIR, "train.tsv"),)
DEFAULT_VALIDATION_TSV = (os.path.join(SEQ2SEQ_DIR, "validation.tsv"),)
SPAN_CORRUPTION_EXTRA_IDS = 100  # sentinel ids of the default byte vocabulary (T5's count)
DEFAULT_TSV_METRICS = ("sequence_accuracy", "bleu", "rouge")

# An infinite i.i.d. stream needs no shuffling. A buffer of 1 keeps the order, so with per-process
# sharding (example i to process i % P) every global batch holds the same examples whatever the number
# of processes: a 2-process run matches a 1-process run on the same mesh.
_SYNTHETIC_SHUFFLE_BUFFER = 1
_CHUNK = 64  # sequences sampled per tf.data map call


def default_vocabulary() -> seqio.Vocabulary:
    """Byte-level vocabulary (259 ids): one token per byte, so one token per synthetic symbol."""
    return seqio.ByteVocabulary()


def sentencepiece_vocabulary(path: str, extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
    """A seqio vocabulary over a SentencePiece model with pad=0, eos=1, unk=2 (see train_sentencepiece.py)."""
    if not isinstance(path, str) or not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"SentencePiece model file {path!r} does not exist")
    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def vocabulary_from(vocabulary: seqio.Vocabulary | str | None) -> seqio.Vocabulary:
    """The vocabulary a task uses: None is the byte vocabulary, a vocabulary is used as given, and a path
    is a SentencePiece model when it ends in `.model`, else a Hugging Face tokenizer.json or a directory
    holding one (e.g. the Hugging Face model directory given to `convert from_hf`), with its special ids."""
    if vocabulary is None:
        return default_vocabulary()
    if isinstance(vocabulary, seqio.Vocabulary):
        return vocabulary
    if not isinstance(vocabulary, str):
        raise TypeError(f"vocabulary (gin macro VOCABULARY) must be a seqio.Vocabulary, a tokenizer path or None, "
                        f"got {vocabulary!r}")
    if vocabulary.endswith(".model"):
        return sentencepiece_vocabulary(vocabulary)
    from lmops_jax.data import hf_tokenizer  # imports the `tokenizers` package only when asked for

    return hf_tokenizer.HFTokenizerVocabulary(vocabulary)


@dataclasses.dataclass(frozen=True)
class _SyntheticLMSpec:
    source: MarkovSource
    example_length: int
    vocabulary: seqio.Vocabulary


_SYNTHETIC_LM_SPECS: dict[str, _SyntheticLMSpec] = {}


def _stream_seed(split: str, seed, train_seed: int, validation_seed: int) -> np.ndarray:
    """Stateless seed pair [2] of a split's stream: validation is fixed; train mixes in the data seed."""
    if split == "validation":
        words = [validation_seed, 0]
    else:
        words = [train_seed, 0 if seed is None else int(seed)]
    if min(words) < 0:
        raise ValueError(f"seeds must be >= 0, got {words}")
    return np.random.SeedSequence(words).generate_state(2, np.uint32).astype(np.int64)


def sample_symbols_tf(source: MarkovSource, seed: tf.Tensor, num_sequences: int, length: int) -> tf.Tensor:
    """Stationary sequences of `source` as symbol indices, int64 [num_sequences, length], in pure TF.

    Same law as `MarkovSource.sample` (not the same draws): inverse-CDF sampling from stateless
    uniforms, so the output depends only on `seed` (int [2]). The data pipeline needs this TF version
    because Python inside tf.data (from_generator, numpy_function) can hang the interpreter at exit
    while a prefetching iterator is alive.
    """
    a, k, n = source.alphabet_size, source.order, source.num_states
    u = tf.random.stateless_uniform([max(length - k, 0) + 1, num_sequences], seed=seed, dtype=tf.float64)
    start_cdf = tf.constant(np.cumsum(source.stationary)[None], tf.float64)  # [1, n]
    state = tf.searchsorted(start_cdf, u[:1], side="left", out_type=tf.int64)[0]
    state = tf.minimum(state, n - 1)  # [num]: the first k symbols, as a base-A number
    first = tf.stack([(state // a ** (k - 1 - i)) % a for i in range(min(k, length))], axis=1)
    if length <= k:
        return first
    cdf = tf.constant(np.cumsum(source.transition, axis=1), tf.float64)  # [n, A]

    def step(state: tf.Tensor, u_t: tf.Tensor) -> tf.Tensor:
        rows = tf.gather(cdf, state)
        symbol = tf.minimum(tf.reduce_sum(tf.cast(u_t[:, None] > rows, tf.int64), axis=1), a - 1)
        return (state * a + symbol) % n

    states = tf.scan(step, u[1:], initializer=state)  # [length - k, num]; newest symbol = state % A
    return tf.concat([first, tf.transpose(states % a)], axis=1)


def _symbols_to_strings(source: MarkovSource, symbols: tf.Tensor) -> tf.Tensor:
    """Symbol indices [N, L] -> N strings of L alphabet characters."""
    table = tf.constant(list(source.alphabet))
    return tf.strings.reduce_join(tf.gather(table, symbols), axis=1)


def _chunked_stream(make_chunk: Callable[[tf.Tensor], dict[str, tf.Tensor]], seed: np.ndarray
                    ) -> tf.data.Dataset:
    """An infinite dataset of examples; chunk c is `make_chunk(fold_in(seed, c))`, a dict of [_CHUNK].

    Each chunk depends only on its index, so every pass replays the same stream, and chunks can be
    made in parallel without changing it.
    """
    seed = tf.constant(seed, tf.int64)
    chunks = tf.data.Dataset.counter().map(
        lambda i: make_chunk(tf.random.experimental.stateless_fold_in(seed, i)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return chunks.unbatch()


def register_synthetic_lm(
    source: MarkovSource | None = None,
    example_length: int = 512,
    vocabulary: seqio.Vocabulary | str | None = None,
    name: str = SYNTHETIC_LM,
    train_seed: int = 0,
    validation_seed: int = 1,
) -> seqio.Task:
    """(Re)registers a decoder-only LM task whose "targets" are `example_length`-symbol Markov strings.

    The stream is infinite and deterministic: the validation split is fixed by `validation_seed`; the
    train split by `train_seed` and the pipeline's seed. No EOS is appended, so with a feature length
    L <= `example_length` seqio trims each example to exactly L tokens and a packed row
    (`seqio.DecoderFeatureConverter(pack=True)`) holds exactly one stationary sequence of L symbols,
    all with loss weight 1. The true model then has per-token loss `source.optimal_loss(L)`, which
    `synthetic_optimal_loss` returns: no model can do better in expectation.
    """
    source = MarkovSource() if source is None else source
    vocabulary = vocabulary_from(vocabulary)
    if not isinstance(source, MarkovSource):
        raise TypeError(f"source must be a MarkovSource, got {type(source).__name__}")
    if example_length < 1:
        raise ValueError(f"example_length must be >= 1, got {example_length}")

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files  # an i.i.d. stream has no files to shuffle

        def make_chunk(chunk_seed: tf.Tensor) -> dict[str, tf.Tensor]:
            symbols = sample_symbols_tf(source, chunk_seed, _CHUNK, example_length)
            return {"targets": _symbols_to_strings(source, symbols)}

        return _chunked_stream(make_chunk, _stream_seed(split, seed, train_seed, validation_seed))

    seqio.TaskRegistry.remove(name)
    task = seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False)},
        preprocessors=[seqio.preprocessors.tokenize],
        shuffle_buffer_size=_SYNTHETIC_SHUFFLE_BUFFER,
    )
    _SYNTHETIC_LM_SPECS[name] = _SyntheticLMSpec(source, example_length, vocabulary)
    return task


def synthetic_optimal_loss(task_feature_lengths: Mapping[str, int], name: str = SYNTHETIC_LM) -> float:
    """Floor (nats/token) of a model's mean loss on the synthetic LM task `name` at these lengths.

    Valid because each row is one stationary sequence of L = task_feature_lengths["targets"] byte
    tokens (see `register_synthetic_lm`); raises ValueError where that does not hold.
    """
    if name not in _SYNTHETIC_LM_SPECS:
        raise ValueError(f"{name!r} is not a registered synthetic LM task; registered: "
                         f"{sorted(_SYNTHETIC_LM_SPECS)}")
    spec = _SYNTHETIC_LM_SPECS[name]
    if "targets" not in task_feature_lengths:
        raise ValueError(f"task_feature_lengths needs a 'targets' length, got {dict(task_feature_lengths)}")
    length = int(task_feature_lengths["targets"])
    if not 1 <= length <= spec.example_length:
        raise ValueError(f"targets length {length} must lie in [1, example_length={spec.example_length}] "
                         f"of task {name!r} for each row to hold exactly one sequence")
    if not isinstance(spec.vocabulary, seqio.ByteVocabulary):
        raise ValueError(f"task {name!r} uses {type(spec.vocabulary).__name__}; the per-token floor is "
                         "only known for ByteVocabulary (one token per symbol)")
    return spec.source.optimal_loss(length)


def known_optimal_loss(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int]) -> float | None:
    """The loss floor of a task when it is known (synthetic LM tasks at valid lengths), else None."""
    try:
        return synthetic_optimal_loss(task_feature_lengths, mixture_or_task_name)
    except ValueError:
        return None


def _resolve_files(files: str | Sequence[str] | None, default: Sequence[str], macro: str) -> list[str]:
    """Validates a path or list of paths (globs allowed); names the gin macro in every error."""
    if files is None:
        files = default
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, (list, tuple)) or not files or not all(isinstance(f, str) for f in files):
        raise TypeError(f"{macro} must be a file path or a non-empty list of file paths, got {files!r}")
    for pattern in files:
        if not tf.io.gfile.glob(pattern):
            raise FileNotFoundError(f"text file {pattern!r} (gin macro {macro}) does not exist")
    return list(files)


def _lines_to_targets(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Maps raw lines to {"targets": line} and drops blank lines."""
    ds = ds.map(lambda line: {"targets": line}, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.filter(lambda ex: tf.strings.length(tf.strings.strip(ex["targets"])) > 0)


def register_text_lm(
    train_files: str | Sequence[str] | None = None,
    validation_files: str | Sequence[str] | None = None,
    vocabulary: seqio.Vocabulary | str | None = None,
    name: str = TEXT_LM,
) -> seqio.Task:
    """(Re)registers a decoder-only LM task over text files, one example per non-empty line + EOS.

    `train_files` / `validation_files` are paths or glob patterns (gin macros TEXT_FILES /
    VALIDATION_TEXT_FILES); None means the corpus shipped with the package. `vocabulary` (gin macro
    VOCABULARY) as in `vocabulary_from`. Lines longer than the feature length are truncated by seqio
    (EOS included), so keep lines shorter than it.
    """
    train = _resolve_files(train_files, DEFAULT_TRAIN_FILES, "TEXT_FILES")
    validation = _resolve_files(validation_files, DEFAULT_VALIDATION_FILES, "VALIDATION_TEXT_FILES")
    vocabulary = vocabulary_from(vocabulary)
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource({"train": train, "validation": validation}),
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True)},
        preprocessors=[_lines_to_targets, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
    )


def register_synthetic_seq2seq(
    source: MarkovSource | None = None,
    min_length: int = 8,
    max_length: int = 32,
    vocabulary: seqio.Vocabulary | str | None = None,
    name: str = SYNTHETIC_SEQ2SEQ,
    train_seed: int = 2,
    validation_seed: int = 3,
) -> seqio.Task:
    """(Re)registers a string-reversal task: "inputs" a Markov string, "targets" it reversed, both + EOS.

    Input lengths are uniform in [min_length, max_length]; seeds behave as in `register_synthetic_lm`.
    """
    source = MarkovSource() if source is None else source
    vocabulary = vocabulary_from(vocabulary)
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files

        def make_chunk(chunk_seed: tf.Tensor) -> dict[str, tf.Tensor]:
            symbol_seed, length_seed = tf.unstack(tf.random.experimental.stateless_split(chunk_seed, 2))
            symbols = sample_symbols_tf(source, symbol_seed, _CHUNK, max_length)
            lengths = tf.random.stateless_uniform(
                [_CHUNK], length_seed, minval=min_length, maxval=max_length + 1, dtype=tf.int64)
            reversed_symbols = tf.reverse_sequence(symbols, lengths, seq_axis=1, batch_axis=0)
            start = tf.zeros_like(lengths)
            inputs = _symbols_to_strings(source, symbols)
            targets = _symbols_to_strings(source, reversed_symbols)
            return {"inputs": tf.strings.substr(inputs, start, lengths),
                    "targets": tf.strings.substr(targets, start, lengths)}

        return _chunked_stream(make_chunk, _stream_seed(split, seed, train_seed, validation_seed))

    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=True),
                         "targets": seqio.Feature(vocabulary, add_eos=True)},
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        shuffle_buffer_size=_SYNTHETIC_SHUFFLE_BUFFER,
    )


def register_span_corruption(
    train_files: str | Sequence[str] | None = None,
    validation_files: str | Sequence[str] | None = None,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    vocabulary: seqio.Vocabulary | str | None = None,
    name: str = SPAN_CORRUPTION,
) -> seqio.Task:
    """(Re)registers T5's span-corruption pretraining task over text files (one example per non-empty line).

    Files as in `register_text_lm` (gin macros TEXT_FILES / VALIDATION_TEXT_FILES); `noise_density` and
    `mean_noise_span_length` (NOISE_DENSITY, MEAN_NOISE_SPAN_LENGTH) as in `t5_extra.span_corruption`. The
    default vocabulary is bytes with `SPAN_CORRUPTION_EXTRA_IDS` sentinel ids. The task needs both an
    "inputs" and a "targets" length, the targets one at least T5's `random_spans_helper` length for the
    inputs one (about 0.4x the inputs length at the defaults). Registering needs no `t5`; reading the
    data does (`t5_extra.MissingExtraError` otherwise).
    """
    train = _resolve_files(train_files, DEFAULT_TRAIN_FILES, "TEXT_FILES")
    validation = _resolve_files(validation_files, DEFAULT_VALIDATION_FILES, "VALIDATION_TEXT_FILES")
    vocabulary = (seqio.ByteVocabulary(extra_ids=SPAN_CORRUPTION_EXTRA_IDS) if vocabulary is None
                  else vocabulary_from(vocabulary))
    corrupt = t5_extra.span_corruption(noise_density, mean_noise_span_length, name)
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource({"train": train, "validation": validation}),
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
                         "targets": seqio.Feature(vocabulary, add_eos=True)},
        preprocessors=[_lines_to_targets, seqio.preprocessors.tokenize, corrupt,
                       seqio.preprocessors.append_eos_after_trim],
    )


def _parse_tsv(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Maps raw "input<TAB>target" lines to {"inputs", "targets"}; blank lines are dropped, others must
    have exactly two fields (tf.data raises naming the record otherwise)."""
    ds = ds.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)

    def parse(line: tf.Tensor) -> dict[str, tf.Tensor]:
        inputs, targets = tf.io.decode_csv(line, record_defaults=["", ""], field_delim="\t", use_quote_delim=False)
        return {"inputs": inputs, "targets": targets}

    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def register_tsv_seq2seq(
    train_files: str | Sequence[str] | None = None,
    validation_files: str | Sequence[str] | None = None,
    metrics: Sequence[str] = DEFAULT_TSV_METRICS,
    vocabulary: seqio.Vocabulary | str | None = None,
    name: str = TSV_SEQ2SEQ,
) -> seqio.Task:
    """(Re)registers an encoder-decoder task over TSV files of "input<TAB>target" lines, both + EOS.

    `train_files` / `validation_files` (gin macros TSV_FILES / VALIDATION_TSV_FILES) are paths or globs;
    None means the shipped pairs (a number in digits, tab, the number in English words). `metrics`
    (TASK_METRICS) are `t5.evaluation.metrics` names (`t5_extra.METRICS`) computed on the decoded
    predictions by `lmops_jax.infer` and by the trainer's evaluation. Registering needs no `t5`; reading
    the data does (`t5_extra.MissingExtraError` otherwise).
    """
    train = _resolve_files(train_files, DEFAULT_TRAIN_TSV, "TSV_FILES")
    validation = _resolve_files(validation_files, DEFAULT_VALIDATION_TSV, "VALIDATION_TSV_FILES")
    vocabulary = vocabulary_from(vocabulary)
    metric_fns = t5_extra.metric_fns(metrics, name)
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource({"train": train, "validation": validation}),
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=True),
                         "targets": seqio.Feature(vocabulary, add_eos=True)},
        preprocessors=[t5_extra.require_t5(name), _parse_tsv, seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos],
        metric_fns=metric_fns,
    )


register_synthetic_lm()
register_text_lm()
register_synthetic_seq2seq()
register_span_corruption()
register_tsv_seq2seq()
