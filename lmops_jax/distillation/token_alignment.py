"""Cross-tokenizer alignment: the teacher's tokenization of the student's text, and the positions where
both models predict a token that starts at the same place in that text.

The student trains on its own task's batches. For each of its sequences (a packed segment, or a row),
`TokenAligner` decodes the student's tokens to text, tokenizes that text with the teacher's vocabulary
and places the teacher's tokens in a teacher row packed the same way (segment by segment, truncated to
the teacher's length). Both tokenizations carry byte offsets into the UTF-8 text (`token_offsets`).

Student target position i, whose token starts at byte b, is aligned with teacher target position j when
teacher token j also starts at b: both models then read exactly the text before b and predict what
follows, so their next-token distributions are comparable (by ULD, `losses.uld`). A sequence's EOS is
aligned with the teacher's EOS (both start at the end of the text). The student's offsets come from
re-tokenizing the decoded text; where that does not reproduce its tokens (a non-invertible tokenizer,
or bytes cut mid-character at the end of a row), the positions from the first difference on stay
unaligned.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np

TEACHER_PREFIX = "teacher_"  # teacher features: teacher_decoder_input_tokens, ... [B, Lt]
ALIGNED_INDEX = "aligned_teacher_index"  # int32 [B, Ls]: the teacher position of each aligned student position
ALIGNED = "aligned"  # int32 [B, Ls]: 1 where the student position is aligned


def token_offsets(vocabulary: Any, text: str) -> tuple[list[int], list[int], list[int]]:
    """(ids, start bytes, end bytes) of `text` tokenized by a seqio vocabulary (no EOS), offsets into the
    UTF-8 encoding of `text`. Byte, SentencePiece and Hugging Face tokenizer vocabularies are supported."""
    import seqio

    if isinstance(vocabulary, seqio.ByteVocabulary):
        ids = list(vocabulary.encode(text))
        return ids, list(range(len(ids))), list(range(1, len(ids) + 1))
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        pieces = vocabulary.tokenizer.encode_as_proto(text).pieces
        return [p.id for p in pieces], [p.begin for p in pieces], [p.end for p in pieces]
    tokenizer = getattr(vocabulary, "tokenizer", None)
    if hasattr(tokenizer, "encode") and hasattr(vocabulary, "add_special_tokens"):  # data.hf_tokenizer
        encoding = tokenizer.encode(text, add_special_tokens=vocabulary.add_special_tokens)
        byte_at = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])]).astype(int).tolist()
        return (list(encoding.ids), [byte_at[a] for a, _ in encoding.offsets], [byte_at[b] for _, b in encoding.offsets])
    raise NotImplementedError(f"cross-tokenizer alignment needs token offsets, which {type(vocabulary).__name__} "
                              "does not give (supported: byte, SentencePiece and Hugging Face tokenizer vocabularies)")


def student_offsets(vocabulary: Any, ids: Sequence[int]) -> tuple[str, list[int]]:
    """(the text of student tokens `ids`, start byte of each of its first m tokens): m is the length of
    the prefix that re-tokenizing the decoded text reproduces."""
    text = vocabulary.decode([int(i) for i in ids])
    again, starts, _ = token_offsets(vocabulary, text)
    m = 0
    while m < min(len(again), len(ids)) and again[m] == ids[m]:
        m += 1
    return text, starts[:m]


def _segments(targets: np.ndarray, segment_ids: np.ndarray | None) -> list[np.ndarray]:
    """Positions of each sequence of a row, in order (a row without segment ids is one sequence)."""
    if segment_ids is None:
        return [np.flatnonzero(targets != 0)]
    return [np.flatnonzero(segment_ids == s) for s in np.unique(segment_ids[segment_ids > 0])]


@dataclasses.dataclass
class TokenAligner:
    """Builds teacher rows and the alignment from student rows (module docstring).

    Attributes:
      student: the student task's seqio vocabulary; teacher: the teacher's.
      teacher_length: tokens per teacher row (KD_TEACHER_LENGTH).
    """

    student: Any
    teacher: Any
    teacher_length: int

    def row(self, targets: np.ndarray, segment_ids: np.ndarray | None) -> dict[str, np.ndarray]:
        """Teacher features [Lt] and alignment [Ls] of one student row (targets [Ls], segment ids or None)."""
        lt = self.teacher_length
        t_targets, t_segments, t_positions = (np.zeros(lt, np.int32) for _ in range(3))
        index, aligned = np.zeros(len(targets), np.int32), np.zeros(len(targets), np.int32)
        cursor = 0
        for number, positions in enumerate(_segments(targets, segment_ids), start=1):
            ids = targets[positions].tolist()
            has_eos = bool(ids) and ids[-1] == self.student.eos_id
            text, starts = student_offsets(self.student, ids[:-1] if has_eos else ids)
            end = len(text.encode("utf-8"))
            t_ids, t_starts, t_ends = token_offsets(self.teacher, text)
            if has_eos:
                t_ids, t_starts, t_ends = t_ids + [self.teacher.eos_id], t_starts + [end], t_ends + [end + 1]
                if len(starts) == len(ids) - 1:
                    starts = starts + [end]
            take = min(len(t_ids), lt - cursor)
            first_at: dict[int, int] = {}
            for j in range(take):
                if t_ends[j] > t_starts[j]:  # a token that covers no text (SentencePiece's lone '▁') is skipped
                    first_at.setdefault(t_starts[j], cursor + j)
            t_targets[cursor:cursor + take] = t_ids[:take]
            t_segments[cursor:cursor + take] = number
            t_positions[cursor:cursor + take] = np.arange(take)
            for k, start in enumerate(starts):
                if start in first_at:
                    index[positions[k]], aligned[positions[k]] = first_at[start], 1
            cursor += take
        inputs = np.where(np.arange(lt) > 0, np.roll(t_targets, 1), 0)
        inputs = np.where(np.roll(t_segments, 1) == t_segments, inputs, 0)  # 0 starts every sequence, as seqio's
        return {f"{TEACHER_PREFIX}decoder_target_tokens": t_targets,
                f"{TEACHER_PREFIX}decoder_input_tokens": inputs.astype(np.int32),
                f"{TEACHER_PREFIX}decoder_segment_ids": t_segments, f"{TEACHER_PREFIX}decoder_positions": t_positions,
                f"{TEACHER_PREFIX}decoder_loss_weights": (t_segments > 0).astype(np.int32),
                ALIGNED_INDEX: index, ALIGNED: aligned}

    def batch(self, targets: np.ndarray, segment_ids: np.ndarray | None) -> dict[str, np.ndarray]:
        """`row` for every row of targets [B, Ls]: teacher features [B, Lt], alignment [B, Ls]."""
        rows = [self.row(targets[i], None if segment_ids is None else segment_ids[i]) for i in range(len(targets))]
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def teacher_batch(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The teacher's own batch (its decoder features) out of an aligned batch."""
    return {k[len(TEACHER_PREFIX):]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}


def _host_rows(x: jax.Array) -> np.ndarray:
    """A global [B, ...] array as numpy, filled in the rows this process holds (zeros elsewhere)."""
    out = np.zeros(x.shape, x.dtype)
    for shard in x.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
    return out


class AlignedBatches:
    """Wraps a student batch iterator: each batch gets the teacher's features and the alignment, computed
    on the host for the rows of this process and sharded like the batch."""

    def __init__(self, batches: Iterator, aligner: TokenAligner, sharding: jax.sharding.Sharding):
        self._batches, self._aligner, self._sharding = batches, aligner, sharding

    def __iter__(self) -> AlignedBatches:
        return self

    @property
    def batches_consumed(self) -> int:
        return getattr(self._batches, "batches_consumed", 0)

    def __next__(self) -> dict:
        batch = next(self._batches)
        segments = batch.get("decoder_segment_ids")
        extra = self._aligner.batch(_host_rows(batch["decoder_target_tokens"]),
                                    None if segments is None else _host_rows(segments))
        out = dict(batch)
        for key, value in extra.items():
            out[key] = jax.make_array_from_callback(value.shape, self._sharding, lambda idx, v=value: v[idx])
        return out

    def get_state(self) -> dict:
        return self._batches.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._batches.set_state(state)
