"""CLI of the Hugging Face bridge.

    python -m lmops_jax.convert from_hf --hf_dir=DIR --out_dir=DIR [--dtype=float32|bfloat16]
    python -m lmops_jax.convert to_hf --checkpoint=DIR --out_dir=DIR [--max_shard_gb=5]

Each prints what it wrote and the model: family and config, parameter count and dtype, special token
ids and tokenizer. Exit status 0 on success, 2 with a one-paragraph error on stderr when the input
cannot be converted.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Sequence

from lmops_jax import checkpoints, convert
from lmops_jax.cli import runner
from lmops_jax.models import loading, spec

if __name__ == "__main__":  # before anything is defined twice (see cli.runner.run_as_main)
    runner.run_as_main("lmops_jax.convert.__main__")


def _from_hf_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf_dir", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="params and compute dtype (default: the stored dtype)")


def _summary(checkpoint: str) -> list[str]:
    """Indented lines on a checkpoint's model: family, parameter count and dtype, special ids, tokenizer."""
    loaded = loading.read_spec(checkpoint)
    shapes = checkpoints.checkpoint_param_shapes(checkpoint).values()
    count, dtypes = sum(math.prod(shape) for shape, _ in shapes), "/".join(sorted({dtype for _, dtype in shapes}))
    special = loaded.special_tokens
    ids = ("none stored: seqio's convention (BOS 0, the vocabulary's EOS)" if special is None
           else ", ".join(f"{name} {value}" for name, value in dataclasses.asdict(special).items()))
    vocabulary = loaded.vocabulary
    tokenizer = ("none (strings are read as bytes)" if vocabulary is None
                 else f"{vocabulary.kind} {vocabulary.path or vocabulary.task or ''}".strip())
    model = loaded.model
    return [f"  model: {spec.family_of(model)} ({type(model.config).__name__}), {count:,} parameters, {dtypes}",
            f"  special ids: {ids}", f"  tokenizer: {tokenizer}"]


def _from_hf(args: argparse.Namespace) -> None:
    step_dir = convert.import_hf(args.hf_dir, args.out_dir, args.dtype)
    print("\n".join([f"wrote {step_dir} and {os.path.join(args.out_dir, 'model.gin')}"] + _summary(step_dir)))


def _to_hf_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model dir, its checkpoints folder or a step folder")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors shard, in GiB")


def _to_hf(args: argparse.Namespace) -> None:
    if not args.max_shard_gb > 0:
        raise ValueError(f"--max_shard_gb must be positive, got {args.max_shard_gb}")
    written = convert.export_hf(args.checkpoint, args.out_dir, int(args.max_shard_gb * 1024 ** 3))
    print("\n".join([f"wrote {', '.join(written)}", f"from {args.checkpoint}:"] + _summary(args.checkpoint)))


JOBS = {
    "from_hf": runner.ArgsJob("Hugging Face directory (config.json + *.safetensors) -> Orbax checkpoint + "
                              "model.gin", _from_hf_flags, _from_hf),
    "to_hf": runner.ArgsJob("checkpoint -> config.json + model.safetensors (sharded when large)",
                            _to_hf_flags, _to_hf),
}


def main(argv: Sequence[str] | None = None) -> int:
    return runner.run("python -m lmops_jax.convert", __doc__, JOBS, argv)
