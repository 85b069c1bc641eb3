"""`python -m lmops_jax.distillation dump_topk <the distillation run's flags>`."""
from lmops_jax.distillation.trainer import main

if __name__ == "__main__":
    main()
