"""serving.speculative: greedy speculation gives exactly the served model's greedy tokens (a draft that
agrees sometimes, the model itself as draft), rejection sampling keeps the served model's distribution,
the counters, the prefix cache with a draft, and the configurations it refuses."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmops_jax.inference import decoding
from lmops_jax.models import encoder_decoder, model
from lmops_jax.serving.engine import Engine, SlotSampling
from lmops_jax.serving.scheduler import SamplingParams, Scheduler
from lmops_jax.serving.speculative import DraftMismatch, SpeculativeEngine, accept_drafts
from tests.helpers import tiny_llama

VOCAB = 32
TARGET = tiny_llama(vocab_size=VOCAB, d_model=32, num_layers=2, max_length=48)
SMALL = tiny_llama(vocab_size=VOCAB, d_model=32, num_layers=1, max_length=48)
ENGINE_ARGS = dict(max_slots=3, max_length=48, max_prompt_length=24, prefill_buckets=(24,), prefix_cache=True, prefix_cache_blocks=12,
                   block_size=4)


@functools.lru_cache(maxsize=None)
def params_of(m: model.BaseModel, seed: int = 0):
    return nn.meta.unbox(m.init_params(jax.random.key(seed), m.input_shapes(1, {"targets": 8})))


@functools.lru_cache(maxsize=None)
def draft_params():
    """The served model's params plus noise on one layer: a draft that agrees with it sometimes."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.8 * jax.random.normal(jax.random.key(1), x.shape)
        if "layers_1" in jax.tree_util.keystr(path) else x, params_of(TARGET))


def serve_all(engine: Engine, requests) -> tuple[list[list[int]], Scheduler]:
    scheduler = Scheduler(engine, max_queue=64, eos_id=None)
    handles = [scheduler.submit(prompt, params) for prompt, params in requests]
    while scheduler.step():
        pass
    return [h.result(timeout=0)[0] for h in handles], scheduler


def greedy_requests():
    """Mixed prompt lengths and max_tokens; one fills its row (24 + 24 = max_length); repeated prefixes."""
    rng = np.random.default_rng(0)
    shared = rng.integers(1, VOCAB, 8).tolist()
    lengths = [(3, 9), (13, 17), (24, 24), (6, 1), (10, 12), (14, 5), (9, 20)]
    return [((shared if i % 2 else []) + rng.integers(1, VOCAB, n).tolist(), SamplingParams(max_tokens=m,
                                                                                              temperature=0.0))
            for i, (n, m) in enumerate(lengths)]


@functools.lru_cache(maxsize=None)
def plain_greedy():
    return serve_all(Engine(TARGET, params_of(TARGET), **ENGINE_ARGS), greedy_requests())[0]


def test_paged_speculation_is_the_served_models_greedy_output():
    args = dict(ENGINE_ARGS, kv_cache="paged", prefix_cache_blocks=None, kv_blocks=16)  # < 2 rows: preempts
    engine = SpeculativeEngine(TARGET, params_of(TARGET), draft_model=TARGET, draft_params=draft_params(),
                               num_draft_tokens=3, **args)
    requests = [(prompt, dataclasses.replace(params, logprobs=True, top_logprobs=2 * (i % 2)))
                for i, (prompt, params) in enumerate(greedy_requests())]
    scheduler = Scheduler(engine, max_queue=64, eos_id=None)
    handles = [scheduler.submit(prompt, params) for prompt, params in requests]
    while scheduler.step():
        pass
    events = [list(h.iter_events(timeout=0))[:-1] for h in handles]
    assert [[e.token_id for e in mine] for mine in events] == plain_greedy()
    stats = scheduler.stats()
    assert stats.spec_accepted_tokens > 0 and stats.prefix_cache_hits > 0 and stats.preemptions > 0
    for i, mine in enumerate(events):  # greedy: the likeliest alternative is the token itself
        assert all((e.top_logprobs[0] == (e.token_id, pytest.approx(e.logprob))) if i % 2 else not e.top_logprobs
                   for e in mine)


@pytest.mark.parametrize("draft", ["noisy", "self", "small"])
def test_greedy_speculation_is_the_served_models_greedy_output(draft):
    draft_model, dparams = {"noisy": (TARGET, draft_params()), "self": (TARGET, params_of(TARGET)),
                            "small": (SMALL, params_of(SMALL, 2))}[draft]
    engine = SpeculativeEngine(TARGET, params_of(TARGET), draft_model=draft_model, draft_params=dparams,
                               num_draft_tokens=3, **ENGINE_ARGS)
    tokens, scheduler = serve_all(engine, greedy_requests())
    assert tokens == plain_greedy()
    stats = scheduler.stats()
    assert stats.spec_draft_tokens == 3 * stats.spec_drafts > 0
    assert stats.generated_tokens == sum(len(t) for t in tokens)
    assert stats.prefix_cache_hits > 0
    if draft == "self":  # every draft accepted: up to k + 1 tokens per verification
        assert stats.spec_accepted_tokens == stats.spec_draft_tokens
        assert stats.steps < stats.generated_tokens / 2
    else:  # the noisy copy agrees sometimes; the small random model may never
        assert (draft == "noisy") <= stats.spec_accepted_tokens < stats.spec_draft_tokens
    assert engine.trace_counts["speculate"] == 1


def total_variation(samples: np.ndarray, probs: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.bincount(samples, minlength=len(probs)) / len(samples) - probs).sum())


def test_rejection_sampling_keeps_the_served_distribution():
    """The first token a verification emits (d_1 if accepted, else the resampled one) follows p_1, and
    so does the second (given the first), over 40000 rows; accepting drafts unconditionally would give
    q instead, far outside the bound."""
    n, k, vocab = 40000, 2, 6
    p = jax.nn.log_softmax(jnp.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]] * (k + 1)))
    q = jax.nn.log_softmax(jnp.array([[-1.0, 0.0, 2.5, 1.0, 0.0, 1.0]] * k))
    key_draft, key_accept = jax.random.split(jax.random.key(0))
    drafts = jax.random.categorical(key_draft, q, shape=(n, k)).astype(jnp.int32)
    accepted, nxt = accept_drafts(jnp.broadcast_to(p, (n, k + 1, vocab)), jnp.broadcast_to(q, (n, k, vocab)),
                                  drafts, jax.random.split(key_accept, n))
    accepted, nxt, drafts = map(np.asarray, (accepted, nxt, drafts))
    first = np.where(accepted > 0, drafts[:, 0], nxt)
    probs = np.exp(np.asarray(p[0]))
    bound = 0.02
    assert total_variation(first, probs) < bound
    assert total_variation(drafts[:, 0], probs) > 10 * bound  # the unconditional-acceptance bug
    second = np.where(accepted > 1, drafts[:, 1], nxt)[accepted > 0]
    assert total_variation(second, probs) < 2 * bound


def test_sampled_speculation_keeps_the_served_models_distribution():
    """End to end at temperature 1/4: a slot's first token comes from its prefill; its second is the first
    one a verification decides, and given the first it follows the served model's distribution (not the
    draft's)."""
    target, draft = params_of(SMALL, 3), params_of(SMALL, 4)
    slots, rounds, prompt = 256, 4, [5, 9, 2]
    engine = SpeculativeEngine(SMALL, target, draft_model=SMALL, draft_params=draft, num_draft_tokens=2,
                               max_slots=slots, max_length=8, max_prompt_length=4)
    sampling = SlotSampling.greedy(slots)
    pairs = []
    for r in range(rounds):
        for slot in range(slots):
            engine.insert(engine.prefill(prompt), slot)
            sampling.set(slot, temperature=0.25, top_k=0, top_p=1.0, seed=r * slots + slot)
        pairs.append(engine.generate(sampling).tokens[:, :2])
        for slot in range(slots):
            engine.free(slot)
    pairs = np.concatenate(pairs)
    first = int(np.bincount(pairs[:, 0]).argmax())
    given = lambda params: np.asarray(jax.nn.softmax(4.0 * SMALL.prefill(  # noqa: E731
        params, jnp.array([prompt + [first]]), jnp.array([4]), SMALL.init_cache(1, 8))[0][0]))
    seconds = pairs[pairs[:, 0] == first, 1]
    assert len(seconds) > 300
    assert total_variation(seconds, given(target)) < 0.1
    assert total_variation(seconds, given(draft)) > 0.3


def test_refused_configurations():
    with pytest.raises(DraftMismatch, match="vocab_size 16 .* vocab_size 32"):
        SpeculativeEngine(TARGET, params_of(TARGET), draft_model=tiny_llama(vocab_size=16, d_model=32),
                          draft_params=None, max_slots=1, max_length=8)
    t5 = model.EncoderDecoderModel(encoder_decoder.T5Config(vocab_size=VOCAB, d_model=16, num_encoder_layers=1,
                                                            num_decoder_layers=1, num_heads=2, head_dim=8,
                                                            mlp_dim=32))
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        SpeculativeEngine(t5, None, draft_model=TARGET, draft_params=None, max_slots=1, max_length=8)
    with pytest.raises(NotImplementedError, match="several at once"):
        t5.decode_tokens(None, jnp.zeros((1, 2), jnp.int32), None)


def test_row_log_probs_is_what_sample_rows_draws():
    logits = jax.random.normal(jax.random.key(0), (4, 10)) * 3
    temperature, top_k, top_p = jnp.array([0.0, 1.0, 0.5, 2.0]), jnp.array([0, 3, 0, 0]), jnp.array([1, 1, 0.7, 1.0])
    logp = decoding.row_log_probs(logits, temperature, top_k, top_p)
    keys = jax.random.split(jax.random.key(1), 20000)
    draws = jax.vmap(lambda key: decoding.sample_rows(logits, jax.random.split(key, 4), temperature, top_k,
                                                      top_p))(keys)
    for row in range(4):
        assert total_variation(np.asarray(draws[:, row]), np.exp(np.asarray(logp[row]))) < 0.02
