"""The typed, versioned model spec a checkpoint stores beside its gin text, so it rebuilds without gin.

    {"format_version": 1, "family": "decoder_only", "module": "lmops_jax.models.model",
     "model": {"config": {"vocab_size": 512, ...}, "z_loss": 0.0001, "label_smoothing": 0.0},
     "vocabulary": {"kind": "byte", "path": null, "extra_ids": 0, "task": null}}

A family names a model wrapper class (a frozen dataclass `BaseModel`); its fields are written as JSON:
numbers, strings and None as they are, dataclass fields (configs) as objects of their fields, and
model fields (LoRA's `base`) as nested records {"family", "module", "model"}. Reading follows the
class's type hints back, so a field added later with a default reads old specs unchanged, and a field
the class does not know is refused by name. Families outside `models/` register themselves when their
module is imported (`peft.lora` registers "lora"); `module` only names that module in the error a
process that has not imported it gets.

The vocabulary is described, not pickled: a byte vocabulary, a SentencePiece model file, or a seqio
task name resolved in the loading process; building it is the only step that imports seqio.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import typing
from typing import Any, Mapping

from lmops_jax.checkpoints import CheckpointError
from lmops_jax.models.model import BaseModel, DecoderOnlyModel, EncoderDecoderModel

FORMAT_VERSION = 1
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
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot build {cls.__name__}: {e}") from e


def model_from_record(record: Any, where: str = "model") -> BaseModel:
    """The model of a {"family", "module", "model"} record; an unregistered family names its module."""
    if not isinstance(record, Mapping) or "family" not in record or "model" not in record:
        raise CheckpointError(f"{where} must be a record with 'family' and 'model', got {record!r}")
    cls = _FAMILIES.get(record["family"])
    if cls is None:
        raise CheckpointError(f"{where}: model family {record['family']!r} is not registered in this process "
                              f"(registered: {sorted(_FAMILIES)}); import {record.get('module')} first")
    return _decode(cls, record["model"], where)


@dataclasses.dataclass(frozen=True)
class VocabularySpec:
    """How to rebuild a checkpoint's text vocabulary (the 'targets' feature's).

    Attributes:
      kind: "byte" (`seqio.ByteVocabulary`), "sentencepiece" (a model file) or "task" (the vocabulary of
        the seqio task or mixture `task`, which the loading process must have registered).
      path: the SentencePiece model file (absolute when it was a local path).
      extra_ids: sentinel ids appended to a byte or SentencePiece vocabulary.
      task: the task or mixture name, for kind "task".
    """

    kind: str
    path: str | None = None
    extra_ids: int = 0
    task: str | None = None

    def __post_init__(self):
        needs = {"byte": None, "sentencepiece": "path", "task": "task"}
        if self.kind not in needs:
            raise ValueError(f"vocabulary kind must be one of {sorted(needs)}, got {self.kind!r}")
        if needs[self.kind] and not getattr(self, needs[self.kind]):
            raise ValueError(f"a {self.kind!r} vocabulary needs its {needs[self.kind]}")

    @classmethod
    def describe(cls, vocabulary: Any, task_name: str) -> VocabularySpec:
        """The spec of a seqio vocabulary: its file when it is a plain byte or SentencePiece one, else
        the task it came from."""
        import seqio  # the caller holds a seqio vocabulary, so seqio is loaded already
        if type(vocabulary) is seqio.ByteVocabulary:
            return cls("byte", extra_ids=vocabulary.extra_ids)
        if type(vocabulary) is seqio.SentencePieceVocabulary:
            path = vocabulary.sentencepiece_model_file
            if vocabulary == seqio.SentencePieceVocabulary(path, vocabulary.extra_ids):  # no other options set
                local = "://" not in path
                return cls("sentencepiece", os.path.abspath(path) if local else path, vocabulary.extra_ids)
        return cls("task", task=task_name)

    def build(self) -> Any:
        """The seqio vocabulary (imports seqio), or None for a task this process has not registered."""
        import seqio
        if self.kind == "byte":
            return seqio.ByteVocabulary(extra_ids=self.extra_ids)
        if self.kind == "sentencepiece":
            return seqio.SentencePieceVocabulary(self.path, extra_ids=self.extra_ids)
        try:
            return seqio.get_mixture_or_task(self.task).output_features["targets"].vocabulary
        except (ValueError, KeyError):
            logging.warning("the checkpoint's vocabulary is that of task %r, which is not registered here", self.task)
            return None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint says about its model: the model itself and, when known, its vocabulary."""

    model: BaseModel
    vocabulary: VocabularySpec | None = None

    def to_json(self) -> dict:
        vocabulary = None if self.vocabulary is None else dataclasses.asdict(self.vocabulary)
        return {"format_version": FORMAT_VERSION, **model_record(self.model), "vocabulary": vocabulary}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str) -> ModelSpec:
        """Parses `to_json`'s output; errors name `source` (the checkpoint) and the field."""
        version = data.get("format_version") if isinstance(data, Mapping) else None
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise CheckpointError(f"the model spec of {source} has format_version {version!r}; this lmops_jax "
                                  f"reads versions 1..{FORMAT_VERSION}")
        model = model_from_record(data, f"the model spec of {source}: model")
        vocabulary = data.get("vocabulary")
        if vocabulary is not None:
            vocabulary = _decode(VocabularySpec, vocabulary, f"the model spec of {source}: vocabulary")
        return cls(model, vocabulary)
