"""Vocabulary-parallel losses equal the unsharded ones and never all-gather the vocabulary."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmops_jax import losses
from lmops_jax.losses import vocab_parallel

B, L, V = 4, 3, 32


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ("data", "fsdp", "model"))


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
def test_cross_entropy_matches_unsharded(mesh, z_loss, label_smoothing):
    student, _, targets, weights = _inputs(0)
    loss, z_term = vocab_parallel.vocab_parallel_cross_entropy(
        student, targets, mesh=mesh, z_loss=z_loss, label_smoothing=label_smoothing
    )
    want_loss, want_z = losses.cross_entropy_with_logits(
        student, targets, z_loss=z_loss, label_smoothing=label_smoothing
    )
    _close(loss, want_loss)
    _close(z_term, want_z)

    def sharded(x):
        tokens, _ = vocab_parallel.vocab_parallel_cross_entropy(
            x, targets, weights, mesh=mesh, z_loss=z_loss, label_smoothing=label_smoothing
        )
        return jnp.sum(tokens)

    def unsharded(x):
        tokens, _ = losses.cross_entropy_with_logits(x, targets, z_loss=z_loss, label_smoothing=label_smoothing)
        return jnp.sum(tokens * weights)

    _close(jax.jit(sharded)(student), unsharded(student))
    _close(jax.jit(jax.grad(sharded))(student), jax.grad(unsharded)(student))


@pytest.mark.parametrize("kind", losses.KD_KINDS)
def test_kd_matches_unsharded(mesh, kind):
    student, teacher, _, weights = _inputs(1)
    kwargs = dict(kind=kind, temperature=1.5, beta=0.3)

    def sharded(s, t):
        return vocab_parallel.vocab_parallel_kd_loss(s, t, weights, mesh=mesh, **kwargs)

    def unsharded(s, t):
        return losses.kd_loss(s, t, weights, **kwargs)

    _close(sharded(student, teacher), unsharded(student, teacher))
    got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(student, teacher)
    want = jax.value_and_grad(unsharded, argnums=(0, 1))(student, teacher)
    _close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        _close(g, w, tol=1e-6)


def test_traced_temperature_and_other_layouts(mesh):
    student, teacher, targets, _ = _inputs(2)
    # Temperature from a schedule is a traced value under jit.
    f = jax.jit(lambda s, t, temp: vocab_parallel.vocab_parallel_kd_loss(s, t, mesh=mesh, temperature=temp))
    _close(f(student, teacher, 3.0), losses.kd_loss(student, teacher, temperature=3.0))
    # Flattened tokens [N, V], and a replicated batch.
    flat_s, flat_t = student.reshape(-1, V), teacher.reshape(-1, V)
    token_loss = vocab_parallel.vocab_parallel_kd_token_loss(flat_s, flat_t, mesh=mesh, kind="jsd", batch_axes=None)
    _close(token_loss, losses.kd_token_loss(flat_s, flat_t, kind="jsd"))
    loss, _ = vocab_parallel.vocab_parallel_cross_entropy(flat_s, targets.reshape(-1), mesh=mesh, batch_axes="data")
    _close(loss, losses.cross_entropy_with_logits(flat_s, targets.reshape(-1))[0])


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


def test_no_full_vocab_all_gather_in_compiled_hlo(mesh):
    student, teacher, targets, weights = _inputs(3)
    sharding = vocab_parallel.logits_sharding(mesh, student.shape)
    s, t = jax.device_put(student, sharding), jax.device_put(teacher, sharding)

    def step(s, t):
        kd = vocab_parallel.vocab_parallel_kd_loss(s, t, weights, mesh=mesh, kind="jsd", temperature=2.0)
        ce, _ = vocab_parallel.vocab_parallel_cross_entropy(s, targets, weights, mesh=mesh, z_loss=1e-3)
        return kd + jnp.sum(ce)

    hlo = jax.jit(jax.value_and_grad(step)).lower(s, t).compile().as_text()
    assert "all-reduce" in hlo  # the collectives are there ...
    assert _full_vocab_all_gathers(hlo) == []  # ... but no device gathers the vocabulary.

    # The detector does find a gather when one is forced: replicate the vocab-sharded logits.
    replicated = NamedSharding(mesh, PartitionSpec())
    gathered = jax.jit(lambda x: x * 2, out_shardings=replicated).lower(s).compile().as_text()
    assert _full_vocab_all_gathers(gathered)


def test_bad_input_raises(mesh):
    student, teacher, targets, _ = _inputs(4)
    with pytest.raises(ValueError, match="not divisible by mesh axis 'model'"):
        vocab_parallel.vocab_parallel_kd_loss(student[..., :30], teacher[..., :30], mesh=mesh)
    with pytest.raises(ValueError, match="vocab sizes of teacher and student logits differ"):
        vocab_parallel.vocab_parallel_kd_loss(student, teacher[..., :28], mesh=mesh)
    with pytest.raises(ValueError, match="unknown kind"):
        vocab_parallel.vocab_parallel_kd_loss(student, teacher, mesh=mesh, kind="tvd")
    with pytest.raises(ValueError, match="vocab_axis 'tensor'"):
        vocab_parallel.vocab_parallel_cross_entropy(student, targets, mesh=mesh, vocab_axis="tensor")
    with pytest.raises(ValueError, match="batch size 3"):
        vocab_parallel.vocab_parallel_cross_entropy(student[:3], targets[:3], mesh=mesh)
    with pytest.raises(ValueError, match="targets shape"):
        vocab_parallel.vocab_parallel_cross_entropy(student, targets[:, :2], mesh=mesh)
