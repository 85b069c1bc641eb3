"""`python -m lmops_jax.distillation dump_topk <the distillation run's flags>`."""
from lmops_jax.cli import runner

if __name__ == "__main__":
    runner.run_as_main("lmops_jax.distillation.trainer")
