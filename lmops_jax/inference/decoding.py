"""Model-agnostic autoregressive decoding: greedy and sampled generation in one `lax.while_loop`.

The model is reached only through a callback

    tokens_to_logits(tokens: int32[N], state) -> (logits: float[N, V], new_state)

that advances every sequence by one token. `state` is any pytree (a KV cache plus whatever the model
needs) with this layout convention:

- a leaf with ndim >= 1 is per-sequence: its leading dimension is the (flattened) batch N;
- a 0-d leaf (e.g. a shared cache index) is shared by all sequences.

Expanding a batch to several samples or beams per prompt (`expand_state`) and reordering beams
(`gather_beams`) touch only the per-sequence leaves. The callback must return a state with the same
structure, shapes and dtypes.

Generation starts after a prefill done by the caller, who passes the logits predicting the first new
token and the state after the prompt. The callback is called at most `max_new_tokens - 1` times (the
first token comes from the prefill logits), so a KV cache needs room for prompt + max_new_tokens - 1
positions. Beam search lives in `lmops_jax.inference.beam_search` and shares the helpers of this module.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

State = Any
TokensToLogits = Callable[[jax.Array, State], tuple[jax.Array, State]]

PAD_ID = 0


class DecodeOutput(NamedTuple):
    """Result of `generate`, a pytree.

    Attributes:
      tokens: int32 [N, max_new_tokens]; EOS is included, positions after it hold PAD_ID (0).
      lengths: int32 [N]; generated tokens per sequence, EOS included.
      log_probs: float32 [N]; sum over the generated tokens (EOS included, padding excluded) of their
        log-probability under the model's unmodified distribution, log_softmax(logits), whatever the
        temperature / top-k / top-p used to pick them. This is the sequence likelihood, comparable
        across decoding methods and usable to rank samples.
    N = batch * num_decodes; row b * num_decodes + i is the i-th decode of prompt b.
    """

    tokens: jax.Array
    lengths: jax.Array
    log_probs: jax.Array


def _is_concrete(x: Any) -> bool:
    return isinstance(x, numbers.Number)


def check_decode_inputs(initial_logits: jax.Array, state: State, max_new_tokens: int) -> tuple[int, int]:
    """Validates the shared decoding inputs and returns (batch, vocab)."""
    if jnp.ndim(initial_logits) != 2:
        raise ValueError(f"initial_logits must be [batch, vocab], got shape {jnp.shape(initial_logits)}")
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a static int >= 1, got {max_new_tokens!r}")
    batch, vocab = jnp.shape(initial_logits)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        shape = jnp.shape(leaf)
        if shape and shape[0] != batch:
            raise ValueError(
                f"state leaf {jax.tree_util.keystr(path)} has shape {shape}: per-sequence leaves must "
                f"have the batch ({batch}) as leading dimension; shared leaves must be 0-d")
    return batch, vocab


def expand_state(state: State, n: int) -> State:
    """Repeats every per-sequence leaf n times along axis 0: [B, ...] -> [B * n, ...].

    Row b * n + i of the result is a copy of row b, so the expanded batch is prompt-major, the layout
    `gather_beams` and the decoding outputs use. 0-d (shared) leaves are returned unchanged.
    """
    if not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if n == 1:
        return state
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0) if jnp.ndim(x) else x, state)


def gather_beams(state: State, beam_indices: jax.Array) -> State:
    """Reorders the beams of each prompt in every per-sequence leaf.

    Args:
      state: pytree whose per-sequence leaves are [B * K_old, ...] (prompt-major).
      beam_indices: int [B, K_new]; entry (b, j) is the old beam of prompt b that new beam j copies.

    Returns:
      The state with per-sequence leaves [B * K_new, ...]; 0-d leaves unchanged.
    """
    if jnp.ndim(beam_indices) != 2:
        raise ValueError(f"beam_indices must be [batch, new_beams], got shape {jnp.shape(beam_indices)}")
    batch, new_beams = beam_indices.shape

    def gather(x: jax.Array) -> jax.Array:
        if not jnp.ndim(x):
            return x
        if x.shape[0] % batch:
            raise ValueError(f"state leaf with leading dimension {x.shape[0]} is not a multiple of the "
                             f"batch {batch} of beam_indices")
        old_beams = x.shape[0] // batch
        rows = (jnp.arange(batch, dtype=jnp.int32)[:, None] * old_beams + beam_indices).reshape(-1)
        return jnp.take(x, rows, axis=0)

    return jax.tree.map(gather, state)


def call_model(tokens_to_logits: TokensToLogits, tokens: jax.Array, state: State,
               vocab: int) -> tuple[jax.Array, State]:
    """Calls the callback and checks, at trace time, that it keeps the logits and state shapes."""
    logits, new_state = tokens_to_logits(tokens, state)
    if jnp.shape(logits) != (tokens.shape[0], vocab):
        raise ValueError(f"tokens_to_logits returned logits of shape {jnp.shape(logits)}, expected "
                         f"{(tokens.shape[0], vocab)}")
    old = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), state)
    new = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), new_state)
    if jax.tree.structure(state) != jax.tree.structure(new_state) or old != new:
        raise ValueError("tokens_to_logits must return a state with the structure, shapes and dtypes "
                         f"of its input state; got {new} for {old}")
    return logits, new_state


def check_sampling_args(temperature: float | jax.Array, top_k: int, top_p: float | jax.Array) -> None:
    """Checks the sampling knobs; traced temperature / top_p cannot be checked and pass through."""
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be a static int >= 0, got {top_k!r}")
    if _is_concrete(temperature) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if _is_concrete(top_p) and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _nucleus_filter(sorted_logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """Masks to -inf all but the smallest prefix of descending logits [..., k] whose mass >= top_p.

    A token is kept when the mass strictly before it is < top_p, so the first token always stays.
    """
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p).at[..., 0].set(True) | (top_p >= 1.0)
    return jnp.where(keep, sorted_logits, -jnp.inf)


def sample_tokens(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
    """Draws one token per row from filtered logits [N, V]; returns int32 [N].

    Order as in Hugging Face: divide by temperature, keep the top_k largest (0 = all), then keep the
    nucleus: the smallest set of most likely tokens whose renormalized mass is >= top_p (always at
    least one). top_k is static; temperature and top_p may be traced (a traced top_p picks the filtered
    or the plain path with `lax.cond`, so top_p = 1 costs no sort over V). When filtering applies,
    sampling happens among the sorted top-k candidates (k = V for top-p alone), so excluded tokens
    have probability exactly 0. Same key and inputs give the same tokens.
    """
    check_sampling_args(temperature, top_k, top_p)
    logits = logits.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]

    def filtered(k: int, nucleus: bool) -> jax.Array:
        values, indices = lax.top_k(logits, k)
        if nucleus:
            values = _nucleus_filter(values, top_p)
        choice = jax.random.categorical(rng, values, axis=-1)
        return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def plain() -> jax.Array:
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)

    if top_k:
        return filtered(min(top_k, vocab), nucleus=not _is_concrete(top_p) or top_p < 1.0)
    if not _is_concrete(top_p):  # traced: sort the vocabulary only when the nucleus filters
        return lax.cond(top_p < 1.0, lambda: filtered(vocab, nucleus=True), plain)
    return filtered(vocab, nucleus=True) if top_p < 1.0 else plain()


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """One token per row of logits [N, V], each row with its own knobs and key: int32 [N].

    The filters and their order are `sample_tokens`'s, given per row as arrays, so rows with different
    settings sample in one compiled function (a serving step over slots). keys: typed PRNG keys [N];
    temperature f32 [N], 0 = greedy (the argmax of the logits); top_k i32 [N], 0 = all; top_p f32 [N] in
    (0, 1]. Nothing is drawn when every row is greedy, and the vocabulary is sorted only when some
    sampled row filters (`lax.switch`).
    """
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    categorical = jax.vmap(jax.random.categorical)

    def filtered() -> jax.Array:
        values, indices = _sorted_row_filter(scaled, top_k, top_p)
        return jnp.take_along_axis(indices, categorical(keys, values)[:, None], axis=-1)[:, 0].astype(jnp.int32)

    branch = jnp.where(jnp.all(greedy), 0, jnp.where(_any_row_filters(greedy, top_k, top_p), 2, 1))
    sampled = lax.switch(branch, [lambda: argmax, lambda: categorical(keys, scaled).astype(jnp.int32), filtered])
    return jnp.where(greedy, argmax, sampled)


def _sorted_row_filter(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [N, V] sorted descending with each row's top-k and nucleus filters applied (-inf outside),
    and the token ids they belong to [N, V]."""
    vocab = scaled.shape[-1]
    values, indices = lax.top_k(scaled, vocab)
    in_top_k = (top_k[:, None] <= 0) | (jnp.arange(vocab)[None, :] < top_k[:, None])
    return _nucleus_filter(jnp.where(in_top_k, values, -jnp.inf), top_p[:, None]), indices


def _any_row_filters(greedy: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    return jnp.any(~greedy & ((top_k > 0) | (top_p < 1.0)))


def row_log_probs(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Log-probabilities [N, V] of the distribution `sample_rows` draws each row's token from.

    Same per-row knobs (temperature f32 [N], 0 = greedy; top_k i32 [N]; top_p f32 [N]); a greedy row is
    one-hot at its argmax (0 there, -inf elsewhere), so speculative decoding's rejection sampling over
    these distributions is exact greedy decoding for greedy rows. Filtered-out tokens get -inf.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]

    def filtered() -> jax.Array:
        values, indices = _sorted_row_filter(scaled, top_k, top_p)
        return jnp.full_like(scaled, -jnp.inf).at[jnp.arange(scaled.shape[0])[:, None], indices].set(values)

    kept = lax.cond(_any_row_filters(greedy, top_k, top_p), filtered, lambda: scaled)
    argmax = jnp.argmax(logits, axis=-1)
    one_hot = jnp.where(jnp.arange(vocab)[None, :] == argmax[:, None], 0.0, -jnp.inf)
    return jnp.where(greedy[:, None], one_hot, jax.nn.log_softmax(kept, axis=-1))


class _GenerateCarry(NamedTuple):
    step: jax.Array  # int32 scalar: next position of `tokens` to fill
    tokens: jax.Array  # int32 [N, T]
    last: jax.Array  # int32 [N]: token emitted at step - 1 (PAD_ID once finished)
    finished: jax.Array  # bool [N]
    lengths: jax.Array  # int32 [N]
    log_probs: jax.Array  # float32 [N]
    state: State


def generate(
    initial_logits: jax.Array,
    state: State,
    tokens_to_logits: TokensToLogits,
    *,
    max_new_tokens: int,
    eos_id: int,
    method: str = "greedy",
    rng: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
    num_decodes: int = 1,
) -> DecodeOutput:
    """Greedy or sampled generation with per-sequence EOS stopping, as one `lax.while_loop`.

    Args:
      initial_logits: float [B, V], the prefill's logits predicting the first new token.
      state: model state after the prompt (layout in the module docstring).
      tokens_to_logits: (int32 [N], state) -> (float [N, V], state); N = B * num_decodes.
      max_new_tokens: static number of tokens to generate at most (T).
      eos_id: end-of-sequence id; a sequence stops after emitting it (EOS is kept in the output).
        Pass -1 never to stop early.
      method: "greedy" (argmax) or "sample" (see `sample_tokens` for temperature, top_k, top_p).
      rng: PRNG key, required for "sample"; step t draws with fold_in(rng, t), so the output is a
        deterministic function of the key.
      num_decodes: decodes per prompt; the state and initial logits are expanded with `expand_state`.

    Returns:
      DecodeOutput with tokens [N, T], lengths [N], log_probs [N]. The loop ends early once every
      sequence has emitted EOS; finished sequences emit PAD_ID and are fed PAD_ID to the model.

    Jit with static_argnames=("tokens_to_logits", "max_new_tokens", "method", "top_k", "num_decodes").
    """
    if method not in ("greedy", "sample"):
        raise ValueError(f"method must be 'greedy' or 'sample', got {method!r}")
    if method == "sample" and rng is None:
        raise ValueError("rng is required when method='sample'")
    if not isinstance(num_decodes, numbers.Integral) or num_decodes < 1:
        raise ValueError(f"num_decodes must be a static int >= 1, got {num_decodes!r}")
    _, vocab = check_decode_inputs(initial_logits, state, max_new_tokens)
    if method == "sample":
        check_sampling_args(temperature, top_k, top_p)
    initial_logits = expand_state(initial_logits, num_decodes)
    state = expand_state(state, num_decodes)
    n = initial_logits.shape[0]

    def emit(carry: _GenerateCarry, logits: jax.Array, state: State) -> _GenerateCarry:
        """Picks the token at position carry.step from logits [N, V] and records it."""
        if method == "greedy":
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            key = jax.random.fold_in(rng, carry.step)
            token = sample_tokens(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
        log_softmax = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_logp = jnp.take_along_axis(log_softmax, token[:, None], axis=-1)[:, 0]
        alive = ~carry.finished
        token = jnp.where(alive, token, PAD_ID)
        return _GenerateCarry(
            step=carry.step + 1,
            tokens=carry.tokens.at[:, carry.step].set(token),
            last=token,
            finished=carry.finished | (alive & (token == eos_id)),
            lengths=carry.lengths + alive.astype(jnp.int32),
            log_probs=carry.log_probs + jnp.where(alive, token_logp, 0.0),
            state=state,
        )

    def cond(carry: _GenerateCarry) -> jax.Array:
        return (carry.step < max_new_tokens) & ~jnp.all(carry.finished)

    def body(carry: _GenerateCarry) -> _GenerateCarry:
        logits, new_state = call_model(tokens_to_logits, carry.last, carry.state, vocab)
        return emit(carry, logits, new_state)

    start = _GenerateCarry(
        step=jnp.array(0, jnp.int32),
        tokens=jnp.full((n, max_new_tokens), PAD_ID, jnp.int32),
        last=jnp.zeros((n,), jnp.int32),
        finished=jnp.zeros((n,), bool),
        lengths=jnp.zeros((n,), jnp.int32),
        log_probs=jnp.zeros((n,), jnp.float32),
        state=state,
    )
    final = lax.while_loop(cond, body, emit(start, initial_logits, state))
    return DecodeOutput(tokens=final.tokens, lengths=final.lengths, log_probs=final.log_probs)
