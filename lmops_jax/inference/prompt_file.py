"""Prompt files of the batch infer job (`INPUT_FILE`): JSONL or plain text, one example a line.

Format, by the file's extension: `.jsonl`, `.ndjson` and `.json` are JSONL, `.txt` is plain text; any
other file is JSONL when its first non-blank line starts with `{`, else plain text.

  JSONL       each line a JSON object: the prompt in "prompt" or "inputs" (a string; one of the two),
              and for MODE='score' the text to score in "targets" (a string). Every field is written
              out again beside the results, e.g. {"id": 7, "prompt": "The cat", "prediction": ...}.
  plain text  each line one prompt, written out as {"prompt": line, ...}; predict mode only, since
              there is no target to score.

Blank lines are skipped. Errors name the file and the line (1-based), so the CLI reports them as one
`error:` line.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

JSONL_EXTENSIONS = (".jsonl", ".ndjson", ".json")
TEXT_EXTENSIONS = (".txt",)
PROMPT_KEYS = ("prompt", "inputs")


class InputFileError(ValueError):
    """A prompt file that cannot be read as documented; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One example of a prompt file.

    Attributes:
      line: its 1-based line number in the file.
      prompt: the prompt text.
      target: the text to score (JSONL "targets"), or None.
      fields: what the output record repeats: the JSON object, or {"prompt": line} for plain text.
    """

    line: int
    prompt: str
    target: str | None
    fields: dict[str, Any]


def is_jsonl(path: str, lines: list[str]) -> bool:
    """Whether `path` (with these `lines`) is read as JSONL (module docstring)."""
    extension = os.path.splitext(path)[1].lower()
    if extension in JSONL_EXTENSIONS or extension in TEXT_EXTENSIONS:
        return extension in JSONL_EXTENSIONS
    first = next((line for line in lines if line.strip()), "")
    return first.lstrip().startswith("{")


def _text_field(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise InputFileError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _jsonl_example(text: str, number: int, where: str) -> Example:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(f"{where} is not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise InputFileError(f"{where} is a JSON {type(record).__name__}, not an object with a 'prompt'")
    keys = [k for k in PROMPT_KEYS if k in record]
    if len(keys) != 1:
        found = "both 'prompt' and 'inputs'" if keys else f"neither (it has {sorted(record)})"
        raise InputFileError(f"{where} needs one of 'prompt' or 'inputs', found {found}")
    target = _text_field(record, "targets", where) if "targets" in record else None
    return Example(number, _text_field(record, keys[0], where), target, record)


def read_examples(path: str, need_targets: bool) -> list[Example]:
    """Every example of the file, in order; `need_targets` (score mode) requires each to have "targets".

    Raises InputFileError naming the file and line for a missing file, a bad line, a line without a
    target in score mode, or a file with no examples.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except OSError as e:
        raise InputFileError(f"cannot read INPUT_FILE {path!r}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise InputFileError(f"INPUT_FILE {path!r} is not UTF-8 text ({e.reason})") from e
    jsonl = is_jsonl(path, lines)
    examples = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path} line {number}"
        example = _jsonl_example(text, number, where) if jsonl else Example(number, text, None, {"prompt": text})
        if need_targets and example.target is None:
            how = "" if jsonl else " (a plain-text file has no targets: give JSONL lines with 'prompt' and 'targets')"
            raise InputFileError(f"{where} has no 'targets', which MODE='score' needs{how}")
        examples.append(example)
    if not examples:
        raise InputFileError(f"INPUT_FILE {path!r} has no examples (every line is blank)")
    return examples
