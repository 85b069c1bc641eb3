"""CLI of the Hugging Face bridge.

    python -m lmops_jax.convert from_hf --hf_dir=DIR --out_dir=DIR [--dtype=float32|bfloat16]
    python -m lmops_jax.convert to_hf --checkpoint=DIR --out_dir=DIR [--max_shard_gb=5]

Exit status 0 on success, 2 with a one-paragraph error on stderr when the input cannot be converted.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lmops_jax import checkpoints, convert


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmops_jax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("from_hf", help="Hugging Face directory (config.json + *.safetensors) -> Orbax "
                                         "checkpoint + model.gin")
    imp.add_argument("--hf_dir", required=True)
    imp.add_argument("--out_dir", required=True)
    imp.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                     help="params and compute dtype (default: the stored dtype)")
    exp = sub.add_parser("to_hf", help="checkpoint -> config.json + model.safetensors (sharded when large)")
    exp.add_argument("--checkpoint", required=True, help="model dir, its checkpoints folder or a step folder")
    exp.add_argument("--out_dir", required=True)
    exp.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors shard, in GiB")
    args = parser.parse_args(argv)
    try:
        if args.command == "from_hf":
            print(f"wrote {convert.import_hf(args.hf_dir, args.out_dir, args.dtype)}")
        else:
            if not args.max_shard_gb > 0:
                parser.error(f"--max_shard_gb must be positive, got {args.max_shard_gb}")
            paths = convert.export_hf(args.checkpoint, args.out_dir, int(args.max_shard_gb * 1024 ** 3))
            print("wrote " + ", ".join(paths))
    except (convert.ConversionError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
