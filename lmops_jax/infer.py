"""`python -m lmops_jax.infer`: the batch inference job. The code is `lmops_jax.inference.infer`;
`infer` is re-exported for notebooks, with the built-in seqio tasks registered (inference/ itself never
imports data/)."""
from lmops_jax.cli import runner
from lmops_jax.data import tasks  # noqa: F401  registers synthetic_lm, text_lm, synthetic_seq2seq
from lmops_jax.inference.infer import infer, main

__all__ = ["infer", "main"]

if __name__ == "__main__":
    runner.run_as_main("lmops_jax.infer")
