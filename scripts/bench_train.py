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

Ours runs with the CPU XLA flags and the malloc setting `python -m lmops_jax.train` makes (`lmops_jax.cli.xla_flags`,
training; `lmops_jax.cli.host_memory`); set LMOPS_JAX_XLA_DEFAULTS=off to measure without them.

Memory and compile time: the train step is lowered and compiled ahead of time once (`compile_s`, lowering
included, no persistent compilation cache: scripts do not turn it on); XLA's compiled memory analysis of
it gives `step_peak_bytes` (arguments + outputs - donated aliases + temporaries, or XLA's own peak where
the backend reports one). `first_step_s` is the first `train_step` call (trace, compile, run). Each side's
peak resident memory is measured in a fresh process that builds it and runs the warm-up steps alone
(`--rss_probe jax|hf`): Linux's VmHWM, restarted after the imports (`*_import_rss_bytes`: resident then).
Not `ru_maxrss`, which a child process inherits from the parent that started it.

    python scripts/bench_train.py [--steps 10] [--windows 3] [--warmup 3] [--skip_hf] [--json_only]

Ends with one JSON line: tokens_per_s, mfu, peak_flops, model_flops_per_token, hf_tokens_per_s,
ratio_vs_hf (ours / HF; null with --skip_hf), compile_s, first_step_s, step_peak_bytes, peak_rss_bytes,
hf_peak_rss_bytes, jax_version, torch_version, ...
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmops_jax.cli import host_memory, xla_flags  # noqa: E402

if __name__ == "__main__":
    host_memory.configure()  # huge pages for malloc's large blocks, as `python -m lmops_jax.train` (may exec again)
xla_flags.configure(xla_flags.TRAINING)  # the CPU flags `python -m lmops_jax.train` runs with (before JAX starts)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmops_jax import partitioning  # noqa: E402
from lmops_jax.training import flops  # noqa: E402
from lmops_jax.training import optimizers  # noqa: E402
from lmops_jax.training import trainer  # noqa: E402
from lmops_jax.models import decoder_only, model  # noqa: E402
from bench_machine import describe as describe_machine, num_cores  # noqa: E402  (scripts/ is on sys.path)

VOCAB, D_MODEL, LAYERS, HEADS, MLP, BATCH, LENGTH = 4096, 256, 4, 4, 704, 8, 256


def batches(seed: int, batch: int = BATCH, length: int = LENGTH, vocab: int = VOCAB):
    """Random next-token batches in the decoder feature format (no data pipeline)."""
    rng = np.random.default_rng(seed)
    while True:
        tokens = rng.integers(1, vocab, (batch, length + 1), dtype=np.int32)
        yield {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
               "decoder_loss_weights": np.ones((batch, length), np.int32)}


def time_window(step_fn: Callable[[], None], steps: int) -> float:
    """Seconds per step over one window of `steps` steps (each step ends synchronized)."""
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - start) / steps


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> None:
    """Restarts VmHWM from the current resident set (Linux >= 4.0), so imports do not set the peak."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """XLA's compiled memory analysis of one executable: its peak bytes (arguments + outputs - donated
    aliases + temporaries) and those parts."""
    stats = compiled.memory_analysis()
    parts = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in ("argument", "output", "alias", "temp")}
    return {"step_peak_bytes": parts["argument"] + parts["output"] - parts["alias"] + parts["temp"],
            **{f"step_{name}_bytes": value for name, value in parts.items()}}


def compile_step(t: trainer.Trainer, batch: dict) -> tuple[float, dict[str, int]]:
    """(seconds to lower and compile the train step for `batch`'s shapes, its compiled memory analysis)."""
    start = time.perf_counter()
    with t.partitioner.context():
        compiled = t._jit_train_step.lower(t.abstract_state, batch, t.step_inputs()).compile()
    return time.perf_counter() - start, compiled_memory(compiled)


def rss_probe(side: str, warmup: int) -> dict[str, int]:
    """Peak resident bytes of a fresh process that builds one side and runs its warm-up steps."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss_probe", side, "--warmup", str(warmup)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--rss_probe", choices=["jax", "hf"], help="internal: print one side's peak RSS and exit")
    args = parser.parse_args()
    if args.rss_probe:
        reset_peak_rss()
        imported = proc_status_bytes("VmRSS")
        step = jax_stepper()[0] if args.rss_probe == "jax" else hf_stepper()
        for _ in range(args.warmup):
            step()
        print(json.dumps({"import_rss_bytes": imported, "peak_rss_bytes": proc_status_bytes("VmHWM")}))
        return
    say = (lambda *a: None) if args.json_only else print
    tokens_per_step = BATCH * LENGTH
    load_start = os.getloadavg()[0]
    peak = flops.measure_matmul_peak(dtype="float32")
    jax_step, llama, jax_trainer = jax_stepper()
    compile_s, memory = compile_step(jax_trainer, next(batches(0)))
    start = time.perf_counter()
    jax_step()
    first_step_s = time.perf_counter() - start
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
    rss = {side: rss_probe(side, args.warmup) for side in steppers}
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
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        **memory,
        "peak_rss_bytes": rss["jax"]["peak_rss_bytes"],
        "import_rss_bytes": rss["jax"]["import_rss_bytes"],
        "hf_peak_rss_bytes": rss.get("hf", {}).get("peak_rss_bytes"),
        "hf_import_rss_bytes": rss.get("hf", {}).get("import_rss_bytes"),
        "batch": BATCH, "seq_len": LENGTH, "steps_per_window": args.steps, "windows": args.windows,
        "threads": num_cores(),
        **describe_machine(),
        "loadavg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "jax_version": jax.__version__,
        "torch_version": torch_version(),
    }
    say(f"lmops_jax: {tokens_per_s:.0f} tokens/s (median window {result['median_tokens_per_s']:.0f}), "
        f"{result['model_flops_per_s'] / 1e9:.1f} model GFLOP/s, MFU {100 * result['mfu']:.1f}% of a "
        f"{peak / 1e9:.1f} GFLOP/s float32 matmul peak measured in this run")
    say(f"train step: compiled in {compile_s:.1f} s (first step {first_step_s:.1f} s), XLA peak "
        f"{memory['step_peak_bytes'] / 2**20:.0f} MiB; process peak RSS {rss['jax']['peak_rss_bytes'] / 2**20:.0f} MiB")
    if "hf" in best:
        hf = tokens_per_step / best["hf"]
        result.update(hf_tokens_per_s=hf, hf_median_tokens_per_s=tokens_per_step / median["hf"],
                      hf_mfu=hf * flops_per_token / peak, ratio_vs_hf=tokens_per_s / hf)
        say(f"HF transformers (PyTorch, {num_cores()} threads): {hf:.0f} tokens/s (median window "
            f"{result['hf_median_tokens_per_s']:.0f}); ours / HF = {result['ratio_vs_hf']:.2f}; process peak RSS "
            f"{rss['hf']['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
