"""`python -m lmops_jax.serve`: an OpenAI-compatible HTTP server for a checkpoint.

    python -m lmops_jax.serve --gin_file=gin_configs/runs/serve.gin --gin.CHECKPOINT_PATH="'/tmp/run'" \\
      [--gin.PORT=8000] [--gin.MAX_SLOTS=8] [--gin.MAX_QUEUE=64] [--gin.MAX_LENGTH=1024] [--gin.DTYPE="'bfloat16'"]

`serve(...)` is also the Python API. It loads the checkpoint's model through `models.loading` (its
spec names model, vocabulary and special tokens), builds the engine (`serving.engine`), the scheduler
whose thread runs it (`serving.scheduler`) and the FastAPI app (`serving.server`), runs one tiny
request through them (so the first client does not wait for compilation), and serves with uvicorn
until SIGTERM or SIGINT. It logs `serving MODEL at http://HOST:PORT/v1` once it accepts connections
(PORT=0 picks a free port, shown there). On SIGTERM / SIGINT it stops accepting connections, lets the
requests in flight finish (at most `drain_timeout_s`), stops the scheduler and returns (exit 0).
Binds to loopback unless HOST says otherwise. See docs/serving.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from typing import Any, Iterator, Mapping, Sequence

import jax

from lmops_jax.cli import gin_flags
from lmops_jax.cli import runner
from lmops_jax.models import loading
from lmops_jax.partitioning import Partitioner
from lmops_jax.serving import builder, model_cache, speculative
from lmops_jax.serving.adapters import model_dir_of
from lmops_jax.serving.engine import Engine
from lmops_jax.serving.model_cache import ModelCache, ServedModel
from lmops_jax.serving.router import ROUTINGS, ReplicaCollector, ReplicaRouter, device_groups
from lmops_jax.serving.scheduler import SamplingParams, Scheduler  # noqa: F401 - SamplingParams: part of its API
from lmops_jax.serving.server import build_app
from lmops_jax.serving.tokenizer import Tokenizer



@dataclasses.dataclass(frozen=True)
class Server:
    """What `serve` runs: the default model's scheduler (its thread runs the engine; with NUM_REPLICAS > 1
    the router over the replicas' schedulers), its prompt tokenizer, the FastAPI app, the default model's
    name, every replica's scheduler (the warm-up reaches each) and the model cache holding every model
    and adapter (`serving.model_cache`)."""
    scheduler: Scheduler | ReplicaRouter
    tokenizer: Tokenizer
    app: Any
    name: str
    replicas: tuple[Scheduler, ...]
    models: ModelCache

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops every resident model's scheduler, the default model's included (waiting up to `timeout` s
        for each)."""
        self.models.stop(drain=drain, timeout=timeout)


def check_arguments(checkpoint_path: Any, *, port: Any = 0, max_slots: Any = 1, max_queue: Any = 1,
                    num_replicas: Any = 1, routing: Any = "least_outstanding") -> None:
    """Fails early, naming the macro, on the arguments a typo or a missing binding gets wrong most."""
    if checkpoint_path is None or gin_flags.is_required_sentinel(checkpoint_path):
        raise gin_flags.GinConfigError("serve(): required argument checkpoint_path not set (CHECKPOINT_PATH in "
                                       "serve.gin)")
    for name, value, low in (("PORT", port, 0), ("MAX_SLOTS", max_slots, 1), ("MAX_QUEUE", max_queue, 1),
                             ("NUM_REPLICAS", num_replicas, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if routing not in ROUTINGS:
        raise ValueError(f"ROUTING must be one of {ROUTINGS}, got {routing!r}")


@contextlib.contextmanager
def _signals_end_serving() -> Iterator[None]:
    """uvicorn turns SIGTERM / SIGINT into a graceful shutdown and then re-raises the signal to the
    handler it found; a no-op handler there lets `serve` drain the scheduler and return."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _serve_and_announce(server: Any, model_name: str) -> None:
    """Runs the uvicorn server; logs its URL once it listens (the bound port, for PORT=0)."""
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        logging.info("serving %s at http://%s:%d/v1", model_name, host, port)
    await task


def serve(
    *,
    checkpoint_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_slots: int = 8,
    max_queue: int = 64,
    max_length: int | None = None,
    prefix_cache: bool = True,
    kv_cache: str = "dense",
    kv_cache_bytes: int | None = None,
    block_size: int = 16,
    prefill_chunk: int | None = 512,
    request_timeout_s: float | None = None,
    draft_checkpoint: str | None = None,
    num_draft_tokens: int = 4,
    dtype: str | None = None,
    mesh_shape: Mapping[str, int] | None = None,
    logical_axis_rules: Any = "tp",
    model_name: str | None = None,
    drain_timeout_s: float | None = 30.0,
    num_replicas: int = 1,
    routing: str = "least_outstanding",
    models: Mapping[str, str] | None = None,
    adapters: Mapping[str, str] | None = None,
    max_resident_models: int | None = None,
    model_memory_bytes: int | None = None,
    max_resident_adapters: int = 4,
    max_lora_rank: int | None = None,
) -> None:
    """Serves the checkpoint's model (and MODELS, ADAPTERS) over HTTP until SIGTERM / SIGINT (module docstring).

    Args:
      checkpoint_path: MODEL_DIR, its checkpoints folder or a step folder (CHECKPOINT_PATH).
      host, port: where to listen (HOST, PORT; port 0: a free one).
      max_slots: requests decoding at once (MAX_SLOTS).
      max_queue: requests waiting for a slot before new ones get 429 (MAX_QUEUE).
      max_length: prompt + generated tokens of a request (MAX_LENGTH); None: the model's, else 2048.
      prefix_cache: reuse the keys/values of prompt blocks seen before (PREFIX_CACHE); decoder-only
        models only (an encoder-decoder model is served without). Dense rows keep cached blocks in a
        pool of max_slots rows' worth; a paged cache shares its own blocks.
      kv_cache: 'dense' (a row of max_length positions per slot) or 'paged' (a pool of blocks shared by
        the slots, `serving.engine`; decoder-only models) (KV_CACHE).
      kv_cache_bytes: the paged pool's bytes (KV_CACHE_BYTES); None: 90% of the free device memory where
        the device reports it (GPU, TPU), else max_slots rows' worth.
      block_size: positions per KV / prefix-cache block (BLOCK_SIZE).
      prefill_chunk: prompt tokens prefilled per engine step, so running requests keep streaming while a
        long prompt is read (PREFILL_CHUNK; None: whole prompts).
      request_timeout_s: a request running longer ends with what it has (REQUEST_TIMEOUT_S; None: never).
      draft_checkpoint, num_draft_tokens: speculative decoding (DRAFT_CHECKPOINT, NUM_DRAFT_TOKENS): a
        checkpoint of a decoder-only draft model with the served model's vocab_size proposes
        num_draft_tokens tokens per step (`serving.speculative`); None: no speculation.
      dtype: None keeps the checkpoint's dtypes; 'bfloat16' casts (DTYPE).
      mesh_shape, logical_axis_rules: the mesh of local devices and its rules (MESH_SHAPE,
        LOGICAL_AXIS_RULES); None: one device.
      model_name: the name clients pass as `model` (MODEL_NAME); None: the model directory's name.
      drain_timeout_s: on SIGTERM, how long requests in flight may take to finish (DRAIN_TIMEOUT_S; None:
        no limit).
      num_replicas: engines on disjoint groups of this process's devices, each of the mesh_shape's size
        (one device without a mesh), behind a router (NUM_REPLICAS; `serving.router`).
      routing: how the router picks a replica: 'least_outstanding' or 'prefix_affinity' (ROUTING).
      models: more models, name -> checkpoint (MODELS), loaded when a request names them and evicted
        least recently used (`serving.model_cache`); one engine each, on the first replica's devices.
      adapters: LoRA adapters, name -> the MODEL_DIR of a LoRA run whose INITIAL_CHECKPOINT_PATH is a
        served model (ADAPTERS); requests naming one run through it on that model's engine.
      max_resident_models, model_memory_bytes: how many models may be resident at once, and the device
        bytes they may hold together (MAX_RESIDENT_MODELS, MODEL_MEMORY_BYTES; None: no limit).
      max_resident_adapters: adapters resident per engine at once (MAX_RESIDENT_ADAPTERS).
      max_lora_rank: the largest adapter rank served (MAX_LORA_RANK; None: the largest of ADAPTERS').
    """
    check_arguments(checkpoint_path, port=port, max_slots=max_slots, max_queue=max_queue, num_replicas=num_replicas,
                    routing=routing)
    server = build_server(
        checkpoint_path, max_slots=max_slots, max_queue=max_queue, max_length=max_length, prefix_cache=prefix_cache,
        kv_cache=kv_cache, kv_cache_bytes=kv_cache_bytes, block_size=block_size,
        prefill_chunk=prefill_chunk, request_timeout_s=request_timeout_s, dtype=dtype, mesh_shape=mesh_shape,
        logical_axis_rules=logical_axis_rules, model_name=model_name, draft_checkpoint=draft_checkpoint,
        num_draft_tokens=num_draft_tokens, num_replicas=num_replicas, routing=routing, models=models,
        adapters=adapters, max_resident_models=max_resident_models, model_memory_bytes=model_memory_bytes,
        max_resident_adapters=max_resident_adapters, max_lora_rank=max_lora_rank)
    server.scheduler.start()
    try:
        warm_up(server)
        _run_until_signal(server, host, port, drain_timeout_s)
    finally:
        server.stop(drain=True)
    logging.info("server stopped")


def build_server(checkpoint_path: str, *, max_slots: int, max_queue: int, max_length: int | None, prefix_cache: bool,
                 kv_cache: str = "dense", kv_cache_bytes: int | None = None, block_size: int = 16,
                 prefill_chunk: int | None, request_timeout_s: float | None, dtype: str | None,
                 mesh_shape: Mapping[str, int] | None, logical_axis_rules: Any,
                 model_name: str | None, draft_checkpoint: str | None = None, num_draft_tokens: int = 4,
                 num_replicas: int = 1, routing: str = "least_outstanding", models: Mapping[str, str] | None = None,
                 adapters: Mapping[str, str] | None = None, max_resident_models: int | None = None,
                 model_memory_bytes: int | None = None, max_resident_adapters: int = 4,
                 max_lora_rank: int | None = None) -> Server:
    """The server of a checkpoint (and MODELS, ADAPTERS), the default model's schedulers not started yet
    (args as for `serve`)."""
    options = builder.ServingOptions(
        max_slots=max_slots, max_queue=max_queue, max_length=max_length, prefix_cache=prefix_cache,
        kv_cache=kv_cache, kv_cache_bytes=kv_cache_bytes, block_size=block_size, prefill_chunk=prefill_chunk,
        request_timeout_s=request_timeout_s, dtype=dtype, max_resident_adapters=max_resident_adapters,
        max_lora_rank=max_lora_rank)
    spec = loading.read_spec(checkpoint_path)
    model = loading.with_dtype(spec.model, dtype)
    if prefix_cache and not model.prompt_shares_cache:
        logging.info("PREFIX_CACHE: %s encodes its whole prompt at once, so it is served without a prefix cache",
                     type(model).__name__)
    name = served_name(checkpoint_path, model_name)
    others = _check_models(models, name)
    partitioners = _partitioners(mesh_shape, logical_axis_rules, num_replicas)
    model_dirs = {name: model_dir_of(checkpoint_path), **{n: model_dir_of(c) for n, c in others.items()}}
    by_model = builder.assign_adapters(builder.read_adapters(adapters), model_dirs)
    own_adapters = by_model.get(name, {})
    layout = builder.adapter_layout(model, partitioners[0], own_adapters, options)
    # read once, onto the first replica's devices; each Engine places a copy on its own (`place_params`)
    params = loading.restore_params(checkpoint_path, model, partitioners[0])
    engine_cls, draft_args = Engine, {}
    if draft_checkpoint is not None:
        draft_model = loading.with_dtype(loading.read_spec(draft_checkpoint).model, dtype)
        speculative.check_draft(model, draft_model)  # before restoring the draft's params
        engine_cls = speculative.SpeculativeEngine
        draft_args = dict(draft_model=draft_model, num_draft_tokens=num_draft_tokens,
                          draft_params=loading.restore_params(draft_checkpoint, draft_model, partitioners[0]))
    tokenizer = Tokenizer.from_spec(spec, model)
    host_adapters: dict = {}
    engines = [engine_cls(model, params, partitioner, **options.engine_args(model), adapters=layout, **draft_args)
               for partitioner in partitioners]
    replicas = tuple(options.scheduler(engine, tokenizer, model_dirs[name], own_adapters, host_adapters)
                     for engine in engines)
    scheduler = replicas[0] if num_replicas == 1 else ReplicaRouter(replicas, routing, block_size)
    template = builder.chat_template(spec.vocabulary)
    default = ServedModel(name, checkpoint_path, tokenizer, template, options.length_for(model), adapters=own_adapters,
                          scheduler=scheduler, engines=engines)
    entries = [default] + [builder.lazy_model(n, c, options, partitioners[0], by_model.get(n, {}))
                           for n, c in others.items()]
    cache = ModelCache(entries, max_resident=max_resident_models, memory_bytes=model_memory_bytes,
                       prompt=tokenizer.prompt("Hi"))
    collectors = [ReplicaCollector(scheduler, name)] if num_replicas > 1 else []
    app = build_app(None, None, None, models=cache, collectors=collectors)
    return Server(scheduler, tokenizer, app, name, replicas, cache)


def _check_models(models: Mapping[str, str] | None, default_name: str) -> dict[str, str]:
    """MODELS as a dict of name -> checkpoint; ValueError names a bad entry or a clash with the default."""
    if models is None:
        return {}
    if not isinstance(models, Mapping) or not all(isinstance(k, str) and k and isinstance(v, str)
                                                  for k, v in models.items()):
        raise ValueError(f"MODELS must be a dict of name -> checkpoint path, got {models!r}")
    if default_name in models:
        raise ValueError(f"MODELS names {default_name!r}, the default model's name (MODEL_NAME or CHECKPOINT_PATH's "
                         "directory); give it another name")
    return dict(models)


def served_name(checkpoint_path: str, model_name: str | None) -> str:
    """What clients pass as `model`: MODEL_NAME, else the model directory's name."""
    return model_name or os.path.basename(model_dir_of(checkpoint_path))


def _partitioners(mesh_shape: Mapping[str, int] | None, logical_axis_rules: Any,
                  num_replicas: int) -> list[Partitioner]:
    """One partitioner per replica. One replica keeps the mesh of all devices (MESH_SHAPE) or one device;
    several get disjoint groups of this process's devices (`router.device_groups`)."""
    if num_replicas == 1:
        return [loading.default_partitioner() if mesh_shape is None else Partitioner(mesh_shape, logical_axis_rules)]
    groups = device_groups(jax.local_devices(), num_replicas, mesh_shape)
    if mesh_shape is None:
        return [Partitioner({"data": 1, "fsdp": 1, "model": 1}, "dp", devices=group) for group in groups]
    return [Partitioner(mesh_shape, logical_axis_rules, devices=group) for group in groups]


def warm_up(server: Server) -> None:
    """One tiny request per replica of the default model, so the first client does not wait for the
    compilation; an engine that fails here fails the job. (Other models warm up as they load.)"""
    prompt = server.tokenizer.prompt("Hi")
    for replica in server.replicas:
        model_cache.warm_up(replica, prompt)


def _run_until_signal(server: Server, host: str, port: int, drain_timeout_s: float | None) -> None:
    """Serves the app with uvicorn until SIGTERM / SIGINT, then lets the requests in flight finish."""
    import uvicorn
    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=drain_timeout_s)
    with _signals_end_serving():
        asyncio.run(_serve_and_announce(uvicorn.Server(config), server.name))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lmops_jax.serve`: the gin-configured `serve` through the CLI runner (exit codes there)."""
    return runner.run("python -m lmops_jax.serve", __doc__, runner.GinJob(serve, "gin_configs/runs/serve.gin"), argv)
