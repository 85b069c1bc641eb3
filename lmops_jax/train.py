"""`python -m lmops_jax.train`: the training job. The code is `lmops_jax.training.train`; `train` is
re-exported so notebooks can call `lmops_jax.train.train(...)`."""
if __name__ == "__main__":  # first, before any import starts a thread: may exec the process once (cli.host_memory)
    from lmops_jax.cli import host_memory
    host_memory.configure()

from lmops_jax.cli import runner  # noqa: E402
from lmops_jax.training.train import main, train  # noqa: E402

__all__ = ["main", "train"]

if __name__ == "__main__":
    runner.run_as_main("lmops_jax.train")
