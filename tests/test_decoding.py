"""Tests of lmops_jax.inference.decoding and lmops_jax.inference.beam_search on a toy second-order Markov model.

The toy model's logits depend on the input token and on the token before it, kept in a per-sequence
state leaf, so a wrong state expansion or beam reordering changes the results. A shared 0-d leaf
counts the calls and must stay 0-d.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmops_jax.inference.beam_search import beam_search, brevity_penalty
from lmops_jax.inference.decoding import expand_state, gather_beams, generate, sample_rows, sample_tokens

GEN_STATIC = ("tokens_to_logits", "max_new_tokens", "method", "top_k", "num_decodes")
BEAM_STATIC = ("tokens_to_logits", "max_new_tokens", "num_beams")
jit_generate = jax.jit(generate, static_argnames=GEN_STATIC)
jit_beam_search = jax.jit(beam_search, static_argnames=BEAM_STATIC)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class ToyModel:
    """logits = W[token] + U[previous token]; state = {prev [N], count [N], index 0-d}."""

    def __init__(self, vocab: int, seed: int, scale: float = 2.0):
        rng = np.random.default_rng(seed)
        self.w = (scale * rng.standard_normal((vocab, vocab))).astype(np.float32)
        self.u = (scale * rng.standard_normal((vocab, vocab))).astype(np.float32)
        self.traces = 0

    def __call__(self, tokens: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        self.traces += 1
        assert state["index"].ndim == 0 and state["prev"].shape == tokens.shape
        logits = jnp.asarray(self.w)[tokens] + jnp.asarray(self.u)[state["prev"]]
        new_state = {"prev": tokens, "count": state["count"] + 1, "index": state["index"] + 1}
        return logits, new_state

    def np_log_probs(self, token: int, prev: int) -> np.ndarray:
        return np_log_softmax(self.w[token] + self.u[prev])

    def sequence_log_prob(self, initial_logits: np.ndarray, prev: int, tokens: list[int]) -> float:
        """Log-probability of `tokens` following a prompt that ends in `prev`."""
        total = np_log_softmax(initial_logits)[tokens[0]]
        for i in range(1, len(tokens)):
            total += self.np_log_probs(tokens[i - 1], tokens[i - 2] if i > 1 else prev)[tokens[i]]
        return float(total)


def make_inputs(batch: int, vocab: int, seed: int) -> tuple[jax.Array, dict]:
    rng = np.random.default_rng(seed + 100)
    initial_logits = jnp.asarray(2.0 * rng.standard_normal((batch, vocab)), jnp.float32)
    state = {"prev": jnp.asarray(rng.integers(0, vocab, batch), jnp.int32),
             "count": jnp.zeros((batch,), jnp.int32), "index": jnp.array(0, jnp.int32)}
    return initial_logits, state


def reference_greedy(model: ToyModel, initial_logits, state, steps: int, eos_id: int):
    tokens = np.zeros((initial_logits.shape[0], steps), np.int32)
    for b in range(initial_logits.shape[0]):
        logits, prev = np.asarray(initial_logits[b]), int(state["prev"][b])
        for t in range(steps):
            token = int(np.argmax(logits))
            tokens[b, t] = token
            if token == eos_id:
                break
            logits, prev = model.w[token] + model.u[prev], token
    return tokens


def test_greedy_matches_argmax_chain():
    model = ToyModel(vocab=7, seed=0)
    initial_logits, state = make_inputs(batch=3, vocab=7, seed=0)
    out = jit_generate(initial_logits, state, model, max_new_tokens=6, eos_id=-1)
    expected = reference_greedy(model, initial_logits, state, 6, eos_id=-1)
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.lengths, [6, 6, 6])
    for b in range(3):
        ref = model.sequence_log_prob(np.asarray(initial_logits[b]), int(state["prev"][b]), list(expected[b]))
        np.testing.assert_allclose(out.log_probs[b], ref, rtol=1e-5)


def test_eos_stops_each_sequence_and_pads():
    vocab, steps = 7, 6
    model = ToyModel(vocab=vocab, seed=1)
    initial_logits, state = make_inputs(batch=4, vocab=vocab, seed=1)
    free = reference_greedy(model, initial_logits, state, steps, eos_id=-1)
    # An EOS that the greedy chains hit at different positions, or not at all.
    eos_id = next(e for e in range(vocab) if len({(list(r) + [e]).index(e) for r in free}) > 1)
    expected = reference_greedy(model, initial_logits, state, steps, eos_id)
    out = jit_generate(initial_logits, state, model, max_new_tokens=steps, eos_id=eos_id)
    np.testing.assert_array_equal(out.tokens, expected)
    lengths = [min((list(r) + [eos_id]).index(eos_id) + 1, steps) for r in free]
    np.testing.assert_array_equal(out.lengths, lengths)
    for b in range(4):
        assert np.all(np.asarray(out.tokens[b, lengths[b]:]) == 0)
        ref = model.sequence_log_prob(np.asarray(initial_logits[b]), int(state["prev"][b]),
                                      list(expected[b, :lengths[b]]))
        np.testing.assert_allclose(out.log_probs[b], ref, rtol=1e-5)


def counting_model(model: ToyModel, calls: list[int]):
    """Wraps the model with a runtime call counter (a debug callback runs on every loop iteration)."""

    def tokens_to_logits(tokens, state):
        jax.debug.callback(lambda: calls.append(1))
        return model(tokens, state)

    return tokens_to_logits


def test_loop_stops_when_all_finished():
    model = ToyModel(vocab=5, seed=2)
    initial_logits, state = make_inputs(batch=2, vocab=5, seed=2)
    initial_logits = initial_logits.at[:, 3].set(100.0)
    calls: list[int] = []
    out = jit_generate(initial_logits, state, counting_model(model, calls), max_new_tokens=8, eos_id=3)
    jax.block_until_ready(out)
    assert not calls
    np.testing.assert_array_equal(out.tokens, [[3] + [0] * 7] * 2)
    np.testing.assert_array_equal(out.lengths, [1, 1])


def test_sampling_is_deterministic_per_key():
    model = ToyModel(vocab=6, seed=3, scale=0.5)
    initial_logits, state = make_inputs(batch=4, vocab=6, seed=3)
    kwargs = dict(max_new_tokens=8, eos_id=-1, method="sample")
    a = jit_generate(initial_logits, state, model, rng=jax.random.key(0), **kwargs)
    b = jit_generate(initial_logits, state, model, rng=jax.random.key(0), **kwargs)
    c = jit_generate(initial_logits, state, model, rng=jax.random.key(1), **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


FIRST_TOKEN_MODEL = ToyModel(vocab=5, seed=4)


def empirical_first_token(logits: np.ndarray, samples: int, **kwargs) -> np.ndarray:
    """First-token frequencies of `samples` decodes, through jitted `generate` (knobs traced)."""
    state = {"prev": jnp.zeros((1,), jnp.int32), "count": jnp.zeros((1,), jnp.int32),
             "index": jnp.array(0, jnp.int32)}
    out = jit_generate(jnp.asarray(logits)[None], state, FIRST_TOKEN_MODEL, max_new_tokens=1, eos_id=-1,
                       method="sample", rng=jax.random.key(7), num_decodes=samples, **kwargs)
    return np.bincount(np.asarray(out.tokens[:, 0]), minlength=logits.shape[-1]) / samples


def empirical_eager(logits: np.ndarray, samples: int, **kwargs) -> np.ndarray:
    """Token frequencies of eager `sample_tokens` (Python-number knobs, the static paths)."""
    tokens = sample_tokens(jnp.tile(jnp.asarray(logits), (samples, 1)), jax.random.key(8), **kwargs)
    return np.bincount(np.asarray(tokens), minlength=logits.shape[-1]) / samples


# Standard error <= 0.0036 per token with 20000 samples: a tolerance of 0.02 is more than 5 of them,
# and the keys are fixed, so these tests cannot flake.
LOGITS = np.array([1.0, 0.5, -0.3, 0.0, -1.0], np.float32)


def test_sampled_distribution_matches_tempered_softmax():
    for temperature in (0.7, 1.5):
        expected = np.exp(np_log_softmax(LOGITS / temperature))
        np.testing.assert_allclose(empirical_first_token(LOGITS, 20000, temperature=temperature), expected,
                                   atol=0.02)
        np.testing.assert_allclose(empirical_eager(LOGITS, 20000, temperature=temperature), expected,
                                   atol=0.02)


def test_top_k_and_top_p_distributions():
    probs = np.exp(np_log_softmax(LOGITS))
    top2 = np.where(np.isin(np.arange(5), [0, 1]), probs, 0.0)
    np.testing.assert_allclose(empirical_eager(LOGITS, 20000, top_k=2), top2 / top2.sum(), atol=0.02)
    # Sorted probs ~ .42 (0) .25 (1) .15 (3) .11 (2) .06 (4): mass before token 3 is .68 < .7, before 2 .83.
    nucleus = np.where(np.isin(np.arange(5), [0, 1, 3]), probs, 0.0)
    np.testing.assert_allclose(empirical_eager(LOGITS, 20000, top_p=0.7), nucleus / nucleus.sum(), atol=0.02)
    np.testing.assert_allclose(empirical_first_token(LOGITS, 20000, top_p=0.7), nucleus / nucleus.sum(),
                               atol=0.02)


def test_sample_rows_applies_each_rows_own_knobs_in_one_call():
    """Four blocks of rows with different knobs in one jitted call: each block has its own distribution."""
    n = 20000
    knobs = [(0.0, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.7), (1.5, 0, 1.0)]  # (temperature, top_k, top_p)
    temperature, top_k, top_p = (np.repeat(np.array(k, dtype), n) for k, dtype in
                                 zip(zip(*knobs), (np.float32, np.int32, np.float32)))
    keys = jax.random.split(jax.random.key(9), len(knobs) * n)
    tokens = np.asarray(jax.jit(sample_rows)(jnp.tile(jnp.asarray(LOGITS), (len(knobs) * n, 1)), keys,
                                             temperature, top_k, top_p)).reshape(len(knobs), n)
    freq = [np.bincount(row, minlength=5) / n for row in tokens]
    probs = np.exp(np_log_softmax(LOGITS))
    top2 = np.where(np.isin(np.arange(5), [0, 1]), probs, 0.0)
    nucleus = np.where(np.isin(np.arange(5), [0, 1, 3]), probs, 0.0)
    np.testing.assert_array_equal(freq[0], np.eye(5)[0])  # temperature 0: the argmax
    np.testing.assert_allclose(freq[1], top2 / top2.sum(), atol=0.02)
    np.testing.assert_allclose(freq[2], nucleus / nucleus.sum(), atol=0.02)
    np.testing.assert_allclose(freq[3], np.exp(np_log_softmax(LOGITS / 1.5)), atol=0.02)
    # The same rows alone take the path that does not sort, with the same distribution.
    alone = jax.jit(sample_rows)(jnp.tile(jnp.asarray(LOGITS), (n, 1)), keys[3 * n:], temperature[3 * n:],
                                 top_k[3 * n:], top_p[3 * n:])
    np.testing.assert_allclose(np.bincount(np.asarray(alone), minlength=5) / n,
                               np.exp(np_log_softmax(LOGITS / 1.5)), atol=0.02)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = ToyModel(vocab=7, seed=5, scale=0.3)
    initial_logits, state = make_inputs(batch=3, vocab=7, seed=5)
    greedy = jit_generate(initial_logits, state, model, max_new_tokens=6, eos_id=2)
    for kwargs in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=3, top_p=1e-6)):
        out = jit_generate(initial_logits, state, model, max_new_tokens=6, eos_id=2, method="sample",
                           rng=jax.random.key(11), temperature=2.0, **kwargs)
        np.testing.assert_array_equal(out.tokens, greedy.tokens)
        np.testing.assert_allclose(out.log_probs, greedy.log_probs, rtol=1e-5)


def test_top_k_never_samples_outside_top_k():
    vocab, k, decodes = 8, 3, 64
    model = ToyModel(vocab=vocab, seed=6, scale=0.3)
    initial_logits, state = make_inputs(batch=2, vocab=vocab, seed=6)
    out = jit_generate(initial_logits, state, model, max_new_tokens=5, eos_id=-1, method="sample",
                       rng=jax.random.key(3), top_k=k, temperature=5.0, num_decodes=decodes)
    tokens = np.asarray(out.tokens)
    for row in range(tokens.shape[0]):
        b = row // decodes
        logits, prev = np.asarray(initial_logits[b]), int(state["prev"][b])
        for t in range(tokens.shape[1]):
            assert tokens[row, t] in np.argsort(-logits)[:k]
            logits, prev = model.w[tokens[row, t]] + model.u[prev], tokens[row, t]


def test_num_decodes_greedy_repeats_each_prompt():
    model = ToyModel(vocab=5, seed=7)
    initial_logits, state = make_inputs(batch=2, vocab=5, seed=7)
    one = jit_generate(initial_logits, state, model, max_new_tokens=4, eos_id=-1)
    three = jit_generate(initial_logits, state, model, max_new_tokens=4, eos_id=-1, num_decodes=3)
    np.testing.assert_array_equal(three.tokens, np.repeat(one.tokens, 3, axis=0))


def brute_force_hypotheses(model, initial_logits, prev, vocab, steps, eos_id, alpha):
    """All distinct hypotheses (EOS only at the end; length < steps only if ending in EOS), scored."""
    scored = []
    for length in range(1, steps + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if eos_id in seq[:-1] or (length < steps and seq[-1] != eos_id):
                continue
            log_prob = model.sequence_log_prob(initial_logits, prev, list(seq))
            scored.append((log_prob / ((5 + length) / 6) ** alpha, seq))
    return sorted(scored, key=lambda s: -s[0])


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_search_equals_brute_force(alpha):
    vocab, steps, eos_id, batch = 4, 3, 2, 2
    beams = vocab ** steps
    model = ToyModel(vocab=vocab, seed=8, scale=1.0)
    initial_logits, state = make_inputs(batch=batch, vocab=vocab, seed=8)
    out = jit_beam_search(initial_logits, state, model, max_new_tokens=steps, eos_id=eos_id,
                          num_beams=beams, length_penalty=alpha)
    for b in range(batch):
        ref = brute_force_hypotheses(model, np.asarray(initial_logits[b]), int(state["prev"][b]), vocab,
                                     steps, eos_id, alpha)
        n = len(ref)
        np.testing.assert_allclose(out.scores[b, :n], [s for s, _ in ref], rtol=1e-5)
        assert np.all(np.isneginf(out.scores[b, n:])) and np.all(out.lengths[b, n:] == 0)
        best = ref[0][1]
        np.testing.assert_array_equal(out.tokens[b, 0, :len(best)], best)
        assert out.lengths[b, 0] == len(best)


def test_beam_search_sorted_and_consistent():
    vocab, steps, eos_id, beams, alpha = 6, 5, 1, 3, 0.6
    model = ToyModel(vocab=vocab, seed=9, scale=1.0)
    initial_logits, state = make_inputs(batch=2, vocab=vocab, seed=9)
    out = jit_beam_search(initial_logits, state, model, max_new_tokens=steps, eos_id=eos_id,
                          num_beams=beams, length_penalty=alpha)
    scores = np.asarray(out.scores)
    assert np.all(np.diff(scores, axis=1) <= 0) and np.all(np.isfinite(scores))
    for b, k in itertools.product(range(2), range(beams)):
        length = int(out.lengths[b, k])
        seq = list(np.asarray(out.tokens[b, k, :length]))
        assert np.all(np.asarray(out.tokens[b, k, length:]) == 0)
        assert eos_id not in seq[:-1] and (length == steps or seq[-1] == eos_id)
        log_prob = model.sequence_log_prob(np.asarray(initial_logits[b]), int(state["prev"][b]), seq)
        np.testing.assert_allclose(out.log_probs[b, k], log_prob, rtol=1e-5)
        np.testing.assert_allclose(scores[b, k], log_prob / float(brevity_penalty(length, alpha)), rtol=1e-5)


def test_beam_search_keeps_early_finished_hypothesis():
    vocab, eos_id = 5, 0
    model = ToyModel(vocab=vocab, seed=10, scale=0.1)
    model.w[:, eos_id] = -30.0  # after the first token EOS is practically impossible
    initial_logits = jnp.log(jnp.array([[0.5, 0.2, 0.1, 0.1, 0.1]], jnp.float32))
    state = {"prev": jnp.zeros((1,), jnp.int32), "count": jnp.zeros((1,), jnp.int32),
             "index": jnp.array(0, jnp.int32)}
    out = jit_beam_search(initial_logits, state, model, max_new_tokens=4, eos_id=eos_id, num_beams=2,
                          length_penalty=0.0)
    np.testing.assert_array_equal(out.tokens[0, 0], [eos_id, 0, 0, 0])
    np.testing.assert_allclose(out.scores[0, 0], np.log(0.5), rtol=1e-5)
    assert out.lengths[0, 1] == 4 and out.scores[0, 1] < np.log(0.2)


def test_beam_search_terminates_early():
    model = ToyModel(vocab=5, seed=11)
    initial_logits = jnp.log(jnp.array([[0.9, 0.025, 0.025, 0.025, 0.025]] * 2, jnp.float32))
    state = {"prev": jnp.zeros((2,), jnp.int32), "count": jnp.zeros((2,), jnp.int32),
             "index": jnp.array(0, jnp.int32)}
    calls: list[int] = []
    out = jit_beam_search(initial_logits, state, counting_model(model, calls), max_new_tokens=6, eos_id=0,
                          num_beams=1, length_penalty=1.0)
    jax.block_until_ready(out)
    # log(0.9) beats any live beam's bound log(0.025) / ((5 + 6) / 6): no model call is needed.
    assert not calls
    np.testing.assert_array_equal(out.lengths, [[1], [1]])


def test_loop_is_traced_a_bounded_number_of_times():
    initial_logits, state = make_inputs(batch=2, vocab=5, seed=12)
    for search in ("generate", "beam"):
        counts = []
        for steps in (3, 12):
            model = ToyModel(vocab=5, seed=12)
            if search == "generate":
                run = lambda m=model, s=steps: jit_generate(initial_logits, state, m, max_new_tokens=s,
                                                            eos_id=1, method="sample", rng=jax.random.key(0))
            else:
                run = lambda m=model, s=steps: jit_beam_search(initial_logits, state, m, max_new_tokens=s,
                                                               eos_id=1, num_beams=3)
            jax.block_until_ready(run())
            jax.block_until_ready(run())  # a second call with the same shapes reuses the compilation
            counts.append(model.traces)
        assert counts[0] == counts[1] <= 2, (search, counts)


def test_expand_and_gather_beams():
    state = {"x": jnp.arange(6).reshape(2, 3), "shared": jnp.array(5)}
    expanded = expand_state(state, 2)
    np.testing.assert_array_equal(expanded["x"], [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])
    assert expanded["shared"].ndim == 0
    beams = {"x": jnp.arange(6) * 10, "shared": jnp.array(5)}  # batch 2 x 3 beams
    gathered = gather_beams(beams, jnp.array([[2, 2], [0, 1]]))
    np.testing.assert_array_equal(gathered["x"], [20, 20, 30, 40])
    assert int(gathered["shared"]) == 5


def test_bad_inputs_raise_clear_errors():
    model = ToyModel(vocab=5, seed=13)
    initial_logits, state = make_inputs(batch=2, vocab=5, seed=13)
    with pytest.raises(ValueError, match="state leaf"):
        generate(initial_logits, {**state, "prev": jnp.zeros((3,), jnp.int32)}, model,
                 max_new_tokens=2, eos_id=1)
    with pytest.raises(ValueError, match="method"):
        generate(initial_logits, state, model, max_new_tokens=2, eos_id=1, method="beam")
    with pytest.raises(ValueError, match="rng"):
        generate(initial_logits, state, model, max_new_tokens=2, eos_id=1, method="sample")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(initial_logits, state, model, max_new_tokens=0, eos_id=1)
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(initial_logits, jax.random.key(0), top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(initial_logits, jax.random.key(0), temperature=0.0)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(initial_logits, state, model, max_new_tokens=2, eos_id=1, num_beams=0)
    with pytest.raises(ValueError, match="tokens_to_logits"):
        generate(initial_logits, state, lambda t, s: (jnp.zeros((2, 4)), s), max_new_tokens=2, eos_id=-1)
