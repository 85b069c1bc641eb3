"""A Hugging Face tokenizer (`tokenizer.json`, through the `tokenizers` package) as a seqio `Vocabulary`.

    vocabulary = HFTokenizerVocabulary("/models/llama")  # a tokenizer.json, or a directory holding one
    tasks.register_text_lm(vocabulary=vocabulary)          # or --gin.VOCABULARY="'/models/llama'"

Token ids are the tokenizer's own, never shifted: a model imported with `python -m lmops_jax.convert
from_hf` keeps the Hugging Face embedding rows, so its tokenizer directory (config.json, tokenizer.json,
tokenizer_config.json) gives the ids that model was trained on, and it can be fine-tuned, distilled and
served on text with this vocabulary.

Special ids. Each of bos / eos / pad / unk is, in order: the constructor argument; the token that
`tokenizer_config.json` names (`eos_token`, ...); the id in `config.json` (`eos_token_id`, ...; the
first of a list); for unk the tokenizer model's `unk_token`; a conventional token name in the vocabulary
("</s>", "<|endoftext|>", "<pad>", "<unk>", ...). The two JSON files are read from the directory of
`tokenizer.json`. EOS is required (seqio appends it to every example); pad defaults to 0.

How this meets seqio's convention (pad 0, eos 1, as `seqio.ByteVocabulary` and this library's SentencePiece
models have): EOS may be any id, since seqio appends `eos_id` and decoding stops at it. Padding is
always id 0 in seqio's feature converters, whatever `pad_id` says, and id 0 gets no loss weight
(`decoder_loss_weights`), and `DecoderFeatureConverter` starts every decoder input with 0. For Llama-2-
and T5-style tokenizers id 0 is `<unk>` / `<pad>`, so nothing is lost; where id 0 is an ordinary token
(GPT-2's "!", Llama 3) that token is never trained on, and the constructor warns. `pad_id` is what the
vocabulary reports (and what `decode_tf` fills after EOS with).

`encode` adds no special tokens by default (seqio's contract: no EOS); `add_special_tokens=True` runs
the tokenizer's post-processor (e.g. Llama's BOS). `decode` stops at the first EOS and skips special
tokens. `extra_ids` reserves sentinel ids after the tokenizer's vocabulary (seqio's span corruption);
no text encodes to them, and seqio's `decode` reads them as unk.

The TensorFlow versions, which seqio's `tokenize` preprocessor calls inside tf.data, run the Rust
tokenizer through `tf.py_function` (tensorflow_text has no BPE tokenizer for tokenizer.json). A tf.data
iterator over such a pipeline must be destroyed before the interpreter finalizes: destroyed during
finalization it waits forever for py_function calls that can no longer take the GIL, and the process
hangs instead of exiting. Iterators local to a function (as in `train()`) are; an atexit hook frees
those an uncaught exception's traceback still holds; delete one kept in a module global yourself.
"""
from __future__ import annotations

import atexit
import gc
import hashlib
import json
import logging
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np
import seqio
import tensorflow as tf
import tokenizers

TOKENIZER_FILE = "tokenizer.json"
# Conventional names of special tokens, tried last (after the arguments and the JSON configs).
_CONVENTIONAL = {
    "bos": ("<s>", "<bos>", "<|begin_of_text|>"),
    "eos": ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]"),
}


def _free_crashed_frames() -> None:
    """atexit: drops an uncaught exception's traceback (and the tf.data iterators its frames hold) while
    Python still runs py_function calls, so a crashed run exits instead of hanging (module docstring)."""
    for name in ("last_exc", "last_type", "last_value", "last_traceback"):
        if getattr(sys, name, None) is not None:
            setattr(sys, name, None)
    gc.collect()


atexit.register(_free_crashed_frames)


def _read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None when there is no such file."""
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            data = json.loads(f.read())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _tokenizer_path(path: str) -> str:
    """`path` itself, or `path`/tokenizer.json when `path` is a directory."""
    if not isinstance(path, str) or not path:
        raise TypeError(f"the Hugging Face tokenizer path must be a non-empty string, got {path!r}")
    if tf.io.gfile.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"Hugging Face tokenizer file {path!r} does not exist")
    return path


class HFTokenizerVocabulary(seqio.Vocabulary):
    """seqio vocabulary over a `tokenizers.Tokenizer` loaded from a tokenizer.json file (see the module
    docstring for the special ids and seqio's padding convention)."""

    def __init__(self, path: str, extra_ids: int = 0, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, unk_id: int | None = None, add_special_tokens: bool = False):
        """Loads `path` (a tokenizer.json file or a directory holding one); None ids are looked up."""
        self.path = _tokenizer_path(path)
        with tf.io.gfile.GFile(self.path, "r") as f:
            text = f.read()
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise ValueError(f"{self.path} is not a Hugging Face tokenizer file: {e}") from e
        self.tokenizer.no_padding()  # seqio trims and pads, not the padding or truncation saved in the file
        self.tokenizer.no_truncation()
        self._digest = hashlib.md5(text.encode("utf-8")).hexdigest()
        self.add_special_tokens = bool(add_special_tokens)
        super().__init__(extra_ids=extra_ids)
        found = self._special_ids(json.loads(text).get("model", {}))
        given = {"bos": bos_id, "eos": eos_id, "pad": pad_id, "unk": unk_id}
        ids = {role: found[role] if given[role] is None else self._check_id(f"{role}_id", given[role])
               for role in given}
        if ids["eos"] is None:
            raise ValueError(f"found no EOS token for {self.path} in tokenizer_config.json, config.json or the "
                             f"tokenizer's special tokens; pass eos_id")
        self._bos_id, self._eos_id, self._unk_id = ids["bos"], ids["eos"], ids["unk"]
        self._pad_id = seqio.vocabularies.PAD_ID if ids["pad"] is None else ids["pad"]
        self._warn_if_id0_is_ordinary()

    def _check_id(self, name: str, value: Any) -> int:
        is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if not is_int or not 0 <= value < self._base_vocab_size:
            raise ValueError(f"{name}={value!r} is not an id of {self.path} (vocabulary size {self._base_vocab_size})")
        return int(value)

    def _token_id(self, token: Any, where: str) -> int | None:
        """The id of a token given as a string or as {"content": string} (tokenizer_config.json's form)."""
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token) if isinstance(token, str) else None
        if token_id is None:
            raise ValueError(f"{where} names {token!r}, which is not a token of {self.path}")
        return token_id

    def _special_ids(self, model_json: dict) -> dict[str, int | None]:
        """{role: id or None} from tokenizer_config.json, config.json, the model's unk_token, conventional names."""
        directory = os.path.dirname(self.path)
        tokenizer_config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}
        model_config = _read_json(os.path.join(directory, "config.json")) or {}
        ids: dict[str, int | None] = {}
        for role, names in _CONVENTIONAL.items():
            token_id = self._token_id(tokenizer_config.get(f"{role}_token"), f"tokenizer_config.json {role}_token")
            configured = model_config.get(f"{role}_token_id")
            if token_id is None and configured is not None:
                first = configured[0] if isinstance(configured, list) and configured else configured
                token_id = self._check_id(f"config.json {role}_token_id", first)
            model_unk = model_json.get("unk_token") if role == "unk" else None  # BPE, WordPiece, WordLevel
            names = (model_unk, *names) if isinstance(model_unk, str) else names
            candidates = (self.tokenizer.token_to_id(name) for name in names)
            ids[role] = token_id if token_id is not None else next((i for i in candidates if i is not None), None)
        return ids

    def _warn_if_id0_is_ordinary(self) -> None:
        special = {added.content for added in self.tokenizer.get_added_tokens_decoder().values() if added.special}
        token0 = self.tokenizer.id_to_token(0)
        if token0 is not None and token0 not in special:
            logging.warning("id 0 of %s is the ordinary token %r: seqio pads with 0 and gives id 0 no loss weight, "
                            "so training never learns this token", self.path, token0)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str | bytes) -> list[int]:
        s = s.decode("utf-8") if isinstance(s, bytes) else s
        return self.tokenizer.encode(s, add_special_tokens=self.add_special_tokens).ids

    def _decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self._eos_id in ids:
            ids = ids[:ids.index(self._eos_id)]
        base = self._base_vocab_size
        return self.tokenizer.decode([i for i in ids if 0 <= i < base], skip_special_tokens=True)

    def _encode_strings(self, strings: tf.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(concatenated ids int32 [sum n_i], lengths int64 [B]) of B strings (host side of `_encode_tf`)."""
        texts = [s.decode("utf-8") for s in strings.numpy().tolist()]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        lengths = np.array([len(e.ids) for e in encodings], np.int64)
        flat = np.fromiter((i for e in encodings for i in e.ids), np.int32, count=int(lengths.sum()))
        return flat, lengths

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        """A string scalar -> int32 [n]; a string vector [B] -> int32 ragged [B, None]."""
        s = tf.convert_to_tensor(s, tf.string)
        if s.shape.rank not in (0, 1):
            raise ValueError(f"HFTokenizerVocabulary.encode_tf takes a string scalar or vector, got shape {s.shape}")
        flat, lengths = tf.py_function(self._encode_strings, [tf.reshape(s, [-1])], (tf.int32, tf.int64))
        flat.set_shape([None])
        lengths.set_shape([None])
        return flat if s.shape.rank == 0 else tf.RaggedTensor.from_row_lengths(flat, lengths)

    def _decode_rows(self, rows: tf.Tensor) -> np.ndarray:
        """Strings [B] of id rows [B, n] (host side of `_decode_tf`)."""
        return np.array([self._decode(row).encode("utf-8") for row in rows.numpy().tolist()], dtype=object)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """int ids [..., n] -> strings [...]."""
        ids = tf.convert_to_tensor(ids)
        rows = tf.reshape(ids, [-1, tf.shape(ids)[-1]])
        texts = tf.py_function(self._decode_rows, [rows], tf.string)
        return tf.reshape(texts, tf.shape(ids)[:-1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HFTokenizerVocabulary):
            return False
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> Sequence[Any]:
        return (self._digest, self.extra_ids, self.add_special_tokens, self._bos_id, self._eos_id, self._pad_id,
                self._unk_id)

    def __str__(self) -> str:
        return (f"HFTokenizerVocabulary(path={self.path}, vocab_size={self.vocab_size}, bos={self._bos_id}, "
                f"eos={self._eos_id}, pad={self._pad_id}, unk={self._unk_id}, extra_ids={self.extra_ids}, "
                f"md5={self._digest})")
