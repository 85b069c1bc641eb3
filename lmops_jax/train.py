"""`python -m lmops_jax.train`: the training job. The code is `lmops_jax.training.train`; `train` is
re-exported so notebooks can call `lmops_jax.train.train(...)`."""
from lmops_jax.cli import runner
from lmops_jax.training.train import main, train

__all__ = ["main", "train"]

if __name__ == "__main__":
    runner.run_as_main("lmops_jax.train")
