"""VocabParallelTokenLosses equals the plain TokenLosses and never all-gathers the vocabulary."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmops_jax import losses
from lmops_jax.losses import vocab_parallel

B, L, V = 4, 3, 32
PLAIN = losses.TokenLosses()


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ("data", "fsdp", "model"))


@pytest.fixture(scope="module")
def sharded_losses(mesh):
    return vocab_parallel.VocabParallelTokenLosses(mesh)


def _weighted_sum(tokens, weights):
    return jnp.sum(tokens * weights)


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(B, L, V)).astype(np.float32) * 2
    teacher = rng.normal(size=(B, L, V)).astype(np.float32) * 2
    targets = rng.integers(0, V, size=(B, L)).astype(np.int32)
    weights = (rng.random((B, L)) > 0.3).astype(np.float32)
    return student, teacher, targets, weights


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("z_loss,label_smoothing", [(0.0, 0.0), (1e-2, 0.1)])
def test_cross_entropy_matches_unsharded(sharded_losses, z_loss, label_smoothing):
    student, _, targets, weights = _inputs(0)
    kwargs = dict(z_loss=z_loss, label_smoothing=label_smoothing)
    loss, z_term = sharded_losses.cross_entropy(student, targets, **kwargs)
    want_loss, want_z = losses.cross_entropy_with_logits(student, targets, **kwargs)
    _close(loss, want_loss)
    _close(z_term, want_z)

    def sharded(x):
        return _weighted_sum(sharded_losses.cross_entropy(x, targets, **kwargs)[0], weights)

    def unsharded(x):
        return _weighted_sum(PLAIN.cross_entropy(x, targets, **kwargs)[0], weights)

    _close(jax.jit(sharded)(student), unsharded(student))
    _close(jax.jit(jax.grad(sharded))(student), jax.grad(unsharded)(student))


@pytest.mark.parametrize("kind", losses.KD_KINDS)
def test_kd_matches_unsharded(sharded_losses, kind):
    student, teacher, _, weights = _inputs(1)
    kwargs = dict(kind=kind, temperature=1.5, beta=0.3)

    def sharded(s, t):
        return _weighted_sum(sharded_losses.kd(s, t, **kwargs), weights) / weights.sum()

    def unsharded(s, t):
        return losses.kd_loss(s, t, weights, **kwargs)

    _close(sharded(student, teacher), unsharded(student, teacher))
    got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(student, teacher)
    want = jax.value_and_grad(unsharded, argnums=(0, 1))(student, teacher)
    _close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        _close(g, w, tol=1e-6)


def test_traced_temperature_and_other_layouts(mesh, sharded_losses):
    student, teacher, targets, _ = _inputs(2)
    # Temperature from a schedule is a traced value under jit.
    f = jax.jit(lambda s, t, temp: sharded_losses.kd(s, t, temperature=temp))
    _close(f(student, teacher, 3.0), PLAIN.kd(student, teacher, temperature=3.0))
    # Flattened tokens [N, V], and a replicated batch.
    flat_s, flat_t = student.reshape(-1, V), teacher.reshape(-1, V)
    replicated = vocab_parallel.VocabParallelTokenLosses(mesh, batch_axes=None)
    _close(replicated.kd(flat_s, flat_t, kind="jsd"), PLAIN.kd(flat_s, flat_t, kind="jsd"))
    by_data = vocab_parallel.VocabParallelTokenLosses(mesh, batch_axes="data")
    loss, _ = by_data.cross_entropy(flat_s, targets.reshape(-1))
    _close(loss, PLAIN.cross_entropy(flat_s, targets.reshape(-1))[0])


def _full_vocab_all_gathers(hlo: str) -> list[str]:
    """All-gather instructions whose result has a dimension of the full vocabulary size V.

    Best effort: the local shards have V / 4 entries, so a dimension equal to V in an all-gather's
    result shape means some device materialized the whole vocabulary. (B, L and V / 4 differ from V.)
    """
    found = []
    for line in hlo.splitlines():
        match = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if match and re.search(rf"\[(?:\d+,)*{V}(?:,\d+)*\]", match.group(1)):
            found.append(line.strip())
    return found


def test_no_full_vocab_all_gather_in_compiled_hlo(mesh, sharded_losses):
    student, teacher, targets, weights = _inputs(3)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "model"))
    s, t = jax.device_put(student, sharding), jax.device_put(teacher, sharding)

    def step(s, t):
        kd = sharded_losses.kd(s, t, kind="jsd", temperature=2.0)
        ce, _ = sharded_losses.cross_entropy(s, targets, z_loss=1e-3)
        return _weighted_sum(kd + ce, weights)

    hlo = jax.jit(jax.value_and_grad(step)).lower(s, t).compile().as_text()
    assert "all-reduce" in hlo  # the collectives are there ...
    assert _full_vocab_all_gathers(hlo) == []  # ... but no device gathers the vocabulary.

    # The detector does find a gather when one is forced: replicate the vocab-sharded logits.
    replicated = NamedSharding(mesh, PartitionSpec())
    gathered = jax.jit(lambda x: x * 2, out_shardings=replicated).lower(s).compile().as_text()
    assert _full_vocab_all_gathers(gathered)


def test_bad_input_raises(mesh, sharded_losses):
    student, teacher, targets, _ = _inputs(4)
    with pytest.raises(ValueError, match="not divisible by mesh axis 'model'"):
        sharded_losses.kd(student[..., :30], teacher[..., :30])
    with pytest.raises(ValueError, match="vocab sizes of teacher and student logits differ"):
        sharded_losses.kd(student, teacher[..., :28])
    with pytest.raises(ValueError, match="unknown kind"):
        sharded_losses.kd(student, teacher, kind="tvd")
    with pytest.raises(ValueError, match="vocab_axis 'tensor'"):
        vocab_parallel.VocabParallelTokenLosses(mesh, vocab_axis="tensor")
    with pytest.raises(ValueError, match="cannot also be one of batch_axes"):
        vocab_parallel.VocabParallelTokenLosses(mesh, batch_axes=("data", "model"))
    with pytest.raises(ValueError, match="batch size 3"):
        sharded_losses.cross_entropy(student[:3], targets[:3])
    with pytest.raises(ValueError, match="targets shape"):
        sharded_losses.cross_entropy(student, targets[:, :2])


def test_topk_kd_and_argmax_match_unsharded(mesh, sharded_losses):
    rng = np.random.default_rng(5)
    student = jnp.asarray(rng.normal(size=(B, L, V)) * 3, jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(B, L, V)) * 3, jnp.float32)
    logprobs, ids = losses.topk_teacher_logprobs(teacher, 5)

    def total(token_losses):
        return lambda s: jnp.sum(token_losses.kd_from_topk(s, logprobs, ids, temperature=1.5))

    _close(sharded_losses.kd_from_topk(student, logprobs, ids, temperature=1.5),
           PLAIN.kd_from_topk(student, logprobs, ids, temperature=1.5))
    _close(jax.jit(jax.grad(total(sharded_losses)))(student), jax.grad(total(PLAIN))(student), tol=1e-6)
    # k = V: no tail bucket, and k exceeds each shard's V / 4 entries.
    full_logprobs, full_ids = losses.topk_teacher_logprobs(teacher, V)
    _close(sharded_losses.kd_from_topk(student, full_logprobs, full_ids), PLAIN.kd(student, teacher))
    # Ties across shards go to the lowest id, as jnp.argmax.
    tied = student.at[:, :, 20].set(student.max() + 1).at[:, :, 9].set(student.max() + 1)
    np.testing.assert_array_equal(sharded_losses.argmax(tied), jnp.argmax(tied, -1))
    np.testing.assert_array_equal(PLAIN.argmax(tied), jnp.argmax(tied, -1))
