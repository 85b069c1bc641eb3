"""CLI of the Hugging Face bridge.

    python -m lmops_jax.convert from_hf --hf_dir=DIR --out_dir=DIR [--dtype=float32|bfloat16]
    python -m lmops_jax.convert to_hf --checkpoint=DIR --out_dir=DIR [--max_shard_gb=5]

Exit status 0 on success, 2 with a one-paragraph error on stderr when the input cannot be converted.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from lmops_jax import convert
from lmops_jax.cli import runner

if __name__ == "__main__":  # before anything is defined twice (see cli.runner.run_as_main)
    runner.run_as_main("lmops_jax.convert.__main__")


def _from_hf_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf_dir", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="params and compute dtype (default: the stored dtype)")


def _from_hf(args: argparse.Namespace) -> None:
    print(f"wrote {convert.import_hf(args.hf_dir, args.out_dir, args.dtype)}")


def _to_hf_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model dir, its checkpoints folder or a step folder")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors shard, in GiB")


def _to_hf(args: argparse.Namespace) -> None:
    if not args.max_shard_gb > 0:
        raise ValueError(f"--max_shard_gb must be positive, got {args.max_shard_gb}")
    print("wrote " + ", ".join(convert.export_hf(args.checkpoint, args.out_dir, int(args.max_shard_gb * 1024 ** 3))))


JOBS = {
    "from_hf": runner.ArgsJob("Hugging Face directory (config.json + *.safetensors) -> Orbax checkpoint + "
                              "model.gin", _from_hf_flags, _from_hf),
    "to_hf": runner.ArgsJob("checkpoint -> config.json + model.safetensors (sharded when large)",
                            _to_hf_flags, _to_hf),
}


def main(argv: Sequence[str] | None = None) -> int:
    return runner.run("python -m lmops_jax.convert", __doc__, JOBS, argv)
