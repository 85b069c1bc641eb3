"""Replication in one process (`serving.router`): 2 replicas x 4-way tensor parallelism on the 8 host
devices behind one FastAPI app, driven in-process through httpx's ASGI transport."""
import asyncio

import httpx
import jax
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmops_jax.serving import serve as serve_lib
from lmops_jax.serving.router import ReplicaRouter, device_groups
from tests.helpers import byte_level_checkpoint, tiny_llama

MODEL = tiny_llama(vocab_size=260, num_heads=4, num_kv_heads=4)  # a byte vocabulary; heads split 4 ways
TP4 = {"data": 1, "fsdp": 1, "model": 4}
PROMPTS = ["Hello", "abcabc", "The quick brown fox", "0123456789" * 3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return byte_level_checkpoint(MODEL, str(tmp_path_factory.mktemp("replicas") / "tiny"))


def _server(checkpoint: str, **overrides) -> serve_lib.Server:
    args = dict(max_slots=2, max_queue=8, max_length=64, prefix_cache=True, prefill_chunk=None,
                request_timeout_s=None, dtype=None, mesh_shape=None, logical_axis_rules="tp", model_name=None)
    server = serve_lib.build_server(checkpoint, **{**args, **overrides})
    server.scheduler.start()
    return server


async def _complete_all(app, prompts: list[str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as c:
        return await asyncio.gather(*(c.post("/v1/completions", json={
            "prompt": p, "max_tokens": 12, "temperature": 0}) for p in prompts))


def _texts(server: serve_lib.Server, prompts: list[str]) -> list[str]:
    responses = asyncio.run(asyncio.wait_for(_complete_all(server.app, prompts), 240))
    assert [r.status_code for r in responses] == [200] * len(prompts), [r.text for r in responses]
    return [r.json()["choices"][0]["text"] for r in responses]


def _metric(server: serve_lib.Server, name: str) -> dict[str, float]:
    async def scrape():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app), base_url="http://test") as c:
            return (await c.get("/metrics")).text
    text = asyncio.run(scrape())
    return {s.labels.get("replica", ""): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name}


def test_two_tensor_parallel_replicas_give_one_engines_greedy_outputs_and_share_the_load(checkpoint):
    one = _server(checkpoint)
    try:
        expected = _texts(one, PROMPTS)
    finally:
        one.scheduler.stop()
    two = _server(checkpoint, mesh_shape=TP4, num_replicas=2)
    try:
        meshes = [r.engine.partitioner.mesh for r in two.replicas]
        assert [m.devices.size for m in meshes] == [4, 4]
        assert not set(meshes[0].devices.flat) & set(meshes[1].devices.flat)  # disjoint device groups
        assert _texts(two, PROMPTS * 2) == expected * 2
        routed = _metric(two, "lmops:replica_requests_routed_total")
        assert routed["0"] > 0 and routed["1"] > 0 and routed["0"] + routed["1"] == 2 * len(PROMPTS)
        generated = _metric(two, "vllm:generation_tokens_total")[""]  # the sum over replicas
        assert generated == sum(r.stats().generated_tokens for r in two.replicas) > 0
    finally:
        two.scheduler.stop()


def test_prefix_affinity_sends_prompts_with_one_first_block_to_one_replica(checkpoint):
    server = _server(checkpoint, num_replicas=2, routing="prefix_affinity", block_size=4)
    try:
        shared = ["abc" + tail for tail in ("x", "yy", "zzz", "0123")]  # BOS + "abc": the first 4-token block
        _texts(server, shared)
        assert sorted(server.scheduler.routed) == [0, len(shared)]
    finally:
        server.scheduler.stop()


def test_replica_layouts_that_do_not_fit_name_the_macros():
    devices = jax.local_devices()
    assert [len(g) for g in device_groups(devices, 2, {"data": 1, "model": -1})] == [4, 4]
    assert [len(g) for g in device_groups(devices, 3, None)] == [1, 1, 1]
    with pytest.raises(ValueError, match=r"NUM_REPLICAS=3 with MESH_SHAPE=.* needs 12 devices"):
        device_groups(devices, 3, TP4)
    with pytest.raises(ValueError, match="NUM_REPLICAS must be an int >= 1"):
        device_groups(devices, 0, None)
    with pytest.raises(ValueError, match="ROUTING must be one of"):
        ReplicaRouter([object()], routing="random")
