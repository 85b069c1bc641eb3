"""Serving under load: continuous batching through the HTTP server vs static batching vs transformers' CB.

One seeded workload of N requests with Poisson arrivals at `--rate` requests/s and mixed lengths (a
`--long_fraction` of requests with long prompts and outputs, the rest short; uniform within each kind)
runs, with greedy decoding, on the decode benchmark's bench config (`bench_decode.BENCH`, random
weights saved as a checkpoint with its model spec) through:

  cb (HTTP)      `python -m lmops_jax.serve` as a subprocess on 127.0.0.1 (a free port), streaming
                 `/v1/completions`; the load generator is an asyncio httpx client in this process.
  cb_inproc      the same `Scheduler` + `Engine` in this process (no HTTP), same arrivals: separates the
                 HTTP/SSE cost from the batching policy. Dense KV rows: MAX_SLOTS rows of max_length.
  paged          the same in-process run with KV_CACHE='paged' (blocks of `--block_size`) in exactly the
                 dense rows' KV bytes (`engine.kv_bytes_per_row` x MAX_SLOTS) and `--paged_slot_factor` x
                 MAX_SLOTS slots: short requests need few blocks, so more of them decode at once in the
                 same bytes; when blocks run out a request is preempted and recomputed. Reported: the
                 most slots decoding in one engine step for both (`paged_` / `dense_peak_concurrency`),
                 preemptions, and greedy token agreement with the dense run.
  static         the same `Engine` (built by the same `serving.serve.build_server`) in static batching,
                 implemented here on the Engine API: wait for MAX_SLOTS arrived requests (or
                 `--static_wait_s` after the first of them), prefill them, step until every one is done,
                 then take the next batch. A request's latency ends at its own last token (as if streamed),
                 not at its batch's end, which favours static batching.
  hf_cb          Hugging Face transformers' continuous batching (`init_continuous_batching`, PyTorch CPU,
                 page_size 16) on the same weights exported with `lmops_jax.convert.export_hf`, in this
                 process with the same arrival schedule; its greedy tokens are compared with ours token by
                 token (`hf_token_agreement`).

  spec (batch 1) a served model and a draft distilled from it on the same data (`--spec_checkpoint`,
                 `--spec_draft_checkpoint`; without them `scripts/make_spec_pair.py` trains a pair with
                 the library's CLI first, on `synthetic_lm`, and its wall time is reported). In process,
                 token ids only (the pair's byte vocabulary is not the bench's): `--spec_requests`
                 prompts of `--spec_prompt` symbols sampled from the task's Markov source, `--spec_tokens`
                 greedy tokens each, one after another on one slot, with and without the draft.

Every system stops a request at EOS (id 1) or its max_tokens. Compilation is excluded: each system first
serves one request per prefill bucket the workload touches. The checkpoint's vocabulary is a word-level
tokenizer whose token i is the word "wI", so streamed text gives back token ids exactly.

Throughput counts output tokens from the first arrival to the last finish; TTFT is from a request's
send (its arrival) to its first token; TPOT is (latency - TTFT) / (tokens - 1) per request. The last
line printed is one JSON object with the figures.

    python scripts/bench_serve.py [--requests 128] [--rate 32] [--max_slots 8] [--skip_hf] [--quick]
        [--spec_checkpoint DIR --spec_draft_checkpoint DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmops_jax import checkpoints  # noqa: E402
from lmops_jax.data.synthetic import MarkovSource  # noqa: E402
from lmops_jax.models import decoder_only, model, spec  # noqa: E402
from lmops_jax.serving import serve as serve_lib  # noqa: E402
from lmops_jax.serving.engine import Engine, SlotSampling, kv_bytes_per_row  # noqa: E402
from lmops_jax.serving.scheduler import SamplingParams, Scheduler, TokenEvent  # noqa: E402
from scripts import make_spec_pair  # noqa: E402
from scripts.bench_decode import BENCH  # noqa: E402

TINY = decoder_only.LlamaConfig(vocab_size=256, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=128,
                                dtype="float32", param_dtype="float32")
EOS = 1
READY = re.compile(r"serving \S+ at (http://127\.0\.0\.1:\d+/v1)")
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class Request:
    arrival_s: float  # after the run's start
    prompt: list[int]
    max_tokens: int


@dataclasses.dataclass
class Outcome:
    """What one request got: its send time, each token's arrival time (perf_counter) and id."""
    sent: float
    times: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------ workload
def workload(args: argparse.Namespace, vocab: int) -> list[Request]:
    """N requests: Poisson arrivals (exponential gaps, the first at 0) and short / long lengths."""
    rng = np.random.default_rng(args.seed)
    arrivals = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / args.rate, args.requests - 1))])
    requests = []
    for arrival in arrivals:
        long = rng.random() < args.long_fraction
        prompt_max, out_max = (args.long_prompt, args.long_output) if long else (args.short_prompt, args.short_output)
        prompt_len = int(rng.integers(max(1, prompt_max // 4), prompt_max + 1))
        out_len = int(rng.integers(max(1, out_max // 4), out_max + 1))
        prompt = rng.integers(EOS + 1, vocab, prompt_len).tolist()  # no EOS / 0 inside prompts
        requests.append(Request(float(arrival), prompt, out_len))
    return requests


def make_checkpoint(model_dir: str, cfg: decoder_only.LlamaConfig) -> str:
    """Random-init params with a model spec and a word-level vocabulary ("w0" ... ; EOS 1, no BOS)."""
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    wrapper = model.DecoderOnlyModel(cfg)
    params = jax.jit(lambda k: nn.meta.unbox(wrapper.init_params(k, {"decoder_input_tokens": (1, 8)})))(
        jax.random.key(0))
    os.makedirs(model_dir, exist_ok=True)
    tokenizer = tokenizers.Tokenizer(WordLevel({f"w{i}": i for i in range(cfg.vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    path = os.path.join(model_dir, "tokenizer.json")
    tokenizer.save(path)
    model_spec = spec.ModelSpec(wrapper, spec.VocabularySpec("hf_tokenizer", path, eos_id=EOS, pad_id=0),
                                spec.SpecialTokens(bos_id=None, eos_id=EOS, pad_id=0))
    checkpoints.save_params(model_dir, jax.device_get(params), "", model_spec=model_spec.to_json())
    return model_dir


def warmup_requests(requests: Sequence[Request], buckets: Sequence[int]) -> list[Request]:
    """One 1-token request per prefill bucket the workload's prompts fall in (compiles them)."""
    used = sorted({next(b for b in buckets if b >= len(r.prompt)) for r in requests})
    return [Request(0.0, [EOS + 1] * b, 1) for b in used]


# ------------------------------------------------------------------------------------- summary
def summarize(outcomes: Sequence[Outcome], t0: float) -> dict:
    """tokens/s over the run, latency mean / p99, TTFT p50 / p99 and TPOT p50 / p99 in seconds."""
    latency = np.array([o.times[-1] - o.sent for o in outcomes])
    ttft = np.array([o.times[0] - o.sent for o in outcomes])
    tpot = np.array([(o.times[-1] - o.times[0]) / (len(o.times) - 1) for o in outcomes if len(o.times) > 1])
    tokens = sum(len(o.tokens) for o in outcomes)
    span = max(o.times[-1] for o in outcomes) - t0
    out = {"tokens_per_s": tokens / span, "output_tokens": tokens, "latency_mean_s": latency.mean(),
           "latency_p99_s": np.percentile(latency, 99), "ttft_p50_s": np.percentile(ttft, 50),
           "ttft_p99_s": np.percentile(ttft, 99),
           "tpot_p50_s": np.percentile(tpot, 50) if len(tpot) else None,
           "tpot_p99_s": np.percentile(tpot, 99) if len(tpot) else None}
    return {k: v if v is None or k == "output_tokens" else round(float(v), 4) for k, v in out.items()}


def token_agreement(ours: Sequence[Outcome], theirs: Sequence[Outcome]) -> float:
    """Equal tokens at equal positions over all requests, divided by the longer side's tokens."""
    same = total = 0
    for a, b in zip(ours, theirs):
        same += sum(x == y for x, y in zip(a.tokens, b.tokens))
        total += max(len(a.tokens), len(b.tokens))
    return round(same / max(total, 1), 4)


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.perf_counter()))


# ------------------------------------------------------------------------- CB through HTTP
class ServerProcess:
    """`python -m lmops_jax.serve` on 127.0.0.1 with a free port, stopped by its pid."""

    def __init__(self, checkpoint: str, max_slots: int, max_length: int):
        flags = [f"--gin.CHECKPOINT_PATH='{checkpoint}'", "--gin.PORT=0", f"--gin.MAX_SLOTS={max_slots}",
                 f"--gin.MAX_LENGTH={max_length}", "--gin.MAX_QUEUE=4096", "--gin.PREFIX_CACHE=False"]
        self.proc = subprocess.Popen([sys.executable, "-m", "lmops_jax.serve", "--gin_file=gin_configs/runs/serve.gin",
                                      *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(START_TIMEOUT_S) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-30:]))
        self.url = READY.search("".join(self.lines)).group(1)

    def _read(self, ready: threading.Event) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if READY.search(line):
                ready.set()
        ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _token_id(text: str) -> int:
    """A streamed token's id from its text ("wI" after a space; EOS streams no text)."""
    word = text.strip()
    return int(word[1:]) if word else EOS


async def _stream_one(client, url: str, request: Request, t0: float) -> Outcome:
    await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
    outcome = Outcome(time.perf_counter())
    body = {"prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", f"{url}/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"the server failed a request: {chunk['error']}")
            if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                outcome.times.append(time.perf_counter())
                outcome.tokens.append(_token_id(chunk["choices"][0]["text"]))
    return outcome


async def _http_load(url: str, requests: Sequence[Request]) -> tuple[list[Outcome], float]:
    import httpx
    limits = httpx.Limits(max_connections=len(requests) + 1, max_keepalive_connections=len(requests) + 1)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        t0 = time.perf_counter()
        outcomes = await asyncio.wait_for(asyncio.gather(*(_stream_one(client, url, r, t0) for r in requests)),
                                          REQUEST_TIMEOUT_S)
    return list(outcomes), t0


def run_http(checkpoint: str, requests: Sequence[Request], warmup: Sequence[Request],
             args: argparse.Namespace) -> tuple[list[Outcome], float]:
    server = ServerProcess(checkpoint, args.max_slots, args.max_length)
    try:
        asyncio.run(_http_load(server.url, warmup))
        return asyncio.run(_http_load(server.url, requests))
    finally:
        server.stop()


# ---------------------------------------------------------------------- in-process CB and static
def run_scheduler(scheduler: Scheduler, requests: Sequence[Request]) -> tuple[list[Outcome], float]:
    """The same arrivals submitted to a started Scheduler in this process, one client thread each."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    errors: list[BaseException] = []
    t0 = time.perf_counter()

    def client(i: int, request: Request) -> None:
        try:
            _sleep_until(t0 + request.arrival_s)
            outcome = Outcome(time.perf_counter())
            handle = scheduler.submit(request.prompt, SamplingParams(max_tokens=request.max_tokens, temperature=0.0))
            for event in handle.iter_events(timeout=REQUEST_TIMEOUT_S):
                if isinstance(event, TokenEvent):
                    outcome.times.append(time.perf_counter())
                    outcome.tokens.append(event.token_id)
            outcomes[i] = outcome
        except BaseException as e:  # noqa: BLE001 - reported below, after every thread ended
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i, r), daemon=True) for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S)
    if errors or any(o is None for o in outcomes):
        raise RuntimeError(f"in-process continuous batching: {errors[:1] or 'a request did not finish'}")
    return outcomes, t0


def _count_decoding(engine: Engine) -> list[int]:
    """Wraps this engine's `generate` to record how many slots hold a decoding request at each step:
    the exact concurrency the engine ran, which token timestamps cannot give once requests are
    preempted (a preempted request's first and last tokens span the time it waited)."""
    counts: list[int] = []
    generate = engine.generate

    def counted(*args, **kwargs):
        counts.append(engine.max_slots - len(engine.free_slots))
        return generate(*args, **kwargs)

    engine.generate = counted
    return counts


def run_inproc(scheduler: Scheduler, requests: Sequence[Request],
               warmup: Sequence[Request]) -> tuple[tuple[list[Outcome], float], dict]:
    """The workload on a built, not yet started scheduler after its warm-up, and what the engine held:
    the most requests decoding in one step and the preemptions (paged KV) during the workload."""
    scheduler.start()
    try:
        run_scheduler(scheduler, warmup)
        decoding = _count_decoding(scheduler.engine)
        before = scheduler.stats().preemptions
        run = run_scheduler(scheduler, requests)
        held = {"peak_concurrency": max(decoding), "preemptions": scheduler.stats().preemptions - before}
    finally:
        scheduler.stop(drain=False, timeout=60)
    return run, held


def _run_batch(engine: Engine, requests: Sequence[Request], batch: Sequence[int], outcomes: list,
               sent: Sequence[float]) -> None:
    """Static batching's unit: prefill the batch into slots 0.., step until all are done, free them."""
    sampling = SlotSampling.greedy(engine.max_slots)
    for slot, i in enumerate(batch):
        engine.insert(engine.prefill(requests[i].prompt), slot)
        outcomes[i] = Outcome(sent[i])
    live = dict(enumerate(batch))
    while live:
        result = engine.generate(sampling)
        now = time.perf_counter()
        for slot, i in list(live.items()):
            token, outcome = int(result.tokens[slot]), outcomes[i]
            outcome.times.append(now)
            outcome.tokens.append(token)
            if token == EOS or len(outcome.tokens) >= requests[i].max_tokens or result.finished[slot]:
                del live[slot]
    for slot in range(len(batch)):
        engine.free(slot)


def run_static(engine: Engine, requests: Sequence[Request], wait_s: float) -> tuple[list[Outcome], float]:
    """Static batching on the Engine API: a batch is the next max_slots requests, or those arrived by
    `wait_s` after the first of them; it runs to completion before the next batch starts."""
    outcomes: list = [None] * len(requests)
    t0 = time.perf_counter()
    arrival = [t0 + r.arrival_s for r in requests]
    start = 0
    while start < len(requests):
        end = min(start + engine.max_slots, len(requests))
        _sleep_until(min(arrival[end - 1], arrival[start] + wait_s))
        now = time.perf_counter()
        batch = [i for i in range(start, end) if arrival[i] <= now]
        _run_batch(engine, requests, batch, outcomes, arrival)
        start += len(batch)
    return outcomes, t0


# ------------------------------------------------------------------------ speculative, batch 1
def _local_server(checkpoint: str, args: argparse.Namespace, max_slots: int, draft: str | None = None,
                  kv_cache_bytes: int | None = None):
    """`serve.build_server` as the HTTP job builds it, without prefix cache, its scheduler not started;
    with `kv_cache_bytes`, a paged KV cache of that many bytes (else dense rows)."""
    return serve_lib.build_server(
        checkpoint, max_slots=max_slots, max_queue=4096, max_length=args.max_length, prefix_cache=False,
        kv_cache="dense" if kv_cache_bytes is None else "paged", kv_cache_bytes=kv_cache_bytes,
        block_size=args.block_size, prefill_chunk=512, request_timeout_s=None, dtype=None, mesh_shape=None,
        logical_axis_rules="tp", model_name=None, draft_checkpoint=draft, num_draft_tokens=args.num_draft_tokens)


def _sequential_tokens_per_s(scheduler: Scheduler, requests: Sequence[Request]) -> tuple[float, list[list[int]]]:
    """Requests one after another (batch 1): output tokens/s and each request's tokens."""
    start, outputs = time.perf_counter(), []
    for request in requests:
        params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0)
        outputs.append(scheduler.submit(request.prompt, params).result(REQUEST_TIMEOUT_S)[0])
    return sum(map(len, outputs)) / (time.perf_counter() - start), outputs


def spec_pair(tmp: str, args: argparse.Namespace) -> tuple[str, str, dict]:
    """The served model and its draft: the flags' checkpoints, else a pair trained now by
    `make_spec_pair` (with its wall seconds in the figures)."""
    if args.spec_checkpoint:
        return args.spec_checkpoint, args.spec_draft_checkpoint, {}
    pair = make_spec_pair.make_pair(os.path.join(tmp, "spec_pair"), args)
    return pair["served"], pair["draft"], {"spec_pair_train_s": pair["served_s"] + pair["draft_s"]}


def spec_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from the Markov source the pair was trained on (`synthetic_lm`'s default source), so
    both models continue text of the kind they learned."""
    source = MarkovSource()
    return [text.decode("ascii") for text in source.to_strings(
        source.sample(np.random.default_rng(args.seed), args.spec_requests, args.spec_prompt))]


def run_spec_b1(checkpoint: str, draft: str, prompts: Sequence[str], args: argparse.Namespace) -> dict:
    """Batch-1 greedy decoding with and without the draft (same engine code, one slot)."""
    rates, outputs = {}, {}
    for name, draft_checkpoint in (("plain", None), ("spec", draft)):
        server = _local_server(checkpoint, args, 1, draft_checkpoint)
        requests = [Request(0.0, server.tokenizer.prompt(p), args.spec_tokens) for p in prompts]
        scheduler = server.scheduler
        scheduler.start()
        try:
            _sequential_tokens_per_s(scheduler, requests[:1])  # compiles
            before = scheduler.stats()
            rates[name], outputs[name] = _sequential_tokens_per_s(scheduler, requests)
            after = scheduler.stats()
        finally:
            scheduler.stop(drain=False, timeout=60)
    drafts = after.spec_drafts - before.spec_drafts
    proposed = after.spec_draft_tokens - before.spec_draft_tokens
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    return {"spec_tokens_per_s_b1": round(rates["spec"], 1), "plain_tokens_per_s_b1": round(rates["plain"], 1),
            "spec_speedup_b1": round(rates["spec"] / rates["plain"], 3),
            "spec_tokens_per_step": round((after.generated_tokens - before.generated_tokens) / max(drafts, 1), 3),
            "spec_acceptance_rate": round(accepted / max(proposed, 1), 4),
            "spec_greedy_equal": outputs["spec"] == outputs["plain"]}


# -------------------------------------------------------------------------- transformers' CB
def run_hf(hf_dir: str, requests: Sequence[Request], warmup: Sequence[Request],
           args: argparse.Namespace) -> tuple[list[Outcome], float]:
    """transformers' continuous batching in this process: a thread adds requests at their arrivals."""
    import torch
    import transformers
    from transformers import ContinuousBatchingConfig, GenerationConfig

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    generation = GenerationConfig(do_sample=False, eos_token_id=EOS, pad_token_id=0,
                                  max_new_tokens=max(r.max_tokens for r in requests))
    config = ContinuousBatchingConfig(page_size=16, max_batch_tokens=args.hf_max_batch_tokens)
    manager = hf.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
    manager.start()
    try:
        _hf_serve(manager, warmup, "warm")
        return _hf_serve(manager, requests, "r")
    finally:
        manager.stop(block=True, timeout=60)


def _hf_serve(manager, requests: Sequence[Request], prefix: str) -> tuple[list[Outcome], float]:
    t0 = time.perf_counter()
    sent = [0.0] * len(requests)

    def submit() -> None:
        for i, request in enumerate(requests):
            _sleep_until(t0 + request.arrival_s)
            sent[i] = time.perf_counter()
            manager.add_request(request.prompt, request_id=f"{prefix}{i}", max_new_tokens=request.max_tokens,
                                record_timestamps=True, eos_token_id=EOS)

    thread = threading.Thread(target=submit, daemon=True)
    thread.start()
    outcomes: list = [None] * len(requests)
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while any(o is None for o in outcomes) and time.monotonic() < deadline:
        result = manager.get_result(timeout=1.0)
        if result is None or not result.is_finished():
            continue
        if result.error:
            raise RuntimeError(f"transformers' continuous batching failed {result.request_id}: {result.error}")
        i = int(result.request_id[len(prefix):])
        outcomes[i] = Outcome(sent[i], list(result.timestamps), list(result.generated_tokens))
    thread.join(10)
    if any(o is None for o in outcomes):
        raise RuntimeError("transformers' continuous batching: requests did not finish in time")
    return outcomes, t0


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--rate", type=float, default=32.0, help="Poisson arrivals per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long_fraction", type=float, default=0.25)
    parser.add_argument("--short_prompt", type=int, default=32, help="longest short prompt (shortest: 1/4 of it)")
    parser.add_argument("--long_prompt", type=int, default=256)
    parser.add_argument("--short_output", type=int, default=32)
    parser.add_argument("--long_output", type=int, default=128)
    parser.add_argument("--max_slots", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--block_size", type=int, default=16, help="positions per paged KV block")
    parser.add_argument("--paged_slot_factor", type=int, default=4,
                        help="the paged run's slots, in multiples of --max_slots (its KV bytes stay the dense rows')")
    parser.add_argument("--static_wait_s", type=float, default=0.5,
                        help="static batching starts a partial batch this long after its first request arrived")
    parser.add_argument("--hf_max_batch_tokens", type=int, default=256)
    parser.add_argument("--skip_hf", action="store_true", help="no transformers peer (hf_* keys null)")
    parser.add_argument("--spec_checkpoint", help="the served model of the batch-1 speculative run")
    parser.add_argument("--spec_draft_checkpoint", help="its draft (same vocabulary)")
    make_spec_pair.add_flags(parser)  # the pair trained when the two flags above are absent
    parser.add_argument("--num_draft_tokens", type=int, default=4)
    parser.add_argument("--spec_requests", type=int, default=4, help="batch-1 requests, with and without draft")
    parser.add_argument("--spec_prompt", type=int, default=16, help="symbols of each batch-1 prompt")
    parser.add_argument("--spec_tokens", type=int, default=96, help="output tokens of each batch-1 request")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, 6 short requests, a pair trained for 3 steps: checks the script, "
                             "measures nothing")
    args = parser.parse_args(argv)
    if bool(args.spec_checkpoint) != bool(args.spec_draft_checkpoint):
        parser.error("--spec_checkpoint and --spec_draft_checkpoint go together")
    if args.quick:
        args.requests, args.rate, args.max_slots, args.max_length = 6, 20.0, 2, 64
        args.short_prompt, args.long_prompt, args.short_output, args.long_output = 8, 24, 4, 12
        args.block_size = 8
        # batch 8: divisible by the 8 host devices the test suite gives its subprocesses
        args.served_layers, args.served_steps, args.draft_steps, args.batch, args.length = 1, 3, 3, 8, 32
        args.spec_requests, args.spec_prompt, args.spec_tokens = 1, 8, 8
    return args


def run_load(checkpoint: str, requests: Sequence[Request], tmp: str,
             args: argparse.Namespace) -> tuple[dict[str, tuple[list[Outcome], float]], dict]:
    """Every system on the workload (module docstring), and what the dense and paged KV caches held."""
    local = _local_server(checkpoint, args, args.max_slots)
    engine = local.scheduler.engine
    warm = warmup_requests(requests, engine.buckets)
    runs = {"cb": run_http(checkpoint, requests, warm, args)}
    run_static(engine, warm, 0.0)
    runs["static"] = run_static(engine, requests, args.static_wait_s)
    runs["cb_inproc"], dense = run_inproc(local.scheduler, requests, warm)
    kv_bytes = args.max_slots * kv_bytes_per_row(engine.model, engine.max_length)
    paged_scheduler = _local_server(checkpoint, args, args.paged_slot_factor * args.max_slots,
                                    kv_cache_bytes=kv_bytes).scheduler
    paged_warm = warmup_requests(requests, paged_scheduler.engine.buckets)
    runs["paged"], paged = run_inproc(paged_scheduler, requests, paged_warm)
    if not args.skip_hf:
        from lmops_jax import convert
        hf_dir = os.path.join(tmp, "hf")
        convert.export_hf(checkpoint, hf_dir)
        runs["hf_cb"] = run_hf(hf_dir, requests, warm, args)
    return runs, {"kv_cache_bytes": kv_bytes, "paged_kv_blocks": paged_scheduler.engine.kv_blocks,
                  "paged_max_slots": paged_scheduler.engine.max_slots,
                  "dense_peak_concurrency": dense["peak_concurrency"],
                  "paged_peak_concurrency": paged["peak_concurrency"], "paged_preemptions": paged["preemptions"]}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = TINY if args.quick else BENCH
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "jax": jax.__version__,
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1min_start": os.getloadavg()[0], **vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(os.path.join(tmp, "bench"), cfg)
        runs, held = run_load(checkpoint, workload(args, cfg.vocab_size), tmp, args)
        result.update(held)
        served, draft, pair = spec_pair(tmp, args)
        result.update(pair)
        result.update(run_spec_b1(served, draft, spec_prompts(args), args))
    print(json.dumps(report(result, runs)))


def report(result: dict, runs: dict[str, tuple[list[Outcome], float]]) -> dict:
    """The JSON figures: each system's summary (prefixed by its name), the issue's keys and the ratios."""
    summaries = {name: summarize(*run) for name, run in runs.items()}
    for name, summary in summaries.items():
        result.update({f"{name}_{k}": v for k, v in summary.items()})
        print(f"{name:>9}: {summary['tokens_per_s']:8,.1f} tokens/s, latency mean {summary['latency_mean_s']:.2f} s "
              f"p99 {summary['latency_p99_s']:.2f} s, TTFT p50 {summary['ttft_p50_s']:.3f} s "
              f"p99 {summary['ttft_p99_s']:.3f} s, TPOT p50 {summary['tpot_p50_s']} s", flush=True)
    cb, static, hf = summaries["cb"], summaries["static"], summaries.get("hf_cb")
    inproc, paged = summaries["cb_inproc"], summaries["paged"]
    result.update({
        "ttft_p50_s": cb["ttft_p50_s"], "ttft_p99_s": cb["ttft_p99_s"], "tpot_p50_s": cb["tpot_p50_s"],
        "tpot_p99_s": cb["tpot_p99_s"],
        "cb_over_static_tokens_per_s": round(cb["tokens_per_s"] / static["tokens_per_s"], 3),
        "cb_over_static_latency_mean": round(cb["latency_mean_s"] / static["latency_mean_s"], 3),
        "cb_inproc_over_static_tokens_per_s": round(inproc["tokens_per_s"] / static["tokens_per_s"], 3),
        "cb_inproc_over_static_latency_mean": round(inproc["latency_mean_s"] / static["latency_mean_s"], 3),
        "paged_over_dense_tokens_per_s": round(paged["tokens_per_s"] / inproc["tokens_per_s"], 3),
        "paged_over_dense_latency_mean": round(paged["latency_mean_s"] / inproc["latency_mean_s"], 3),
        "hf_cb_tokens_per_s": hf and hf["tokens_per_s"],
        "cb_over_hf_tokens_per_s": hf and round(cb["tokens_per_s"] / hf["tokens_per_s"], 3),
        "cb_over_hf_latency_p99": hf and round(cb["latency_p99_s"] / hf["latency_p99_s"], 3),
        "hf_token_agreement": token_agreement(runs["cb"][0], runs["hf_cb"][0]) if hf else None,
        "static_token_agreement": token_agreement(runs["cb"][0], runs["static"][0]),
        "cb_inproc_token_agreement": token_agreement(runs["cb"][0], runs["cb_inproc"][0]),
        "paged_token_agreement": token_agreement(runs["cb_inproc"][0], runs["paged"][0]),
        "load_avg_1min_end": os.getloadavg()[0]})
    return result


if __name__ == "__main__":
    main()
