"""`python -m lmops_jax.serve`: the OpenAI-compatible server. The code is `lmops_jax.serving.serve`;
`serve` is re-exported so notebooks can call `lmops_jax.serve.serve(...)`."""
from lmops_jax.cli import runner
from lmops_jax.serving.serve import main, serve

__all__ = ["main", "serve"]

if __name__ == "__main__":
    runner.run_as_main("lmops_jax.serve")
