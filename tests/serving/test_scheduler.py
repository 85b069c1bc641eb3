"""serving.scheduler (+ kv_blocks): continuous batching gives each request the tokens it gets alone from
`InferenceModule.generate`, with and without chunked prefill and the prefix cache, for Llama and T5;
stopping, streaming, cancellation, timeouts, back-pressure, bad input and failures."""
import asyncio
import functools
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from lmops_jax.inference.inference_module import InferenceModule
from lmops_jax.models import encoder_decoder, model
from lmops_jax.serving import scheduler as scheduler_lib
from lmops_jax.serving.engine import Engine
from lmops_jax.serving.kv_blocks import BlockPool
from lmops_jax.serving.scheduler import (FinishEvent, QueueFull, RequestError, SamplingParams, Scheduler,
                                         SchedulerUnavailable, TokenEvent)
from tests.helpers import tiny_llama

LLAMA = tiny_llama(max_length=64)
T5 = model.EncoderDecoderModel(encoder_decoder.T5Config(
    vocab_size=128, d_model=32, num_encoder_layers=1, num_decoder_layers=2, num_heads=2, head_dim=16, mlp_dim=64))
GREEDY = dict(temperature=0.0)
NEW = 8  # reference tokens per prompt


@functools.lru_cache(maxsize=None)
def params_of(m):
    return nn.meta.unbox(m.init_params(jax.random.key(0), m.input_shapes(1, {"inputs": 8, "targets": 8})))


@functools.lru_cache(maxsize=None)
def engine(name: str) -> Engine:
    if name == "t5":
        return Engine(T5, params_of(T5), max_slots=3, max_length=32, max_prompt_length=16)
    if name.startswith("paged"):  # paged_small: 24 blocks of 4, half what 4 full rows take, so rows are preempted
        return Engine(LLAMA, params_of(LLAMA), max_slots=4, max_length=64, max_prompt_length=40, kv_cache="paged",
                      block_size=4, kv_blocks=24 if name == "paged_small" else None, prefix_cache="cached" in name)
    return Engine(LLAMA, params_of(LLAMA), max_slots=4, max_length=64, max_prompt_length=40,
                  prefix_cache=name == "cached", prefix_cache_blocks=16 if name == "cached" else None, block_size=4)


@functools.lru_cache(maxsize=None)
def requests(name: str) -> tuple:
    """32 (prompt, params, expected tokens, expected summed logprob or None) of mixed lengths; every other
    Llama prompt starts with the same 12 tokens. Expected: InferenceModule alone, greedy, eos_id=-1,
    cut at max_tokens or at the request's stop token."""
    m = T5 if name == "t5" else LLAMA
    rng = np.random.default_rng(0)
    shared = rng.integers(1, 128, 12).tolist()
    reference = InferenceModule(m, params_of(m), bos_id=None, max_length=64)
    out = []
    for i in range(32 if name != "t5" else 8):
        if name == "t5":
            prompt = rng.integers(1, 128, int(rng.integers(1, 17))).tolist()
        else:
            prompt = (shared if i % 2 else []) + rng.integers(1, 128, int(rng.integers(1, 29))).tolist()
        ref = reference.generate([prompt], max_new_tokens=NEW, eos_id=-1)
        tokens = ref.tokens[0]
        max_tokens = NEW if i % 3 else int(rng.integers(1, NEW))
        stop = (tokens[3],) if i % 5 == 4 else ()
        expected = tokens[:max_tokens]
        if stop:
            expected = expected[:expected.index(stop[0]) + 1] if stop[0] in expected else expected
        logprob = float(ref.log_probs[0]) if len(expected) == NEW else None
        params = SamplingParams(max_tokens=max_tokens, stop_token_ids=stop, logprobs=True, **GREEDY)
        out.append((prompt, params, expected, logprob))
    if name == "llama":  # the stop token means what InferenceModule's eos_id means
        prompt, params, expected, _ = next(r for r in out if r[1].stop_token_ids)
        assert reference.generate([prompt], max_new_tokens=NEW, eos_id=params.stop_token_ids[0]).tokens[0] == \
            expected[:params.max_tokens]
    return tuple(out)


def serve(scheduler: Scheduler, reqs, seed: int = 1) -> list[tuple[list[int], str, list[float]]]:
    """Submits the requests a few per step (0 to 3) and steps until all are done: (tokens, reason, logprobs)."""
    rng = np.random.default_rng(seed)
    handles, pending = [], list(reqs)
    while pending or scheduler.step():
        for _ in range(min(len(pending), int(rng.integers(0, 4)))):
            prompt, params = pending.pop(0)[:2]
            handles.append(scheduler.submit(prompt, params))
    results = []
    for handle in handles:
        events = list(handle.iter_events(timeout=0))
        results.append(([e.token_id for e in events[:-1]], events[-1].finish_reason,
                        [e.logprob for e in events[:-1]]))
    assert scheduler.engine.free_slots == list(range(scheduler.engine.max_slots))
    return results


@pytest.mark.parametrize("name,chunk", [("llama", None), ("cached", None), ("cached", 8), ("t5", None),
                                        ("paged", None), ("paged_cached", 8)])
def test_continuous_batching_gives_each_request_its_tokens_alone(name, chunk, monkeypatch):
    reqs = requests("t5" if name == "t5" else "llama")
    fed = []  # prompt tokens per prefill call
    prefill = engine(name).prefill
    monkeypatch.setattr(engine(name), "prefill",
                        lambda tokens, n, prefix, adapter: fed.append(n) or prefill(tokens, n, prefix, adapter))
    scheduler = Scheduler(engine(name), max_queue=32, prefill_chunk=chunk)
    for (tokens, reason, logprobs), (_, params, expected, logprob) in zip(serve(scheduler, reqs), reqs):
        assert tokens == expected
        assert reason == ("stop" if tokens[-1:] == list(params.stop_token_ids) else "length")
        if logprob is not None:
            np.testing.assert_allclose(sum(logprobs), logprob, rtol=1e-4, atol=1e-4)
    stats = scheduler.stats()
    assert stats.generated_tokens == sum(len(r[2]) for r in reqs) and stats.waiting == stats.running == 0
    assert (stats.prefix_cache_hits > 0) == ("cached" in name)
    if engine(name).paged:  # one compiled step per block-table width used: 1, 2, 4, ... of its 16 blocks
        assert 1 < engine(name).trace_counts["generate"] <= 5
    else:
        assert engine(name).trace_counts["generate"] == 1
    assert sum(fed) == sum(len(r[0]) for r in reqs) - stats.prefix_cache_hits  # hits are not prefilled
    assert max(fed) == chunk if chunk else len(fed) == len(reqs)  # chunks of at most `chunk` tokens


def test_paged_rows_out_of_blocks_are_preempted_and_recomputed_never_dropped():
    reqs = requests("llama")
    scheduler = Scheduler(engine("paged_small"), max_queue=32)
    peak = 0
    original_step = scheduler.step

    def step():
        nonlocal peak
        peak = max(peak, len(scheduler._running))
        return original_step()
    scheduler.step = step
    for (tokens, reason, logprobs), (_, params, expected, logprob) in zip(serve(scheduler, reqs), reqs):
        assert tokens == expected and reason in ("stop", "length")
        if logprob is not None:
            np.testing.assert_allclose(sum(logprobs), logprob, rtol=1e-4, atol=1e-4)
    stats = scheduler.stats()
    assert stats.preemptions > 0 and stats.generated_tokens == sum(len(r[2]) for r in reqs)
    assert scheduler.blocks.blocks_referenced == 0 and peak > 1


def test_paged_rows_run_more_requests_than_dense_rows_in_the_same_bytes():
    from lmops_jax.serving import engine as engine_lib
    budget = 2 * engine_lib.kv_bytes_per_row(LLAMA, 64)  # two dense rows of 64 positions
    dense = Engine(LLAMA, params_of(LLAMA), max_slots=2, max_length=64)
    paged = Engine(LLAMA, params_of(LLAMA), max_slots=8, max_length=64, kv_cache="paged", block_size=4,
                   kv_cache_bytes=budget)
    assert paged.kv_blocks * engine_lib.kv_bytes_per_block(LLAMA, 4, 64) <= budget
    peaks = []
    for e in (dense, paged):
        scheduler = Scheduler(e, max_queue=8)
        handles = [scheduler.submit(list(range(1, 6 + i)), SamplingParams(max_tokens=4, **GREEDY)) for i in range(8)]
        peak = 0
        while scheduler.step():
            peak = max(peak, scheduler.stats().running)
        peaks.append(peak)
        assert all(h.result(0)[1] == "length" for h in handles)
    assert peaks == [2, 8]


def test_paged_prefix_hits_share_blocks_without_copying():
    scheduler = Scheduler(engine("paged_cached"), max_queue=4)
    shared = np.random.default_rng(6).integers(1, 128, 12).tolist()
    first = scheduler.submit(shared + [5, 6, 7], SamplingParams(max_tokens=6, **GREEDY))
    scheduler.step()  # first is prefilled and running: its 3 full prompt blocks are cached
    second = scheduler.submit(shared + [9, 9], SamplingParams(max_tokens=6, **GREEDY))
    scheduler.step()
    rows = {r.id: r.blocks for r in scheduler._running.values()}
    assert rows[first.request_id][:3] == rows[second.request_id][:3]  # the same blocks, referenced twice
    assert scheduler.blocks.blocks_referenced == len(set(rows[first.request_id]) | set(rows[second.request_id]))
    while scheduler.step():
        pass
    alone = Scheduler(engine("paged"), max_queue=4)
    again = alone.submit(shared + [9, 9], SamplingParams(max_tokens=6, **GREEDY))
    while alone.step():
        pass
    assert second.result(0) == again.result(0) and scheduler.stats().prefix_cache_hits == 12


def test_prefix_cache_counts_hits_and_keeps_outputs():
    scheduler = Scheduler(engine("cached"), max_queue=4)
    rng = np.random.default_rng(5)
    shared = rng.integers(1, 128, 12).tolist()
    a, b = shared + [5, 6, 7, 8, 9], shared + [9, 8, 7, 6, 5, 4]
    run = lambda prompt: scheduler.submit(prompt, SamplingParams(max_tokens=4, **GREEDY))  # noqa: E731
    first = run(a)
    while scheduler.step():
        pass
    stats = scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (17, 0)
    second, third = run(b), run(a)
    while scheduler.step():
        pass
    stats = scheduler.stats()
    # b reuses the 3 shared blocks; a again its 4 full blocks (its 17th token is always prefilled).
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (17 + 18 + 17, 12 + 16)
    events = list(third.iter_events(timeout=0))
    assert events[-1].usage.cached_tokens == 16
    assert [e.token_id for e in events[:-1]] == first.result(0)[0]
    assert second.result(0)[1] == "length"


def test_prefix_cache_evicts_unreferenced_tails_first():
    cache = BlockPool(num_blocks=3, block_size=2)
    held, copies = cache.cache_prompt([1, 2, 3, 4, 5], [])
    assert copies == [(0, 0), (1, 1)]
    cache.release(held)
    other, copies = cache.cache_prompt([7, 7, 8], [])
    assert copies == [(0, 2)]  # the free block
    # The pool is full: the next block evicts the least recently released tail ([3, 4]), not its head.
    more, copies = cache.cache_prompt([9, 9, 1], [])
    assert copies == [(0, 1)]
    assert cache.match([1, 2, 3, 4, 5]) == held[:1]
    # Everything is referenced now: nothing can be evicted, so nothing more is cached.
    assert cache.cache_prompt([6, 6, 6], []) == ([], [])


def test_stop_strings_text_deltas_eos_and_logprobs():
    detokenize = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)  # noqa: E731
    prompt, _, expected, _ = requests("llama")[1]
    text = detokenize(expected)
    stop = text[4:6]
    scheduler = Scheduler(engine("llama"), max_queue=4, detokenize=detokenize, eos_id=expected[6])
    handles = [scheduler.submit(prompt, SamplingParams(max_tokens=NEW, stop=(stop,), logprobs=True, top_logprobs=3,
                                                       **GREEDY)),
               scheduler.submit(prompt, SamplingParams(max_tokens=NEW, **GREEDY))]
    while scheduler.step():
        pass
    events = list(handles[0].iter_events(timeout=0))
    cut = text.find(stop)
    assert [e.token_id for e in events[:-1]] == expected[:cut + len(stop)]
    assert "".join(e.text_delta for e in events) == text[:cut] and events[-1].finish_reason == "stop"
    first = engine("llama").prefill(prompt).logits[0]
    np.testing.assert_allclose(events[0].logprob, jax.nn.log_softmax(first)[expected[0]], rtol=1e-5)
    best = np.argsort(-np.asarray(jax.nn.log_softmax(first)))[:3]
    assert [t for t, _ in events[0].top_logprobs] == best.tolist() and best[0] == expected[0]
    np.testing.assert_allclose([x for _, x in events[0].top_logprobs], jax.nn.log_softmax(first)[best], rtol=1e-5)
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0][0] == e.token_id for e in events[:-1])
    events = list(handles[1].iter_events(timeout=0))  # ends at eos_id, which is kept, with no text
    tokens = [e.token_id for e in events[:-1]]
    assert tokens == expected[:expected.index(expected[6]) + 1]
    assert "".join(e.text_delta for e in events) == detokenize(tokens[:-1])
    assert events[-1].finish_reason == "stop" and events[0].logprob is None


def test_cancel_frees_the_slot_within_a_step():
    scheduler = Scheduler(engine("llama"), max_queue=8)
    prompt = requests("llama")[0][0]
    handles = [scheduler.submit(prompt, SamplingParams(max_tokens=20, **GREEDY), request_id=f"r{i}")
               for i in range(5)]
    scheduler.step()
    assert scheduler.stats().slots_used == 4 and scheduler.stats().waiting == 1
    scheduler.cancel("r1")
    scheduler.cancel("unknown")
    scheduler.step()
    tokens, reason = handles[1].result(0)
    assert reason == "cancelled" and len(tokens) == 1
    stats = scheduler.stats()
    assert stats.waiting == 0 and stats.slots_used == 4  # r4 took r1's slot in the same step
    scheduler.cancel("r4")  # a request still prefilling or waiting is cancelled too
    scheduler.stop(drain=False)
    assert [h.result(0)[1] for h in handles[:1] + handles[2:]] == ["cancelled"] * 4
    assert engine("llama").free_slots == [0, 1, 2, 3]


def test_a_full_queue_raises_queue_full():
    scheduler = Scheduler(engine("llama"), max_queue=2)
    handles = [scheduler.submit([1, 2, 3], SamplingParams(max_tokens=2)) for _ in range(2)]
    with pytest.raises(QueueFull):
        scheduler.submit([1, 2, 3], SamplingParams(max_tokens=2))
    assert scheduler.stats().rejected == 1
    scheduler.stop(drain=True)
    assert [h.result(0)[1] for h in handles] == ["length", "length"]
    with pytest.raises(SchedulerUnavailable, match="stopping"):
        scheduler.submit([1, 2, 3])


@pytest.mark.parametrize("prompt,params,field", [
    ([], {}, "prompt"),
    ([1, 128], {}, "prompt"),
    ("abc", {}, "prompt"),
    ([1] * 41, {}, "prompt"),
    ([1], {"max_tokens": 0}, "max_tokens"),
    ([1] * 40, {"max_tokens": 25}, "max_tokens"),
    ([1], {"temperature": -0.5}, "temperature"),
    ([1], {"top_k": -1}, "top_k"),
    ([1], {"top_p": 0.0}, "top_p"),
    ([1], {"seed": -1}, "seed"),
    ([1], {"stop_token_ids": (300,)}, "stop_token_ids"),
    ([1], {"stop": ("x",)}, "stop"),
    ([1], {"timeout_s": 0}, "timeout_s"),
])
def test_bad_input_raises_request_error_naming_the_field(prompt, params, field):
    scheduler = Scheduler(engine("llama"), max_queue=2)
    with pytest.raises(RequestError, match=f"^{field}: ") as info:
        scheduler.submit(prompt, SamplingParams(**params))
    assert info.value.field == field and scheduler.stats().waiting == 0


def test_duplicate_request_ids_are_refused():
    scheduler = Scheduler(engine("llama"), max_queue=2)
    scheduler.submit([1, 2], request_id="same")
    with pytest.raises(RequestError, match="^request_id: "):
        scheduler.submit([1, 2], request_id="same")
    scheduler.stop(drain=False)


def test_a_request_past_its_timeout_ends_with_what_it_has(monkeypatch):
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(scheduler_lib, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    scheduler = Scheduler(engine("llama"), max_queue=2, request_timeout_s=10.0)
    slow = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=20, **GREEDY))
    quick = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=20, timeout_s=100.0, **GREEDY))
    for _ in range(3):
        scheduler.step()
    clock.now = 11.0
    scheduler.step()
    tokens, reason = slow.result(0)
    assert reason == "timeout" and len(tokens) == 3
    scheduler.stop(drain=True)
    assert quick.result(0)[1] == "length"


def test_a_failing_request_ends_alone_and_an_engine_failure_marks_unhealthy(monkeypatch):
    calls = []

    def detokenize(ids):
        calls.append(len(ids))
        if calls.count(2) == 1 and len(ids) == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
        return "x" * len(ids)

    scheduler = Scheduler(engine("llama"), max_queue=4, detokenize=detokenize)
    broken = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=4, **GREEDY))
    fine = scheduler.submit([4, 5, 6], SamplingParams(max_tokens=4, **GREEDY))
    while scheduler.step():
        pass
    events = list(broken.iter_events(timeout=0))
    assert events[-1].finish_reason == "error" and "UnicodeDecodeError" in events[-1].error
    assert fine.result(0)[1] == "length" and scheduler.healthy

    def fail(sampling, top_logprobs=False):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine("llama"), "generate", fail)
    handles = [scheduler.submit([1, 2, 3], SamplingParams(max_tokens=4)) for _ in range(2)]
    assert not scheduler.step()
    assert [h.result(0)[1] for h in handles] == ["error", "error"]
    stats = scheduler.stats()
    assert not stats.healthy and "device lost" in stats.error and stats.finished["error"] == 3
    with pytest.raises(SchedulerUnavailable, match="device lost"):
        scheduler.submit([1, 2, 3])
    assert engine("llama").free_slots == [0, 1, 2, 3]


def test_the_background_loop_streams_to_threads_and_asyncio_and_drains():
    reqs = requests("llama")[:6]
    scheduler = Scheduler(engine("llama"), max_queue=8)
    scheduler.start()
    handles = [scheduler.submit(prompt, params) for prompt, params, _, _ in reqs[:5]]

    async def consume():
        handle = scheduler.submit(reqs[5][0], reqs[5][1])
        return [event async for event in handle.aiter_events()]

    events = asyncio.run(consume())
    assert isinstance(events[-1], FinishEvent) and all(isinstance(e, TokenEvent) for e in events[:-1])
    assert [e.token_id for e in events[:-1]] == reqs[5][2]
    for handle, (_, _, expected, _) in zip(handles, reqs):
        assert handle.result(timeout=120)[0] == expected
    scheduler.stop(drain=True, timeout=60)
    assert not scheduler._thread.is_alive()


def test_a_scheduler_bug_in_the_loop_fails_every_request_instead_of_hanging(monkeypatch):
    scheduler = Scheduler(engine("llama"), max_queue=2)

    def broken_admission():
        raise KeyError("slot bookkeeping")

    monkeypatch.setattr(scheduler, "_admit", broken_admission)
    scheduler.start()
    handle = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=2))
    assert handle.result(timeout=60)[1] == "error"
    scheduler._thread.join(60)
    assert not scheduler._thread.is_alive() and not scheduler.healthy and "slot bookkeeping" in scheduler.error
