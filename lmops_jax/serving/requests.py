"""What a serving request is and what its client sees: sampling parameters, the checks a request must
pass (`check_request`, `RequestError` naming the field), and the stream of events a `RequestHandle`
delivers (TokenEvents, then one FinishEvent), to a thread or to an asyncio loop. The scheduler
(`serving.scheduler`, which re-exports these names) produces them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import numbers
import queue
import threading
import time
from typing import AsyncIterator, Iterator, Sequence

from lmops_jax.serving.engine import MAX_TOP_LOGPROBS, Engine

FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")


class QueueFull(Exception):
    """The waiting queue is at max_queue (HTTP 429)."""


class SchedulerUnavailable(RuntimeError):
    """The scheduler is stopping or its engine failed (HTTP 503)."""


class RequestError(ValueError):
    """A request the scheduler cannot take (HTTP 400); `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. temperature 0 is greedy; top_k 0 keeps all tokens; seed None draws one;
    stop: strings that end the text (they need the scheduler's detokenize); logprobs: give each token's
    log-probability; top_logprobs: and the most likely tokens at each step, this many (at most
    MAX_TOP_LOGPROBS; needs logprobs); timeout_s: end the request after this long (None: the scheduler's
    default)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    timeout_s: float | None = None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float | None  # None unless SamplingParams.logprobs
    text_delta: str  # new text (detokenize given), "" for a stop token or held-back text
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token, logprob) most likely first, SamplingParams.top_logprobs


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens found in the prefix cache


@dataclasses.dataclass(frozen=True)
class FinishEvent:
    finish_reason: str  # one of FINISH_REASONS
    usage: Usage
    text_delta: str = ""  # held-back text released at the end
    error: str | None = None  # what went wrong, for "error"


Event = TokenEvent | FinishEvent


class RequestHandle:
    """A submitted request's event stream: TokenEvents, then one FinishEvent. One consumer: either the
    blocking `events` queue (`iter_events`, `result`) or `aiter_events` in an asyncio loop."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.events: queue.Queue[Event] = queue.Queue()
        self._lock = threading.Lock()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None

    def _put(self, event: Event) -> None:
        with self._lock:
            if self._async is None:
                self.events.put(event)
                return
            loop, async_queue = self._async
        try:
            loop.call_soon_threadsafe(async_queue.put_nowait, event)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass

    def iter_events(self, timeout: float | None = None) -> Iterator[Event]:
        """Blocks for each event until the FinishEvent; queue.Empty when one takes over `timeout` s."""
        while True:
            event = self.events.get(timeout=timeout)
            yield event
            if isinstance(event, FinishEvent):
                return

    async def aiter_events(self) -> AsyncIterator[Event]:
        """The events in the running asyncio loop, without blocking it."""
        async_queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            while not self.events.empty():
                async_queue.put_nowait(self.events.get_nowait())
            self._async = (asyncio.get_running_loop(), async_queue)
        while True:
            event = await async_queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return

    def result(self, timeout: float | None = None) -> tuple[list[int], str]:
        """(generated tokens, finish_reason), waiting up to `timeout` s for the end (TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        tokens = []
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s") from None
            if isinstance(event, FinishEvent):
                return tokens, event.finish_reason
            tokens.append(event.token_id)


def check_request(prompt_tokens: Sequence[int], params: SamplingParams, engine: Engine, *,
                  has_text: bool) -> list[int]:
    """The prompt as a list of ints, if `engine` can serve the request (has_text: a detokenizer makes
    stop strings work); else RequestError naming the first bad field."""
    vocab = engine.model.vocab_size
    try:
        prompt = [int(t) for t in prompt_tokens if _is_int(t)]
    except TypeError:
        prompt = None
    if isinstance(prompt_tokens, (str, bytes)) or prompt is None or len(prompt) != len(prompt_tokens):
        raise RequestError("prompt", "must be a list of token ids")
    if not prompt:
        raise RequestError("prompt", "is empty")
    if any(not 0 <= t < vocab for t in prompt):
        raise RequestError("prompt", f"token id {next(t for t in prompt if not 0 <= t < vocab)} is outside the "
                                     f"vocabulary [0, {vocab})")
    if len(prompt) > engine.max_prompt_length:
        raise RequestError("prompt", f"{len(prompt)} tokens, more than the {engine.max_prompt_length} this "
                                     "server takes")
    if not _is_int(params.max_tokens) or params.max_tokens < 1:
        raise RequestError("max_tokens", f"must be an int >= 1, got {params.max_tokens!r}")
    room = engine.capacity(len(prompt))
    if params.max_tokens > room:
        raise RequestError("max_tokens", f"{params.max_tokens} tokens after a prompt of {len(prompt)} exceed "
                                         f"max_length={engine.max_length}; at most {room}")
    checks = [
        ("temperature", _is_real(params.temperature) and 0 <= params.temperature < math.inf, "a number >= 0"),
        ("top_k", _is_int(params.top_k) and params.top_k >= 0, "an int >= 0"),
        ("top_p", _is_real(params.top_p) and 0 < params.top_p <= 1, "a number in (0, 1]"),
        ("seed", params.seed is None or (_is_int(params.seed) and 0 <= params.seed < 2 ** 63),
         "None or an int in [0, 2**63)"),
        ("stop_token_ids", all(_is_int(t) and 0 <= t < vocab for t in params.stop_token_ids),
         f"token ids in [0, {vocab})"),
        ("stop", not isinstance(params.stop, str) and all(isinstance(s, str) and s for s in params.stop),
         "a list of non-empty strings"),
        ("top_logprobs", _is_int(params.top_logprobs) and 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS
         and (params.logprobs or not params.top_logprobs), f"an int in [0, {MAX_TOP_LOGPROBS}], with logprobs"),
        ("timeout_s", params.timeout_s is None or (_is_real(params.timeout_s) and params.timeout_s > 0),
         "None or a number > 0"),
    ]
    for field, ok, what in checks:
        if not ok:
            raise RequestError(field, f"must be {what}, got {getattr(params, field)!r}")
    if params.stop and not has_text:
        raise RequestError("stop", "stop strings need text, and this scheduler has no detokenizer")
    return prompt


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
