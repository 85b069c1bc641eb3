"""Training throughput of lmops_jax against Hugging Face transformers (PyTorch) on the same CPU.

Config (fixed): Llama, vocab 4096, d_model 256, 4 layers, 4 heads (4 KV heads), MLP 704, untied
embeddings, float32, AdamW with global-norm clipping, batch 8 x 256 tokens of random ids, one device.
Ours runs `lmops_jax.training.trainer.Trainer.train_step` (jitted once, state donated) on a {'data': 1} mesh;
the peer runs `transformers.LlamaForCausalLM` forward + backward + clipping + `torch.optim.AdamW` with
`torch.set_num_threads(<cores>)`. Both run `--warmup` steps first (compile, allocator), then `--windows`
timed windows of `--steps` steps each, alternating between the two so that both see the same background
load; every window ends on a device sync (block_until_ready / torch's synchronous CPU ops). Each side's
best window counts; medians are reported too.

A float32 2048^3 jitted matmul peak is measured in the same run (before and after the timed windows;
the higher counts), and MFU = model FLOP/s / that peak, with model FLOPs per token counted as the field
does (`BaseModel.training_flops_per_token`: 6 x matmul weights + causal attention scores).

    python scripts/bench_train.py [--steps 10] [--windows 3] [--warmup 3] [--skip_hf] [--json_only]

Ends with one JSON line: tokens_per_s, mfu, peak_flops, model_flops_per_token, hf_tokens_per_s,
ratio_vs_hf (ours / HF; null with --skip_hf), jax_version, torch_version, ...
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import jax
import numpy as np

from lmops_jax import partitioning
from lmops_jax.training import flops
from lmops_jax.training import optimizers
from lmops_jax.training import trainer
from lmops_jax.models import decoder_only, model

VOCAB, D_MODEL, LAYERS, HEADS, MLP, BATCH, LENGTH = 4096, 256, 4, 4, 704, 8, 256


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def batches(seed: int):
    """Random next-token batches in the decoder feature format (no data pipeline)."""
    rng = np.random.default_rng(seed)
    while True:
        tokens = rng.integers(1, VOCAB, (BATCH, LENGTH + 1), dtype=np.int32)
        yield {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
               "decoder_loss_weights": np.ones((BATCH, LENGTH), np.int32)}


def time_window(step_fn: Callable[[], None], steps: int) -> float:
    """Seconds per step over one window of `steps` steps (each step ends synchronized)."""
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - start) / steps


def jax_stepper() -> tuple[Callable[[], None], model.DecoderOnlyModel, trainer.Trainer]:
    llama = model.DecoderOnlyModel(decoder_only.LlamaConfig(
        vocab_size=VOCAB, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS, mlp_dim=MLP,
        tie_embeddings=False, dtype="float32", param_dtype="float32"))
    t = trainer.Trainer(llama, partitioning.Partitioner({"data": 1}, devices=jax.devices()[:1]),
                        optimizers.OptimizerConfig(name="adamw", warmup_steps=0), 10**6, BATCH, {"targets": LENGTH})
    holder = {"state": t.init_state(), "i": 0}
    data = batches(0)
    device_batches = [jax.device_put(next(data), t.batch_sharding) for _ in range(4)]

    def step():
        holder["state"], metrics = t.train_step(holder["state"], device_batches[holder["i"] % 4])
        holder["i"] += 1
        jax.block_until_ready(metrics["loss_sum"])  # the step's outputs are ready once the loss is
    return step, llama, t


def hf_stepper() -> Callable[[], None]:
    import torch
    import transformers

    torch.set_num_threads(num_cores())
    torch.manual_seed(0)
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


def torch_version() -> str | None:
    try:
        import torch
        return torch.__version__
    except ImportError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per framework (alternating)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    parser.add_argument("--skip_hf", action="store_true", help="do not run the PyTorch peer")
    parser.add_argument("--json_only", action="store_true", help="print only the final JSON line")
    args = parser.parse_args()
    say = (lambda *a: None) if args.json_only else print
    tokens_per_step = BATCH * LENGTH
    load_start = os.getloadavg()[0]
    peak = flops.measure_matmul_peak(dtype="float32")
    jax_step, llama, jax_trainer = jax_stepper()
    steppers = {"jax": jax_step}
    if not args.skip_hf:
        steppers["hf"] = hf_stepper()
    for step in steppers.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(args.windows):
        for name, step in steppers.items():
            times[name].append(time_window(step, args.steps))
    peak = max(peak, flops.measure_matmul_peak(dtype="float32"))
    best = {name: min(v) for name, v in times.items()}
    median = {name: statistics.median(v) for name, v in times.items()}
    flops_per_token = llama.training_flops_per_token({"targets": LENGTH})
    tokens_per_s = tokens_per_step / best["jax"]
    result = {
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token / peak,
        "peak_flops": peak,
        "model_flops_per_token": flops_per_token,
        "model_flops_per_s": tokens_per_s * flops_per_token,
        "step_time_s": best["jax"],
        "median_tokens_per_s": tokens_per_step / median["jax"],
        "hf_tokens_per_s": None,
        "hf_median_tokens_per_s": None,
        "hf_mfu": None,
        "ratio_vs_hf": None,
        "train_step_compiles": jax_trainer._jit_train_step._cache_size(),
        "batch": BATCH, "seq_len": LENGTH, "steps_per_window": args.steps, "windows": args.windows,
        "threads": num_cores(),
        "loadavg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "jax_version": jax.__version__,
        "torch_version": torch_version(),
    }
    say(f"lmops_jax: {tokens_per_s:.0f} tokens/s (median window {result['median_tokens_per_s']:.0f}), "
        f"{result['model_flops_per_s'] / 1e9:.1f} model GFLOP/s, MFU {100 * result['mfu']:.1f}% of a "
        f"{peak / 1e9:.1f} GFLOP/s float32 matmul peak measured in this run")
    if "hf" in best:
        hf = tokens_per_step / best["hf"]
        result.update(hf_tokens_per_s=hf, hf_median_tokens_per_s=tokens_per_step / median["hf"],
                      hf_mfu=hf * flops_per_token / peak, ratio_vs_hf=tokens_per_s / hf)
        say(f"HF transformers (PyTorch, {num_cores()} threads): {hf:.0f} tokens/s (median window "
            f"{result['hf_median_tokens_per_s']:.0f}); ours / HF = {result['ratio_vs_hf']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
