"""Replication in one process: `NUM_REPLICAS` engines on disjoint device groups behind one router.

    groups = device_groups(jax.local_devices(), 2, {'data': 1, 'fsdp': 1, 'model': 4})   # 8 devices: 2 x 4
    router = ReplicaRouter([Scheduler(engine_0), Scheduler(engine_1)], routing="least_outstanding")
    app = build_app(router, tokenizer, "my-model")          # the HTTP app takes it as it takes a Scheduler

Why: a model that fits a group of devices serves more requests as several copies, each with its own
decode batch, than as one engine spread over every device (tensor parallelism adds a collective per
layer and per step; a copy adds none). Each replica is an `Engine` on its own group with its own
`Scheduler` (queue, slots, thread); the router only chooses a replica per request. It stands where the
HTTP app expects a `Scheduler` (`submit`, `cancel`, `stats`, `healthy`, `error`, `engine`), so the
server code is the same for one engine or several.

Routing (`ROUTING`):
  least_outstanding  the healthy replica with the fewest requests waiting or running (ties: the lowest
                     index), so a burst spreads over the replicas and a slow replica gets less.
  prefix_affinity    the replica picked by a hash of the prompt's first block (`block_size` tokens,
                     BOS included), so prompts that share a system prompt meet the same replica's
                     prefix cache; the load is balanced only as far as first blocks differ.
A request whose replica's queue is full gets 429 even if another replica has room (the HTTP client
retries), as vLLM's and SGLang's routers do.

Metrics: the vLLM series are the sum over replicas (`combined_stats`; `kv_cache_usage_perc` the mean),
so dashboards read the server as one; `ReplicaCollector` adds per-replica series labelled `replica`.
A replica whose engine failed is skipped; the server is unhealthy (503, `/health`) once all are.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
from typing import Any, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmops_jax.serving.scheduler import (RequestHandle, SamplingParams, Scheduler, SchedulerStats,
                                         SchedulerUnavailable)

ROUTINGS = ("least_outstanding", "prefix_affinity")


def device_groups(devices: Sequence[Any], num_replicas: int, mesh_shape: Mapping[str, int] | None) -> list[list]:
    """`num_replicas` disjoint, consecutive groups of `devices`, each the size `mesh_shape` needs.

    mesh_shape None: one device per replica; an axis of -1: the devices split evenly between replicas;
    else the product of the sizes. Raises ValueError naming NUM_REPLICAS / MESH_SHAPE when they do not fit.
    """
    if not isinstance(num_replicas, int) or isinstance(num_replicas, bool) or num_replicas < 1:
        raise ValueError(f"NUM_REPLICAS must be an int >= 1, got {num_replicas!r}")
    sizes = [] if mesh_shape is None else [int(s) for s in mesh_shape.values()]
    if -1 in sizes:
        per_replica = len(devices) // num_replicas
    else:
        per_replica = math.prod(sizes)
    if per_replica < 1 or per_replica * num_replicas > len(devices):
        raise ValueError(f"NUM_REPLICAS={num_replicas} with MESH_SHAPE={mesh_shape} needs "
                         f"{max(per_replica, 1) * num_replicas} devices, but this process has {len(devices)}")
    return [list(devices[i * per_replica:(i + 1) * per_replica]) for i in range(num_replicas)]


def combined_stats(stats: Sequence[SchedulerStats]) -> SchedulerStats:
    """The replicas' stats as one server's: counts summed, KV usage averaged (equal replicas), healthy
    while any replica is, errors joined."""
    merged: dict[str, Any] = {}
    for field in dataclasses.fields(SchedulerStats):
        values = [getattr(s, field.name) for s in stats]
        if field.name == "finished":
            merged[field.name] = dict(sum((collections.Counter(v) for v in values), collections.Counter()))
        elif field.name == "kv_cache_usage":
            merged[field.name] = sum(values) / len(values)
        elif field.name == "healthy":
            merged[field.name] = any(values)
        elif field.name == "error":
            merged[field.name] = "; ".join(f"replica {i}: {v}" for i, v in enumerate(values) if v) or None
        else:
            merged[field.name] = sum(values)
    return SchedulerStats(**merged)


class ReplicaRouter:
    """Schedulers of identical engines behind one `submit` (module docstring).

    Args:
      replicas: one Scheduler per engine, not started (`start` starts them).
      routing: one of ROUTINGS (ROUTING).
      block_size: the prompt tokens `prefix_affinity` hashes (BLOCK_SIZE, the prefix cache's block).
    """

    def __init__(self, replicas: Sequence[Scheduler], routing: str = "least_outstanding", block_size: int = 16):
        if routing not in ROUTINGS:
            raise ValueError(f"ROUTING must be one of {ROUTINGS}, got {routing!r}")
        if not replicas:
            raise ValueError("a ReplicaRouter needs at least one replica")
        self.replicas = list(replicas)
        self.routing, self.block_size = routing, block_size
        self.routed = [0] * len(self.replicas)  # requests sent to each replica
        self._lock = threading.Lock()

    @property
    def engine(self) -> Any:
        """Replica 0's engine: every replica's has the same shapes and limits (what the app reads)."""
        return self.replicas[0].engine

    @property
    def healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    @property
    def idle(self) -> bool:
        return all(r.idle for r in self.replicas)

    @property
    def error(self) -> str | None:
        return combined_stats([r.stats() for r in self.replicas]).error

    def start(self) -> None:
        for replica in self.replicas:
            replica.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Every replica stops taking requests at once, then each finishes (drain) or cancels its own."""
        for replica in self.replicas:
            replica.stop(drain, timeout=0)
        for replica in self.replicas:
            replica.stop(drain, timeout)

    def submit(self, prompt_tokens: Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None, adapter: str | None = None) -> RequestHandle:
        """Submits to the replica the routing picks; raises as `Scheduler.submit` does."""
        with self._lock:
            index = self._choose(prompt_tokens)
            handle = self.replicas[index].submit(prompt_tokens, params, request_id, adapter)
            self.routed[index] += 1
        return handle

    def _choose(self, prompt_tokens: Sequence[int]) -> int:
        healthy = [i for i, r in enumerate(self.replicas) if r.healthy]
        if not healthy:
            raise SchedulerUnavailable(self.error or "every replica failed")
        if self.routing == "prefix_affinity":
            return healthy[hash(tuple(prompt_tokens[:self.block_size])) % len(healthy)]
        outstanding = {i: _outstanding(self.replicas[i].stats()) for i in healthy}
        return min(healthy, key=outstanding.__getitem__)

    def cancel(self, request_id: str) -> None:
        """Cancels the request on whichever replica holds it (the others ignore an unknown id)."""
        for replica in self.replicas:
            replica.cancel(request_id)

    def stats(self) -> SchedulerStats:
        return combined_stats([r.stats() for r in self.replicas])


def _outstanding(stats: SchedulerStats) -> int:
    return stats.waiting + stats.running


class ReplicaCollector(Collector):
    """Per-replica series for /metrics: lmops:replica_requests_routed_total (counter) and
    lmops:replica_num_requests_outstanding (gauge, waiting + running), labelled model_name and replica."""

    def __init__(self, router: ReplicaRouter, model_name: str):
        self._router, self._model_name = router, model_name

    def collect(self) -> Iterator[Metric]:
        routed = CounterMetricFamily("lmops:replica_requests_routed", "Requests the router sent to each replica.",
                                     labels=["model_name", "replica"])
        outstanding = GaugeMetricFamily("lmops:replica_num_requests_outstanding",
                                        "Requests waiting or running on each replica.", labels=["model_name", "replica"])
        for i, replica in enumerate(self._router.replicas):
            routed.add_metric([self._model_name, str(i)], float(self._router.routed[i]))
            outstanding.add_metric([self._model_name, str(i)], float(_outstanding(replica.stats())))
        yield routed
        yield outstanding
