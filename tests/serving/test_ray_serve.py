"""The Ray Serve application (`serving.ray_app`) on a local Ray with 2 CPUs and a tiny model: the documented
command as a subprocess, an autoscaling ramp 1 -> 2 -> 1 replicas, and a replica removed mid-load.

Ray's HTTP proxy binds 127.0.0.1 on a free port; every request loop is bounded in count and time; Ray is
shut down after each use.
"""
import concurrent.futures
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

from lmops_jax.serving import ray_app  # noqa: E402
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
    serve.start(http_options={"host": "127.0.0.1", "port": port})
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
        statuses, replicas, scaled = [], set(), threading.Event()
        stop_at = time.monotonic() + 120

        def client():
            for _ in range(300):  # at most 300 requests and 120 s per client; 5 s more once scaled
                if time.monotonic() > stop_at:
                    return
                answer = _complete(local_serve, 32)
                statuses.append(answer.status_code)
                replicas.add(answer.headers.get(ray_app.REPLICA_HEADER))

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            clients = [pool.submit(client) for _ in range(6)]
            if _wait_for(lambda: _running_replicas() == 2, 110):
                scaled.set()
                stop_at = min(stop_at, time.monotonic() + 5)
            for c in clients:
                c.result(timeout=300)
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
