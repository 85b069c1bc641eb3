"""Serving under load: continuous batching through the HTTP server vs static batching vs transformers' CB.

One seeded workload of N requests with Poisson arrivals at `--rate` requests/s and mixed lengths (a
`--long_fraction` of requests with long prompts and outputs, the rest short; uniform within each kind)
runs, with greedy decoding, on the decode benchmark's bench config (`bench_decode.BENCH`, random
weights saved as a checkpoint with its model spec) through:

  cb (HTTP)      `python -m lmops_jax.serve` as a subprocess on 127.0.0.1 (a free port), streaming
                 `/v1/completions`; the load generator is an asyncio httpx client in this process.
  cb_inproc      the same `Scheduler` + `Engine` in this process (no HTTP), same arrivals: separates the
                 HTTP/SSE cost from the batching policy.
  static         the same `Engine` (built by the same `serving.serve.build_server`) in static batching,
                 implemented here on the Engine API: wait for MAX_SLOTS arrived requests (or
                 `--static_wait_s` after the first of them), prefill them, step until every one is done,
                 then take the next batch. A request's latency ends at its own last token (as if streamed),
                 not at its batch's end, which favours static batching.
  hf_cb          Hugging Face transformers' continuous batching (`init_continuous_batching`, PyTorch CPU,
                 page_size 16) on the same weights exported with `lmops_jax.convert.export_hf`, in this
                 process with the same arrival schedule; its greedy tokens are compared with ours token by
                 token (`hf_token_agreement`).

  spec (batch 1) `--spec_requests` requests one after another (prompts cut to `--short_prompt`,
                 `--spec_tokens` each) on one slot, with and without a draft (`DRAFT`: the bench vocabulary,
                 d_model 64, 1 layer; random init like the served model, so it is not aligned with it:
                 acceptance is near 0 and the figure is speculation's overhead, not its gain).

Every system stops a request at EOS (id 1) or its max_tokens. Compilation is excluded: each system first
serves one request per prefill bucket the workload touches. The paged KV cache is not in the serving
engine yet: `paged_peak_concurrency` is null, and `dense_peak_concurrency` is the most requests decoding
at once in the in-process CB run (at most MAX_SLOTS). The checkpoint's vocabulary is a word-level
tokenizer whose token i is the word "wI", so streamed text gives back token ids exactly.

Throughput counts output tokens from the first arrival to the last finish; TTFT is from a request's
send (its arrival) to its first token; TPOT is (latency - TTFT) / (tokens - 1) per request. The last
line printed is one JSON object with the figures.

    python scripts/bench_serve.py [--requests 128] [--rate 32] [--max_slots 8] [--skip_hf] [--quick]
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
from lmops_jax.models import decoder_only, model, spec  # noqa: E402
from lmops_jax.serving import serve as serve_lib  # noqa: E402
from lmops_jax.serving.engine import Engine, SlotSampling  # noqa: E402
from lmops_jax.serving.scheduler import SamplingParams, Scheduler, TokenEvent  # noqa: E402
from scripts.bench_decode import BENCH  # noqa: E402

TINY = decoder_only.LlamaConfig(vocab_size=256, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=128,
                                dtype="float32", param_dtype="float32")
# The speculative draft: the bench config's vocabulary with a quarter of its width and one layer.
DRAFT = dataclasses.replace(BENCH, d_model=64, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=176)
TINY_DRAFT = dataclasses.replace(TINY, d_model=32, mlp_dim=64)
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
def _local_server(checkpoint: str, args: argparse.Namespace, max_slots: int, draft: str | None = None):
    """`serve.build_server` as the HTTP job builds it, without prefix cache, its scheduler not started."""
    return serve_lib.build_server(
        checkpoint, max_slots=max_slots, max_queue=4096, max_length=args.max_length, prefix_cache=False,
        prefill_chunk=512, request_timeout_s=None, dtype=None, mesh_shape=None, logical_axis_rules="tp",
        model_name=None, draft_checkpoint=draft, num_draft_tokens=args.num_draft_tokens)


def _sequential_tokens_per_s(scheduler: Scheduler, requests: Sequence[Request]) -> tuple[float, list[list[int]]]:
    """Requests one after another (batch 1): output tokens/s and each request's tokens."""
    start, outputs = time.perf_counter(), []
    for request in requests:
        params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0)
        outputs.append(scheduler.submit(request.prompt, params).result(REQUEST_TIMEOUT_S)[0])
    return sum(map(len, outputs)) / (time.perf_counter() - start), outputs


def run_spec_b1(checkpoint: str, draft: str, requests: Sequence[Request], args: argparse.Namespace) -> dict:
    """Batch-1 greedy decoding with and without the draft (same engine code, one slot)."""
    rates, outputs = {}, {}
    for name, draft_checkpoint in (("plain", None), ("spec", draft)):
        scheduler = _local_server(checkpoint, args, 1, draft_checkpoint).scheduler
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
def peak_decoding(outcomes: Sequence[Outcome]) -> int:
    """Most requests between their first and last token at any moment."""
    edges = sorted([(o.times[0], 1) for o in outcomes] + [(o.times[-1], -1) for o in outcomes],
                   key=lambda e: (e[0], -e[1]))
    return int(max(np.cumsum([d for _, d in edges])))


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
    parser.add_argument("--static_wait_s", type=float, default=0.5,
                        help="static batching starts a partial batch this long after its first request arrived")
    parser.add_argument("--hf_max_batch_tokens", type=int, default=256)
    parser.add_argument("--num_draft_tokens", type=int, default=4)
    parser.add_argument("--spec_requests", type=int, default=4, help="batch-1 requests, with and without draft")
    parser.add_argument("--spec_tokens", type=int, default=128, help="output tokens of each batch-1 request")
    parser.add_argument("--skip_hf", action="store_true", help="no transformers peer (hf_* keys null)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and 6 short requests: checks the script, measures nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rate, args.max_slots, args.max_length = 6, 20.0, 2, 64
        args.short_prompt, args.long_prompt, args.short_output, args.long_output = 8, 24, 4, 12
        args.spec_requests, args.spec_tokens = 1, 8
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = TINY if args.quick else BENCH
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "jax": jax.__version__,
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1min_start": os.getloadavg()[0], **{k: v for k, v in vars(args).items()}}
    runs: dict[str, tuple[list[Outcome], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(os.path.join(tmp, "bench"), cfg)
        requests = workload(args, cfg.vocab_size)
        local = _local_server(checkpoint, args, args.max_slots)
        engine = local.scheduler.engine
        warm = warmup_requests(requests, engine.buckets)
        runs["cb"] = run_http(checkpoint, requests, warm, args)
        run_static(engine, warm, 0.0)
        runs["static"] = run_static(engine, requests, args.static_wait_s)
        local.scheduler.start()
        try:
            run_scheduler(local.scheduler, warm)
            runs["cb_inproc"] = run_scheduler(local.scheduler, requests)
        finally:
            local.scheduler.stop(drain=False, timeout=60)
        if not args.skip_hf:
            from lmops_jax import convert
            hf_dir = os.path.join(tmp, "hf")
            convert.export_hf(checkpoint, hf_dir)
            runs["hf_cb"] = run_hf(hf_dir, requests, warm, args)
        draft = make_checkpoint(os.path.join(tmp, "draft"), TINY_DRAFT if args.quick else DRAFT)
        spec_requests = [Request(0.0, r.prompt[:args.short_prompt], args.spec_tokens)
                         for r in requests[:args.spec_requests]]
        result.update(run_spec_b1(checkpoint, draft, spec_requests, args))
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
    result.update({
        "ttft_p50_s": cb["ttft_p50_s"], "ttft_p99_s": cb["ttft_p99_s"], "tpot_p50_s": cb["tpot_p50_s"],
        "tpot_p99_s": cb["tpot_p99_s"],
        "cb_over_static_tokens_per_s": round(cb["tokens_per_s"] / static["tokens_per_s"], 3),
        "cb_over_static_latency_mean": round(cb["latency_mean_s"] / static["latency_mean_s"], 3),
        "cb_inproc_over_static_tokens_per_s": round(
            summaries["cb_inproc"]["tokens_per_s"] / static["tokens_per_s"], 3),
        "cb_inproc_over_static_latency_mean": round(
            summaries["cb_inproc"]["latency_mean_s"] / static["latency_mean_s"], 3),
        "hf_cb_tokens_per_s": hf and hf["tokens_per_s"],
        "cb_over_hf_tokens_per_s": hf and round(cb["tokens_per_s"] / hf["tokens_per_s"], 3),
        "cb_over_hf_latency_p99": hf and round(cb["latency_p99_s"] / hf["latency_p99_s"], 3),
        "hf_token_agreement": "hf_cb" in runs and token_agreement(runs["cb"][0], runs["hf_cb"][0]),
        "static_token_agreement": token_agreement(runs["cb"][0], runs["static"][0]),
        "cb_inproc_token_agreement": token_agreement(runs["cb"][0], runs["cb_inproc"][0]),
        "paged_peak_concurrency": None,  # KV_CACHE='paged' is not in the serving engine yet
        "dense_peak_concurrency": peak_decoding(runs["cb_inproc"][0]),
        "load_avg_1min_end": os.getloadavg()[0]})
    if "hf_cb" not in runs:
        result["hf_token_agreement"] = None
    return result


if __name__ == "__main__":
    main()
