"""The benchmark and study scripts the docs show (benchmarks.md, configuration.md, compression.md,
distillation.md) run end to end at small sizes (one or two steps, a few tokens) and print the JSON keys
those pages read: throughput, MFU, compile time, peak memory, the profile's categories, the tables' rows.
Speed figures and losses are not checked against values; what the scripts compare (the tokens of two
frameworks, a cache's files, parameter counts, bytes) is."""
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
    assert result["cores"] >= 1 and isinstance(result["cpu_vector"], list)  # the machine the figures came from


def test_bench_decode_emits_hugging_faces_greedy_tokens_at_both_batch_sizes():
    out, result = _run("bench_decode.py", "--repeats", "1", "--new_tokens", "4")
    for batch in (1, 8):
        assert f"batch {batch}: lmops_jax" in out
        assert result[f"token_agreement_b{batch}"] == 1.0
        assert result[f"tokens_per_s_b{batch}"] > 0 and result[f"hf_tokens_per_s_b{batch}"] > 0
        assert result[f"speedup_b{batch}"] > 0
    assert result["new_tokens"] == 4 and result["torch_threads"] >= 1
    assert result["matvec_read_gbps_4mib"] > 0 and result["matvec_read_gbps_64mib"] > 0
    assert 16 < result["step_weight_mib"] < 17  # the bench config's float32 weights but the embedding table
    assert result["cores"] >= 1 and isinstance(result["cpu_vector"], list)


def test_bench_machine_reads_the_cpus_vector_isa_and_cache():
    import bench_machine
    machine = bench_machine.describe()
    assert machine["cores"] == len(os.sched_getaffinity(0))
    with open("/proc/cpuinfo") as f:
        first = f.read().split("\n\n")[0]
    flags = next(line.split(":", 1)[1].split() for line in first.splitlines() if line.startswith("flags"))
    assert machine["cpu_vector"] == [f for f in bench_machine.VECTOR_FLAGS if f in flags]
    assert machine["l3_bytes"] is None or machine["l3_bytes"] >= 1 << 20


def test_profile_train_splits_the_traced_step_into_matmuls_copies_and_the_rest():
    out, result = _run("profile_train.py", "--steps", "1", "--top", "3")
    assert "op kinds (ms per step):" in out and "largest ops (ms per step):" in out
    assert 0 < result["matmul_ms"] < result["device_ops_ms"] and result["copy_ms"] >= 0 and result["other_ms"] >= 0
    assert result["in_step_matmul_gflops"] > 0 and result["isolated_matmul_gflops"] > 0 and result["step_time_s"] > 0


def test_bench_distill_times_each_mode_and_the_dump():
    out, result = _run("bench_distill.py", "--steps", "1", "--windows", "1")
    assert set(result["step_time_s"]) == {"plain", "online", "offline", "offline, pre-read"}
    assert all(seconds > 0 for seconds in result["step_time_s"].values())
    assert result["dump_s"] > 0 and result["teacher_forward_flops_per_token"] > result["student_flops_per_token"] > 0
    assert "| online |" in out


def test_bench_compile_cache_runs_the_job_three_times_and_the_cache_gets_files():
    _, result = _run("bench_compile_cache.py")
    assert result["cache_files"] > 0 and result["model"] == "gin_configs/models/llama_tiny.gin"
    assert all(result[f"wall_s_cache_{setting}"] > 0 for setting in ("off", "cold", "warm"))


def test_bench_compression_measures_float32_bf16_and_the_chosen_variants(tmp_path):
    out, result = _run("bench_compression.py", "--train_steps", "2", "--prompts", "2", "--batches", "1",
                       "--new_tokens", "4", "--repeats", "1", "--variants", "int8",
                       "--workdir", str(tmp_path / "work"))
    rows = result["rows"]
    assert list(rows) == ["float32", "bf16", "int8"] and result["new_tokens"] == 4
    assert 0.2 < rows["int8"]["matmul_bytes_ratio"] < 0.3  # int8 kernels and their scales, from the checkpoint
    for name in ("bf16", "int8"):  # each loaded back from its checkpoint and evaluated on the same batches
        assert 0 <= rows[name]["greedy_agreement"] <= 1 and abs(rows[name]["eval_loss_change"]) < 0.05
    assert all(r["eval_loss"] > 0 and r["decode_tok_s_b1"] > 0 and r["decode_tok_s_b8"] > 0 for r in rows.values())
    assert "| int8 |" in out


def test_bench_compression_names_an_unknown_variant():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_compression.py"), "--variants", "int3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--variants: unknown ['int3']" in done.stderr


def test_distill_story_trains_the_teacher_and_the_students_through_the_cli(tmp_path):
    """The GKD and hidden-state runs are the same train command with two more gin flags: skipped here for time."""
    out, result = _run("distill_story.py", "--teacher_steps", "2", "--student_steps", "2", "--teacher_batch", "2",
                       "--student_batch", "2", "--eval_steps", "1", "--length", "16", "--topk", "2", "--skip_gkd",
                       "--skip_hidden", "--workdir", str(tmp_path / "work"))
    students = [name for name in result if name.startswith("student")]
    assert students == ["student, scratch", "student, KD online", "student, KD offline top-2"]
    assert all(result[name]["eval_loss"] > result["optimal_loss"] > 0 for name in ["teacher", *students])
    assert "$ -m lmops_jax.distillation dump_topk" in out and "excess loss, KD online / scratch:" in out


def test_distill_cross_tokenizer_distils_a_byte_student_from_a_sentencepiece_teacher(tmp_path):
    out, result = _run("distill_cross_tokenizer.py", "--teacher_steps", "2", "--student_steps", "2", "--batch", "2",
                       "--vocab_size", "200", "--teacher_length", "32", "--student_length", "64",
                       "--workdir", str(tmp_path / "work"))
    uld = "byte student, ULD from the SentencePiece teacher"
    assert set(result) == {"teacher", "byte student, scratch", uld}
    assert 0 < result[uld]["aligned"] <= 1 and all(r["eval_loss"] > 0 for r in result.values())
    assert "held-out loss, distilled / scratch:" in out


def test_bench_prune_trains_prunes_and_distils_every_row_through_the_cli(tmp_path):
    out, result = _run("bench_prune.py", "--teacher_steps", "2", "--steps", "2", "--new_tokens", "4", "--repeats", "1",
                       "--workdir", str(tmp_path / "work"))
    rows = result["rows"]
    assert list(rows) == ["teacher", "width pruned", "pruned+distil", "scratch", "2:4", "2:4+distil"]
    teacher, width = rows["teacher"], rows["width pruned"]
    assert teacher["nonzero_params"] == teacher["params"] and teacher["greedy_agreement"] == 1.0
    # Width pruning removes parameters; the distilled and scratch students have its shapes; 2:4 keeps the shapes
    # and zeroes half of every projection (the norms and the embedding stay dense).
    assert width["params"] < 0.7 * teacher["params"]
    assert rows["pruned+distil"]["params"] == rows["scratch"]["params"] == width["params"]
    for name in ("2:4", "2:4+distil"):
        assert rows[name]["params"] == teacher["params"] and rows[name]["nonzero_params"] < 0.7 * teacher["params"]
    assert all(r["eval_loss"] > result["optimal_loss"] > 0 for r in rows.values())
    assert all(f"decode_tok_s_b{b}" in rows[n] for n in ("teacher", "pruned+distil", "2:4") for b in (1, 8))
    assert f"| pruned+distil | {width['params']:,} ({width['params']:,}) |" in out
