"""The OpenAI-compatible HTTP server: a FastAPI app over a running `Scheduler`.

    app = build_app(scheduler, tokenizer, "my-model")
    uvicorn.run(app, host="127.0.0.1", port=8000)       # the `serve` job does this (serving/serve.py)

Endpoints: POST /v1/completions, POST /v1/chat/completions (bodies in `api`), GET /v1/models,
GET /health, GET /metrics (Prometheus text, `metrics`).

Several models and LoRA adapters (`serving.model_cache`): a request's `model` names one of them (None:
the default model); its tokenizer, chat template and scheduler serve it, a model not resident is
loaded first (in a worker thread, so the event loop keeps serving), and an adapter's requests go to its
base model's scheduler, which runs them through the adapter.

The app only translates: it tokenizes, submits each of the request's `n` choices to the scheduler
(whose thread runs the engine) and reads their events with `RequestHandle.aiter_events()`, so no
handler blocks the event loop and nothing a handler does waits on the engine loop or holds it up.
Statuses:
  400  a bad body or a prompt the model cannot take; the error's `param` names the field.
  404  a `model` no served model or adapter has (OpenAI's model_not_found), listing the known names.
  429  the scheduler's queue is full (`QueueFull`), with Retry-After; nothing of the request runs.
  503  the engine failed or the server is stopping (`/health` says so too); a model that cannot be
       loaded now (`ModelsBusy`, with Retry-After) or failed to load.
With `stream: true` the answer is server-sent events, one `data: {chunk}` per token and a last one per
choice with its finish reason (and a `usage` chunk when `stream_options.include_usage`), ending in
`data: [DONE]`; an engine failure mid-stream sends `data: {"error": ...}`, which the openai client
raises. A client that disconnects, streaming or not, has its requests cancelled
(`Scheduler.cancel`), which frees their slots within a step. finish_reason: "stop" (EOS or a stop
string), "length" (max_tokens, MAX_LENGTH, or the scheduler's request timeout, which ends a request
with what it has).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmops_jax.serving import api
from lmops_jax.serving.chat_template import SIMPLE, ChatTemplate
from lmops_jax.serving.metrics import CONTENT_TYPE, RequestTimer, ServerMetrics
from lmops_jax.serving.model_cache import ModelCache, ModelsBusy, ServedModel, UnknownModel
from lmops_jax.serving.scheduler import (Event, FinishEvent, QueueFull, RequestError, RequestHandle, SamplingParams,
                                         Scheduler, SchedulerUnavailable, TokenEvent)
from lmops_jax.serving.tokenizer import Tokenizer

DONE = "data: [DONE]\n\n"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request its client abandoned
# scheduler finish reason -> OpenAI's (vLLM's "abort" for a cancelled request, which no client sees)
FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "abort"}
ChunkChoice = Callable[["_Choice", Event], Any]


def unavailable(reason: str) -> api.APIError:
    return api.APIError(503, f"the server cannot serve: {reason}", code="unavailable", error_type="server_error")


@dataclasses.dataclass
class _Choice:
    """Choice `index` of an HTTP request: one scheduler request and what it produced so far.

    pieces / logprobs / tops: each token's text, log-probability and most likely alternatives ((token id,
    logprob) pairs); tail: text released at the finish.
    """
    index: int
    handle: RequestHandle
    timer: RequestTimer = dataclasses.field(default_factory=RequestTimer)
    pieces: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    tops: list[tuple] = dataclasses.field(default_factory=list)
    tail: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces) + self.tail

    @property
    def open(self) -> bool:
        return self.finish_reason is None and self.error is None


@dataclasses.dataclass(frozen=True)
class _Target:
    """What a request's `model` names: a served model, and one of its adapters or None."""
    entry: ServedModel
    adapter: str | None

    @property
    def name(self) -> str:
        return self.adapter or self.entry.name


@dataclasses.dataclass
class _Run:
    """An accepted HTTP request: its id, target, prompt length, choices and the scheduler running them."""
    id: str
    target: _Target
    prompt_tokens: int
    choices: list[_Choice]
    scheduler: Any = None

    def usage(self) -> api.Usage:
        completion = sum(c.completion_tokens for c in self.choices)
        return api.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                         total_tokens=self.prompt_tokens + completion)


def _sse(body: Any) -> str:
    return f"data: {body.model_dump_json()}\n\n"


class _CancelOnClose(StreamingResponse):
    """A stream that runs `on_close` however it ends (done, client gone, server shutting down)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Service:
    """What the handlers share, and a request's life: submit, events, cancel, respond."""

    def __init__(self, models: ModelCache, retry_after_s: int):
        self.models = models
        self.retry_after_s = retry_after_s
        self.created = int(time.time())
        self.metrics = ServerMetrics(models.default.name, self._stats, models.default.max_length)

    def _stats(self) -> dict[str, Any]:
        return {name: scheduler.stats() for name, scheduler in self.models.schedulers().items()}

    def target(self, model: str | None) -> _Target:
        """What `model` names; 404 listing the known names for an unknown one."""
        try:
            return _Target(*self.models.resolve(model))
        except UnknownModel as e:
            raise api.APIError(404, str(e), param="model", code="model_not_found") from e

    async def submit(self, target: _Target, prompt: list[int], make_params: Callable[[Any], SamplingParams], n: int,
                     prompt_field: str) -> _Run:
        """Submits the n choices (seed + i each, when seeded) to the target's scheduler, loading its model
        first if needed: all of them, or none and an APIError. make_params(engine) gives the sampling."""
        run = _Run(f"cmpl-{uuid.uuid4().hex}", target, len(prompt), [])

        def submit_all(scheduler: Any) -> None:
            if not scheduler.healthy:
                raise SchedulerUnavailable(scheduler.error or "the engine failed")
            run.scheduler = scheduler
            params = make_params(scheduler.engine)
            for i in range(n):
                choice_params = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                handle = scheduler.submit(prompt, choice_params, request_id=f"{run.id}-{i}", adapter=target.adapter)
                run.choices.append(_Choice(i, handle))

        try:
            if target.entry.resident:
                self.models.submit(target.entry, submit_all, load=False)
            else:
                await asyncio.to_thread(self.models.submit, target.entry, submit_all)
        except ModelsBusy as e:
            self.metrics.reject("unhealthy")
            raise api.APIError(503, str(e), code="model_busy", error_type="server_error",
                               headers={"Retry-After": str(self.retry_after_s)}) from e
        except QueueFull as e:
            self._withdraw(run, "queue_full")
            raise api.APIError(429, f"the server is at capacity ({e}); retry later", code="queue_full",
                               error_type="rate_limit_error", headers={"Retry-After": str(self.retry_after_s)})
        except RequestError as e:
            self._withdraw(run, "invalid")
            field = prompt_field if e.field == "prompt" else e.field
            raise api.bad_request(field, f"{field}: {e.message}") from e
        except SchedulerUnavailable as e:
            self._withdraw(run, "unhealthy")
            raise unavailable(str(e)) from e
        except (RuntimeError, OSError, ValueError) as e:  # the model failed to load
            self.metrics.reject("unhealthy")
            raise unavailable(f"cannot load model {target.entry.name!r}: {e}") from e
        return run

    def _withdraw(self, run: _Run, reason: str) -> None:
        for choice in run.choices:
            run.scheduler.cancel(choice.handle.request_id)
        self.metrics.reject(reason)

    def cancel(self, run: _Run) -> None:
        """Cancels the run's unfinished choices (their client is gone)."""
        for choice in run.choices:
            if choice.open:
                run.scheduler.cancel(choice.handle.request_id)
                choice.finish_reason = "abort"

    async def events(self, run: _Run) -> AsyncIterator[tuple[_Choice, Event]]:
        """Every choice's events as they come, recorded on the choice and in the metrics; ends when all
        choices finished."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: _Choice) -> None:
            async for event in choice.handle.aiter_events():
                await queue.put((choice, event))

        tasks = [asyncio.create_task(pump(c)) for c in run.choices]
        try:
            for _ in run.choices:
                while True:
                    choice, event = await queue.get()
                    self._record(run, choice, event)
                    yield choice, event
                    if isinstance(event, FinishEvent):
                        break
        finally:
            for task in tasks:
                task.cancel()

    def _record(self, run: _Run, choice: _Choice, event: Event) -> None:
        if isinstance(event, TokenEvent):
            choice.timer.token()
            choice.pieces.append(event.text_delta)
            if event.logprob is not None:
                choice.logprobs.append(event.logprob)
                choice.tops.append(event.top_logprobs)
            return
        choice.tail = event.text_delta
        choice.completion_tokens = event.usage.completion_tokens
        if event.finish_reason == "error":
            choice.error = event.error or "the engine failed"
            return
        choice.finish_reason = FINISH_REASONS[event.finish_reason]
        self.metrics.finish(choice.timer, run.prompt_tokens, choice.completion_tokens, run.target.name)

    async def _collect(self, run: _Run, request: Request) -> bool:
        """Runs the choices to their end (True); cancels them if the client disconnects first (False)."""
        async def drain() -> None:
            async for _ in self.events(run):
                pass

        work = asyncio.ensure_future(drain())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            finished = work.done()
            if not finished:
                work.cancel()
                self.cancel(run)
        if not finished:
            return False
        work.result()
        errors = [c.error for c in run.choices if c.error]
        if errors:
            raise unavailable(errors[0])
        return True

    async def respond(self, request: Request, run: _Run, body: api.SamplingFields, chunk_type: type,
                      chunk_choice: ChunkChoice, whole: Callable[[_Run], Any]) -> Response:
        """`whole(run)` once every choice finished, or with `body.stream` server-sent events: per event a
        `chunk_type` chunk holding `chunk_choice(choice, event)`."""
        if not body.stream:
            if not await self._collect(run, request):
                return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it
            return JSONResponse(whole(run).model_dump())
        return _CancelOnClose(self._sse(run, body.include_usage, chunk_type, chunk_choice), lambda: self.cancel(run))

    async def _sse(self, run: _Run, include_usage: bool, chunk_type: type,
                   chunk_choice: ChunkChoice) -> AsyncIterator[str]:
        async for choice, event in self.events(run):
            if choice.error:
                yield f"data: {json.dumps(unavailable(choice.error).body())}\n\n"
            else:
                yield _sse(chunk_type(id=run.id, model=run.target.name, choices=[chunk_choice(choice, event)]))
        if include_usage:
            yield _sse(chunk_type(id=run.id, model=run.target.name, choices=[], usage=run.usage()))
        yield DONE


# ------------------------------------------------------------------------------------- the endpoints
def _offsets(pieces: list[str]) -> list[int]:
    """Character offset of each piece in the text they make."""
    out, start = [], 0
    for piece in pieces:
        out.append(start)
        start += len(piece)
    return out


def _chat_logprobs(tokenizer: Tokenizer, pieces: list[str], logprobs: list[float], tops: list[tuple]) -> api.ChatLogprobs:
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return api.ChatLogprobs(content=[api.TokenLogprob(
        token=p, logprob=lp, bytes=list(p.encode("utf-8")),
        top_logprobs=[entry(tokenizer.decode([t]), x) for t, x in top]) for p, lp, top in zip(pieces, logprobs, tops)])


def _completion_logprobs(tokenizer: Tokenizer, pieces: list[str], logprobs: list[float], tops: list[tuple],
                         offset: int, top_n: int) -> api.CompletionLogprobs:
    """The legacy format; top_logprobs maps each alternative's text to its logprob (when asked). Being keyed
    by text, it keeps the likeliest of alternatives whose texts are equal (e.g. partial UTF-8 bytes)."""
    def by_text(pairs: tuple) -> dict[str, float]:
        out: dict[str, float] = {}
        for token, logprob in pairs:
            out.setdefault(tokenizer.decode([token]), logprob)
        return out
    top = [by_text(pairs) for pairs in tops] if top_n else None
    return api.CompletionLogprobs(tokens=pieces, token_logprobs=logprobs, top_logprobs=top,
                                  text_offset=[offset + o for o in _offsets(pieces)])


def _sampling(body: api.SamplingFields, max_tokens: int, stop: tuple[str, ...], logprobs: bool,
              top_logprobs: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0),
                          top_p=body.top_p, seed=body.seed, stop=tuple(body.stop) + stop, logprobs=logprobs,
                          top_logprobs=top_logprobs)


def _completion_chunk(tokenizer: Tokenizer, choice: _Choice, event: Event, top_n: int | None) -> api.CompletionChoice:
    """A streamed choice: a token's text (and logprobs), or the finish with any text held back until then."""
    if isinstance(event, FinishEvent):
        return api.CompletionChoice(index=choice.index, text=event.text_delta, finish_reason=choice.finish_reason)
    offset = len(choice.text) - len(event.text_delta)
    lp = (_completion_logprobs(tokenizer, [event.text_delta], [event.logprob], [event.top_logprobs], offset, top_n)
          if top_n is not None else None)
    return api.CompletionChoice(index=choice.index, text=event.text_delta, logprobs=lp)


async def _completions(service: _Service, body: api.CompletionRequest, request: Request) -> Response:
    target = service.target(body.model)
    top_n, tokenizer = body.logprobs, target.entry.tokenizer
    prompt = tokenizer.prompt(body.prompt)
    params = _sampling(body, body.max_tokens, (), top_n is not None, top_n or 0)
    run = await service.submit(target, prompt, lambda engine: params, body.n, "prompt")

    def whole(run: _Run) -> api.CompletionResponse:
        choices = [api.CompletionChoice(
            index=c.index, text=c.text, finish_reason=c.finish_reason,
            logprobs=_completion_logprobs(tokenizer, c.pieces, c.logprobs, c.tops, 0, top_n)
            if top_n is not None else None) for c in run.choices]
        return api.CompletionResponse(id=run.id, model=target.name, choices=choices, usage=run.usage())

    return await service.respond(request, run, body, api.CompletionResponse,
                                 lambda c, e: _completion_chunk(tokenizer, c, e, top_n), whole)


def _chat_chunk(tokenizer: Tokenizer, choice: _Choice, event: Event, logprobs: bool) -> api.ChatChunkChoice:
    """A streamed chat choice; its first chunk carries the role."""
    finished = isinstance(event, FinishEvent)
    first = choice.timer.tokens == (0 if finished else 1)
    delta = api.ChatDelta(role="assistant" if first else None, content=event.text_delta or None)
    lp = (_chat_logprobs(tokenizer, [event.text_delta], [event.logprob], [event.top_logprobs])
          if logprobs and not finished else None)
    return api.ChatChunkChoice(index=choice.index, delta=delta, logprobs=lp,
                               finish_reason=choice.finish_reason if finished else None)


def _chat_prompt(entry: ServedModel, body: api.ChatCompletionRequest) -> list[int]:
    try:
        text = entry.chat_template.render([{"role": m.role, "content": m.text} for m in body.messages])
    except ValueError as e:  # the model's own template refusing the conversation
        raise api.bad_request("messages", str(e)) from e
    return entry.tokenizer.prompt(text)


async def _chat(service: _Service, body: api.ChatCompletionRequest, request: Request) -> Response:
    target = service.target(body.model)
    entry = target.entry
    prompt = _chat_prompt(entry, body)

    def params(engine: Any) -> SamplingParams:
        max_tokens = body.token_limit or max(1, engine.capacity(len(prompt)))
        return _sampling(body, max_tokens, entry.chat_template.stop, body.logprobs, body.top_logprobs or 0)

    run = await service.submit(target, prompt, params, body.n, "messages")
    tokenizer = entry.tokenizer

    def whole(run: _Run) -> api.ChatCompletionResponse:
        choices = [api.ChatChoice(index=c.index, message=api.AssistantMessage(content=c.text),
                                  finish_reason=c.finish_reason,
                                  logprobs=_chat_logprobs(tokenizer, c.pieces, c.logprobs, c.tops)
                                  if body.logprobs else None)
                   for c in run.choices]
        return api.ChatCompletionResponse(id=run.id, model=target.name, choices=choices, usage=run.usage())

    return await service.respond(request, run, body, api.ChatCompletionChunk,
                                 lambda c, e: _chat_chunk(tokenizer, c, e, body.logprobs), whole)


def _model_cards(models: ModelCache, created: int) -> list[api.ModelCard]:
    """Every served model, then its adapters (parent = the base model), with whether each is resident."""
    cards = []
    for entry in models.entries:
        cards.append(api.ModelCard(id=entry.name, created=created, max_model_len=entry.max_length,
                                   resident=entry.resident))
        resident = entry.resident_adapters()
        cards += [api.ModelCard(id=name, created=created, max_model_len=entry.max_length, parent=entry.name,
                                root=entry.name, resident=name in resident) for name in entry.adapters]
    return cards


def _error_response(error: api.APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def single_model(scheduler: Any, tokenizer: Tokenizer, model_name: str,
                 chat_template: ChatTemplate = SIMPLE) -> ModelCache:
    """A ModelCache of one model served by `scheduler` (a Scheduler or a router over replicas)."""
    entry = ServedModel(model_name, "", tokenizer, chat_template, scheduler.engine.max_length, scheduler=scheduler)
    return ModelCache([entry])


def build_app(scheduler: Scheduler | None, tokenizer: Tokenizer | None, model_name: str | None, *,
              chat_template: ChatTemplate = SIMPLE, retry_after_s: int = 1, collectors: Sequence[Collector] = (),
              models: ModelCache | None = None) -> FastAPI:
    """The app serving `scheduler` (or `models`), which the caller starts and stops (the `serve` job does).

    Args:
      scheduler: a `Scheduler` whose thread runs the engine, or a `router.ReplicaRouter` over several.
      tokenizer: text and prompt formatting of the served model.
      model_name: the `model` of requests and responses, and the metrics' model_name label.
      chat_template: how chat messages become a prompt (`chat_template.SIMPLE`, or the model's own).
      retry_after_s: the Retry-After of a 429 or of a 503 for a model that cannot be loaded now.
      collectors: more Prometheus collectors for /metrics (the router's per-replica series).
      models: several models and adapters (`serving.model_cache`) instead of scheduler / tokenizer /
        model_name / chat_template, which then must be None / left at their defaults.
    """
    if models is None:
        models = single_model(scheduler, tokenizer, model_name, chat_template)
    elif scheduler is not None or tokenizer is not None or model_name is not None:
        raise ValueError("build_app: pass either `models` or scheduler, tokenizer and model_name")
    service = _Service(models, retry_after_s)
    for collector in collectors:
        service.metrics.registry.register(collector)
    app = FastAPI(title="lmops_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(api.APIError)
    async def _api_error(request: Request, error: api.APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        service.metrics.reject("invalid")
        return _error_response(api.validation_error(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(api.APIError(error.status_code, str(error.detail), code=str(error.status_code)))

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        return await _completions(service, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
        return await _chat(service, body, request)

    @app.get("/v1/models")
    async def list_models() -> api.ModelList:
        return api.ModelList(data=_model_cards(models, service.created))

    @app.get("/health")
    async def health() -> Response:
        default = models.default.scheduler
        if not default.healthy:
            return _error_response(unavailable(default.error or "the engine failed"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)

    return app
