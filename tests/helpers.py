"""Shared test fixtures: tiny models and synthetic batches (no data pipeline needed)."""
import socket

import numpy as np

from lmops_jax.models import decoder_only, model


def tiny_llama(**overrides) -> model.DecoderOnlyModel:
    cfg = dict(vocab_size=128, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=128)
    cfg.update(overrides)
    return model.DecoderOnlyModel(decoder_only.LlamaConfig(**cfg))


def model_gin(m: model.BaseModel, task: str = "synthetic_lm") -> str:
    """The gin config a checkpoint of `m` stores (MODEL and the task), as `train` would write it."""
    from lmops_jax import convert
    return convert.gin_config(m) + f"MIXTURE_OR_TASK_NAME = {task!r}\n"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a coordinator or a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lm_batch(batch_size: int, length: int, vocab: int = 128, seed: int = 0, ragged: bool = False) -> dict:
    """Decoder batch of random tokens; `ragged` zeroes a random tail of each row's loss weights."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (batch_size, length + 1)).astype(np.int32)
    weights = np.ones((batch_size, length), np.int32)
    if ragged:
        for i, n in enumerate(rng.integers(1, length, batch_size)):
            weights[i, n:] = 0
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:] * weights,
            "decoder_loss_weights": weights}


def serve_greedy(checkpoint: str, prompt: list[int], max_tokens: int) -> list[int]:
    """The greedy tokens the server built from `checkpoint` (`serving.serve.build_server`) generates."""
    from lmops_jax.serving import serve as serve_lib
    server = serve_lib.build_server(checkpoint, max_slots=2, max_queue=4, max_length=32, prefix_cache=False,
                                    prefill_chunk=None, request_timeout_s=None, dtype=None, mesh_shape=None,
                                    logical_axis_rules="tp", model_name=None)
    handle = server.scheduler.submit(prompt, serve_lib.SamplingParams(max_tokens=max_tokens, temperature=0.0))
    while server.scheduler.step():
        pass
    return list(handle.result(timeout=0)[0])


def byte_level_checkpoint(m: model.BaseModel, model_dir: str) -> str:
    """A params-only checkpoint of `m` (random init, seed 0) whose spec names a byte vocabulary: what a
    server needs to start."""
    import flax.linen as nn
    import jax

    from lmops_jax import checkpoints
    from lmops_jax.models import spec
    params = jax.device_get(nn.meta.unbox(m.init_params(jax.random.key(0), m.input_shapes(1, {
        "inputs": 8, "targets": 8}))))
    checkpoints.save_params(model_dir, params, "", model_spec=spec.ModelSpec(m, spec.VocabularySpec("byte")).to_json())
    return model_dir


def lora_run_checkpoint(base: model.BaseModel, base_dir: str, run_dir: str, *, rank: int = 4, alpha: float = 8.0,
                        targets: str = r".*/(q_proj|v_proj)", seed: int = 1) -> str:
    """What a LoRA run (gin_configs/runs/lora.gin) of `base` from the checkpoint `base_dir` saves: adapter-only
    params (A and B random, so the adapter changes the outputs), its LoraModel spec and a gin config naming
    INITIAL_CHECKPOINT_PATH. Returns run_dir."""
    import flax.linen as nn
    import jax

    from lmops_jax import checkpoints
    from lmops_jax.models import spec
    from lmops_jax.peft import lora
    lora_model = lora.LoraModel(base, rank=rank, alpha=alpha, targets=targets)
    params = nn.meta.unbox(lora_model.init_params(jax.random.key(seed), base.input_shapes(1, {"inputs": 8,
                                                                                              "targets": 8})))
    keys = iter(jax.random.split(jax.random.key(seed + 100), 1000))
    adapters = jax.tree.map(lambda x: np.asarray(jax.random.normal(next(keys), x.shape, x.dtype)) * 0.5,
                            jax.device_get(lora.adapter_params(params)))
    config = f"INITIAL_CHECKPOINT_PATH = {base_dir!r}\n"
    checkpoints.save_params(run_dir, adapters, config,
                            model_spec=spec.ModelSpec(lora_model, spec.VocabularySpec("byte")).to_json())
    return run_dir
