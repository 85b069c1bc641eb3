"""Command-line plumbing shared by every `python -m lmops_jax.<job>`: gin flags and the runner."""
