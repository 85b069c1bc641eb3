"""`python -m lmops_jax.compress quantize|prune`: the compression jobs (docs/compression.md).

    python -m lmops_jax.compress quantize --gin_file=gin_configs/runs/quantize.gin \\
      --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.OUTPUT_DIR="'/tmp/run_int8'" --gin.QUANT_SCHEME="'int8'"
    python -m lmops_jax.compress prune --gin_file=gin_configs/runs/prune.gin \\
      --gin.CHECKPOINT_PATH="'/tmp/run'" --gin.OUTPUT_DIR="'/tmp/run_pruned'" --gin.PRUNE_METHOD="'width'"

Each writes a checkpoint that every loader accepts and ends by printing one JSON line (bytes and
validation loss before and after). The code is `lmops_jax.compression`.
"""
from lmops_jax.cli import runner
from lmops_jax.compression import quantize as quantize_lib
from lmops_jax.compression.prune_job import JOB as PRUNE_JOB
from lmops_jax.data import tasks  # noqa: F401  registers the built-in tasks calibration and evaluation read

if __name__ == "__main__":
    runner.run_as_main("lmops_jax.compress")

QUANTIZE_JOB = runner.GinJob(quantize_lib.quantize, "gin_configs/runs/quantize.gin",
                             help="quantize a checkpoint through qwix: int8, int4, w8a8; PTQ, GPTQ or AWQ")


def main(argv=None) -> int:
    """The `quantize` and `prune` sub-commands through the CLI runner (exit codes there)."""
    return runner.run("python -m lmops_jax.compress", __doc__.split("\n\n")[0],
                      {"quantize": QUANTIZE_JOB, "prune": PRUNE_JOB}, argv)
