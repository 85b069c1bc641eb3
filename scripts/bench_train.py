"""Training throughput of lmops_jax against Hugging Face transformers (PyTorch) on the same CPU.

Config (fixed): Llama, vocab 4096, d_model 256, 4 layers, 4 heads (4 KV heads), MLP 704, float32,
AdamW, batch 8 x 256 tokens of random ids. Both sides run warm-up steps first (compile, allocator),
then `--windows` timed windows of `--steps` steps each, alternating; each side's best window counts. A float32 matmul peak is
measured in the same run, and MFU = model FLOP/s / that peak, with model FLOPs counted as the field
does (`BaseModel.training_flops_per_token`).

    python scripts/bench_train.py [--steps 10] [--windows 3] [--skip_hf]

Ends with one JSON line: tokens_per_s, mfu, peak_flops, hf_tokens_per_s, ratio_vs_hf, ...
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from lmops_jax import flops, optimizers, partitioning, trainer
from lmops_jax.models import decoder_only, model

VOCAB, D_MODEL, LAYERS, HEADS, MLP, BATCH, LENGTH = 4096, 256, 4, 4, 704, 8, 256


def batches(seed: int):
    rng = np.random.default_rng(seed)
    while True:
        tokens = rng.integers(1, VOCAB, (BATCH, LENGTH + 1), dtype=np.int32)
        yield {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
               "decoder_loss_weights": np.ones((BATCH, LENGTH), np.int32)}


def time_window(step_fn, steps: int) -> float:
    """Seconds per step over one window of `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - start) / steps


def jax_stepper() -> tuple[callable, model.DecoderOnlyModel]:
    llama = model.DecoderOnlyModel(decoder_only.LlamaConfig(
        vocab_size=VOCAB, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS, mlp_dim=MLP))
    t = trainer.Trainer(llama, partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1]),
                        optimizers.OptimizerConfig(warmup_steps=0), 10**6, BATCH, {"targets": LENGTH})
    holder = {"state": t.init_state()}
    data = batches(0)
    device_batches = [jax.device_put(next(data), t.batch_sharding) for _ in range(4)]
    counter = {"i": 0}

    def step():
        holder["state"], metrics = t.train_step(holder["state"], device_batches[counter["i"] % 4])
        counter["i"] += 1
        jax.block_until_ready(metrics["loss_sum"])
    return step, llama


def hf_stepper():
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, tie_word_embeddings=False,
        max_position_embeddings=LENGTH)
    net = transformers.LlamaForCausalLM(config).float().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = batches(0)
    tensors = [torch.from_numpy(next(data)["decoder_input_tokens"].astype(np.int64)) for _ in range(4)]
    counter = {"i": 0}

    def step():
        ids = tensors[counter["i"] % 4]
        counter["i"] += 1
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip_hf", action="store_true")
    args = parser.parse_args()
    tokens_per_step = BATCH * LENGTH
    peak = flops.measure_matmul_peak(dtype="float32")
    jax_step, llama = jax_stepper()
    steppers = {"jax": jax_step}
    if not args.skip_hf:
        steppers["hf"] = hf_stepper()
    for step in steppers.values():
        for _ in range(args.warmup):
            step()
    # Windows alternate between the two, so both see the same background load; best window counts.
    best = {name: float("inf") for name in steppers}
    for _ in range(args.windows):
        for name, step in steppers.items():
            best[name] = min(best[name], time_window(step, args.steps))
    peak = max(peak, flops.measure_matmul_peak(dtype="float32"))  # best of before and after
    flops_per_token = llama.training_flops_per_token({"targets": LENGTH})
    result = {
        "tokens_per_s": tokens_per_step / best["jax"],
        "step_time_s": best["jax"],
        "model_flops_per_token": flops_per_token,
        "peak_flops": peak,
        "mfu": tokens_per_step / best["jax"] * flops_per_token / peak,
        "jax_version": jax.__version__,
    }
    print(f"lmops_jax: {result['tokens_per_s']:.0f} tokens/s, MFU {100 * result['mfu']:.1f}% of a "
          f"{peak / 1e9:.1f} GFLOP/s matmul peak")
    if "hf" in best:
        import torch
        result.update(hf_tokens_per_s=tokens_per_step / best["hf"], ratio_vs_hf=best["hf"] / best["jax"],
                      torch_version=torch.__version__)
        print(f"HF transformers: {result['hf_tokens_per_s']:.0f} tokens/s; ratio {result['ratio_vs_hf']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
