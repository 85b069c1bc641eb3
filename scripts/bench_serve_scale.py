"""Serving at scale, in one run: mixed LoRA adapters vs the base model, 1 vs 2 replicas, cold vs warm model loads.

On the decode benchmark's bench config (`bench_decode.BENCH`, random weights saved as a checkpoint with a
word-level vocabulary, as `bench_serve.py` makes it), in this process, greedy decoding, compilation
excluded (each system, each replica, serves a warm-up request per adapter first), best of `--rounds`:

  adapters   `--requests` requests, all submitted at once, `--prompt` random prompt tokens and at most
             `--tokens` output tokens each (a request also stops at EOS; tokens/s counts what came), through
             (a) the base model's engine and (b) an engine serving `--adapters` LoRA adapters (rank
             `--rank` on q/k/v/o, random weights, saved as LoRA runs of the base) in
             `--adapters` resident slots, request i naming adapter i mod `--adapters`, so every decode step
             mixes them. Reported: output tokens/s of each and mixed / base (the issue's aim: >= 0.6).
  replicas   the same requests through `serve.build_server` with NUM_REPLICAS=1 and 2 on the process's
             host devices (the script asks XLA for 2), behind the router: tokens/s of each and 2 / 1.
  load       MODELS={'other': the bench checkpoint} with MAX_RESIDENT_MODELS=2 and a third model: the
             first request to 'other' loads it from disk (restore + compile + warm-up: cold); a request
             to the third evicts it; the next request to 'other' loads it from host memory (warm).
             Reported: both load times (`ServedModel.loads`) and warm / cold.

    python scripts/bench_serve_scale.py [--requests 32] [--prompt 32] [--tokens 64] [--adapters 4] [--rank 8] [--rounds 3]

The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench_decode import BENCH  # noqa: E402
from bench_serve import make_checkpoint  # noqa: E402
from lmops_jax.models import decoder_only, loading, model  # noqa: E402
from lmops_jax.serving import builder  # noqa: E402
from lmops_jax.serving import serve as serve_lib  # noqa: E402
from lmops_jax.serving.adapters import AdapterResidency, AdapterSource  # noqa: E402
from lmops_jax.serving.engine import Engine  # noqa: E402
from lmops_jax.serving.scheduler import SamplingParams, Scheduler  # noqa: E402
from tests.helpers import byte_level_checkpoint, lora_run_checkpoint  # noqa: E402

TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj)"


def _prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(2, vocab, args.prompt))) for _ in range(args.requests)]


def tokens_per_s(scheduler: Any, replicas: Sequence[Scheduler], prompts: Sequence[list[int]],
                 adapters: Sequence[str | None], max_tokens: int, rounds: int) -> float:
    """Output tokens/s of the requests submitted at once to a started scheduler (or router), the best of
    `rounds`, after a warm-up of every replica (compiles its prefill bucket, makes every adapter resident)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for replica in replicas:
        for adapter in sorted(set(adapters), key=str):
            replica.submit(prompts[0], SamplingParams(max_tokens=2), adapter=adapter).result(600)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        handles = [scheduler.submit(p, params, adapter=a) for p, a in zip(prompts, adapters)]
        generated = sum(len(h.result(600)[0]) for h in handles)
        best = max(best, generated / (time.perf_counter() - start))
    return best


def bench_adapters(base: str, tmp: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    bench_model = model.DecoderOnlyModel(BENCH)
    sources = {f"lora{i}": AdapterSource.read(f"lora{i}", lora_run_checkpoint(
        bench_model, base, os.path.join(tmp, f"lora{i}"), rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS,
        seed=i)) for i in range(args.adapters)}
    params = loading.restore_params(base, bench_model, loading.default_partitioner())
    options = builder.ServingOptions(max_resident_adapters=args.adapters)
    layout = builder.adapter_layout(bench_model, loading.default_partitioner(), sources, options)
    engine_args = dict(max_slots=args.max_slots, max_length=args.prompt + args.tokens + 8)
    names = list(sources)
    out = {}
    for label, layout_or_none, adapters in (("base", None, [None] * len(prompts)),
                                            ("mixed", layout, [names[i % len(names)] for i in range(len(prompts))])):
        engine = Engine(bench_model, params, adapters=layout_or_none, **engine_args)
        residency = AdapterResidency(engine, sources) if layout_or_none else None
        scheduler = Scheduler(engine, max_queue=len(prompts) + 8, adapters=residency)
        scheduler.start()
        try:
            out[f"{label}_tokens_per_s"] = tokens_per_s(scheduler, [scheduler], prompts, adapters, args.tokens,
                                                        args.rounds)
        finally:
            scheduler.stop(drain=False)
    out["mixed_over_base"] = out["mixed_tokens_per_s"] / out["base_tokens_per_s"]
    return out


def _server(checkpoint: str, args: argparse.Namespace, **kwargs: Any) -> serve_lib.Server:
    return serve_lib.build_server(
        checkpoint, max_slots=args.max_slots, max_queue=args.requests + 8, max_length=args.prompt + args.tokens + 8,
        prefix_cache=False, prefill_chunk=None, request_timeout_s=None, dtype=None, mesh_shape=None,
        logical_axis_rules="tp", model_name=None, **kwargs)


def bench_replicas(base: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    out = {"devices": jax.local_device_count()}
    for replicas in (1, 2):
        server = _server(base, args, num_replicas=replicas)
        server.scheduler.start()
        try:
            out[f"replicas_{replicas}_tokens_per_s"] = tokens_per_s(
                server.scheduler, server.replicas, prompts, [None] * len(prompts), args.tokens, args.rounds)
        finally:
            server.stop(drain=False)
    out["two_over_one"] = out["replicas_2_tokens_per_s"] / out["replicas_1_tokens_per_s"]
    return out


def bench_loads(base: str, tmp: str, args: argparse.Namespace) -> dict:
    small = model.DecoderOnlyModel(decoder_only.LlamaConfig(vocab_size=BENCH.vocab_size, d_model=64, num_layers=1,
                                                            num_heads=2, num_kv_heads=2, mlp_dim=128))
    third = byte_level_checkpoint(small, os.path.join(tmp, "third"))
    server = _server(base, args, models={"other": base, "third": third}, max_resident_models=2)
    server.scheduler.start()
    prompt = [2, 3, 4, 5]
    try:
        for name in ("other", "third", "other"):
            entry, _ = server.models.resolve(name)
            server.models.submit(entry, lambda s: s.submit(prompt, SamplingParams(max_tokens=4))).result(600)
        loads = server.models.resolve("other")[0].loads
    finally:
        server.stop(drain=False)
    (cold_tier, cold), (warm_tier, warm) = loads
    assert (cold_tier, warm_tier) == ("disk", "host"), loads
    return {"cold_load_s": cold, "warm_load_s": warm, "warm_over_cold": warm / cold}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--max_slots", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4, help="LoRA adapters mixed in the batch (and resident)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per system; the best counts")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = make_checkpoint(os.path.join(tmp, "base"), BENCH)
        prompts = _prompts(args, BENCH.vocab_size)
        result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                  "cpus": os.cpu_count(), "args": vars(args)}
        result["adapters"] = bench_adapters(base, tmp, prompts, args)
        print(json.dumps(result["adapters"]), flush=True)
        result["replicas"] = bench_replicas(base, prompts, args)
        print(json.dumps(result["replicas"]), flush=True)
        result["load"] = bench_loads(base, tmp, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
