"""The serving stack as a Ray Serve application: replicas of the server that follow the load.

    python -m lmops_jax.serving.ray_app --gin_file=gin_configs/runs/serve_ray.gin --gin.CHECKPOINT_PATH="'/tmp/run'"

Why Ray Serve: it already routes HTTP to replicas, counts each replica's ongoing requests, adds and
removes replicas between bounds (`autoscaling_config`), queues and sheds load at the proxy
(`max_queued_requests`, 429 with Retry-After), drains a replica before it goes, restarts one whose
health check fails and places replicas on a multi-node cluster (KubeRay). This module only supplies
the replica: `LmopsServer` builds what `python -m lmops_jax.serve` builds (`serve.build_server`: engine,
scheduler, the same OpenAI-compatible FastAPI app and /metrics) and hands that app to `serve.ingress`.

A replica's life: the constructor turns on the persistent compilation cache (`cli.compile_cache`, as
every CLI job does; LMOPS_JAX_COMPILATION_CACHE applies), loads the checkpoint, starts the scheduler and
runs one warm-up request per engine, so Ray routes to it only once it is compiled; a replica the
autoscaler adds on a node that served the same model before loads its executables from that cache
instead of compiling them. `check_health` fails when its engine failed, so Ray replaces it; a replica
that dies (or stops answering health checks) is replaced too, and the requests it held end in a 502 or,
on a stream, an error event that `ray_proxy`'s guard in Ray's HTTP proxy sends (`start_serve` installs
it). On scale-down, `serve.delete` or SIGTERM, Ray stops routing to it, waits for its ongoing requests
(`graceful_shutdown_timeout_s` = DRAIN_TIMEOUT_S, checked every `graceful_shutdown_wait_loop_s`), then
calls `__del__`, which drains the scheduler and stops it: an
accepted request is answered, never dropped. Every answer carries `x-lmops-replica` (the Ray replica
id), so a client or a test can tell the replicas apart.

`python -m lmops_jax.serving.ray_app` (`serve_on_ray`) starts a local Ray (or joins RAY_ADDRESS), runs
the application with Ray's HTTP proxy on HOST:PORT, logs `serving MODEL at http://HOST:PORT/v1` once
every initial replica is warm, and on SIGTERM / SIGINT deletes it (replicas drain) and exits 0.
`serve run` / `serve deploy` / a KubeRay RayService take `app_builder` (import path
`lmops_jax.serving.ray_app:app_builder`, args `gin_file` and `bindings`). Needs the `ray` extra.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Mapping, Sequence

import gin
import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from lmops_jax.cli import compile_cache, gin_flags, runner
from lmops_jax.serving import ray_proxy
from lmops_jax.serving import serve as serve_lib

if __name__ == "__main__":
    runner.run_as_main("lmops_jax.serving.ray_app")

APP_NAME = "lmops_jax"
REPLICA_HEADER = "x-lmops-replica"


class LmopsServer:
    """One Ray Serve replica: the server of `serve.build_server(**server_options)`, started and warm."""

    def __init__(self, server_options: Mapping[str, Any], drain_timeout_s: float | None):
        compile_cache.configure()  # a replica is a serving job's process: a later one on this node loads, not compiles
        self.server = serve_lib.build_server(**server_options)
        self.drain_timeout_s = drain_timeout_s
        self.server.scheduler.start()
        serve_lib.warm_up(self.server)
        replica_id = serve.get_replica_context().replica_id.unique_id

        @self.server.app.middleware("http")
        async def tag_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica_id
            return response

    def __serve_build_asgi_app__(self) -> Any:
        """The app `serve.ingress` serves (built in the constructor, over this replica's scheduler)."""
        return self.server.app

    def check_health(self) -> None:
        """Raises once the engine failed, so Ray replaces this replica."""
        if not self.server.scheduler.healthy:
            raise RuntimeError(f"the engine failed: {self.server.scheduler.error}")

    def __del__(self) -> None:
        """Ray calls this after the replica's ongoing requests ended; finish anything still queued."""
        server = getattr(self, "server", None)  # absent when the constructor failed
        if server is not None:
            server.stop(drain=True, timeout=self.drain_timeout_s)


def application(*, min_replicas: int = 1, max_replicas: int = 1, target_ongoing_requests: float = 2.0,
                upscale_delay_s: float = 30.0, downscale_delay_s: float = 600.0, metrics_interval_s: float = 10.0,
                look_back_period_s: float = 30.0, max_ongoing_requests: int = 16, max_queued_requests: int = 64,
                ray_actor_options: Mapping[str, Any] | None = None, drain_timeout_s: float | None = 30.0,
                health_check_period_s: float = 10.0, health_check_timeout_s: float = 30.0,
                checkpoint_path: str, **server_options: Any) -> serve.Application:
    """The bound Ray Serve application (nothing runs until `serve.run`).

    Args:
      min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s, downscale_delay_s,
        metrics_interval_s, look_back_period_s: Ray Serve's `autoscaling_config` (MIN_REPLICAS,
        MAX_REPLICAS, TARGET_ONGOING_REQUESTS, UPSCALE_DELAY_S, DOWNSCALE_DELAY_S, METRICS_INTERVAL_S,
        LOOK_BACK_PERIOD_S); Ray adds a replica when the ongoing requests per replica exceed the target
        for upscale_delay_s and removes one when they stay below it for downscale_delay_s.
      max_ongoing_requests: HTTP requests Ray sends one replica at once (RAY_MAX_ONGOING_REQUESTS); keep
        it >= MAX_SLOTS so every slot can be busy, and small enough that load spills to new replicas.
      max_queued_requests: requests the proxy holds while every replica is full; more get 429 with
        Retry-After (RAY_MAX_QUEUED_REQUESTS; -1: no limit).
      ray_actor_options: each replica's resources, e.g. {'num_cpus': 1, 'num_gpus': 1} for one GPU per
        replica (RAY_ACTOR_OPTIONS).
      drain_timeout_s: how long a replica that goes may finish its requests (DRAIN_TIMEOUT_S).
      health_check_period_s, health_check_timeout_s: how often Ray calls `check_health`, and how long an
        answer may take (RAY_HEALTH_CHECK_PERIOD_S, RAY_HEALTH_CHECK_TIMEOUT_S): a replica that died is
        replaced within about one period; one that fails 3 checks in a row (its engine failed, or no
        answer within the timeout) is stopped (drained up to drain_timeout_s) and replaced.
      checkpoint_path, server_options: `serve.build_server`'s arguments (serve.gin's macros).
    """
    serve_lib.check_arguments(checkpoint_path, **{k: server_options[k] for k in (
        "max_slots", "max_queue", "num_replicas", "routing") if k in server_options})
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(f"MIN_REPLICAS ({min_replicas}) and MAX_REPLICAS ({max_replicas}) need "
                         "1 <= MIN_REPLICAS <= MAX_REPLICAS")
    autoscaling = AutoscalingConfig(
        min_replicas=min_replicas, max_replicas=max_replicas, target_ongoing_requests=target_ongoing_requests,
        upscale_delay_s=upscale_delay_s, downscale_delay_s=downscale_delay_s, metrics_interval_s=metrics_interval_s,
        look_back_period_s=look_back_period_s)
    deployment = serve.deployment(serve.ingress()(LmopsServer), name="LmopsServer").options(
        autoscaling_config=autoscaling, max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        graceful_shutdown_timeout_s=1e9 if drain_timeout_s is None else drain_timeout_s,
        graceful_shutdown_wait_loop_s=0.5, health_check_period_s=health_check_period_s,
        health_check_timeout_s=health_check_timeout_s, ray_actor_options=dict(ray_actor_options or {"num_cpus": 1}))
    return deployment.bind(dict(checkpoint_path=checkpoint_path, **server_options), drain_timeout_s)


def start_serve(host: str, port: int) -> None:
    """Starts Serve (its controller and HTTP proxy on host:port) with `ray_proxy`'s guard in the proxy, so a
    request cut by a replica's death ends in a 502 or a stream's error event (on a running cluster whose
    Serve is already up, Ray keeps that Serve's options)."""
    serve.start(http_options={"host": host, "port": port},
                controller_options={"runtime_env": {"env_vars": dict(ray_proxy.PROXY_ENV)}})


def serve_on_ray(*, app: serve.Application, checkpoint_path: str, model_name: str | None = None,
                 host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None,
                 num_cpus: int | None = None) -> None:
    """Runs `app` on Ray (module docstring) until SIGTERM / SIGINT, then deletes it (replicas drain).

    Args:
      app: `application(...)`, bound by serve_ray.gin.
      checkpoint_path, model_name: name the model in the log line (`serve.served_name`).
      host, port: Ray's HTTP proxy (HOST, PORT; loopback unless HOST says otherwise).
      ray_address: None starts a local Ray for this job (stopped at the end); 'auto' or 'ray://...'
        joins a running cluster (RAY_ADDRESS), whose Serve then keeps its own HTTP options.
      num_cpus: the CPUs a local Ray may use (RAY_NUM_CPUS; None: all).
    """
    name = serve_lib.served_name(checkpoint_path, model_name)
    local = ray_address is None
    ray.init(address=ray_address, **(dict(num_cpus=num_cpus, include_dashboard=False) if local else {}))
    ended = threading.Event()  # handlers set after ray.init, which installs its own (a crash report)
    previous = {sig: signal.signal(sig, lambda *_: ended.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        start_serve(host, port)
        serve.run(app, name=APP_NAME, route_prefix="/")
        logging.info("serving %s at http://%s:%d/v1", name, host, port)
        while not ended.wait(1.0):
            pass
        logging.info("stopping: the replicas finish their requests")
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    finally:
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logging.info("server stopped")


def app_builder(args: Mapping[str, Any]) -> serve.Application:
    """For `serve run` / `serve deploy` / a KubeRay RayService: args {'gin_file': a gin file (serve_ray.gin
    or one that includes it), 'bindings': ["CHECKPOINT_PATH='/models/run'", ...]}."""
    unknown = set(args) - {"gin_file", "bindings"}
    if unknown or "gin_file" not in args:
        raise ValueError(f"app_builder takes the args gin_file and bindings, got {sorted(args)}")
    bindings: Sequence[str] = args.get("bindings") or []
    gin_flags.parse([args["gin_file"]], list(bindings), [])
    return gin.get_configurable(application)()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lmops_jax.serving.ray_app`: the gin-configured `serve_on_ray` (exit codes: cli runner)."""
    return runner.run("python -m lmops_jax.serving.ray_app", __doc__,
                      runner.GinJob(serve_on_ray, "gin_configs/runs/serve_ray.gin"), argv)
