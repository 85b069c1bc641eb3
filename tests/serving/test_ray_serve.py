"""The Ray Serve application (`serving.ray_app`) on a local Ray with 2 CPUs and a tiny model: the documented
command as a subprocess, an autoscaling ramp 1 -> 2 -> 1 replicas, a replica removed mid-load and one killed
mid-load; and the proxy's guard (`serving.ray_proxy`) on its own, without Ray.

Ray's HTTP proxy binds 127.0.0.1 on a free port; every request loop is bounded in count and time; Ray is
shut down after each use.
"""
import asyncio
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from lmops_jax.cli import compile_cache  # noqa: E402
from lmops_jax.serving import ray_app, ray_proxy  # noqa: E402
from tests.helpers import byte_level_checkpoint, free_port, tiny_llama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = tiny_llama(vocab_size=260)
SERVER = dict(max_slots=2, max_queue=16, max_length=256, prefix_cache=False, prefill_chunk=None,
              request_timeout_s=None, dtype=None, mesh_shape=None, logical_axis_rules="tp", model_name=None)
FAST_SCALING = dict(target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=4, metrics_interval_s=0.5,
                    look_back_period_s=2, max_ongoing_requests=4, max_queued_requests=64, drain_timeout_s=60)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return byte_level_checkpoint(MODEL, str(tmp_path_factory.mktemp("ray") / "tiny"))


def _complete(base: str, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", timeout=120,
                      json={"prompt": "abc", "max_tokens": max_tokens, "temperature": 0})


def test_the_documented_command_serves_and_exits_0_on_sigterm(checkpoint):
    port = free_port()
    command = [sys.executable, "-m", "lmops_jax.serving.ray_app", "--gin_file=gin_configs/runs/serve_ray.gin",
               f"--gin.CHECKPOINT_PATH='{checkpoint}'", f"--gin.PORT={port}", "--gin.RAY_NUM_CPUS=2"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if re.search(rf"serving tiny at http://127\.0\.0\.1:{port}/v1", line):
                ready.set()
        ready.set()
    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(300) and proc.poll() is None, "".join(lines[-40:])
        answer = _complete(f"http://127.0.0.1:{port}", 8)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        assert answer.headers[ray_app.REPLICA_HEADER]
        assert "vllm:generation_tokens_total" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_app_builder_binds_the_gin_configured_application_for_serve_run(checkpoint):
    import gin
    try:
        app = ray_app.app_builder({"gin_file": "gin_configs/runs/serve_ray.gin",
                                   "bindings": [f"CHECKPOINT_PATH='{checkpoint}'", "MAX_REPLICAS=3"]})
        assert isinstance(app, serve.Application)
    finally:
        gin.clear_config()
    with pytest.raises(ValueError, match="app_builder takes the args gin_file and bindings"):
        ray_app.app_builder({"gin_files": "serve_ray.gin"})


@pytest.fixture(scope="module")
def local_serve():
    """A local Ray (2 CPUs, no dashboard) with Serve's proxy on 127.0.0.1; yields its base URL."""
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    port = free_port()
    ray_app.start_serve("127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _running_replicas() -> int:
    deployment = serve.status().applications[ray_app.APP_NAME].deployments["LmopsServer"]
    return sum(n for state, n in deployment.replica_states.items() if str(state).endswith("RUNNING"))


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_a_load_ramp_scales_1_to_2_replicas_and_back_with_every_request_answered(checkpoint, local_serve):
    serve.run(ray_app.application(checkpoint_path=checkpoint, min_replicas=1, max_replicas=2, **FAST_SCALING,
                                  **SERVER), name=ray_app.APP_NAME, route_prefix="/")
    try:
        assert _running_replicas() == 1
        assert os.listdir(compile_cache.cache_dir()), "the replica did not use the compilation cache, so a new one compiles again"
        statuses, replicas, scaled = [], set(), threading.Event()
        stop_at = time.monotonic() + 290  # the second replica starts a process and loads first: slow on a busy machine

        def client():
            for _ in range(600):  # at most 600 requests and 290 s per client; 5 s more once scaled
                if time.monotonic() > stop_at:
                    return
                answer = _complete(local_serve, 96)
                statuses.append(answer.status_code)
                replicas.add(answer.headers.get(ray_app.REPLICA_HEADER))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client) for _ in range(4)]
            if _wait_for(lambda: _running_replicas() == 2, 280):
                scaled.set()
                stop_at = min(stop_at, time.monotonic() + 5)
            for c in clients:
                c.result(timeout=400)
        assert scaled.is_set(), f"never scaled to 2 replicas ({len(statuses)} requests)"
        assert statuses and set(statuses) == {200}
        assert len(replicas) == 2
        assert _wait_for(lambda: _running_replicas() == 1, 60), "did not scale back to 1 replica"
    finally:
        serve.delete(ray_app.APP_NAME)


def test_no_accepted_request_is_lost_when_a_replica_goes(checkpoint, local_serve):
    fixed = {**FAST_SCALING, "max_ongoing_requests": 8}
    options = dict(checkpoint_path=checkpoint, **fixed, **{**SERVER, "max_slots": 1})
    serve.run(ray_app.application(min_replicas=2, max_replicas=2, **options), name=ray_app.APP_NAME,
              route_prefix="/")
    try:
        assert _running_replicas() == 2
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = [pool.submit(lambda: (_complete(local_serve, 240), time.monotonic())) for _ in range(12)]
            time.sleep(1.0)  # every request accepted: one slot per replica, the rest queued on the replicas
            scaled_down_at = time.monotonic()
            serve.run(ray_app.application(min_replicas=1, max_replicas=1, **options), name=ray_app.APP_NAME,
                      route_prefix="/")
            results = [a.result(timeout=300) for a in answers]
        assert [r.status_code for r, _ in results] == [200] * 12
        assert all(r.json()["usage"]["completion_tokens"] >= 1 for r, _ in results)
        assert _wait_for(lambda: _running_replicas() == 1, 60)
        survivor = _complete(local_serve, 1).headers[ray_app.REPLICA_HEADER]
        gone = [(r, t) for r, t in results if r.headers[ray_app.REPLICA_HEADER] != survivor]
        assert gone, "the removed replica answered nothing"
        assert max(t for _, t in gone) > scaled_down_at  # it finished requests after its removal began
    finally:
        serve.delete(ray_app.APP_NAME)


def _stream(base: str, log: dict) -> None:
    """A streamed completion; `log` gets its status, replica, `data:` payloads (or an error's body), any
    exception, end time."""
    try:
        with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json={
                "prompt": "abc", "max_tokens": 240, "temperature": 0, "stream": True}) as answer:
            log.update(status=answer.status_code, replica=answer.headers.get(ray_app.REPLICA_HEADER))
            if answer.status_code != 200:
                log["body"] = answer.read()
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    log["events"].append(line[len("data: "):])
    except httpx.HTTPError as e:
        log["exception"] = repr(e)
    log["ended"] = time.monotonic()


def _finished(events: list[str]) -> bool:
    """A stream that ran to its end: a finish reason, then [DONE], and no error event."""
    chunks = [json.loads(e) for e in events[:-1]]
    return (events[-1:] == ["[DONE]"] and not any("error" in c for c in chunks)
            and any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks))


def _cut(events: list[str]) -> bool:
    """A stream the replica's death ended: tokens (maybe none), the guard's error event, [DONE]."""
    return (events[-1:] == ["[DONE]"] and len(events) >= 2
            and json.loads(events[-2]).get("error", {}).get("code") == "replica_lost"
            and not _finished(events))


def _replica_ids(base: str, n: int) -> set[str]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda _: _complete(base, 4), range(n)))
    assert [a.status_code for a in answers] == [200] * n
    return {a.headers[ray_app.REPLICA_HEADER] for a in answers}


def _replica_actor(replica_id: str):
    """The Ray actor of a Serve replica (Serve names it SERVE_REPLICA::app#deployment#replica id)."""
    return ray.get_actor(f"SERVE_REPLICA::{ray_app.APP_NAME}#LmopsServer#{replica_id}", namespace="serve")


def test_a_replica_that_dies_fails_only_its_requests_with_5xx_and_ray_replaces_it(checkpoint, local_serve):
    fixed = {**FAST_SCALING, "max_ongoing_requests": 8, "health_check_period_s": 1}
    serve.run(ray_app.application(min_replicas=2, max_replicas=2, checkpoint_path=checkpoint, **fixed,
                                  **{**SERVER, "max_slots": 1}), name=ray_app.APP_NAME, route_prefix="/")
    try:
        streams = [{"events": [], "exception": None} for _ in range(10)]
        with concurrent.futures.ThreadPoolExecutor(14) as pool:  # 14 requests > 8 a replica holds: both busy
            pending = [pool.submit(_stream, local_serve, log) for log in streams]
            plain = [pool.submit(_complete, local_serve, 240) for _ in range(4)]
            assert _wait_for(lambda: any(log["events"] for log in streams), 60), streams
            victim = next(log["replica"] for log in streams if log["events"])
            killed_at = time.monotonic()
            ray.kill(_replica_actor(victim), no_restart=True)
            for f in pending:
                f.result(timeout=120)
            plain = [f.result(timeout=120) for f in plain]  # a hang raises httpx's ReadTimeout here
        assert all(log["exception"] is None for log in streams), streams
        refused = [log for log in streams if log["status"] != 200]  # sent to the victim, no answer started
        assert all(log["status"] == 502 and json.loads(log["body"])["error"]["code"] == "replica_lost"
                   for log in refused), refused
        on_victim = [log for log in streams if log["replica"] == victim]
        survivor = {log["replica"] for log in streams if log["status"] == 200} - {victim}
        assert len(survivor) == 1
        assert all(_finished(log["events"]) for log in streams if log["replica"] in survivor)
        assert all(_cut(log["events"]) or (_finished(log["events"]) and log["ended"] < killed_at)
                   for log in on_victim), on_victim
        cut = sum(_cut(log["events"]) for log in on_victim)
        assert cut >= 1, "the kill cut no stream"
        for answer in plain:  # a non-streamed request on the victim: 502, never a short 200
            assert (answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"]) or (
                answer.status_code == 502 and answer.json()["error"]["code"] == "replica_lost"), answer.text
        assert cut + len(refused) + sum(a.status_code == 502 for a in plain) <= fixed["max_ongoing_requests"]
        seen: set[str] = set()  # the replacement: a third replica id, answering beside the survivor
        assert _wait_for(lambda: bool(seen.update(_replica_ids(local_serve, 3)) or seen - survivor - {victim})
                         and _running_replicas() == 2, 240), seen  # a new replica loads slowly on a busy machine
        assert victim not in seen
    finally:
        serve.delete(ray_app.APP_NAME)


def _guarded(app) -> list[dict]:
    """The ASGI messages `ReplicaLossGuard(app)` sends for one HTTP request."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.disconnect"}
    asyncio.run(ray_proxy.ReplicaLossGuard(app)({"type": "http"}, receive, send))
    return sent


def _start(content_type: bytes) -> dict:
    return {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]}


def test_the_proxy_guard_ends_what_a_dead_replica_left_unanswered_with_a_5xx():
    async def nothing(scope, receive, send):  # the replica died before the response started
        pass

    async def cut_stream(scope, receive, send):
        await send(_start(b"text/event-stream; charset=utf-8"))
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})

    async def cut_json(scope, receive, send):
        await send(_start(b"application/json"))

    async def whole(scope, receive, send):
        await send(_start(b"text/event-stream"))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    start, body = _guarded(nothing)
    assert start["status"] == 502 and json.loads(body["body"])["error"]["code"] == "replica_lost"
    *_, last = _guarded(cut_stream)
    error, done = last["body"].decode().strip().split("\n\n")
    assert json.loads(error[len("data: "):])["error"]["code"] == "replica_lost" and done == "data: [DONE]"
    assert not last["more_body"]
    assert _guarded(cut_json) == [_start(b"application/json")]  # the client sees the cut, never a short 200
    assert len(_guarded(whole)) == 2
