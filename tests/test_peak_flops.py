"""The MFU peak: measured once per host and dtype and cached, pinned when given, never failing the run."""
import json
import logging

import pytest

from lmops_jax.training import flops
from lmops_jax.training import train as train_lib
from tests.helpers import tiny_llama


@pytest.fixture
def probes(monkeypatch):
    """Replaces the matmul probe: records each call's dtype and returns 1e9 FLOP/s."""
    calls = []

    def probe(dtype="float32", **_):
        calls.append(dtype)
        return 1e9

    monkeypatch.setattr(flops, "measure_matmul_peak", probe)
    return calls


def test_second_call_reads_the_cache_per_dtype(tmp_path, probes):
    first = flops.job_peak_flops(None, "float32", cache_dir=str(tmp_path))
    second = flops.job_peak_flops(None, "float32", cache_dir=str(tmp_path))
    assert first.source == "measured now" and probes == ["float32"]
    assert second == flops.PeakFlops(first.flops, f"cached from {tmp_path / flops.CACHE_FILE}")
    stored = json.loads((tmp_path / flops.CACHE_FILE).read_text())
    assert stored[flops.probe_key("float32")]["flops_per_probe"] == 1e9
    assert flops.job_peak_flops(None, "bfloat16", cache_dir=str(tmp_path)).source == "measured now"
    assert probes == ["float32", "bfloat16"]


def test_a_given_peak_is_used_without_probing(tmp_path, probes):
    assert flops.job_peak_flops(2e12, cache_dir=str(tmp_path)) == flops.PeakFlops(2e12, "given")
    assert probes == [] and not (tmp_path / flops.CACHE_FILE).exists()
    with pytest.raises(ValueError, match="PEAK_FLOPS"):
        flops.job_peak_flops(-1.0)


def test_unwritable_or_corrupt_cache_does_not_fail(tmp_path, probes, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        peak = flops.job_peak_flops(None, cache_dir=str(blocker / "cache"))  # a directory under a file
    assert peak.source == "measured now" and "could not write the peak FLOP/s cache" in caplog.text
    (tmp_path / flops.CACHE_FILE).write_text("{not json")
    assert flops.job_peak_flops(None, cache_dir=str(tmp_path)).source == "measured now"
    assert flops.job_peak_flops(None, cache_dir=str(tmp_path)).source.startswith("cached from")
    assert len(probes) == 2


def test_train_uses_and_logs_the_cached_peak(tmp_path, probes, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    flops.job_peak_flops(None, "float32")  # what an earlier run on this host measured
    with caplog.at_level(logging.INFO):
        train_lib.train(model=tiny_llama(vocab_size=512), model_dir=str(tmp_path / "run"), train_steps=1,
                        batch_size=8, mixture_or_task_name="synthetic_lm", task_feature_lengths={"targets": 16},
                        log_period=1)
    assert probes == ["float32"]
    assert f"cached from {tmp_path / 'cache' / 'lmops_jax' / flops.CACHE_FILE}" in caplog.text
