"""`python -m lmops_jax.infer`: the batch inference job. The code is `lmops_jax.inference.infer`;
`infer` is re-exported for notebooks."""
from lmops_jax.inference.infer import infer, main

__all__ = ["infer", "main"]

if __name__ == "__main__":
    main()
