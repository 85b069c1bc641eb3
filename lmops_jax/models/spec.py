"""The typed, versioned model spec a checkpoint stores beside its gin text, so it rebuilds without gin.

    {"format_version": 2, "family": "decoder_only", "module": "lmops_jax.models.model",
     "model": {"config": {"vocab_size": 512, ...}, "z_loss": 0.0001, "label_smoothing": 0.0},
     "vocabulary": {"kind": "byte", "path": null, "extra_ids": 0, "task": null, "eos_id": null, ...},
     "special_tokens": null}

A family names a model wrapper class (a frozen dataclass `BaseModel`); its fields are written as JSON:
numbers, strings and None as they are, dataclass fields (configs) as objects of their fields, and
model fields (LoRA's `base`) as nested records {"family", "module", "model"}, tuples as lists
(a quantized model's rules: `models.quantized`). Reading follows the
class's type hints back, so a field added later with a default reads old specs unchanged, and a field
the class does not know is refused by name. Families outside `models/` register themselves when their
module is imported (`peft.lora` registers "lora"); `module` only names that module in the error a
process that has not imported it gets.

The vocabulary is described, not pickled: a byte vocabulary, a SentencePiece model file, a Hugging
Face tokenizer.json with its special ids, or a seqio task name resolved in the loading process;
building it is the only step that imports seqio (and, for a tokenizer.json, `tokenizers`).

Format 2 adds "special_tokens": {"bos_id", "eos_id", "pad_id", "decoder_start_id"}, the ids of a model
imported from Hugging Face (`convert from_hf`); null, and absent in format 1, means seqio's convention
that models trained here follow (BOS 0, the vocabulary's EOS).
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import typing
from typing import Any, Mapping

from lmops_jax.checkpoints import CheckpointError
from lmops_jax.models.model import DECODER_START_ID, BaseModel, DecoderOnlyModel, EncoderDecoderModel
from lmops_jax.models.quantized import QuantizedModel

FORMAT_VERSION = 2
_FAMILIES: dict[str, type] = {}


def register_family(name: str, cls: type) -> None:
    """Makes instances of `cls` (a frozen dataclass BaseModel) storable in a spec as family `name`."""
    known = _FAMILIES.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"model family {name!r} is already registered to {known.__module__}.{known.__qualname__}")
    if not (isinstance(cls, type) and issubclass(cls, BaseModel) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"model family {name!r}: {cls!r} is not a dataclass subclass of BaseModel")
    _FAMILIES[name] = cls


register_family("decoder_only", DecoderOnlyModel)
register_family("encoder_decoder", EncoderDecoderModel)
register_family("quantized", QuantizedModel)


def family_of(model: BaseModel) -> str | None:
    """The registered family name of `model`'s class, or None."""
    return next((name for name, cls in _FAMILIES.items() if type(model) is cls), None)


def _encode_fields(value: Any, where: str) -> dict:
    return {f.name: _encode(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value) if f.init}


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, BaseModel):
        return model_record(value, where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encode_fields(value, where)
    if isinstance(value, (tuple, list)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"model spec field {where} holds a {type(value).__name__}, which a JSON spec cannot store")


def model_record(model: BaseModel, where: str = "model") -> dict:
    """{"family", "module", "model": fields} of a model of a registered family."""
    family = family_of(model)
    if family is None:
        raise TypeError(f"{where}: {type(model).__name__} is no registered model family (registered: "
                        f"{sorted(_FAMILIES)}); call models.spec.register_family for it")
    return {"family": family, "module": type(model).__module__, "model": _encode_fields(model, where)}


def _decode(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass `cls` from its JSON fields, following the type hints into nested records."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{where} must be a JSON object of {cls.__name__} fields, got {data!r}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise CheckpointError(f"{where}: {cls.__name__} has no fields {unknown} (a spec from a newer lmops_jax?)")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint, here = hints.get(name), f"{where}.{name}"
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            value = model_from_record(value, here)
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = _decode(hint, value, here)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(_decode_item(typing.get_args(hint)[0], v, f"{here}[{i}]") for i, v in enumerate(value))
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot build {cls.__name__}: {e}") from e


def _decode_item(hint: Any, value: Any, where: str) -> Any:
    """One item of a tuple field: a dataclass record decoded, anything else as it is."""
    return _decode(hint, value, where) if isinstance(hint, type) and dataclasses.is_dataclass(hint) else value


def model_from_record(record: Any, where: str = "model") -> BaseModel:
    """The model of a {"family", "module", "model"} record; an unregistered family names its module."""
    if not isinstance(record, Mapping) or "family" not in record or "model" not in record:
        raise CheckpointError(f"{where} must be a record with 'family' and 'model', got {record!r}")
    cls = _FAMILIES.get(record["family"])
    if cls is None:
        raise CheckpointError(f"{where}: model family {record['family']!r} is not registered in this process "
                              f"(registered: {sorted(_FAMILIES)}); import {record.get('module')} first")
    return _decode(cls, record["model"], where)


# The Hugging Face tokenizer vocabulary lives in data/, which models/ must not import (data/ pulls in
# TensorFlow, seqio and `tokenizers`, which loading a model never needs). The spec names the class, as a
# family record names its module, and imports it only in `VocabularySpec.build`.
HF_TOKENIZER_CLASS = ("lmops_jax.data.hf_tokenizer", "HFTokenizerVocabulary")
_NEEDS = {"byte": None, "sentencepiece": "path", "hf_tokenizer": "path", "task": "task"}
_HF_IDS = ("bos_id", "eos_id", "pad_id", "unk_id")


@dataclasses.dataclass(frozen=True)
class VocabularySpec:
    """How to rebuild a checkpoint's text vocabulary (the 'targets' feature's).

    Attributes:
      kind: "byte" (`seqio.ByteVocabulary`), "sentencepiece" (a model file), "hf_tokenizer" (a Hugging
        Face tokenizer.json, `data.hf_tokenizer.HFTokenizerVocabulary`) or "task" (the vocabulary of the
        seqio task or mixture `task`, which the loading process must have registered).
      path: the SentencePiece model or tokenizer.json file: absolute when it was a local path, or
        relative to the model directory (a tokenizer `convert from_hf` copied into it; `under`).
      extra_ids: sentinel ids appended to the vocabulary (not for "task").
      task: the task or mixture name, for kind "task".
      bos_id, eos_id, pad_id, unk_id, add_special_tokens: "hf_tokenizer" only: its constructor
        arguments; a None id is looked up in the files beside tokenizer.json when it is built.
    """

    kind: str
    path: str | None = None
    extra_ids: int = 0
    task: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_special_tokens: bool = False

    def __post_init__(self):
        if self.kind not in _NEEDS:
            raise ValueError(f"vocabulary kind must be one of {sorted(_NEEDS)}, got {self.kind!r}")
        if _NEEDS[self.kind] and not getattr(self, _NEEDS[self.kind]):
            raise ValueError(f"a {self.kind!r} vocabulary needs its {_NEEDS[self.kind]}")
        if self.kind != "hf_tokenizer":
            given = [name for name in (*_HF_IDS, "add_special_tokens") if getattr(self, name)]
            if given:
                raise ValueError(f"{given} apply only to an 'hf_tokenizer' vocabulary, not a {self.kind!r} one")

    @classmethod
    def describe(cls, vocabulary: Any, task_name: str) -> VocabularySpec:
        """The spec of a seqio vocabulary: its file when it is a plain byte, SentencePiece or Hugging Face
        tokenizer one, else the task it came from."""
        import seqio  # the caller holds a seqio vocabulary, so seqio is loaded already
        if type(vocabulary) is seqio.ByteVocabulary:
            return cls("byte", extra_ids=vocabulary.extra_ids)
        if type(vocabulary) is seqio.SentencePieceVocabulary:
            path = vocabulary.sentencepiece_model_file
            if vocabulary == seqio.SentencePieceVocabulary(path, vocabulary.extra_ids):  # no other options set
                return cls("sentencepiece", _absolute(path), vocabulary.extra_ids)
        if (type(vocabulary).__module__, type(vocabulary).__qualname__) == HF_TOKENIZER_CLASS:
            ids = {name: getattr(vocabulary, name) for name in _HF_IDS}
            return cls("hf_tokenizer", _absolute(vocabulary.path), vocabulary.extra_ids,
                       add_special_tokens=vocabulary.add_special_tokens, **ids)
        return cls("task", task=task_name)

    def under(self, directory: str) -> VocabularySpec:
        """This spec with a relative file path rooted at `directory` (the model directory)."""
        if self.path is None or "://" in self.path or os.path.isabs(self.path):
            return self
        return dataclasses.replace(self, path=os.path.join(directory, self.path))

    def build(self) -> Any:
        """The seqio vocabulary (imports seqio), or None for a task this process has not registered."""
        import seqio
        if self.kind == "byte":
            return seqio.ByteVocabulary(extra_ids=self.extra_ids)
        if self.kind == "sentencepiece":
            return seqio.SentencePieceVocabulary(self.path, extra_ids=self.extra_ids)
        if self.kind == "hf_tokenizer":
            module, name = HF_TOKENIZER_CLASS
            vocabulary_cls = getattr(importlib.import_module(module), name)
            return vocabulary_cls(self.path, self.extra_ids, add_special_tokens=self.add_special_tokens,
                                  **{name: getattr(self, name) for name in _HF_IDS})
        try:
            return seqio.get_mixture_or_task(self.task).output_features["targets"].vocabulary
        except (ValueError, KeyError):
            logging.warning("the checkpoint's vocabulary is that of task %r, which is not registered here", self.task)
            return None


def _absolute(path: str) -> str:
    """A local path made absolute (a checkpoint outlives the working directory); URLs as they are."""
    return path if "://" in path else os.path.abspath(path)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The special token ids of a model that does not follow seqio's convention (one imported from
    Hugging Face: `config.json`'s bos/eos/pad/decoder_start_token_id).

    Attributes:
      bos_id: what decoder-only prompts start with; None: nothing (the model was trained without one).
      eos_id: where generation stops; None: unknown (the vocabulary's EOS is used).
      pad_id: the padding id, written back on export (batches here pad with 0 and mask by length).
      decoder_start_id: an encoder-decoder's first decoder input (`models.model.DECODER_START_ID`).
    """

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    decoder_start_id: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"special token {f.name} must be None or a token id >= 0, got {value!r}")


# Models trained here: seqio's feature converters shift every sequence right with 0, so a decoder-only
# model reads 0 before its first token and an encoder-decoder's decoder starts from 0; EOS is the
# vocabulary's (1 for seqio's byte and SentencePiece vocabularies).
SEQIO_CONVENTION = SpecialTokens(bos_id=0, eos_id=None, pad_id=0, decoder_start_id=DECODER_START_ID)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint says about its model: the model itself and, when known, its vocabulary and (for
    imported models) its special token ids; None: seqio's convention (module docstring)."""

    model: BaseModel
    vocabulary: VocabularySpec | None = None
    special_tokens: SpecialTokens | None = None

    def to_json(self) -> dict:
        records = {name: None if value is None else dataclasses.asdict(value)
                   for name, value in (("vocabulary", self.vocabulary), ("special_tokens", self.special_tokens))}
        return {"format_version": FORMAT_VERSION, **model_record(self.model), **records}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str) -> ModelSpec:
        """Parses `to_json`'s output; errors name `source` (the checkpoint) and the field."""
        version = data.get("format_version") if isinstance(data, Mapping) else None
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise CheckpointError(f"the model spec of {source} has format_version {version!r}; this lmops_jax "
                                  f"reads versions 1..{FORMAT_VERSION}")
        model = model_from_record(data, f"the model spec of {source}: model")
        records = {}
        for name, record_cls in (("vocabulary", VocabularySpec), ("special_tokens", SpecialTokens)):
            value, where = data.get(name), f"the model spec of {source}: {name}"
            records[name] = None if value is None else _decode(record_cls, value, where)
        return cls(model, **records)
