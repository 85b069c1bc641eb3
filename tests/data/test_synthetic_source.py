"""MarkovSource: stationary distribution, entropy rate and optimal loss against exact and empirical values."""
import itertools
import math

import numpy as np
import pytest

from lmops_jax.data.synthetic import MarkovSource


def _h(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_two_symbol_chain_matches_analytic_entropy():
    source = MarkovSource(alphabet="ab", order=1, concentration=1.0, seed=3)
    a, b = source.transition[0, 1], source.transition[1, 0]  # P(a->b), P(b->a)
    pi = np.array([b, a]) / (a + b)
    np.testing.assert_allclose(source.stationary, pi, atol=1e-13)
    assert source.entropy_rate() == pytest.approx(pi[0] * _h(a) + pi[1] * _h(b), abs=1e-12)
    h1 = -(pi * np.log(pi)).sum()
    assert source.optimal_loss(1) == pytest.approx(h1, abs=1e-12)
    assert source.optimal_loss(10) == pytest.approx((h1 + 9 * source.entropy_rate()) / 10, abs=1e-12)


def test_stationary_matches_dense_eigenvector():
    source = MarkovSource(alphabet="abcd", order=2, seed=1)
    n, a = source.num_states, source.alphabet_size
    dense = np.zeros((n, n))
    for state, x in itertools.product(range(n), range(a)):
        dense[state, (state * a + x) % n] += source.transition[state, x]
    vals, vecs = np.linalg.eig(dense.T)
    pi = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
    np.testing.assert_allclose(source.stationary, pi / pi.sum(), atol=1e-12)


def test_optimal_loss_equals_brute_force_expectation():
    """Enumerates every sequence of a small chain: exact E[-log p(x)] / L."""
    source = MarkovSource(alphabet="abc", order=2, concentration=0.3, seed=7)
    for length in (1, 2, 5):
        seqs = np.array(list(itertools.product(range(3), repeat=length)))
        log_p = source.token_log_probs(seqs).sum(axis=1)
        p = np.exp(log_p)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert source.optimal_loss(length) == pytest.approx(-(p * log_p).sum() / length, abs=1e-12)


def test_default_source_is_well_below_uniform_and_samples_match_optimal_loss():
    source = MarkovSource()
    assert 0.5 < source.entropy_rate() < 0.7 * math.log(source.alphabet_size)
    symbols = source.sample(np.random.default_rng(0), 2000, 64)
    assert symbols.dtype == np.uint8 and symbols.shape == (2000, 64)
    nll = -source.token_log_probs(symbols).mean()
    assert nll == pytest.approx(source.optimal_loss(64), abs=0.02)
    first = np.bincount(symbols[:, 0], minlength=16) / 2000  # stationary start
    np.testing.assert_allclose(first, source.stationary.reshape(16, 16).sum(1), atol=0.04)


def test_sampling_is_deterministic_and_strings_use_the_alphabet():
    source = MarkovSource(seed=5)
    x = source.sample(np.random.default_rng(1), 4, 30)
    np.testing.assert_array_equal(x, source.sample(np.random.default_rng(1), 4, 30))
    assert not np.array_equal(x, source.sample(np.random.default_rng(2), 4, 30))
    strings = source.to_strings(x)
    assert len(strings) == 4
    assert all(len(s) == 30 and set(s.decode()) <= set(source.alphabet) for s in strings)
    assert source.sample(np.random.default_rng(0), 3, 1).shape == (3, 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"alphabet": "aa"}, "distinct"),
    ({"order": 0}, "order"),
    ({"concentration": 0.0}, "concentration"),
    ({"smoothing": 1.0}, "smoothing"),
])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MarkovSource(**kwargs)


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="length"):
        MarkovSource().optimal_loss(0)
    with pytest.raises(ValueError, match="symbols"):
        MarkovSource().token_log_probs(np.full((2, 3), 16))
