"""scripts/bench_serve.py runs end to end (`--quick`: a tiny model, a few requests, a speculative pair
trained for 3 steps by scripts/make_spec_pair.py through the CLI) and ends with the JSON line
docs/benchmarks.md reads, so the benchmark cannot rot. Its figures are not checked (no timing
asserts); the systems' greedy tokens must agree."""
import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench_serve.py")
KEYS = ("cb_tokens_per_s", "static_tokens_per_s", "hf_cb_tokens_per_s", "cb_latency_mean_s", "static_latency_mean_s",
        "cb_latency_p99_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "spec_speedup_b1", "spec_tokens_per_step",
        "hf_token_agreement", "paged_peak_concurrency", "dense_peak_concurrency", "paged_tokens_per_s",
        "paged_preemptions", "paged_token_agreement", "spec_acceptance_rate", "spec_greedy_equal", "spec_pair_train_s")


def test_quick_run_prints_every_key():
    has_torch = importlib.util.find_spec("torch") is not None
    flags = ["--quick"] + ([] if has_torch else ["--skip_hf"])
    done = subprocess.run([sys.executable, SCRIPT, *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(KEYS) <= set(result)
    assert result["cb_tokens_per_s"] > 0 and result["static_tokens_per_s"] > 0
    assert result["static_token_agreement"] == result["cb_inproc_token_agreement"] == 1.0
    assert result["spec_greedy_equal"] is True and result["spec_tokens_per_step"] >= 1
    assert 1 <= result["dense_peak_concurrency"] <= 2  # --quick: 2 slots
    assert 1 <= result["paged_peak_concurrency"] <= 8 and result["paged_tokens_per_s"] > 0  # 4 x 2 slots
    assert result["paged_preemptions"] >= 0 and result["paged_token_agreement"] == 1.0
    assert 0 <= result["spec_acceptance_rate"] <= 1 and result["spec_pair_train_s"] > 0
    if has_torch:
        assert result["hf_token_agreement"] == 1.0 and result["hf_cb_tokens_per_s"] > 0


def test_scale_bench_small_run_prints_every_figure():
    """scripts/bench_serve_scale.py with a few requests: mixed adapters, 1 and 2 replicas, a cold then warm load."""
    script = os.path.join(ROOT, "scripts", "bench_serve_scale.py")
    done = subprocess.run([sys.executable, script, "--requests", "4", "--tokens", "4", "--adapters", "2", "--rounds",
                           "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["adapters"]["mixed_tokens_per_s"] > 0 and result["adapters"]["base_tokens_per_s"] > 0
    assert result["replicas"]["devices"] >= 2 and result["replicas"]["replicas_2_tokens_per_s"] > 0
    assert 0 < result["load"]["warm_load_s"] and 0 < result["load"]["cold_load_s"]
