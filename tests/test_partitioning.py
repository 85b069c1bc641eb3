import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmops_jax import partitioning


def test_mesh_fills_minus_one_and_missing_standard_axes():
    p = partitioning.Partitioner({"data": -1, "model": 2}, "tp")
    assert p.axis_sizes == {"data": 4, "model": 2, "fsdp": 1}
    assert p.batch_size_divisor == 4


@pytest.mark.parametrize("shape,message", [
    ({"data": 3, "fsdp": 1, "model": 1}, "needs 3 devices but 8 are available"),
    ({"data": -1, "model": 3}, "does not fit 8 devices"),
    ({"data": -1, "model": -1}, "at most one axis may be -1"),
    ({"data": 0}, "must be positive or -1"),
])
def test_bad_mesh_names_shape_and_device_count(shape, message):
    with pytest.raises(ValueError, match=message):
        partitioning.Partitioner(shape)


def test_rule_with_unknown_mesh_axis_is_named():
    with pytest.raises(ValueError, match="names mesh axis 'tensor'.*mesh has axes"):
        partitioning.Partitioner({"data": -1}, [("batch", "data"), ("mlp", "tensor")])


def test_misspelt_mesh_axis_is_named():
    with pytest.raises(ValueError, match="axis 'dat' is not a known mesh axis.*check its spelling"):
        partitioning.Partitioner({"dat": -1})
    with pytest.raises(ValueError, match="axis 'dat' is not a known mesh axis"):
        partitioning.Partitioner({"dat": 1, "data": -1})


def test_mesh_axis_no_rule_uses_is_named():
    with pytest.raises(ValueError, match="axis 'model' has size 2 but no logical axis rule uses it"):
        partitioning.Partitioner({"data": -1, "model": 2}, "dp")
    # a custom axis is fine when a rule names it, and unused standard axes of size 1 are fine
    p = partitioning.Partitioner({"replica": -1, "model": 1}, [("batch", "replica")])
    assert p.batch_size_divisor == 8


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown LOGICAL_AXIS_RULES preset 'zero3'"):
        partitioning.Partitioner({"data": -1}, "zero3")


def test_presets_and_fallbacks():
    sizes = {"data": 1, "fsdp": 2, "model": 4}
    rules = partitioning.logical_axis_rules("fsdp_tp")
    spec = lambda names, shape: partitioning.logical_to_spec(names, shape, rules, sizes)  # noqa: E731
    assert spec(("embed", "heads", "head_dim"), (64, 8, 16)) == P("fsdp", "model")
    # 2 kv heads do not divide the 4-way model axis: replicated, not padded.
    assert spec(("embed", "kv_heads", "head_dim"), (64, 2, 16)) == P("fsdp")
    # embed not divisible by fsdp: the mlp fallback takes fsdp ... unless model already holds mlp.
    assert spec(("embed", "mlp"), (63, 128)) == P(None, "model")
    assert spec(("batch", "length", "act_vocab"), (8, 16, 512)) == P(("data", "fsdp"), None, "model")
    dp = partitioning.logical_axis_rules("dp")
    assert partitioning.logical_to_spec(("embed", "mlp"), (64, 128), dp, sizes) == P()


def test_explicit_rules_from_lists_and_constraint_outside_context_is_noop():
    rules = partitioning.logical_axis_rules([["batch", ["data", "fsdp"]], ["mlp", None]])
    assert rules == (("batch", ("data", "fsdp")), ("mlp", None))
    x = jax.numpy.ones((4, 4))
    assert partitioning.constrain_logical(x, ("batch", None)) is x


def test_constraint_inside_context_shards_activation():
    p = partitioning.Partitioner({"data": 2, "model": 4}, "tp")
    with p.context():
        y = jax.jit(lambda x: partitioning.constrain_logical(x * 2, ("batch", "act_mlp")))(np.ones((8, 16)))
    assert y.sharding.spec == P("data", "model")
