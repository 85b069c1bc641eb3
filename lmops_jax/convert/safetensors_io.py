"""Reading and writing Hugging Face safetensors weights (single file or sharded with an index).

Only safetensors are read: pickled PyTorch files (`pytorch_model.bin`, `*.pt`) are never opened, since
unpickling runs arbitrary code. Tensors come back as numpy arrays (bfloat16 as `ml_dtypes.bfloat16`)
without passing through an accelerator.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Mapping

import numpy as np

from lmops_jax.convert.mapping import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3


def weight_files(hf_dir: str) -> tuple[list[str], dict[str, str] | None]:
    """(safetensors files to read, the index's {tensor: file} or None) of a model directory.

    With `model.safetensors.index.json` exactly the shards it names are read; else `model.safetensors`;
    else every `*.safetensors` file.
    """
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir!r} is not a directory")
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"cannot read the weight_map of {index_path}: {e!r}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConversionError(f"{index_path}: weight_map must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not os.path.isfile(os.path.join(hf_dir, s))]
        if absent:
            raise ConversionError(f"{INDEX_FILE} in {hf_dir} names shards that are missing: {', '.join(absent)}")
        return [os.path.join(hf_dir, s) for s in shards], weight_map
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], None
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise ConversionError(
            f"no *.safetensors weights in {hf_dir!r} (it holds {sorted(os.listdir(hf_dir))}); pickled .bin/.pt "
            "files are never loaded because unpickling runs code: save the model with "
            "save_pretrained(safe_serialization=True) first")
    return files, None


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """{HF name: numpy array} of every tensor in a model directory's safetensors weights."""
    from safetensors import safe_open

    files, weight_map = weight_files(hf_dir)
    tensors: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for path in files:
        try:
            with safe_open(path, framework="np") as f:
                for name in f.keys():
                    if name in tensors:
                        raise ConversionError(f"tensor {name!r} is stored twice: in {source[name]} and {path}")
                    tensors[name], source[name] = f.get_tensor(name), path
        except ConversionError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt or foreign files
            raise ConversionError(f"cannot read safetensors file {path}: {e}") from e
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ConversionError(f"{INDEX_FILE} in {hf_dir} lists tensors its shards lack: {', '.join(absent)}")
    return tensors


def write_tensors(out_dir: str, tensors: Mapping[str, np.ndarray],
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Writes `tensors` as `model.safetensors`, or as shards plus an index when they exceed `max_shard_bytes`.

    Returns the written paths. Refuses a directory that already holds other safetensors weights, which
    a loader could mix with the new ones.
    """
    from safetensors.numpy import save_file

    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        value = np.ascontiguousarray(value)
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        names.append(INDEX_FILE)
    os.makedirs(out_dir, exist_ok=True)
    existing = {os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "*.safetensors"))}
    existing |= {INDEX_FILE} if os.path.exists(os.path.join(out_dir, INDEX_FILE)) else set()
    stale = sorted(existing - set(names))
    if stale:
        raise ConversionError(f"{out_dir} already holds other weights ({', '.join(stale)}): use an empty directory")
    paths = []
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        paths.append(os.path.join(out_dir, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(v.nbytes for s in shards for v in s.values()))},
                 "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        paths.append(os.path.join(out_dir, INDEX_FILE))
    return paths
