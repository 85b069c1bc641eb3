"""Several models and adapters behind one server: the `model` field picks one, models load on demand and are
evicted least recently used (host copies make a re-load skip the disk), unknown names get 404."""
import asyncio
import types

import httpx
import pytest

from lmops_jax.serving import serve as serve_lib
from lmops_jax.serving.model_cache import ModelCache, ModelsBusy, ServedModel
from tests.helpers import byte_level_checkpoint, lora_run_checkpoint, serve_greedy, tiny_llama

KWARGS = dict(max_slots=2, max_queue=8, max_length=32, prefix_cache=True, prefill_chunk=None, request_timeout_s=None,
              dtype=None, mesh_shape=None, logical_axis_rules="tp", model_name=None)
MODELS = {"m1": tiny_llama(num_layers=2), "m2": tiny_llama(d_model=32, mlp_dim=64)}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    out = {"base": byte_level_checkpoint(tiny_llama(), str(tmp / "base"))}
    out.update({name: byte_level_checkpoint(m, str(tmp / name)) for name, m in MODELS.items()})
    out["legal"] = lora_run_checkpoint(tiny_llama(), out["base"], str(tmp / "legal"))
    out["m1_chat"] = lora_run_checkpoint(MODELS["m1"], out["m1"], str(tmp / "m1_chat"), seed=3)
    return out


@pytest.fixture(scope="module")
def server(dirs):
    server = serve_lib.build_server(dirs["base"], models={"m1": dirs["m1"], "m2": dirs["m2"]},
                                    adapters={"legal": dirs["legal"], "m1_chat": dirs["m1_chat"]},
                                    max_resident_models=2, max_resident_adapters=1, **KWARGS)
    server.scheduler.start()
    serve_lib.warm_up(server)
    yield server
    server.stop(drain=False)


def _call(app, method: str, path: str, body: dict | None = None) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, json=body, timeout=300)
    return asyncio.run(go())


def _complete(server, model: str) -> str:
    response = _call(server.app, "POST", "/v1/completions", {"model": model, "prompt": "abc", "max_tokens": 6,
                                                              "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.json()["choices"][0]["text"]


def _resident(server) -> dict[str, bool]:
    return {card["id"]: card["resident"] for card in _call(server.app, "GET", "/v1/models").json()["data"]}


def test_models_load_on_demand_and_evict_lru_with_a_host_tier(server, dirs):
    cards = _call(server.app, "GET", "/v1/models").json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [("base", None), ("legal", "base"), ("m1", None),
                                                       ("m1_chat", "m1"), ("m2", None)]
    assert _resident(server) == {"base": True, "legal": False, "m1": False, "m1_chat": False, "m2": False}
    first = _complete(server, "m1")
    prompt = server.tokenizer.prompt("abc")
    assert first == server.tokenizer.decode(serve_greedy(dirs["m1"], prompt, 6))
    _complete(server, "m2")  # two resident at most: the default stays, m1 (least recently used) goes
    assert _resident(server)["m1"] is False and _resident(server)["m2"] is True
    assert _complete(server, "m1") == first
    m1 = server.models.resolve("m1")[0]
    assert [tier for tier, _ in m1.loads] == ["disk", "host"]
    assert _complete(server, "m1_chat") != first  # an adapter on m1, resident now
    assert _resident(server)["m1_chat"] is True
    assert _complete(server, "legal") != _complete(server, "base")
    metrics = _call(server.app, "GET", "/metrics").text
    assert 'vllm:generation_tokens_total{model_name="m1"}' in metrics
    assert 'vllm:e2e_request_latency_seconds_count{model_name="m1_chat"}' in metrics


def test_unknown_names_get_404_listing_the_known_ones_and_serving_goes_on(server):
    response = _call(server.app, "POST", "/v1/chat/completions", {
        "model": "nope", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "['base', 'legal', 'm1', 'm1_chat', 'm2']" in error["message"]
    _complete(server, "base")


def test_models_busy_is_refused_and_bad_settings_name_the_macro(dirs):
    """The policy alone: a budget held by busy models refuses a load (ModelsBusy, a 503); names clash."""
    busy = types.SimpleNamespace(idle=False, engine=types.SimpleNamespace(max_length=32))
    default = ServedModel("base", dirs["base"], None, None, 32, scheduler=busy)
    other = ServedModel("m1", dirs["m1"], None, None, 32, scheduler=busy, last_used=1.0)
    cache = ModelCache([default, other, ServedModel("m2", dirs["m2"], None, None, 32)], max_resident=2)
    with pytest.raises(ModelsBusy, match="model 'm2' is not loaded"):
        cache.submit(cache.resolve("m2")[0], lambda scheduler: None)
    with pytest.raises(ValueError, match=r"MODELS names 'base', the default model's name"):
        serve_lib.build_server(dirs["base"], models={"base": dirs["m1"]}, **KWARGS)
    with pytest.raises(ValueError, match=r"MODEL_MEMORY_BYTES=1000 cannot hold model 'm1'"):
        serve_lib.build_server(dirs["base"], models={"m1": dirs["m1"]}, model_memory_bytes=1000, **KWARGS)
