"""Data: a Markov source with known entropy (`synthetic`), offline seqio tasks (`tasks`, registered on
import) and the seqio -> global jax.Array pipeline (`pipeline`).

Submodules are imported explicitly (`from lmops_jax.data import pipeline`) so that `synthetic`, which
needs only numpy, does not pull in TensorFlow.
"""
