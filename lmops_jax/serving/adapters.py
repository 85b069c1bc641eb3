"""LoRA adapters of a served model: where they come from, and which are resident on its engine.

    source = AdapterSource.read("legal", "/runs/lora_legal")      # a LoRA run of this library
    residency = AdapterResidency(engine, {"legal": source})
    slot = residency.acquire("legal")    # scheduler thread: the engine slot its rows run through
    residency.release("legal")           # when the request ends

Three tiers, as S-LoRA keeps them: the engine's stack of `MAX_RESIDENT_ADAPTERS` device slots
(`models.multi_lora`), host memory (every adapter once read stays there as numpy; adapters are small),
and the run's checkpoint on disk. `acquire` returns a resident adapter's slot, else loads it into a free
slot or the least recently used slot no running request holds (its adapter stays on the host), else None:
every slot is busy and the request waits. Rows of one decode step may use different slots.

A source is read from the run itself: its model spec (family 'lora': rank, alpha, the base model's
record) and its gin config's INITIAL_CHECKPOINT_PATH, the base it was trained from, which must be a
model this server serves. Serving imports no `peft` code (the import rules keep training code out of
serving), so the spec record is read as data.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Mapping

import jax
import numpy as np

from lmops_jax import checkpoints
from lmops_jax.checkpoints import CheckpointError
from lmops_jax.models import loading, spec
from lmops_jax.models.model import BaseModel
from lmops_jax.models.multi_lora import Adapter


def model_dir_of(checkpoint_path: str) -> str:
    """The model directory a checkpoint path (MODEL_DIR, its checkpoints folder or a step) belongs to."""
    return os.path.dirname(checkpoints.resolve(checkpoint_path)[0])


@dataclasses.dataclass(frozen=True)
class AdapterSource:
    """A LoRA run's adapters on disk: name, path, rank, alpha, the base model's spec record and the base
    checkpoint's model directory (None when the run names no INITIAL_CHECKPOINT_PATH)."""

    name: str
    path: str
    rank: int
    alpha: float
    base_record: Mapping
    base_dir: str | None

    @classmethod
    def read(cls, name: str, path: str) -> AdapterSource:
        """The run at `path` (MODEL_DIR, checkpoints folder or step); CheckpointError names the adapter."""
        try:
            stored = checkpoints.read_model_spec(path)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"ADAPTERS[{name!r}]: {path!r} is not a checkpoint of a LoRA run: {e}") from e
        record = (stored or {})
        if record.get("family") != "lora":
            raise CheckpointError(f"ADAPTERS[{name!r}]: {path!r} holds a {record.get('family', 'spec-less')!r} "
                                  "model, not the adapters of a LoRA run (train one with gin_configs/runs/lora.gin)")
        fields = record["model"]
        text = checkpoints.read_config(path)
        initial = loading.parse_gin(text, repr(path), lambda: loading.gin_macro("INITIAL_CHECKPOINT_PATH")) \
            if text.strip() else None
        base_dir = model_dir_of(initial) if isinstance(initial, str) and initial else None
        return cls(name, path, int(fields["rank"]), float(fields["alpha"]), fields["base"], base_dir)

    def base_model(self) -> BaseModel:
        return spec.model_from_record(self.base_record, f"the base model of adapter {self.name!r}")

    def load(self) -> Adapter:
        """The adapter's arrays, read from disk into host memory."""
        shapes = checkpoints.checkpoint_param_shapes(self.path)
        device = jax.local_devices()[0]
        abstract = checkpoints.unflatten({n: jax.ShapeDtypeStruct(s, np.dtype(d)) for n, (s, d) in shapes.items()})
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
        params = jax.device_get(checkpoints.restore_params(self.path, abstract, shardings))
        return Adapter.from_params(self.name, params, self.rank, self.alpha)


class AdapterResidency:
    """Which adapters hold an engine's adapter slots (module docstring). Scheduler thread only, except
    `resident`, a snapshot any thread may read.

    Counters: `disk_loads`, `host_loads` (a slot filled from host memory), `evictions`.
    """

    def __init__(self, engine, sources: Mapping[str, AdapterSource], host: dict[str, Adapter] | None = None):
        if engine.adapter_layout is None:
            raise ValueError("AdapterResidency needs an engine built with an adapter layout (Engine(adapters=...))")
        self.engine, self.sources = engine, dict(sources)
        self.host: dict[str, Adapter] = host if host is not None else {}
        self._slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # resident; LRU first
        self._free = list(range(engine.adapter_layout.slots, 0, -1))
        self._users: collections.Counter = collections.Counter()
        self.disk_loads = self.host_loads = self.evictions = 0

    @property
    def resident(self) -> frozenset[str]:
        return frozenset(self._slot_of)

    def acquire(self, name: str) -> int | None:
        """The engine slot of adapter `name`, loaded if needed; None when every slot is held by running
        requests. The caller holds it until `release(name)`."""
        slot = self._slot_of.get(name)
        if slot is None:
            slot = self._free.pop() if self._free else self._evict()
            if slot is None:
                return None
            self.engine.load_adapter(slot, self._host_copy(name))
            self._slot_of[name] = slot
        self._slot_of.move_to_end(name)
        self._users[name] += 1
        return slot

    def release(self, name: str) -> None:
        self._users[name] -= 1

    def _evict(self) -> int | None:
        """Frees the least recently used slot no request holds (its adapter stays on the host)."""
        victim = next((n for n in self._slot_of if self._users[n] <= 0), None)
        if victim is None:
            return None
        self.evictions += 1
        return self._slot_of.pop(victim)

    def _host_copy(self, name: str) -> Adapter:
        adapter = self.host.get(name)
        if adapter is None:
            adapter = self.host[name] = self.sources[name].load()
            self.disk_loads += 1
        else:
            self.host_loads += 1
        return adapter
