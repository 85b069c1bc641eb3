"""CLI: `python -m lmops_jax.convert from_hf --hf_dir=DIR --out_dir=DIR` / `to_hf --checkpoint=DIR --out_dir=DIR`."""
import argparse
import sys

from lmops_jax import checkpoints, convert


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmops_jax.convert")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("from_hf", help="Hugging Face directory -> Orbax checkpoint + model.gin")
    imp.add_argument("--hf_dir", required=True)
    imp.add_argument("--out_dir", required=True)
    imp.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    exp = sub.add_parser("to_hf", help="checkpoint -> config.json + model.safetensors")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out_dir", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "from_hf":
            print(f"wrote {convert.import_hf(args.hf_dir, args.out_dir, args.dtype)}")
        else:
            convert.export_hf(args.checkpoint, args.out_dir)
            print(f"wrote {args.out_dir}/config.json and model.safetensors")
    except (convert.ConversionError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
