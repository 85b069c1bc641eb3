"""The host side of serving: a bounded queue, admission into engine slots, and one loop that steps them.

    scheduler = Scheduler(engine, max_queue=64, eos_id=1, detokenize=vocab.decode)
    scheduler.start()                                            # a background thread runs step()
    handle = scheduler.submit([0, 72, 105], SamplingParams(max_tokens=32, temperature=0))
    for event in handle.iter_events(timeout=60): ...             # TokenEvent ..., then one FinishEvent
    scheduler.stop(drain=True)

A step (`step()`): ends the requests cancelled or past their timeout (freeing their slots), admits
waiting requests while slots are free (FIFO; a finished slot is refilled at the next step, which is
continuous batching), feeds prompts (a prompt-sharing model's prompts in chunks of `prefill_chunk`
tokens per step, interleaved with the decode steps of the running requests), then runs one engine
`generate` for all slots and streams each running request's token. A request stops on `eos_id`, its
`stop_token_ids` (the token is kept, with no text) or `stop` strings (the text ends before the string;
text that may begin one is held back until it cannot), at `max_tokens` or when its row is full
("length"), when cancelled, or at its timeout ("timeout", with what it has).

Prompts are token rows exactly as the model reads them (`BaseModel.prompt_tokens`: BOS or EOS already
added). Requests never break the loop: an error in one request's handling ends it with "error"; an
engine failure (a generate / insert that raises) ends every request with "error", stops the loop and
marks the scheduler unhealthy (`healthy`, `error`; `submit` then raises `SchedulerUnavailable`).

With a prefix cache (`engine.prefix_caching`) a prompt's cached leading blocks are reused and only the
rest is prefilled; newly prefilled full blocks are cached (`serving.kv_blocks`). Dense rows copy them in
and out of the engine's prefix pool; a paged engine's rows share them.

Paged KV cache (`engine.paged`): a request is admitted only when blocks for its whole prompt are free
(or evictable); before each step every running slot gets the blocks its next `engine.tokens_per_step`
positions need. When none are left, the most recently admitted running request is preempted: its
blocks are released and it goes back to the front of the queue, to be prefilled again from its prompt
and the tokens it already streamed (vLLM's recompute preemption), continuing where it stopped; nothing
it sent is lost or sent twice.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import secrets
import threading
import time
import uuid
from typing import Callable, Sequence

from lmops_jax.serving.adapters import AdapterResidency
from lmops_jax.serving.engine import Engine, Prefix, SlotSampling
from lmops_jax.serving.kv_blocks import BlockPool
from lmops_jax.serving.speculative import SpeculativeStepResult
# The request types are part of the scheduler's API: importable from here as well.
from lmops_jax.serving.requests import (FINISH_REASONS, Event, FinishEvent, QueueFull, RequestError,  # noqa: F401
                                        RequestHandle, SamplingParams, SchedulerUnavailable, TokenEvent, Usage,
                                        check_request)


@dataclasses.dataclass
class SchedulerStats:
    """A snapshot for /metrics: gauges (waiting ... kv_cache_usage) and cumulative counters."""

    waiting: int
    running: int  # requests holding a slot (prefilling or decoding)
    slots_used: int
    max_slots: int
    kv_cache_usage: float  # fraction of the KV cache requests hold (paged: blocks; dense: slots' rows)
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of them, cached
    prompt_tokens: int
    generated_tokens: int
    finished: dict[str, int]  # requests ended, by finish reason
    rejected: int  # submits refused with QueueFull
    steps: int  # engine generate steps
    healthy: bool
    error: str | None
    preemptions: int = 0  # running requests sent back to the queue for lack of KV blocks (paged)
    kv_blocks_used: int = 0  # blocks of the block pool (paged KV, or the dense prefix pool) referenced or cached
    kv_blocks_total: int = 0
    spec_drafts: int = 0  # speculative verifications, one per running slot and step
    spec_draft_tokens: int = 0  # tokens the draft proposed
    spec_accepted_tokens: int = 0  # of them, accepted by the served model


@dataclasses.dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    handle: RequestHandle
    deadline: float
    seed: int
    adapter: str | None = None  # the LoRA adapter it runs through (None: the base model)
    slot: int | None = None
    adapter_slot: int = 0  # while admitted: the engine's adapter slot holding `adapter`
    prefix: Prefix | None = None
    row: list[int] = dataclasses.field(default_factory=list)  # what is prefilled: prompt + tokens before a preemption
    blocks: list[int] = dataclasses.field(default_factory=list)  # block-pool blocks referenced
    admitted: int = -1  # admission order (the latest admitted is preempted first)
    cached_tokens: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    text_sent: str = ""


class Scheduler:
    """Continuous batching over an `Engine` (module docstring).

    Args:
      engine: the slot engine.
      max_queue: most requests waiting for a slot; more raise QueueFull.
      eos_id: the token that ends every request (None: none).
      detokenize: token ids -> text; gives text deltas and makes `stop` strings work.
      prefill_chunk: prompt tokens fed per step (None: whole prompts); smaller keeps running requests
        streaming while a long prompt is fed.
      request_timeout_s: default SamplingParams.timeout_s (None: no limit).
      model_id: part of the prefix-cache keys (a checkpoint or adapter name).
      adapters: the LoRA adapters requests may name (`serving.adapters`); a request is admitted once its
        adapter holds one of the engine's adapter slots, requests whose adapter must wait for a slot
        letting later ones pass.
    """

    def __init__(self, engine: Engine, *, max_queue: int = 64, eos_id: int | None = None,
                 detokenize: Callable[[list[int]], str] | None = None, prefill_chunk: int | None = None,
                 request_timeout_s: float | None = None, model_id: str = "",
                 adapters: AdapterResidency | None = None):
        if max_queue < 1 or (prefill_chunk is not None and prefill_chunk < 1):
            raise ValueError(f"Scheduler needs max_queue >= 1 and prefill_chunk None or >= 1, got {max_queue}, "
                             f"{prefill_chunk}")
        self.engine, self.max_queue, self.eos_id = engine, max_queue, eos_id
        self.detokenize, self.prefill_chunk, self.request_timeout_s = detokenize, prefill_chunk, request_timeout_s
        self.adapters = adapters
        pool_blocks = engine.kv_blocks if engine.paged else engine.prefix_cache_blocks
        self.blocks = (BlockPool(pool_blocks, engine.block_size, prefix_caching=engine.prefix_caching,
                                 model_id=model_id) if pool_blocks else None)
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._live: dict[str, _Request] = {}
        self._cancelled: set[str] = set()
        self._free_slots = collections.deque(range(engine.max_slots))
        self._prefilling: list[_Request] = []
        self._running: dict[int, _Request] = {}
        self._sampling = SlotSampling.greedy(engine.max_slots)
        self._counts = collections.Counter()
        self._finished = collections.Counter()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self.healthy = True
        self.error: str | None = None

    # ------------------------------------------------------------------------------ public API
    def submit(self, prompt_tokens: Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None, adapter: str | None = None) -> RequestHandle:
        """Queues a request (through LoRA adapter `adapter`, None: the base model); raises RequestError
        (bad input), QueueFull, or SchedulerUnavailable."""
        params = params or SamplingParams()
        prompt = check_request(prompt_tokens, params, self.engine, has_text=self.detokenize is not None)
        if adapter is not None and (self.adapters is None or adapter not in self.adapters.sources):
            known = sorted(self.adapters.sources) if self.adapters else []
            raise RequestError("model", f"no adapter {adapter!r} on this model (adapters: {known})")
        request_id = request_id or uuid.uuid4().hex
        timeout = params.timeout_s if params.timeout_s is not None else self.request_timeout_s
        request = _Request(request_id, prompt, params, RequestHandle(request_id),
                           math.inf if timeout is None else time.monotonic() + timeout,
                           secrets.randbits(63) if params.seed is None else params.seed, adapter)
        with self._lock:
            if not self.healthy or self._stopping:
                raise SchedulerUnavailable(self.error or "the scheduler is stopping")
            if request_id in self._live:
                raise RequestError("request_id", f"a request {request_id!r} is already running")
            if len(self._waiting) >= self.max_queue:
                self._counts["rejected"] += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the most this server queues")
            self._waiting.append(request)
            self._live[request_id] = request
            self._lock.notify_all()
        return request.handle

    def cancel(self, request_id: str) -> None:
        """Ends the request ("cancelled") and frees its slot at the next step; unknown ids are ignored."""
        with self._lock:
            if request_id in self._live:
                self._cancelled.add(request_id)
                self._lock.notify_all()

    def start(self) -> None:
        """Runs `step()` in a background thread until `stop`."""
        if self._thread is not None:
            raise RuntimeError("the scheduler is already started")
        self._thread = threading.Thread(target=self._loop, name="lmops-serving-scheduler", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests; drain: finish every submitted request first, else cancel them. Waits up
        to `timeout` s for the background thread."""
        with self._lock:
            self._stopping, self._drain = True, drain
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return
        while drain and self.step():
            pass
        self._end_all("cancelled")

    @property
    def idle(self) -> bool:
        """No request waiting, prefilling or running."""
        with self._lock:
            return not self._live

    def stats(self) -> SchedulerStats:
        with self._lock:
            used = self.engine.max_slots - len(self._free_slots)
            pool = self.blocks
            usage = pool.blocks_referenced / pool.num_blocks if self.engine.paged else used / self.engine.max_slots
            return SchedulerStats(
                waiting=len(self._waiting), running=len(self._running) + len(self._prefilling), slots_used=used,
                max_slots=self.engine.max_slots, kv_cache_usage=usage,
                prefix_cache_queries=pool.queries if pool else 0, prefix_cache_hits=pool.hits if pool else 0,
                prompt_tokens=self._counts["prompt_tokens"], generated_tokens=self._counts["generated_tokens"],
                finished=dict(self._finished), rejected=self._counts["rejected"], steps=self._counts["steps"],
                healthy=self.healthy, error=self.error, spec_drafts=self._counts["spec_drafts"],
                spec_draft_tokens=self._counts["spec_draft_tokens"],
                spec_accepted_tokens=self._counts["spec_accepted_tokens"], preemptions=self._counts["preemptions"],
                kv_blocks_used=pool.blocks_used if pool else 0, kv_blocks_total=pool.num_blocks if pool else 0)

    # ------------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._live:
                    self._lock.wait()
                if self._stopping and (not self._drain or not self._live):
                    break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a scheduler bug: fail loudly, never hang requests
                self._fail(e)
        self._end_all("cancelled")

    def step(self) -> bool:
        """One scheduling step (module docstring); returns whether requests remain."""
        if not self.healthy:
            return False
        self._end_cancelled_and_late()
        self._admit()
        self._feed_prompts()
        if self.engine.paged and self.healthy:
            self._grow_rows()
        if self._running and self.healthy:
            self._decode()
        with self._lock:
            return bool(self._live)

    def _end_cancelled_and_late(self) -> None:
        now = time.monotonic()
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            ending = [(r, "cancelled" if r.id in cancelled else "timeout") for r in self._live.values()
                      if r.id in cancelled or r.deadline <= now]
        for request, reason in ending:
            self._finish(request, reason)

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or not self._free_slots or (self._stopping and not self._drain):
                    return
                request = self._first_with_adapter()
                if request is None:
                    return  # every waiting request's adapter waits for an adapter slot
                request.row = request.prompt + request.tokens
                if self.engine.paged and not self._take_prompt_blocks(request):
                    self._release_adapter(request)
                    return  # FIFO: the head waits for blocks
                self._waiting.remove(request)
                request.slot = self._free_slots.popleft()
            self._prefilling.append(request)
            request.admitted = self._counts["admitted"]
            self._counts["admitted"] += 1
            if not request.tokens:
                self._counts["prompt_tokens"] += len(request.prompt)
            if self.blocks is not None and not self.engine.paged:
                self._guard(request, self._load_cached_prefix, request)

    def _first_with_adapter(self) -> _Request | None:
        """The first waiting request whose adapter (if any) now holds an adapter slot, which it keeps."""
        for request in self._waiting:
            if request.adapter is None:
                return request
            slot = self.adapters.acquire(request.adapter)
            if slot is not None:
                request.adapter_slot = slot
                return request
        return None

    def _release_adapter(self, request: _Request) -> None:
        if request.adapter is not None and request.adapter_slot:
            self.adapters.release(request.adapter)
            request.adapter_slot = 0

    def _take_prompt_blocks(self, request: _Request) -> bool:
        """Paged: references the row's cached leading blocks and allocates the rest; False (nothing
        held) when the pool cannot give them now."""
        hit = self.blocks.match(request.row, request.adapter)
        fresh = self.blocks.allocate(self.blocks.blocks_for(len(request.row)) - len(hit))
        if fresh is None:
            self.blocks.release(hit)
            return False
        self.blocks.record_lookup(len(request.row), len(hit))
        request.blocks = hit + fresh
        request.prefix = self.engine.paged_prefix(request.blocks, len(hit) * self.engine.block_size)
        request.cached_tokens = max(request.cached_tokens, request.prefix.length)
        return True

    def _load_cached_prefix(self, request: _Request) -> None:
        request.blocks = self.blocks.match(request.row, request.adapter)
        self.blocks.record_lookup(len(request.row), len(request.blocks))
        if request.blocks:
            request.prefix = self.engine.load_prefix(request.blocks)
            request.cached_tokens = request.prefix.length

    def _feed_prompts(self) -> None:
        """Prefills admitted prompts, FIFO, `prefill_chunk` tokens per step; inserts the finished ones."""
        budget = math.inf if self.prefill_chunk is None else self.prefill_chunk
        chunked = self.engine.model.prompt_shares_cache
        for request in list(self._prefilling):
            if budget <= 0 or not self.healthy:
                return
            done = 0 if request.prefix is None else request.prefix.length
            take = len(request.row) - done
            if chunked:
                take = min(take, budget)
            budget -= take
            if not self._guard(request, self._prefill, request, done, take):
                continue
            if request.prefix.length == len(request.row):
                self._engine_call(self._start_decoding, request)

    def _prefill(self, request: _Request, done: int, take: int) -> None:
        request.prefix = self.engine.prefill(request.row[done:done + take], take, request.prefix,
                                             request.adapter_slot)

    def _start_decoding(self, request: _Request) -> None:
        """Caches the prompt's new blocks and moves the request into its slot."""
        if self.engine.paged:
            self.blocks.publish(request.row, request.blocks, request.adapter)
        elif self.blocks is not None:
            request.blocks, copies = self.blocks.cache_prompt(request.row, request.blocks, request.adapter)
            self.engine.save_blocks(request.prefix, copies)
            self.blocks.release(request.blocks)
            request.blocks = []
        params = request.params
        self._sampling.set(request.slot, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                           seed=request.seed)
        self.engine.insert(request.prefix, request.slot, steps=len(request.tokens), adapter=request.adapter_slot)
        request.prefix = None
        self._prefilling.remove(request)
        self._running[request.slot] = request

    def _grow_rows(self) -> None:
        """Paged: blocks for the positions each running slot writes next, preempting the latest admitted
        running requests while the pool has too few."""
        ahead = self.engine.tokens_per_step
        for request in sorted(self._running.values(), key=lambda r: r.admitted):
            if request.slot is None:  # preempted for an older request in this loop
                continue
            positions = min(int(self.engine.lengths[request.slot]) + ahead, self.engine.row_limit)
            need = self.blocks.blocks_for(positions) - len(request.blocks)
            while need > 0 and self._running.get(request.slot) is request:
                fresh = self.blocks.allocate(need)
                if fresh is not None:
                    request.blocks += fresh
                    self.engine.set_blocks(request.slot, request.blocks)
                    break
                self._preempt(max(self._running.values(), key=lambda r: r.admitted))

    def _preempt(self, request: _Request) -> None:
        """Sends a running request back to the front of the queue, releasing its slot and blocks."""
        del self._running[request.slot]
        self.engine.free(request.slot)
        self.blocks.release(request.blocks)
        self._release_adapter(request)
        request.blocks, request.prefix = [], None
        with self._lock:
            self._free_slots.append(request.slot)
            request.slot = None
            self._waiting.appendleft(request)
        self._counts["preemptions"] += 1

    def _decode(self) -> None:
        top = any(r.params.top_logprobs for r in self._running.values())
        result = self._engine_call(self.engine.generate, self._sampling, top)
        if result is None:
            return
        self._counts["steps"] += 1
        if isinstance(result, SpeculativeStepResult):
            self._counts.update(spec_drafts=result.drafts, spec_draft_tokens=result.draft_tokens,
                                spec_accepted_tokens=result.accepted_tokens)
        for slot, request in list(self._running.items()):
            emitted = result.emitted(slot)
            for i, (token, logprob, top) in enumerate(emitted):
                row_full = bool(result.finished[slot]) and i == len(emitted) - 1
                if self._running.get(slot) is not request or not self._guard(
                        request, self._advance, request, token, logprob, top, row_full):
                    break

    def _advance(self, request: _Request, token: int, logprob: float, top: tuple, row_full: bool) -> None:
        """Records one token of a running request, streams it, and ends the request when it stops."""
        params = request.params
        request.tokens.append(token)
        self._counts["generated_tokens"] += 1
        stop_token = token == self.eos_id or token in params.stop_token_ids
        delta, stop_string = ("", False) if stop_token else self._new_text(request)
        request.handle._put(TokenEvent(token, logprob if params.logprobs else None, delta,
                                       top[:params.top_logprobs]))
        if stop_token or stop_string:
            self._finish(request, "stop", flush=not stop_string)
        elif len(request.tokens) >= params.max_tokens or row_full:
            self._finish(request, "length")

    def _new_text(self, request: _Request) -> tuple[str, bool]:
        """(text to stream now, whether a stop string ended the text)."""
        if self.detokenize is None:
            return "", False
        text = self.detokenize(request.tokens)
        found = [i for i in (text.find(s) for s in request.params.stop) if i >= 0]
        if found:
            end, stopped = min(found), True
        else:
            end, stopped = len(text) - _held_back(text, request.params.stop), False
        delta = text[len(request.text_sent):end] if end > len(request.text_sent) else ""
        request.text_sent += delta
        return delta, stopped

    # --------------------------------------------------------------------------- ending requests
    def _finish(self, request: _Request, reason: str, flush: bool = True, error: str | None = None) -> None:
        """Ends a request wherever it is (waiting, prefilling, running) and frees what it held."""
        with self._lock:
            if self._live.pop(request.id, None) is None:
                return
            if request in self._waiting:
                self._waiting.remove(request)
        if request.blocks:
            self.blocks.release(request.blocks)
            request.blocks = []
        self._release_adapter(request)
        if request in self._prefilling:
            self._prefilling.remove(request)
        if self._running.get(request.slot) is request:
            del self._running[request.slot]
            self.engine.free(request.slot)
        if request.slot is not None:
            with self._lock:
                self._free_slots.append(request.slot)
        rest = ""
        if flush and self.detokenize is not None and request.tokens and reason != "error":
            text_tokens = request.tokens[:-1] if request.tokens[-1] == self.eos_id or (
                request.tokens[-1] in request.params.stop_token_ids) else request.tokens
            rest = self.detokenize(text_tokens)[len(request.text_sent):]
        self._finished[reason] += 1
        usage = Usage(len(request.prompt), len(request.tokens), request.cached_tokens)
        request.handle._put(FinishEvent(reason, usage, rest, error))

    def _guard(self, request: _Request, fn: Callable, *args) -> bool:
        """fn(*args); an exception ends only `request` ("error"). Returns whether fn succeeded."""
        try:
            fn(*args)
            return True
        except Exception as e:  # noqa: BLE001 - one request must never take the loop down
            self._finish(request, "error", error=f"{type(e).__name__}: {e}")
            return False

    def _engine_call(self, fn: Callable, *args):
        """fn(*args); an exception is an engine failure (`_fail`). Returns fn's result, None on failure."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - the device state may be gone: serve nothing more
            self._fail(e)
            return None

    def _fail(self, e: Exception) -> None:
        """Marks the scheduler unhealthy, ends every request with "error" and stops the loop."""
        with self._lock:
            self.healthy = False
            self.error = f"engine failure: {type(e).__name__}: {e}"
            self._stopping, self._drain = True, False
            self._lock.notify_all()
        self._end_all("error", self.error)

    def _end_all(self, reason: str, error: str | None = None) -> None:
        with self._lock:
            requests = list(self._live.values())
        for request in requests:
            self._finish(request, reason, error=error)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` not to stream yet: an incomplete UTF-8 character (U+FFFD from a
    partial byte sequence) or the start of a stop string."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held
