"""The token side of a Hugging Face model: its special ids (`config.json`) and its tokenizer files.

Special ids. `config.json`'s bos_token_id, eos_token_id, pad_token_id and decoder_start_token_id (those
its architecture has: `SPECIAL_TOKENS` of `hf_llama` / `hf_t5`) become the checkpoint's
`models.spec.SpecialTokens`, which `InferenceModule.from_checkpoint` uses as its defaults, and are
written back by export. An eos_token_id list (chat models stop at several tokens) keeps its first id:
decoding stops at one. A negative id (older configs write -1 for "none") is None; an id outside the
vocabulary is refused naming the field.

Tokenizer. When the directory holds `tokenizer.json`, it is copied with the files that
`data.hf_tokenizer.HFTokenizerVocabulary` reads beside it into `out_dir/tokenizer/`, and the spec
records that path relative to the model directory, so the checkpoint is self-contained (it may be
moved) and `InferenceModule.from_checkpoint(out_dir).generate(["text"])` uses the model's own
tokenizer. Its special ids are left to the vocabulary, which looks them up in the copied files when
it is built: conversion itself needs neither `tokenizers` nor seqio. Export copies a checkpoint's tokenizer
files back beside `config.json`.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Mapping, Sequence

from lmops_jax.convert.mapping import ConversionError
from lmops_jax.models.spec import SpecialTokens, VocabularySpec

# SpecialTokens field -> config.json field
HF_FIELDS = {"bos_id": "bos_token_id", "eos_id": "eos_token_id", "pad_id": "pad_token_id",
             "decoder_start_id": "decoder_start_token_id"}
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
# Exported with the weights. config.json is only imported: the vocabulary reads the ids there that
# tokenizer_config.json does not name, and export writes a config.json of its own.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")


def special_tokens(cfg: Mapping[str, Any], vocab_size: int, names: Sequence[str]) -> SpecialTokens:
    """The special ids `names` (SpecialTokens fields) of a config.json dict (module docstring)."""
    ids = {}
    for ours in names:
        field = HF_FIELDS[ours]
        value = cfg.get(field)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConversionError(f"config.json field {field}={cfg[field]!r} must be a token id or a list of them")
        if value is not None and value >= vocab_size:
            raise ConversionError(f"config.json field {field}={value} is no token id of the model "
                                  f"(vocab_size={vocab_size})")
        ids[ours] = None if value is None or value < 0 else value
    return SpecialTokens(**ids)


def hf_fields(special: SpecialTokens, names: Sequence[str]) -> dict[str, int]:
    """The config.json fields of the ids `names` (SpecialTokens fields) that `special` knows."""
    return {HF_FIELDS[name]: getattr(special, name) for name in names if getattr(special, name) is not None}


def _copy(directory: str, names: tuple[str, ...], out_dir: str) -> list[str]:
    """Copies the files of `names` that exist in `directory` to `out_dir`; returns the written paths."""
    written = []
    for name in names:
        if os.path.isfile(os.path.join(directory, name)):
            written.append(shutil.copyfile(os.path.join(directory, name), os.path.join(out_dir, name)))
    return written


def import_tokenizer(hf_dir: str, out_dir: str) -> VocabularySpec | None:
    """Copies the tokenizer of `hf_dir` (if it has tokenizer.json) to `out_dir/tokenizer/`; its spec."""
    if not os.path.isfile(os.path.join(hf_dir, TOKENIZER_FILE)):
        return None
    os.makedirs(os.path.join(out_dir, TOKENIZER_DIR), exist_ok=True)
    _copy(hf_dir, TOKENIZER_FILES + ("config.json",), os.path.join(out_dir, TOKENIZER_DIR))
    return VocabularySpec("hf_tokenizer", os.path.join(TOKENIZER_DIR, TOKENIZER_FILE))


def export_tokenizer(vocabulary: VocabularySpec | None, out_dir: str) -> list[str]:
    """Copies a Hugging Face tokenizer vocabulary's files to `out_dir`; the written paths (none for others)."""
    if vocabulary is None or vocabulary.kind != "hf_tokenizer":
        return []
    if not os.path.isfile(vocabulary.path):
        raise ConversionError(f"the checkpoint's tokenizer {vocabulary.path!r} does not exist")
    os.makedirs(out_dir, exist_ok=True)
    written = shutil.copyfile(vocabulary.path, os.path.join(out_dir, TOKENIZER_FILE))  # whatever its own name
    return [written] + _copy(os.path.dirname(vocabulary.path), TOKENIZER_FILES[1:], out_dir)
