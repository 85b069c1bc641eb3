"""LoRA adapters served per slot: every row of a mixed batch equals its adapter merged and served alone."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from lmops_jax import checkpoints
from lmops_jax.checkpoints import CheckpointError
from lmops_jax.models import loading
from lmops_jax.models.multi_lora import AdapterLayout, AdapterMismatch
from lmops_jax.peft import lora
from lmops_jax.serving import builder
from lmops_jax.serving.adapters import AdapterResidency, AdapterSource
from lmops_jax.serving.engine import Engine
from lmops_jax.serving.kv_blocks import BlockPool
from lmops_jax.serving.scheduler import RequestError, SamplingParams, Scheduler
from lmops_jax.training.train_state import overlay_params
from tests.helpers import byte_level_checkpoint, lora_run_checkpoint, tiny_llama

MODEL = tiny_llama()
TARGETS = r".*/(q_proj|v_proj)"
PROMPTS = [[1, 5, 9, 13, 20, 7, 3, 11, 2, 8], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(base checkpoint, {adapter name: source}): two adapters of rank 4 and 2 from the base."""
    tmp = tmp_path_factory.mktemp("adapters")
    base = byte_level_checkpoint(MODEL, str(tmp / "base"))
    sources = {
        "a": AdapterSource.read("a", lora_run_checkpoint(MODEL, base, str(tmp / "a"), rank=4, seed=1)),
        "b": AdapterSource.read("b", lora_run_checkpoint(MODEL, base, str(tmp / "b"), rank=2, alpha=4.0, seed=2,
                                                         targets=r".*/(q_proj|v_proj|o_proj)")),
    }
    return base, sources


def _merged(base: str, source: AdapterSource):
    """The base params with the adapter's pairs folded in (peft.lora.merge_lora), as one would serve it."""
    params = jax.device_get(loading.restore_params(base, MODEL, loading.default_partitioner()))
    adapter = source.load()
    tree = checkpoints.unflatten({f"{path}/kernel_lora_{ab}": arr for path, (a, b) in adapter.pairs.items()
                                  for ab, arr in (("a", a), ("b", b))})
    return lora.merge_lora(overlay_params(params, tree), source.rank, source.alpha)


def _greedy(scheduler: Scheduler, requests: list[tuple[list[int], str | None]], max_tokens: int = 8) -> list[list[int]]:
    handles = [scheduler.submit(p, SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter=a)
               for p, a in requests]
    while scheduler.step():
        pass
    return [list(h.result(timeout=0)[0]) for h in handles]


def _alone(params, prompt: list[int]) -> list[int]:
    return _greedy(Scheduler(Engine(MODEL, params, max_slots=1, max_length=32)), [(prompt, None)])[0]


def _server_of(base: str, sources, slots: int, **engine_kwargs) -> Scheduler:
    params = loading.restore_params(base, MODEL, loading.default_partitioner())
    layout = builder.adapter_layout(MODEL, loading.default_partitioner(), sources, builder.ServingOptions(
        max_resident_adapters=slots))
    engine = Engine(MODEL, params, max_slots=4, max_length=32, adapters=layout, **engine_kwargs)
    return Scheduler(engine, adapters=AdapterResidency(engine, sources))


@pytest.mark.parametrize("slots", [2, 1])
def test_a_mixed_batch_gives_each_row_its_merged_adapters_tokens(runs, slots):
    """Base, a, b and a again in one batch (2 adapter slots), or taking turns for one slot (b waits while a
    runs, then evicts it to the host; a later 'a' loads it from there): each request's greedy tokens equal
    its merged adapter served alone."""
    base, sources = runs
    scheduler = _server_of(base, sources, slots)
    requests = [(PROMPTS[0], None), (PROMPTS[0], "a"), (PROMPTS[1], "b"), (PROMPTS[1], "a")]
    got = _greedy(scheduler, requests)
    requests.append((PROMPTS[1], "a"))  # after b: with one slot, 'a' comes back from the host
    got += _greedy(scheduler, requests[-1:])
    alone = {None: jax.device_get(loading.restore_params(base, MODEL, loading.default_partitioner())),
             "a": _merged(base, sources["a"]), "b": _merged(base, sources["b"])}
    expected = [_alone(alone[a], p) for p, a in requests]
    assert got == expected
    assert len({tuple(t) for t in got[:2]}) == 2  # the adapter changes the output
    residency = scheduler.adapters
    assert residency.disk_loads == 2
    if slots == 1:
        assert residency.evictions == 2 and residency.host_loads == 1
    else:
        assert residency.evictions == 0


def test_prefix_cache_blocks_are_never_shared_across_adapters(runs):
    """The base model caches a prompt's blocks first; the adapter's request must not read them."""
    base, sources = runs
    scheduler = _server_of(base, sources, 2, prefix_cache=True, block_size=4)
    first = _greedy(scheduler, [(PROMPTS[0], None)])
    again = _greedy(scheduler, [(PROMPTS[0], "a"), (PROMPTS[0], None)])
    assert again == [_alone(_merged(base, sources["a"]), PROMPTS[0]), first[0]]
    pool = BlockPool(8, 4)
    blocks = pool.allocate(2)
    pool.publish(PROMPTS[0], blocks)
    assert pool.match(PROMPTS[0]) == blocks and pool.match(PROMPTS[0], "a") == []


def test_bad_adapters_are_refused_by_name(runs, tmp_path):
    base, sources = runs
    with pytest.raises(CheckpointError, match=r"ADAPTERS\['a'\]: its base model .* is not served"):
        builder.assign_adapters({"a": sources["a"]}, {"other": str(tmp_path)})
    with pytest.raises(AdapterMismatch, match=r"adapter 'a' has rank 4, more than MAX_LORA_RANK=2"):
        builder.adapter_layout(MODEL, loading.default_partitioner(), {"a": sources["a"]},
                               builder.ServingOptions(max_lora_rank=2))
    wider = tiny_llama(d_model=32)
    with pytest.raises(AdapterMismatch, match=r"adapter 'a': layers_0/self_attn/q_proj has A \(64, 4\)"):
        builder.adapter_layout(wider, loading.default_partitioner(), {"a": sources["a"]}, builder.ServingOptions())
    with pytest.raises(CheckpointError, match=r"ADAPTERS\['x'\]: .* not the adapters of a LoRA run"):
        AdapterSource.read("x", base)
    scheduler = _server_of(base, sources, 1)
    with pytest.raises(RequestError, match=r"no adapter 'legal' on this model \(adapters: \['a', 'b'\]\)"):
        scheduler.submit(PROMPTS[0], SamplingParams(max_tokens=2), adapter="legal")


def test_layout_pads_ranks_and_folds_the_scale(runs):
    _, sources = runs
    adapters = [s.load() for s in sources.values()]
    params = nn.meta.unbox(jax.eval_shape(lambda: MODEL.init_params(jax.random.key(0), MODEL.input_shapes(
        1, {"inputs": 8, "targets": 8}))))
    layout = AdapterLayout.of(params, adapters, slots=3)
    assert layout.rank == 4 and sorted(layout.sizes) == [f"layers_0/self_attn/{m}" for m in ("o_proj", "q_proj",
                                                                                             "v_proj")]
    b = adapters[1]
    slot = layout.padded(b)
    a_pad, b_pad = slot["layers_0/self_attn/q_proj"]
    a, bb = b.pairs["layers_0/self_attn/q_proj"]
    np.testing.assert_allclose(a_pad[:, :2], a)
    np.testing.assert_allclose(b_pad[:2], bb * b.alpha / b.rank)
    assert not a_pad[:, 2:].any() and not b_pad[2:].any()
