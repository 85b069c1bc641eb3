"""scripts/bench_accel.py and scripts/bench_train.py run end to end (one step) and print the JSON keys that
docs/benchmarks.md reads: throughput, MFU, compile time and peak memory. Figures are not checked."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def _run(script, *flags):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(done.stdout.strip().splitlines()[-1])


def test_bench_accel_says_it_scaled_down_on_cpu_and_reports_mfu_and_memory():
    out, result = _run("bench_accel.py", "--steps", "1", "--warmup", "1")
    assert "SCALED-DOWN" in out and result["scaled_down"] is True
    assert result["compute_dtype"] == "bfloat16" and result["param_dtype"] == "float32" and result["scan_layers"]
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] and result["peak_source"].startswith("measured")
    assert result["step_peak_bytes"] > result["step_argument_bytes"] > 0 and result["compile_s"] > 0


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA A100-SXM4-40GB", 312e12), ("TPU v5 lite", 197e12),
                                        ("NVIDIA L40S", 362e12), ("Some new chip", None)])
def test_published_peaks_match_device_kinds(kind, peak):
    import bench_accel
    assert bench_accel.published_peak(kind) == peak


def test_bench_train_reports_compile_time_and_peak_memory():
    _, result = _run("bench_train.py", "--steps", "1", "--windows", "1", "--warmup", "1", "--skip_hf")
    assert result["compile_s"] > 0 and result["first_step_s"] > 0
    assert result["step_peak_bytes"] > 0 and result["step_temp_bytes"] > 0
    assert result["peak_rss_bytes"] > result["import_rss_bytes"] > 0 and result["hf_peak_rss_bytes"] is None
