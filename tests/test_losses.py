"""Knowledge-distillation losses (`TokenLosses`, `kd_loss`) against plain numpy formulas written with probabilities."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmops_jax import losses

V = 11
PLAIN = losses.TokenLosses()


def _softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(x, np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """sum p log(p / q) with 0 log 0 = 0."""
    ratio = np.where(p > 0, p, 1.0) / np.where(p > 0, q, 1.0)
    return np.sum(np.where(p > 0, p * np.log(ratio), 0.0), axis=-1)


def _reference(student, teacher, kind, temperature=1.0, beta=0.5):
    p, q = _softmax(teacher, temperature), _softmax(student, temperature)
    if kind == "forward_kl":
        d = _kl(p, q)
    elif kind == "reverse_kl":
        d = _kl(q, p)
    else:
        m = beta * p + (1 - beta) * q
        d = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    return temperature**2 * d


def _logits(seed: int, shape=(2, 3, V), scale: float = 2.0, dtype=np.float32):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


@pytest.mark.parametrize("kind", losses.KD_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_loss_matches_reference(kind, temperature):
    s, t = _logits(0), _logits(1)
    want = _reference(s, t, kind, temperature, beta=0.3)
    got_tokens = PLAIN.kd(s, t, kind=kind, temperature=temperature, beta=0.3)
    np.testing.assert_allclose(got_tokens, want, rtol=1e-5, atol=1e-6)
    got = losses.kd_loss(s, t, kind=kind, temperature=temperature, beta=0.3)
    np.testing.assert_allclose(got, want.mean(), rtol=1e-5)


def test_temperature_squared_scaling():
    s, t = _logits(2), _logits(3)
    unscaled = _reference(s, t, "forward_kl", 3.0) / 9.0
    np.testing.assert_allclose(losses.kd_loss(s, t, temperature=3.0), 9.0 * unscaled.mean(), rtol=1e-5)


def test_weights_mask_tokens():
    s, t = _logits(4), _logits(5)
    weights = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
    garbage = s.copy()
    garbage[weights == 0] = 1e4  # masked tokens may hold anything
    per_token = _reference(s, t, "reverse_kl")
    want = per_token[weights == 1].mean()
    np.testing.assert_allclose(losses.kd_loss(garbage, t, weights, kind="reverse_kl"), want, rtol=1e-5)
    assert float(losses.kd_loss(s, t, np.zeros_like(weights))) == 0.0


@pytest.mark.parametrize("kind", losses.KD_KINDS)
def test_gradients_match_finite_differences(kind):
    with jax.enable_x64(True):
        s, t = _logits(6, (2, 5), dtype=np.float64), _logits(7, (2, 5), dtype=np.float64)
        weights = np.array([1.0, 0.5])

        def f(s, t):
            return losses.kd_loss(s, t, weights, kind=kind, temperature=1.7, beta=0.3)

        grads = jax.grad(f, argnums=(0, 1))(s, t)
        assert grads[0].dtype == jnp.float64
        eps = 1e-6
        for which, (x, g) in enumerate(zip((s, t), grads)):
            for idx in [(0, 0), (0, 3), (1, 2), (1, 4)]:
                hi, lo = x.copy(), x.copy()
                hi[idx] += eps
                lo[idx] -= eps
                args_hi = (hi, t) if which == 0 else (s, hi)
                args_lo = (lo, t) if which == 0 else (s, lo)
                numeric = (float(f(*args_hi)) - float(f(*args_lo))) / (2 * eps)
                np.testing.assert_allclose(g[idx], numeric, rtol=1e-6, atol=1e-9)


def test_jsd_beta_limits_and_symmetry():
    with jax.enable_x64(True):
        s, t = _logits(8, dtype=np.float64), _logits(9, dtype=np.float64)
        small = 1e-5
        fwd = PLAIN.kd(s, t, kind="forward_kl")
        rev = PLAIN.kd(s, t, kind="reverse_kl")
        # beta weights the teacher: the mixture tends to the student as beta -> 0 (forward KL) ...
        np.testing.assert_allclose(PLAIN.kd(s, t, kind="jsd", beta=small) / small, fwd, rtol=1e-3)
        # ... and to the teacher as beta -> 1 (reverse KL).
        np.testing.assert_allclose(PLAIN.kd(s, t, kind="jsd", beta=1 - small) / small, rev, rtol=1e-3)
        np.testing.assert_allclose(
            PLAIN.kd(s, t, kind="jsd", beta=0.2),
            PLAIN.kd(t, s, kind="jsd", beta=0.8),
            rtol=1e-10,
        )
        # The symmetric JSD is bounded by log 2.
        assert float(jnp.max(PLAIN.kd(s, t, kind="jsd"))) <= np.log(2)


@pytest.mark.parametrize("kind", losses.KD_KINDS)
def test_zero_probabilities_give_no_nan(kind):
    s, t = _logits(10), _logits(11)
    s[..., -2:] = -np.inf  # padded vocabulary entries, masked in both models
    t[..., -2:] = -np.inf
    if kind != "reverse_kl":  # a token the teacher alone excludes (reverse KL would rightly be infinite)
        t[0, 0, 3] = -np.inf
    value, grads = jax.value_and_grad(lambda a, b: losses.kd_loss(a, b, kind=kind), argnums=(0, 1))(s, t)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in grads)
    # 0 log 0 = 0: dropping the padded entries changes nothing.
    np.testing.assert_allclose(value, _reference(s[..., :-2], t[..., :-2], kind).mean(), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_full_vocab_equals_forward_kl(temperature):
    s, t = _logits(12), _logits(13)
    logprobs, ids = losses.topk_teacher_logprobs(t, V)
    got = PLAIN.kd_from_topk(s, logprobs, ids, temperature=temperature)
    np.testing.assert_allclose(got, PLAIN.kd(s, t, temperature=temperature), rtol=1e-5, atol=1e-6)


def _topk_reference(student, teacher, k, temperature):
    """The (k + 1)-outcome KL written with probabilities: kept top-k renormalized at T, tail mass r at T=1."""
    p_full = _softmax(teacher)
    ids = np.argsort(-p_full, axis=-1)[..., :k]
    p_top = np.take_along_axis(p_full, ids, -1)
    rest = 1.0 - p_top.sum(-1)
    tempered = p_top ** (1.0 / temperature)
    p = np.concatenate([tempered / tempered.sum(-1, keepdims=True) * (1 - rest)[..., None], rest[..., None]], -1)
    q_full = _softmax(student, temperature)
    q_top = np.take_along_axis(q_full, ids, -1)
    q = np.concatenate([q_top, (1.0 - q_top.sum(-1))[..., None]], -1)
    return temperature**2 * _kl(p, q)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_partial_vocab_is_a_proper_kl(temperature):
    s, t = _logits(14), _logits(15)
    weights = np.array([[1, 0, 1], [1, 1, 1]], np.float32)
    logprobs, ids = losses.topk_teacher_logprobs(t, 4)
    assert logprobs.shape == (2, 3, 4) and ids.dtype == jnp.int32
    tokens = PLAIN.kd_from_topk(s, logprobs, ids, temperature=temperature)
    np.testing.assert_allclose(tokens, _topk_reference(s, t, 4, temperature), rtol=1e-4, atol=1e-6)
    assert float(jnp.min(tokens)) >= 0.0
    if temperature == 1.0:
        # Merging outcomes cannot increase a KL (data processing), and identical models score 0.
        assert np.all(np.asarray(tokens) <= _reference(s, t, "forward_kl") + 1e-6)
        np.testing.assert_allclose(PLAIN.kd_from_topk(t, logprobs, ids), 0.0, atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(PLAIN.kd_from_topk(x, logprobs, ids, temperature=temperature) * weights))(s)
    assert np.all(np.isfinite(grad))
    assert not np.any(grad[weights == 0])  # masked tokens get no gradient


def test_cross_entropy_label_smoothing_and_z_loss():
    s = _logits(16)
    targets = np.random.default_rng(18).integers(0, V, size=(2, 3))
    smoothing, z_coef = 0.1, 1e-2
    loss, z_term = losses.cross_entropy_with_logits(s, targets, z_loss=z_coef, label_smoothing=smoothing)
    log_p = np.log(_softmax(s))
    smoothed = np.full(s.shape, smoothing / (V - 1))
    np.put_along_axis(smoothed, targets[..., None], 1.0 - smoothing, axis=-1)
    log_z = np.log(np.exp(np.asarray(s, np.float64)).sum(-1))
    # Cross-entropy minus the smoothed target's own entropy (a perfect model scores 0), plus z-loss.
    want = -(smoothed * log_p).sum(-1) + (smoothed * np.log(smoothed)).sum(-1) + z_coef * log_z**2
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(z_term, z_coef * log_z**2, rtol=1e-5)
    np.testing.assert_array_equal(PLAIN.argmax(s), s.argmax(-1))


def test_resolve_schedule():
    assert losses.resolve_schedule(0.3, None) == 0.3
    assert float(losses.resolve_schedule(optax.linear_schedule(1.0, 0.0, transition_steps=10), 5)) == 0.5
    with pytest.raises(ValueError, match="step is required"):
        losses.resolve_schedule(optax.constant_schedule(0.5), None)


def test_bad_input_raises():
    s, t = _logits(21), _logits(22)
    with pytest.raises(ValueError, match="unknown kind"):
        losses.kd_loss(s, t, kind="tvd")
    with pytest.raises(ValueError, match="vocab sizes of teacher and student logits differ"):
        losses.kd_loss(s, t[..., :-1])
    with pytest.raises(ValueError, match="beta"):
        losses.kd_loss(s, t, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="temperature"):
        losses.kd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="weights shape"):
        losses.kd_loss(s, t, np.ones((2,)))
    with pytest.raises(ValueError, match="targets shape"):
        losses.cross_entropy_with_logits(s, np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="k must be"):
        losses.topk_teacher_logprobs(t, V + 1)
    logprobs, ids = losses.topk_teacher_logprobs(t, 3)
    with pytest.raises(ValueError, match="teacher_topk_ids shape"):
        PLAIN.kd_from_topk(s, logprobs, ids[..., :2])
    with pytest.raises(ValueError, match="leading shape"):
        PLAIN.kd_from_topk(s[:1], logprobs, ids)
