"""What Ray Serve's HTTP proxy answers when the replica serving a request dies mid-request.

Without this, a replica killed mid-request (OOM, a lost node, `ray.kill`) leaves the proxy with no
answer to send: a request whose response had not started gets uvicorn's bare "500 Internal Server
Error" text, and a stream that had started (status 200 already on the wire) is cut, so the client
reads an incomplete chunked body. `ReplicaLossGuard` wraps the proxy's ASGI app and finishes such a
response in the shape the lone server gives an engine failure: OpenAI's error body with status 502
(the proxy lost its upstream; the server's own 503 means a live replica refuses), or, on a stream, a
last `data: {"error": ...}` event (which the openai client raises) and `data: [DONE]`.
Responses the proxy completes itself (200, 408 on its request timeout, 429 back-pressure, 503) pass
through untouched.

Ray builds the proxy's middlewares in the proxy process from the import path in the environment
variable RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (the replacement Ray keeps for the removed
`HTTPOptions.middlewares`); `PROXY_ENV` holds it for `serve.start(controller_options=...)`, whose
env vars the proxy actors inherit. Kept apart from `ray_app` so the proxy imports no JAX.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, MutableMapping

from starlette.middleware import Middleware

from lmops_jax.serving import api

Message = MutableMapping[str, Any]
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "lmops_jax.serving.ray_proxy:middlewares"}
REPLICA_LOST = api.APIError(
    502, "the replica serving this request died before it finished; Ray Serve replaces it, retry the request",
    code="replica_lost", error_type="server_error")


@dataclass
class _Progress:
    """How far the response went: started (and as an event stream or not), finished."""
    started: bool = False
    event_stream: bool = False
    finished: bool = False

    def see(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.event_stream = any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                                    for name, value in message.get("headers", []))
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True


class ReplicaLossGuard:
    """ASGI middleware for the proxy: finishes, with a 5xx, an HTTP response the proxy left unfinished."""

    def __init__(self, app: Callable[..., Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Message, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        progress = _Progress()

        async def tracked(message: Message) -> None:
            progress.see(message)
            await send(message)

        await self.app(scope, receive, tracked)
        if progress.finished:
            return
        if not progress.started:
            body = json.dumps(REPLICA_LOST.body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": REPLICA_LOST.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif progress.event_stream:
            await send({"type": "http.response.body", "more_body": False,
                        "body": f"data: {json.dumps(REPLICA_LOST.body())}\n\ndata: [DONE]\n\n".encode()})
        # A started JSON body is left unfinished: the client sees the connection cut, never a short 200.


def middlewares() -> list[Middleware]:
    """The proxy callback Ray calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ReplicaLossGuard)]
