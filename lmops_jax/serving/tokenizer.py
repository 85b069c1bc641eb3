"""Text <-> token ids for the server, in the model's own prompt format.

A request's prompt is a string (encoded with the checkpoint's vocabulary) or token ids (used as
given); either then goes through `BaseModel.prompt_tokens` with the checkpoint's special tokens exactly
as `InferenceModule.generate` formats prompts, so both see the same rows: decoder-only models get BOS
first; encoder-decoder models get EOS last on text prompts (as seqio tasks end their inputs), token-id
prompts as given.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from lmops_jax.models.model import BaseModel
from lmops_jax.models.spec import SEQIO_CONVENTION, ModelSpec


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """vocabulary: seqio-style (`encode(str) -> ids`, `decode(ids) -> str`, `eos_id`); model: whose
    `prompt_tokens` formats prompts; bos_id, eos_id: the checkpoint's (None: none / the vocabulary's)."""
    vocabulary: Any
    model: BaseModel
    bos_id: int | None = 0
    eos_id: int | None = None

    @classmethod
    def from_spec(cls, spec: ModelSpec, model: BaseModel) -> Tokenizer:
        """The checkpoint's vocabulary (a byte vocabulary when it names none) and special tokens."""
        if spec.vocabulary is None:
            import seqio
            vocabulary = seqio.ByteVocabulary()
        else:
            vocabulary = spec.vocabulary.build()
        if vocabulary is None:
            raise ValueError(f"the checkpoint's vocabulary is that of the seqio task {spec.vocabulary.task!r}, which "
                             "is not registered in this process, so prompts cannot be tokenized")
        special = spec.special_tokens or SEQIO_CONVENTION
        return cls(vocabulary, model, special.bos_id, special.eos_id)

    @property
    def stop_id(self) -> int:
        """Where generation ends: the checkpoint's EOS, else the vocabulary's."""
        return int(self.vocabulary.eos_id) if self.eos_id is None else self.eos_id

    def prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """The row the scheduler takes for a text or token-id prompt (module docstring)."""
        if isinstance(prompt, str):
            return self.model.prompt_tokens(list(self.vocabulary.encode(prompt)), bos_id=self.bos_id,
                                            eos_id=self.stop_id)
        return self.model.prompt_tokens([int(t) for t in prompt], bos_id=self.bos_id)

    def decode(self, ids: Sequence[int]) -> str:
        return self.vocabulary.decode(list(ids))
