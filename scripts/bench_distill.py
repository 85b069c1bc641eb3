"""Step time of distillation against plain training of the same student, as ratios from one run.

Student: Llama d_model 128, 2 layers, MLP 512; teacher: Llama d_model 256, 4 layers, MLP 1024 (4x the
student's layers x width); vocab 512, float32, batch 16 x 128 tokens of `synthetic_lm`, 1 device.
Three modes of the same student and batches:
  plain    Trainer (cross-entropy only)
  online   DistillationTrainer with the teacher forward pass inside the jitted step
  offline  DistillationTrainer reading the teacher's stored top-k (k = 32) from a `dump_topk` store;
           the timed step includes reading the store and checking the batch's tokens
           ("offline, pre-read": the same step with the store read before timing).
Each mode runs warm-up steps (compile), then `--windows` timed windows of `--steps` steps, the modes
alternating window by window so that the shared machine's load hits them alike; each mode's best
window counts. Teacher weights are random: step time does not depend on them.

    python scripts/bench_distill.py [--steps 10] [--windows 5]

Ends with one JSON line: step_time_s per mode and the ratios online / plain, offline / plain.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import flax.linen as nn
import jax

from lmops_jax import checkpoints, convert, partitioning
from lmops_jax.distillation import trainer as distillation
from lmops_jax.distillation import topk_store as distillation_store
from lmops_jax.training import optimizers
from lmops_jax.training import trainer
from lmops_jax.models import decoder_only, model

VOCAB, BATCH, LENGTH, K = 512, 16, 128, 32


def llama(d_model: int, layers: int, heads: int, mlp: int) -> model.DecoderOnlyModel:
    return model.DecoderOnlyModel(decoder_only.LlamaConfig(
        vocab_size=VOCAB, d_model=d_model, num_layers=layers, num_heads=heads, num_kv_heads=heads // 2, mlp_dim=mlp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--windows", type=int, default=5)
    args = parser.parse_args()
    from lmops_jax.data import pipeline
    import seqio

    workdir = tempfile.mkdtemp(prefix="bench_distill_")
    teacher, student = llama(256, 4, 8, 1024), llama(128, 2, 4, 512)
    teacher_params = jax.device_get(nn.meta.unbox(teacher.init_params(
        jax.random.key(1), teacher.input_shapes(1, {"targets": LENGTH}))))
    teacher_dir = os.path.join(workdir, "teacher")
    checkpoints.save_params(teacher_dir, teacher_params, convert.gin_config(teacher))
    part = partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1])
    num_batches = 2 + args.steps * args.windows
    lengths = {"targets": LENGTH}
    start = time.perf_counter()
    store_dir = distillation_store.dump_teacher_topk(
        teacher_checkpoint=teacher_dir, output_dir=os.path.join(workdir, "topk"), mixture_or_task_name="synthetic_lm",
        task_feature_lengths=lengths, batch_size=BATCH, num_batches=num_batches, k=K, partitioner=part)
    dump_s = time.perf_counter() - start
    data = pipeline.GlobalBatchIterator(lambda: pipeline.get_dataset(
        "synthetic_lm", lengths, seqio.DecoderFeatureConverter(pack=True), global_batch_size=BATCH, seed=0),
        part.data_sharding())
    batches = [next(data) for _ in range(num_batches)]

    opt = optimizers.OptimizerConfig(warmup_steps=0)
    common = dict(num_train_steps=num_batches, batch_size=BATCH, task_feature_lengths=lengths)
    trainers = {
        "plain": trainer.Trainer(student, part, opt, **common),
        "online": distillation.DistillationTrainer(student, part, opt, **common, teacher_checkpoint=teacher_dir,
                                                   kd_alpha=0.5),
        "offline": distillation.DistillationTrainer(student, part, opt, **common, teacher_checkpoint=teacher_dir,
                                                    kd_alpha=0.5, topk_dir=store_dir),
    }
    trainers["offline, pre-read"] = trainers["offline"]  # the same step, store read before timing
    states = {name: t.init_state() for name, t in trainers.items()}
    attached = [trainers["offline"].store.attach(i, b, trainers["offline"].batch_sharding)
                for i, b in enumerate(batches)]

    def step(name: str, index: int) -> None:
        t = trainers[name]
        batch = batches[index]
        if name == "offline":
            batch = t.store.attach(index, batch, t.batch_sharding)
        elif name == "offline, pre-read":
            batch = attached[index]
        states[name], metrics = t.train_step(states[name], batch)
        jax.block_until_ready(metrics["loss_sum"])

    for name in trainers:  # compile + warm up
        for i in range(2):
            step(name, i)
    best = {name: float("inf") for name in trainers}
    for w in range(args.windows):
        for name in trainers:
            begin = time.perf_counter()
            for i in range(args.steps):
                step(name, 2 + w * args.steps + i)
            best[name] = min(best[name], (time.perf_counter() - begin) / args.steps)
    print("| mode | step time (s) | / plain |")
    print("|---|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.4f} | {seconds / best['plain']:.2f} |")
    print(f"dump of the teacher's top-{K} for {num_batches} batches: {dump_s:.1f} s (compile included)")
    print(json.dumps({"step_time_s": best, "online_over_plain": best["online"] / best["plain"],
                      "offline_over_plain": best["offline"] / best["plain"],
                      "offline_preread_over_plain": best["offline, pre-read"] / best["plain"], "dump_s": dump_s,
                      "student_flops_per_token": student.training_flops_per_token(lengths),
                      "teacher_forward_flops_per_token": teacher.training_flops_per_token(lengths) / 3,
                      "jax_version": jax.__version__}))


if __name__ == "__main__":
    main()
