"""Greedy decoding throughput: lmops_jax InferenceModule vs Hugging Face LlamaForCausalLM.generate.

The bench config (Llama: vocab 4096, d_model 256, 4 layers, 4 heads, 4 KV heads, MLP 704, float32,
random init) decodes 128 new tokens after a 16-token prompt at batch 1 and 8. The Hugging Face
PyTorch model gets the same weights, copied through the one-to-one layout documented in
`lmops_jax/models/decoder_only.py`, so both should emit the same tokens; the agreement is reported.
Compile time (and PyTorch's first-call overhead) is excluded by a warm-up run; the two sides then take
turns for `--repeats` rounds (default 5), so that both see the same background load; each side's best
run counts, and the median over the rounds of HF's time over ours in the same round is reported too.
Ours runs with the CPU XLA flags `python -m lmops_jax.infer` and `serve` set (`lmops_jax.cli.xla_flags`,
inference: none today). The last line printed is one JSON object with the figures, the CPU and, measured after
the rounds, how fast XLA:CPU's matrix-vector products read matrices in and out of the cache beside the
MiB of weights a step reads (`bench_machine.py`): batch 1 reads every weight once a step.

    python scripts/bench_decode.py [--repeats 5] [--new_tokens 128] [--prompt_length 16]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmops_jax.cli import xla_flags  # noqa: E402

xla_flags.configure(xla_flags.INFERENCE)  # the CPU flags of `python -m lmops_jax.infer` and `serve` (none today)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmops_jax.inference.inference_module import InferenceModule  # noqa: E402
from lmops_jax.models import decoder_only, model  # noqa: E402
from bench_machine import describe as describe_machine, matvec_read_gbps  # noqa: E402  (scripts/ is on sys.path)

PAUSE_S = 0.2  # after each timed call: lets PyTorch's OpenMP threads go idle (alternating_times)
BENCH = decoder_only.LlamaConfig(vocab_size=4096, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4,
                                 mlp_dim=704, dtype="float32", param_dtype="float32")


def hf_model(cfg: decoder_only.LlamaConfig, params: dict):
    """LlamaForCausalLM with our params (decoder_only.py layout: kernels transposed, heads flattened)."""
    import torch
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_length, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    p = jax.tree.map(np.asarray, params)

    def linear(kernel: np.ndarray, fan_in_dims: int) -> torch.Tensor:
        rows = int(np.prod(kernel.shape[:fan_in_dims]))
        return torch.from_numpy(np.ascontiguousarray(kernel.reshape(rows, -1).T))

    state = {"model.embed_tokens.weight": torch.from_numpy(p["embed_tokens"]["embedding"].copy()),
             "model.norm.weight": torch.from_numpy(p["norm"]["scale"].copy())}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = linear(p["lm_head"]["kernel"], 1)
    for i in range(cfg.num_layers):
        layer, prefix = p[f"layers_{i}"], f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj"):
            state[prefix + f"self_attn.{name}.weight"] = linear(layer["self_attn"][name]["kernel"], 1)
        state[prefix + "self_attn.o_proj.weight"] = linear(layer["self_attn"]["o_proj"]["kernel"], 2)
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[prefix + f"mlp.{name}.weight"] = linear(layer["mlp"][name]["kernel"], 1)
        state[prefix + "input_layernorm.weight"] = torch.from_numpy(layer["input_layernorm"]["scale"].copy())
        state[prefix + "post_attention_layernorm.weight"] = torch.from_numpy(
            layer["post_attention_layernorm"]["scale"].copy())
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight copy: missing {missing}, unexpected {unexpected}")
    return hf


def alternating_times(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each callable over `repeats` rounds, the callables taking turns within a round (the first
    one swapping each round) so that both sides see the same background load, after one warm-up call each
    (compile / first-call overhead). Each call is followed by `PAUSE_S` of sleep: PyTorch's OpenMP threads
    keep spinning for a while after a call and would otherwise slow down XLA running right after them."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
        time.sleep(PAUSE_S)
    order = list(runs)
    for _ in range(repeats):
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
            time.sleep(PAUSE_S)
        order.reverse()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prompt_length", type=int, default=16)
    args = parser.parse_args()
    import torch

    wrapper = model.DecoderOnlyModel(BENCH)
    params = jax.jit(lambda k: nn.meta.unbox(wrapper.init_params(k, {"decoder_input_tokens": (1, 8)})))(
        jax.random.key(0))
    ours = InferenceModule(wrapper, params, bos_id=None)
    hf = hf_model(BENCH, params)
    rng = np.random.default_rng(0)
    result: dict = {"jax": jax.__version__, "torch": torch.__version__, **describe_machine(),
                    "torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
                    "prompt_length": args.prompt_length, "load_avg_1min_start": os.getloadavg()[0]}
    prompts = {b: rng.integers(3, BENCH.vocab_size, (b, args.prompt_length)).astype(np.int32) for b in (1, 8)}
    times, tokens = {}, {}
    for batch, ids in prompts.items():
        input_ids = torch.from_numpy(ids.astype(np.int64))

        def run_ours():
            tokens["ours", batch] = np.array(ours.generate(ids, max_new_tokens=args.new_tokens, eos_id=-1).tokens)

        def run_hf():
            with torch.no_grad():
                out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, num_beams=1)
            tokens["hf", batch] = out[:, args.prompt_length:].numpy()
        per_side = alternating_times({"ours": run_ours, "hf": run_hf}, args.repeats)
        times["ours", batch], times["hf", batch] = per_side["ours"], per_side["hf"]
    for batch in prompts:
        t_ours, t_hf = min(times["ours", batch]), min(times["hf", batch])
        round_speedups = [hf_s / ours_s for ours_s, hf_s in zip(times["ours", batch], times["hf", batch])]
        ours_tokens, hf_tokens = tokens["ours", batch], tokens["hf", batch]
        agreement = float(np.mean(ours_tokens == hf_tokens))
        first_diff = [int(np.argmax(r != h)) if np.any(r != h) else None for r, h in zip(ours_tokens, hf_tokens)]
        new = batch * args.new_tokens
        result[f"tokens_per_s_b{batch}"] = round(new / t_ours, 1)
        result[f"hf_tokens_per_s_b{batch}"] = round(new / t_hf, 1)
        result[f"speedup_b{batch}"] = round(t_hf / t_ours, 2)
        result[f"median_round_speedup_b{batch}"] = round(statistics.median(round_speedups), 2)
        result[f"token_agreement_b{batch}"] = agreement
        print(f"batch {batch}: lmops_jax {new / t_ours:,.0f} tokens/s ({t_ours * 1e3:.1f} ms), "
              f"HF transformers {new / t_hf:,.0f} tokens/s ({t_hf * 1e3:.1f} ms), speedup {t_hf / t_ours:.1f}x "
              f"(median of the rounds' {statistics.median(round_speedups):.1f}x), "
              f"token agreement {agreement:.3f} (first divergence per row: {first_diff})", flush=True)
    result["load_avg_1min_end"] = os.getloadavg()[0]  # the machine may be shared: context for the figures
    read_per_step = {k: v for k, v in params.items() if k != "embed_tokens"}  # of the embedding, one row a token
    result["step_weight_mib"] = round(sum(p.nbytes for p in jax.tree.leaves(read_per_step)) / 2**20, 1)
    result["matvec_read_gbps_4mib"] = round(matvec_read_gbps(4), 1)
    result["matvec_read_gbps_64mib"] = round(matvec_read_gbps(64), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
