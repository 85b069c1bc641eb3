"""Many models behind one server: which are resident on the devices, loaded on demand, evicted LRU.

    cache = ModelCache([default, other], memory_bytes=8 << 30)     # ServedModel entries; default first
    entry, adapter = cache.resolve("legal")       # the OpenAI `model` field: a model or an adapter name
    handles = cache.submit(entry, lambda scheduler: scheduler.submit(...))   # loads `entry` if needed

The default model (CHECKPOINT_PATH, with its replicas) is pinned: it is loaded at start and never
evicted. Every other model (MODELS) is loaded when a request first names it, and the least recently
used ones whose schedulers are idle are evicted while the resident models exceed `max_resident` or
`memory_bytes` (params, KV cache, adapters and prefix pool of each engine, measured once loaded,
estimated before). Three tiers: resident (device), host (the restored params as numpy, kept after the
first read, so a re-load does not touch disk) and disk. An evicted engine keeps its compiled functions
(`Engine.offload`), so a re-load from host is a transfer plus a warm-up request, no compilation. When
the budget cannot be met because every resident model is busy, `ModelsBusy` (the server answers 503 with
Retry-After). One lock guards residency: `submit` holds it while it calls `fn`, and evictions take it,
so a model is never evicted between being chosen and taking the request; loads are serialized by
another, outside the first, so requests to resident models go on while a model loads.

Each load is timed (`ServedModel.loads`: tier 'disk' or 'host', seconds from the call to a warm engine).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax

from lmops_jax.serving.adapters import AdapterSource
from lmops_jax.serving.chat_template import ChatTemplate
from lmops_jax.serving.engine import Engine
from lmops_jax.serving.scheduler import SamplingParams, Scheduler
from lmops_jax.serving.tokenizer import Tokenizer

T = TypeVar("T")
WARMUP_TIMEOUT_S = 600.0


class UnknownModel(LookupError):
    """A `model` name no served model or adapter has."""

    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(f"the model {name!r} does not exist; this server serves {sorted(known)}")
        self.name, self.known = name, list(known)


class ModelsBusy(RuntimeError):
    """A model cannot be loaded now: the memory budget is held by models with requests in flight."""


def warm_up(scheduler: Any, prompt: Sequence[int]) -> None:
    """One tiny request through `scheduler` (a started Scheduler or router), so clients do not wait for
    the compilation; an engine that fails here raises."""
    _, reason = scheduler.submit(list(prompt), SamplingParams(max_tokens=2)).result(WARMUP_TIMEOUT_S)
    if reason == "error":
        raise RuntimeError(f"the engine failed on a warm-up request: {scheduler.error}")


@dataclasses.dataclass(eq=False)
class ServedModel:
    """One model the server can serve, resident or not.

    name: what clients pass as `model`; checkpoint: where its params are; tokenizer, chat_template: its
    text side; adapters: the LoRA adapters served on it (name -> source); make_engine(params): a new
    engine (compiles on first use); make_scheduler(engine): a scheduler over it, not started;
    read_params(): the params from disk, on the host. The default model comes with its `scheduler` (maybe
    a router over replicas) and `engines` already built, and `pinned`.
    """

    name: str
    checkpoint: str
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    max_length: int
    make_engine: Callable[[Any], Engine] | None = None
    make_scheduler: Callable[[Engine], Scheduler] | None = None
    read_params: Callable[[], Any] | None = None
    adapters: Mapping[str, AdapterSource] = dataclasses.field(default_factory=dict)
    pinned: bool = False
    scheduler: Any = None  # a started Scheduler / ReplicaRouter while resident, else None
    engines: list[Engine] = dataclasses.field(default_factory=list)
    estimated_bytes: int = 0  # before the first load: params + KV cache, from shapes
    host_params: Any = None
    last_used: float = 0.0
    loads: list[tuple[str, float]] = dataclasses.field(default_factory=list)

    @property
    def resident(self) -> bool:
        return self.scheduler is not None

    @property
    def device_bytes(self) -> int:
        """Bytes its engines hold now (when resident), else what a load will take."""
        measured = sum(e.device_bytes() for e in self.engines if e.loaded)
        return measured or self.estimated_bytes

    def resident_adapters(self) -> frozenset[str]:
        residency = getattr(self.scheduler, "adapters", None)
        return residency.resident if self.resident and residency is not None else frozenset()


class ModelCache:
    """The served models (module docstring). `entries[0]` is the default model, resident and pinned."""

    def __init__(self, entries: Sequence[ServedModel], *, max_resident: int | None = None,
                 memory_bytes: int | None = None, prompt: Sequence[int] = (0,)):
        if not entries or not entries[0].resident:
            raise ValueError("ModelCache needs the default model first, with its scheduler built")
        names = [e.name for e in entries] + [a for e in entries for a in e.adapters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"MODELS / ADAPTERS: names {duplicates} are used twice (model names and adapter "
                             "names share the OpenAI `model` field)")
        if max_resident is not None and max_resident < 1:
            raise ValueError(f"MAX_RESIDENT_MODELS must be None or >= 1, got {max_resident}")
        self.entries = list(entries)
        self.default = self.entries[0]
        self.default.pinned = True
        self.max_resident, self.memory_bytes = max_resident, memory_bytes
        self._warm_up_prompt = list(prompt)
        self._lock = threading.Lock()  # residency: who is resident, submits, evictions
        self._load_lock = threading.Lock()
        self._targets: dict[str, tuple[ServedModel, str | None]] = {}
        for entry in self.entries:
            self._targets[entry.name] = (entry, None)
            for adapter in entry.adapters:
                self._targets[adapter] = (entry, adapter)
        self._check_budget()

    def _check_budget(self) -> None:
        if self.memory_bytes is None:
            return
        for entry in self.entries[1:]:
            need = entry.estimated_bytes + self.default.device_bytes
            if need > self.memory_bytes:
                raise ValueError(f"MODEL_MEMORY_BYTES={self.memory_bytes} cannot hold model {entry.name!r} "
                                 f"(~{entry.estimated_bytes} bytes) beside the default model "
                                 f"({self.default.device_bytes} bytes)")

    # ------------------------------------------------------------------------------ lookups
    def resolve(self, name: str | None) -> tuple[ServedModel, str | None]:
        """(the model, the adapter or None) a request's `model` names; None: the default model."""
        if name is None:
            return self.default, None
        target = self._targets.get(name)
        if target is None:
            raise UnknownModel(name, list(self._targets))
        return target

    def resident(self) -> list[ServedModel]:
        return [e for e in self.entries if e.resident]

    def schedulers(self) -> dict[str, Any]:
        """{model name: its scheduler} of the resident models (for /metrics and /health)."""
        return {e.name: e.scheduler for e in self.entries if e.resident}

    # ------------------------------------------------------------------------------ residency
    def submit(self, entry: ServedModel, fn: Callable[[Any], T], load: bool = True) -> T:
        """fn(the entry's scheduler), after loading the entry if it is not resident (may evict others);
        raises ModelsBusy when it cannot be loaded now. load=False: never loads here (an event loop's
        call), a model evicted meanwhile raises ModelsBusy."""
        while True:
            with self._lock:
                if entry.resident:
                    entry.last_used = time.monotonic()
                    return fn(entry.scheduler)
            if not load:
                raise ModelsBusy(f"model {entry.name!r} was just evicted; retry")
            with self._load_lock:  # one load at a time; submits to resident models go on meanwhile
                if not entry.resident:
                    with self._lock:
                        self._make_room(entry)
                    self._load(entry)

    def _over_budget(self, incoming: ServedModel) -> bool:
        resident = self.resident()
        if self.max_resident is not None and len(resident) + 1 > self.max_resident:
            return True
        if self.memory_bytes is None:
            return False
        return sum(e.device_bytes for e in resident) + incoming.device_bytes > self.memory_bytes

    def _make_room(self, incoming: ServedModel) -> None:
        while self._over_budget(incoming):
            idle = [e for e in self.resident() if not e.pinned and e.scheduler.idle]
            if not idle:
                raise ModelsBusy(f"model {incoming.name!r} is not loaded and the models holding the device "
                                 "memory have requests in flight; retry shortly")
            self._evict(min(idle, key=lambda e: e.last_used))

    def _evict(self, entry: ServedModel) -> None:
        """Stops the entry's scheduler and drops its device arrays (its params stay on the host)."""
        entry.scheduler.stop(drain=True)
        entry.scheduler = None
        for engine in entry.engines:
            engine.offload()

    def _load(self, entry: ServedModel) -> None:
        start = time.perf_counter()
        tier = "host" if entry.host_params is not None else "disk"
        if entry.host_params is None:
            entry.host_params = jax.device_get(entry.read_params())
        if entry.engines:
            entry.engines[0].reload(entry.host_params)
        else:
            entry.engines = [entry.make_engine(entry.host_params)]
        scheduler = entry.make_scheduler(entry.engines[0])
        scheduler.start()
        try:
            warm_up(scheduler, self._warm_up_prompt)
        except Exception:
            scheduler.stop(drain=False)
            entry.engines[0].offload()
            raise
        with self._lock:
            entry.scheduler = scheduler
        entry.loads.append((tier, time.perf_counter() - start))

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops every resident model's scheduler (the default model's too), waiting up to `timeout` s for each."""
        for entry in self.resident():
            entry.scheduler.stop(drain=drain, timeout=timeout)
