"""Subprocess tests: SIGTERM to a CLI run, and a two-process (gloo) run that checkpoints and resumes."""
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from lmops_jax import checkpoints, partitioning
from lmops_jax.training import optimizers
from lmops_jax.training import trainer
from tests.helpers import free_port, model_gin, tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--gin_file=gin_configs/models/llama_tiny.gin", "--gin_file=gin_configs/runs/pretrain.gin",
        "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}", "--gin.EVAL_STEPS=1",
        "--gin.optimizers.OptimizerConfig.schedule='constant'", "--gin.WARMUP_STEPS=0",
        "--gin.decoder_only.LlamaConfig.num_layers=1", "--gin.decoder_only.LlamaConfig.d_model=64"]


def _cmd(model_dir, steps, *extra):
    return [sys.executable, "-m", "lmops_jax.train", *TINY, f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.TRAIN_STEPS={steps}", *extra]


def _env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _steps_logged(model_dir):
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def test_sigterm_saves_then_same_command_resumes(tmp_path):
    model_dir = str(tmp_path)
    flags = ("--gin.LOG_PERIOD=1", "--gin.CHECKPOINT_PERIOD=100000", "--gin.EVAL_PERIOD=0")
    proc = subprocess.Popen(_cmd(model_dir, 100000, *flags), cwd=REPO, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while len(_steps_logged(model_dir)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM received: saved a checkpoint at step" in out
    saved = checkpoints.Checkpointer(model_dir).all_steps()
    assert len(saved) == 1 and saved[0] >= 3
    stopped_at = saved[0]
    resumed = subprocess.run(_cmd(model_dir, stopped_at + 2, *flags), cwd=REPO, env=_env(1),
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stdout
    assert _steps_logged(model_dir)[-2:] == [stopped_at + 1, stopped_at + 2]  # no step lost or repeated



def _two_processes(cmd):
    """Runs `cmd` (a gin job) as processes 0 and 1 of one jax.distributed job with 2 CPU devices each."""
    port = free_port()
    procs = [subprocess.Popen(
        [*cmd, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         "--cpu_collectives=gloo"],
        cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _final_params(model_dir):
    t = trainer.Trainer(tiny_llama(vocab_size=512, num_layers=1, d_model=64, mlp_dim=512),
                        partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1]),
                        optimizers.OptimizerConfig(), 4, 8, {"targets": 16})
    return jax.device_get(checkpoints.restore_params(model_dir, t.abstract_state.params, t.state_shardings.params))


def test_two_processes_checkpoint_resume_and_match_single_process(tmp_path):
    flags = ["--gin.MESH_SHAPE={'data': 2, 'fsdp': 2, 'model': 1}", "--gin.LOGICAL_AXIS_RULES='fsdp'",
             "--gin.LOG_PERIOD=1", "--gin.CHECKPOINT_PERIOD=2", "--gin.EVAL_PERIOD=0",
             ]
    multi = str(tmp_path / "multi")
    _two_processes(_cmd(multi, 2, *flags))
    assert checkpoints.Checkpointer(multi).all_steps() == [2]
    outs = _two_processes(_cmd(multi, 4, *flags))  # both restart and resume from step 2
    assert all("resumed from step 2" in out for out in outs)
    assert checkpoints.Checkpointer(multi).all_steps() == [2, 4]
    assert _steps_logged(multi) == [1, 2, 3, 4]  # only process 0 writes metrics
    single = str(tmp_path / "single")
    run = subprocess.run(_cmd(single, 4, *flags), cwd=REPO, env=_env(4), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for a, b in zip(jax.tree.leaves(_final_params(multi)), jax.tree.leaves(_final_params(single))):
        # Rows reach devices in another order, so sums differ in the last bits; Adam amplifies them a little.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_dump_topk_runs_as_one_job_over_two_processes(tmp_path):
    """`python -m lmops_jax.distillation dump_topk` with the distributed flags joins both processes, and
    their store holds the rows of a one-process dump of the same stream (rows reach devices in another
    order, so compare them sorted)."""
    from lmops_jax.data import tasks  # noqa: F401  registers synthetic_lm for the in-process dump
    from lmops_jax.distillation import topk_store

    teacher = tiny_llama(vocab_size=512)
    shapes = teacher.input_shapes(1, {"targets": 16})
    params = jax.device_get(nn.meta.unbox(teacher.init_params(jax.random.key(7), shapes)))
    teacher_dir = str(tmp_path / "teacher")
    checkpoints.save_params(teacher_dir, params, model_gin(teacher))
    store = str(tmp_path / "topk")
    outs = _two_processes([
        sys.executable, "-m", "lmops_jax.distillation", "dump_topk", "--gin_file=gin_configs/models/llama_tiny.gin",
        "--gin_file=gin_configs/runs/distill.gin", f"--gin.MODEL_DIR='{tmp_path / 'student'}'",
        f"--gin.TEACHER_CHECKPOINT='{teacher_dir}'", f"--gin.KD_TOPK_DIR='{store}'", "--gin.KD_TOPK=4",
        "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'targets': 16}"])
    for i, out in enumerate(outs):
        assert f"jax.distributed: process {i} of 2, 4 devices" in out, out[-3000:]
    single = topk_store.dump_teacher_topk(
        teacher_checkpoint=teacher_dir, output_dir=str(tmp_path / "single"), mixture_or_task_name="synthetic_lm",
        task_feature_lengths={"targets": 16}, batch_size=8, num_batches=2, k=4,
        partitioner=partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1]))
    multi, one = topk_store.TopKStore(store), topk_store.TopKStore(single)
    assert multi.num_batches == 2
    for index in range(2):
        a, b = multi.batch(index), one.batch(index)
        order_a, order_b = np.lexsort(a["targets"].T[::-1]), np.lexsort(b["targets"].T[::-1])
        np.testing.assert_array_equal(a["targets"][order_a], b["targets"][order_b])
        np.testing.assert_allclose(a["logprobs"][order_a], b["logprobs"][order_b], atol=1e-5)
