"""Serving: a model behind continuous batching and an OpenAI-compatible HTTP server.

    HTTP (server, api, metrics, chat_template, tokenizer) -> Scheduler.submit -> RequestHandle events
    Scheduler (host thread: queue, slots, stops, KV blocks, preemption) -> Engine (device arrays)
    Engine: prefill -> insert(slot) -> generate (one compiled step for all slots) -> free(slot)

`engine` holds the decode state and the compiled functions, `scheduler` the queue and the loop,
`requests` what a request is and what its client receives, `kv_blocks` which KV blocks requests hold
and which prompt blocks are cached; the job `python -m lmops_jax.serve` is in `serve`. Never imports training,
distillation, data or peft; models are loaded through `lmops_jax.models`.
"""
