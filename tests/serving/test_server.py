"""The OpenAI-compatible server: the `serve` job as a subprocess driven by the official `openai` client
and raw HTTP (bad input, overload, disconnects, /metrics, SIGTERM), and the FastAPI app in-process
through httpx's ASGI transport (n choices, stop strings, logprobs, an engine failure).

Servers bind 127.0.0.1 (PORT=0: a free port, read from the job's log line), traffic goes to loopback
only, every wait is bounded, and a server is stopped through its own process.
"""
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import flax.linen as nn
import httpx
import jax
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmops_jax import checkpoints
from lmops_jax.inference import InferenceModule
from lmops_jax.models import spec
from lmops_jax.serving import api, chat_template
from lmops_jax.serving import serve as serve_lib
from lmops_jax.serving.engine import Engine
from lmops_jax.serving.scheduler import Scheduler
from lmops_jax.serving.server import build_app
from lmops_jax.serving.tokenizer import Tokenizer
from tests.helpers import tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = tiny_llama(vocab_size=260)  # a byte vocabulary's 259 ids
MAX_LENGTH = 256
SERVE = [sys.executable, "-m", "lmops_jax.serve", "--gin_file=gin_configs/runs/serve.gin"]
READY = re.compile(r"serving (\S+) at (http://127\.0\.0\.1:\d+/v1)")


def _params():
    shapes = MODEL.input_shapes(1, {"inputs": 8, "targets": 8})
    return jax.device_get(nn.meta.unbox(MODEL.init_params(jax.random.key(0), shapes)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("serving") / "tiny")
    checkpoints.save_params(model_dir, _params(), "",
                            model_spec=spec.ModelSpec(MODEL, spec.VocabularySpec("byte")).to_json())
    return model_dir


class Server:
    """A `python -m lmops_jax.serve` subprocess and its log (read by a thread)."""

    def __init__(self, checkpoint: str, *flags: str):
        self.proc = subprocess.Popen(SERVE + [f"--gin.CHECKPOINT_PATH='{checkpoint}'", "--gin.PORT=0", *flags],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(300) or self.proc.poll() is not None:
            self.stop()
            pytest.fail("the server did not start:\n" + "".join(self.lines[-40:]))
        self.model, self.url = READY.search("".join(self.lines)).groups()
        self.base = self.url.removesuffix("/v1")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if READY.search(line):
                self._ready.set()
        self._ready.set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{self.base}/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = Server(checkpoint, "--gin.MAX_SLOTS=2", "--gin.MAX_QUEUE=4", f"--gin.MAX_LENGTH={MAX_LENGTH}",
                 "--gin.KV_CACHE='paged'")  # the in-process app below keeps dense rows
    yield srv
    srv.stop()


def _value(metrics: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for (n, lab), v in metrics.items()
               if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


def test_openai_client_streaming_and_not_matches_inference_module(server, checkpoint):
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [server.model] == ["tiny"]
    expected = InferenceModule.from_checkpoint(checkpoint).generate(["Hello"], max_new_tokens=12).texts[0]

    whole = client.completions.create(model=server.model, prompt="Hello", max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.usage.prompt_tokens == 6 and whole.usage.completion_tokens >= 1  # BOS + 5 bytes
    chunks = list(client.completions.create(model=server.model, prompt="Hello", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    ids = client.completions.create(model=server.model, prompt=[75, 104, 111], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 4
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=server.model, prompt="Hello", max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="Hello")


BAD_COMPLETIONS = [
    ("{not json", "body"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x" * (MAX_LENGTH + 10)}, "prompt"),  # longer than MAX_LENGTH
    ({"prompt": [5, 100000]}, "prompt"),  # a token id outside the vocabulary
    ({"prompt": [5, "a"]}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": MAX_LENGTH}, "max_tokens"),  # prompt + max_tokens > MAX_LENGTH
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ([1, 2], "body"),
]
BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_LENGTH + 10)}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [3]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
]


def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(server):
    before = server.metrics()
    cases = [("completions", *c) for c in BAD_COMPLETIONS] + [("chat/completions", *c) for c in BAD_CHATS]
    for path, body, field in cases:
        content = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(f"{server.url}/{path}", content=content, headers={"Content-Type": "application/json"},
                       timeout=60)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == field and error["type"] == "invalid_request_error" and error["message"], (body, error)
    after = server.metrics()
    assert _value(after, "lmops:requests_rejected_total", reason="invalid") - \
        _value(before, "lmops:requests_rejected_total", reason="invalid") == len(cases)
    ok = httpx.post(f"{server.url}/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and httpx.get(f"{server.base}/health").json() == {"status": "ok"}


async def _burst(url: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        body = {"prompt": "overload", "max_tokens": 40, "temperature": 0}
        return await asyncio.gather(*(client.post(f"{url}/completions", json=body) for _ in range(count)))


def test_overload_answers_429_with_retry_after_and_every_accepted_request_completes(server):
    before = server.metrics()
    responses = asyncio.run(_burst(server.url, 32))
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full"
        else:
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] in ("stop", "length") and r.json()["usage"]["completion_tokens"] >= 1
    after = server.metrics()
    rejected = _value(after, "lmops:requests_rejected_total", reason="queue_full") - \
        _value(before, "lmops:requests_rejected_total", reason="queue_full")
    assert rejected == statuses.count(429)
    assert _value(after, "vllm:num_requests_running") == 0 and _value(after, "vllm:num_requests_waiting") == 0


def test_disconnect_mid_stream_cancels_the_request_and_frees_its_slot(server):
    before = server.metrics()
    body = {"prompt": "a", "max_tokens": MAX_LENGTH - 2, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=60) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # leaving the block closes the connection mid-stream
    for _ in range(200):
        after = server.metrics()
        if _value(after, "vllm:request_success_total", finished_reason="abort") > \
                _value(before, "vllm:request_success_total", finished_reason="abort"):
            break
        time.sleep(0.05)
    assert _value(after, "vllm:request_success_total", finished_reason="abort") == \
        _value(before, "vllm:request_success_total", finished_reason="abort") + 1
    assert _value(after, "vllm:request_success_total", finished_reason="length") == \
        _value(before, "vllm:request_success_total", finished_reason="length")
    assert _value(after, "lmops:slots_used") == 0


def test_metrics_parse_and_count_the_requests_made(server):
    before = server.metrics()
    usages = []
    for i in range(3):
        r = httpx.post(f"{server.url}/completions", json={"prompt": "count me" * (i + 1), "max_tokens": 5,
                                                         "temperature": 0, "stop_never": None}, timeout=60)
        assert r.status_code == 400  # an unknown field: counted as invalid, never run
        r = httpx.post(f"{server.url}/completions", json={"prompt": "count me" * (i + 1), "max_tokens": 5},
                       timeout=60)
        usages.append(r.json()["usage"])
    after = server.metrics()

    def delta(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("vllm:request_success_total") == 3
    assert delta("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("vllm:e2e_request_latency_seconds_count") == 3
    assert delta("vllm:time_to_first_token_seconds_count") == 3
    assert delta("vllm:request_prompt_tokens_sum") == sum(u["prompt_tokens"] for u in usages)
    assert delta("lmops:requests_rejected_total", reason="invalid") == 3
    assert _value(after, "lmops:slots_total") == 2
    assert _value(after, "lmops:kv_blocks_total") == 2 * MAX_LENGTH // 16  # paged: MAX_SLOTS rows' worth of blocks
    assert delta("vllm:prefix_cache_queries_total") >= delta("vllm:prefix_cache_hits_total") >= 0
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total",
                 "vllm:time_per_output_token_seconds_count"):
        assert any(n == name and dict(lab)["model_name"] == "tiny" for n, lab in after), name


def test_sigterm_drains_the_requests_in_flight_and_exits_0(server):
    """Runs last in this file: it stops the module's server."""
    body = {"prompt": "drain", "max_tokens": 60, "temperature": 0, "stream": True}
    data = []
    with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                data.append(line)
                if len(data) == 1:
                    server.proc.send_signal(signal.SIGTERM)
    assert data[-1] == "data: [DONE]" and json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert len(data) == 60 + 2  # every token, the finish, [DONE]
    assert server.proc.wait(60) == 0
    assert "server stopped" in "".join(server.lines)


def test_a_draft_of_another_vocabulary_is_refused_naming_both_sizes(checkpoint, tmp_path):
    draft = tiny_llama(vocab_size=300)
    params = jax.device_get(nn.meta.unbox(draft.init_params(jax.random.key(0), draft.input_shapes(1, {"targets": 8}))))
    checkpoints.save_params(str(tmp_path / "draft"), params, "",
                            model_spec=spec.ModelSpec(draft, spec.VocabularySpec("byte")).to_json())
    proc = subprocess.run(SERVE + [f"--gin.CHECKPOINT_PATH='{checkpoint}'",
                                   f"--gin.DRAFT_CHECKPOINT='{tmp_path / 'draft'}'"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"^error: DRAFT_CHECKPOINT: the draft model's vocab_size 300 differs from the served model's "
                     r"vocab_size 260", proc.stderr, re.M), proc.stderr[-2000:]


def test_a_draft_checkpoint_serves_speculatively(checkpoint):
    """DRAFT_CHECKPOINT wired: the model as its own draft accepts every draft and changes no greedy token."""
    kwargs = dict(max_slots=2, max_queue=4, max_length=64, prefix_cache=True, prefill_chunk=None,
                  request_timeout_s=None, dtype=None, mesh_shape=None, logical_axis_rules="tp", model_name=None)
    plain = serve_lib.build_server(checkpoint, **kwargs)
    spec_server = serve_lib.build_server(checkpoint, draft_checkpoint=checkpoint, num_draft_tokens=3, **kwargs)
    prompt = plain.tokenizer.prompt("speculate")
    params = serve_lib.SamplingParams(max_tokens=12, temperature=0.0)
    outputs = []
    for server in (plain, spec_server):
        handle = server.scheduler.submit(prompt, params)
        while server.scheduler.step():
            pass
        outputs.append(handle.result(timeout=0)[0])
    assert outputs[0] == outputs[1]
    stats = spec_server.scheduler.stats()
    assert stats.spec_accepted_tokens == stats.spec_draft_tokens > 0


# ------------------------------------------------------------------------------------------ in-process
@pytest.fixture(scope="module")
def in_process():
    """(app, scheduler) on the tiny model, the scheduler's thread running."""
    engine = Engine(MODEL, _params(), max_slots=4, max_length=64)
    tokenizer = Tokenizer.from_spec(spec.ModelSpec(MODEL, spec.VocabularySpec("byte")), MODEL)
    scheduler = Scheduler(engine, max_queue=8, eos_id=tokenizer.stop_id, detokenize=tokenizer.decode)
    scheduler.start()
    yield build_app(scheduler, tokenizer, "tiny"), scheduler
    scheduler.stop(drain=False)


def _post(app, path: str, body: dict) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post(path, json=body, timeout=120)
    return asyncio.run(go())


def test_n_choices_seeds_logprobs_and_stop_strings(in_process):
    app, _ = in_process
    body = {"prompt": "Hi", "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3, "logprobs": 0}
    first, again = _post(app, "/v1/completions", body).json(), _post(app, "/v1/completions", body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    # The same seed samples the same tokens; their log-probs agree to float rounding (a row's logits may
    # differ in the last bit with the other rows that share its decode batch).
    for c, c_again in zip(first["choices"], again["choices"]):
        assert (c["text"], c["logprobs"]["tokens"]) == (c_again["text"], c_again["logprobs"]["tokens"])
        assert c["logprobs"]["token_logprobs"] == pytest.approx(c_again["logprobs"]["token_logprobs"], abs=1e-5)
    assert len({c["text"] for c in first["choices"]}) > 1  # seed + i per choice
    for c in first["choices"]:
        lp = c["logprobs"]
        assert "".join(lp["tokens"]) == c["text"] and all(x <= 0 for x in lp["token_logprobs"])
        assert lp["text_offset"][0] == 0 and len(lp["tokens"]) == len(lp["token_logprobs"])
    assert first["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in first["choices"])
    assert all(lp["top_logprobs"] is None for lp in (c["logprobs"] for c in first["choices"]))

    top = _post(app, "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "temperature": 0, "logprobs": 3}).json()
    lp = top["choices"][0]["logprobs"]
    for token, logprob, alternatives in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        # keyed by text: alternatives decoding to the same text (partial UTF-8 bytes) keep the likeliest
        assert 1 <= len(alternatives) <= 3 and list(alternatives.values()) == sorted(alternatives.values(), reverse=True)
        assert alternatives[token] == pytest.approx(logprob) == max(alternatives.values())  # greedy: the top one
    chat = _post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                                "logprobs": True, "top_logprobs": 2, "temperature": 0}).json()
    for item in chat["choices"][0]["logprobs"]["content"]:
        assert [t["logprob"] for t in item["top_logprobs"]][0] == pytest.approx(item["logprob"])
        assert len(item["top_logprobs"]) == 2 and item["top_logprobs"][0]["token"] == item["token"]

    greedy = _post(app, "/v1/completions", {"prompt": "Hi", "max_tokens": 8, "temperature": 0}).json()
    text = greedy["choices"][0]["text"]
    stop = text[2:4]
    stopped = _post(app, "/v1/completions", {"prompt": "Hi", "max_tokens": 8, "temperature": 0, "stop": stop}).json()
    assert stopped["choices"][0] == {**greedy["choices"][0], "text": text[:text.index(stop)], "finish_reason": "stop"}


def test_sse_framing_ends_with_done(in_process):
    app, _ = in_process
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True, "n": 2,
            "logprobs": True, "seed": 3, "stream_options": {"include_usage": True}}
    r = _post(app, "/v1/chat/completions", body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == "length"
        assert sum(len(c["logprobs"]["content"]) for c in mine if c["logprobs"]) == 4


def test_a_tensor_parallel_server_on_8_devices_gives_the_one_device_greedy_text(in_process, checkpoint):
    assert jax.device_count() == 8
    tp = serve_lib.build_server(checkpoint, max_slots=4, max_queue=8, max_length=64, prefix_cache=True,
                                kv_cache="paged", block_size=8, prefill_chunk=16, request_timeout_s=None, dtype=None,
                                mesh_shape={"data": 1, "fsdp": 1, "model": -1}, logical_axis_rules="tp",
                                model_name="tiny")
    assert tp.scheduler.engine.partitioner.mesh.size == 8
    tp.scheduler.start()
    try:
        for prompt in ("Hello", "The quick brown fox jumps over the lazy dog"):
            body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
            assert _post(tp.app, "/v1/completions", body).json()["choices"] == \
                _post(in_process[0], "/v1/completions", body).json()["choices"]
    finally:
        tp.scheduler.stop(drain=False)


def test_a_client_leaving_before_a_whole_answer_cancels_its_request(in_process):
    app, scheduler = in_process
    body = json.dumps({"prompt": "Hi", "max_tokens": 60}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    cancelled = scheduler.stats().finished.get("cancelled", 0)
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 499
    for _ in range(200):
        stats = scheduler.stats()
        if stats.finished.get("cancelled", 0) == cancelled + 1 and stats.slots_used == 0:
            break
        time.sleep(0.05)
    assert stats.finished.get("cancelled", 0) == cancelled + 1 and stats.slots_used == 0


def test_engine_failure_answers_503_and_health_says_so(monkeypatch):
    engine = Engine(MODEL, _params(), max_slots=2, max_length=32)
    tokenizer = Tokenizer.from_spec(spec.ModelSpec(MODEL, spec.VocabularySpec("byte")), MODEL)
    scheduler = Scheduler(engine, max_queue=4, eos_id=tokenizer.stop_id, detokenize=tokenizer.decode)
    app = build_app(scheduler, tokenizer, "tiny")

    def broken(sampling, top_logprobs=False):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "generate", broken)
    scheduler.start()
    try:
        r = _post(app, "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]

        async def health():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
                return await c.get("/health")
        assert asyncio.run(health()).status_code == 503
        assert _post(app, "/v1/completions", {"prompt": "x"}).status_code == 503
    finally:
        scheduler.stop(drain=False)


def test_chat_templates(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_template.SIMPLE.render(messages) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert chat_template.from_tokenizer_dir(str(tmp_path)) is None
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    own = chat_template.from_tokenizer_dir(str(tmp_path))
    assert own.render(messages) == "<|system|>Be brief.</s><|user|>Hi</s><|assistant|>"  # BOS left to the server


def test_request_validation_names_the_deepest_field():
    error = api.validation_error([
        {"type": "string_type", "loc": ("body", "prompt", "str"), "msg": "Input should be a valid string",
         "input": [1]},
        {"type": "int_type", "loc": ("body", "prompt", "list[int]", 1), "msg": "Input should be a valid integer",
         "input": "a"}])
    assert error.status == 400 and error.param == "prompt"
    assert error.message == "prompt[1]: Input should be a valid integer (got 'a')"
