"""Model wrappers: what a Trainer, an InferenceModule or a serving engine needs from a network.

A wrapper pairs a Flax module with its batch format (the seqio feature converter that produces it) and
exposes pure functions of (params, batch): `compute_logits`, `loss_fn`, `score_batch`. It knows
nothing about meshes, optimizers or requests.

Batch format (decoder-only, from `seqio.DecoderFeatureConverter`): int32 arrays [B, L] named
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights` and, when packed,
`decoder_segment_ids`, `decoder_positions`. Encoder-decoder batches add `encoder_input_tokens` [B, Le]
(and `encoder_segment_ids`, `encoder_positions` when packed).

Decode API (T5X's model-wrapper contract; callers never branch on the family):
    cache = model.init_cache(batch, max_length, prompt_length)     # zeros, boxed with logical axes
    logits, cache = model.prefill(params, tokens, lengths, cache)  # tokens [B, P] right-padded
    logits, cache = model.decode_step(params, next_tokens, cache)  # next_tokens [B], one per row
Logits are float32 [B, V], predicting each row's next token. The cache is a pytree whose every leaf
has the row first; it holds `cache_index` [B], the positions written per row, so rows decode at their
own positions and a row can be refilled (prefill a one-row cache, write it into row i) while the
others continue. Key/value caches are laid out [B, K, Dh, S] (`attention.dot_product_attention`).
Decoder-only: S = max_length, the prompt's keys included; `init_cache(..., pages=KVPages(n, size))` makes
a paged cache instead (`models.paged_attention`: a pool of pages per layer, shared by the rows, and a
block table per row that the caller fills; the same logits). Encoder-decoder: the prompt is the encoder
input; the cache holds its cross-attention keys/values [B, H, Dh, Le = prompt_length] and padding mask
`encoder_valid` [B, Le] (the encoder runs once, in prefill) and decoder keys/values
[B, H, Dh, S = max_length - prompt_length]; prefill feeds the decoder start token.

Request formats (`prompt_tokens`, `score_features`, `logits_features`) turn token lists into the rows
that prefill, `score_batch` and `compute_logits` take, so InferenceModule needs no family branches.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmops_jax import losses
from lmops_jax.models import decoder_only, encoder_decoder, paged_attention
from lmops_jax.models.paged_attention import KVPages

Batch = Mapping[str, jax.Array]
Params = Any
Cache = Any  # pytree of arrays, each [B, ...]: see `BaseModel.init_cache`
Rows = list[list[int]]
DECODER_START_ID = 0  # seqio shifts decoder targets right with 0: the token before every target


class BaseModel(abc.ABC):
    """Shared loss and scoring on top of `compute_logits`, plus the decode API. Subclasses are frozen
    dataclasses. Their methods reach the network only through `self.module` (and plain functions), so
    a wrapper that swaps the module (LoRA, `peft.LoraModel`) reuses them unchanged."""

    z_loss: float = 0.0
    label_smoothing: float = 0.0

    @property
    @abc.abstractmethod
    def module(self) -> nn.Module:
        """The Flax module; `init_params` and `compute_logits` apply it."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Size of the output softmax (may exceed the data vocabulary, e.g. padded to a multiple of 128)."""

    @property
    @abc.abstractmethod
    def feature_converter_cls(self) -> type:
        """The seqio FeatureConverter class that produces this model's batches."""

    @abc.abstractmethod
    def input_shapes(self, batch_size: int, task_feature_lengths: Mapping[str, int]) -> dict[str, tuple]:
        """Shapes of the model features (as the feature converter produces them) for a batch."""

    @abc.abstractmethod
    def init_params(self, rng: jax.Array, input_shapes: Mapping[str, tuple]) -> Params:
        """Parameters with logical-axis metadata (`nn.Partitioned` boxes) for the given input shapes."""

    @abc.abstractmethod
    def compute_logits(self, params: Params, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        """Logits [B, L, V] for the decoder targets of `batch`."""

    @abc.abstractmethod
    def training_flops_per_token(self, task_feature_lengths: Mapping[str, int]) -> float:
        """Model FLOPs per target token of a training step (forward + backward)."""

    # Hooks for models that train or save only part of their params (LoRA: `peft.LoraModel`).
    @property
    def trainable_patterns(self) -> tuple[str, ...]:
        """Regexes of the param paths the Trainer trains when the optimizer names none; () = all."""
        return ()

    def checkpoint_params(self, params: Params) -> Params:
        """The params (or a tree of their shapes or shardings) that checkpoints hold: all of them,
        returned as the same object, unless a subclass keeps a subset."""
        return params

    @property
    def checkpoint_model(self) -> BaseModel:
        """The model whose parameter layout checkpoints hold, as their model spec records it: this one,
        unless it trains in another layout (a scanned decoder: `DecoderOnlyModel`)."""
        return self

    @property
    def max_length(self) -> int | None:
        """Most positions a sequence may have (e.g. a trained context length); None: no limit."""
        return None

    # Decode API (module docstring).
    @property
    @abc.abstractmethod
    def prompt_shares_cache(self) -> bool:
        """Whether a prompt takes positions of the decoding cache, as a decoder-only model's does.

        True: a row holds prompt + generated tokens within max_length, and `prefill` called again on a
        row continues it at its cache_index, so a long prompt can be fed in chunks and a cached prefix
        of a row reused. False (encoder-decoder): the prompt gets its own region of init_cache's
        prompt_length positions, filled by one `prefill` of the whole prompt (the encoder sees all of
        it at once), and max_length - prompt_length positions are left for the generated tokens.
        """

    @abc.abstractmethod
    def init_cache(self, batch: int, max_length: int, prompt_length: int | None = None, *,
                   pages: KVPages | None = None) -> Cache:
        """An empty decoding cache (zeros, every row at position 0) for `batch` rows.

        max_length: the most tokens of a row, prompt + generated; prompt_length: the longest prompt
        `prefill` will get (subclasses give the shapes); pages: a paged cache of this shape, with every
        block table entry "no page" (decoder-only models). Leaves are `nn.Partitioned` boxes naming
        their logical axes, as `init_params` returns them: `partitioner.shardings_of_boxed(
        jax.eval_shape(lambda: model.init_cache(...)))` shards them, `nn.meta.unbox` gives the arrays.
        """

    @abc.abstractmethod
    def prefill(self, params: Params, tokens: jax.Array, lengths: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Feeds the prompts: (float32 logits [B, V] predicting each row's first new token, cache).

        tokens: int32 [B, P], rows from `prompt_tokens`, right-padded; lengths: int32 [B] >= 1, the real
        tokens of each row; cache: from `init_cache` (boxed or not), written from each row's
        cache_index (0 when fresh). Jittable.
        """

    @abc.abstractmethod
    def decode_step(self, params: Params, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Feeds one token per row, int32 [B], at each row's own position: (float32 logits [B, V], cache)."""

    def decode_tokens(self, params: Params, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Feeds L tokens per row, int32 [B, L], from each row's cache_index: (float32 logits [B, L, V] at
        every position, cache with cache_index advanced by L). Speculative decoding verifies a draft's
        tokens with it. Only models whose prompt shares the cache (decoder-only) decode several tokens
        at once."""
        raise NotImplementedError(f"{type(self).__name__} decodes one token per row at a time (decode_step); "
                                  "feeding several at once needs a model whose prompt shares the cache")

    # Request formats: token lists -> unpadded rows (module docstring).
    @abc.abstractmethod
    def prompt_tokens(self, prompt: Sequence[int], *, bos_id: int | None = None,
                      eos_id: int | None = None) -> list[int]:
        """The row `prefill` takes for a prompt.

        bos_id: the start token a decoder-only model reads before its sequence; eos_id: the end token
        an encoder input gets (seqio tasks end text inputs with EOS). None: none. Each family uses the
        one that applies to it.
        """

    @abc.abstractmethod
    def score_features(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *,
                       bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Rows]:
        """Rows of the batch `score_batch` takes to score targets[i] given inputs[i] (bos_id, eos_id as
        for `prompt_tokens`). Rows that the model reads together (inputs, targets, weights) have
        equal lengths; the caller pads each feature."""

    @abc.abstractmethod
    def logits_features(self, tokens: Sequence[Sequence[int]],
                        decoder_tokens: Sequence[Sequence[int]] | None = None) -> dict[str, Rows]:
        """Rows of the batch `compute_logits` takes; its `decoder_input_tokens` rows are where the
        logits are. decoder_tokens: the decoder inputs of an encoder-decoder model (tokens are then
        its encoder inputs)."""

    def loss_fn(
        self, params: Params, batch: Batch, rng: jax.Array | None = None, *, loss_normalizer: Any = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Weighted token cross-entropy.

        The loss is sum(weights * token_loss) / loss_normalizer, where the normalizer defaults to
        sum(weights); a trainer that splits a batch into microbatches passes the whole batch's weight so
        that the accumulated gradient equals the large-batch gradient exactly. Metrics are sums
        (`loss_sum`, `z_loss_sum`, `correct_sum`, `weight_sum`) so that they add across microbatches
        and devices.
        """
        logits = self.compute_logits(params, batch, rng)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        weights = weights.astype(jnp.float32)
        token_loss, z_term = losses.cross_entropy_with_logits(
            logits, targets, z_loss=self.z_loss, label_smoothing=self.label_smoothing)
        weight_sum = jnp.sum(weights)
        loss_sum = jnp.sum(token_loss * weights)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        metrics = {
            "loss_sum": loss_sum,
            "z_loss_sum": jnp.sum(z_term * weights),
            "correct_sum": jnp.sum(correct * weights),
            "weight_sum": weight_sum,
        }
        normalizer = jnp.maximum(weight_sum, 1.0) if loss_normalizer is None else loss_normalizer
        return loss_sum / normalizer, metrics

    def score_batch(self, params: Params, batch: Batch) -> jax.Array:
        """Per-sequence log-likelihood [B] of the weighted targets (no z-loss, no smoothing)."""
        logits = self.compute_logits(params, batch).astype(jnp.float32)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        token_logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(token_logp * weights.astype(jnp.float32), axis=-1)


def _init_cache(module: nn.Module, *input_shapes: tuple[int, int], **kwargs: Any) -> Cache:
    """Zeros of the `cache` collection that `module(*int32 inputs, decode=True, **kwargs)` creates, still boxed."""
    def cache():
        inputs = [jnp.zeros(shape, jnp.int32) for shape in input_shapes]
        return module.init(jax.random.key(0), *inputs, decode=True, **kwargs)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(cache))


def _unboxed(cache: Cache) -> Cache:
    """The arrays of a cache (boxed or not). No sharding constraint here: the layers apply theirs."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, cache, is_leaf=is_box)


def _apply_decode(module: nn.Module, params: Params, cache: Cache, *inputs: Any,
                  **kwargs: Any) -> tuple[jax.Array, Cache]:
    """module(*inputs, decode=True, **kwargs) over the cache: (logits [B, L, V], updated cache)."""
    logits, variables = module.apply({"params": params, "cache": _unboxed(cache)}, *inputs, decode=True,
                                     mutable=["cache"], **kwargs)
    return logits, variables["cache"]


def _row_positions(cache: Cache) -> int:
    """Positions a row of a decoder-only cache holds (dense or paged)."""
    attention = cache["layers_0"]["self_attn"]
    if paged_attention.BLOCK_TABLE in cache:
        return cache[paged_attention.BLOCK_TABLE].shape[1] * attention["key_pages"].shape[2]
    return attention["cached_key"].shape[3]


def _check_prompt_fits(prompt_length: int, slots: int, what: str) -> None:
    if prompt_length > slots:
        raise ValueError(f"prefill: prompts of {prompt_length} tokens do not fit the cache's {slots} {what}; "
                         "make the cache with a larger init_cache(..., prompt_length)")


@dataclasses.dataclass(frozen=True)
class DecoderOnlyModel(BaseModel):
    """A Llama-style decoder trained with next-token cross-entropy on (packed) decoder batches."""

    config: decoder_only.LlamaConfig = dataclasses.field(default_factory=decoder_only.LlamaConfig)
    z_loss: float = 1e-4
    label_smoothing: float = 0.0

    @property
    def module(self) -> nn.Module:
        return decoder_only.LlamaDecoder(self.config)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def feature_converter_cls(self) -> type:
        import seqio  # imported lazily: the model is usable without the data extra
        return seqio.DecoderFeatureConverter

    def input_shapes(self, batch_size, task_feature_lengths):
        shape = (batch_size, int(task_feature_lengths["targets"]))
        names = ["decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                 "decoder_segment_ids", "decoder_positions"]
        return {name: shape for name in names}

    def init_params(self, rng, input_shapes):
        tokens = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
        return self.module.init(rng, tokens)["params"]

    def compute_logits(self, params, batch, rng=None):
        return self.module.apply(
            {"params": params}, batch["decoder_input_tokens"], positions=batch.get("decoder_positions"),
            segment_ids=batch.get("decoder_segment_ids"))

    def training_flops_per_token(self, task_feature_lengths):
        return decoder_only.training_flops_per_token(self.config, int(task_feature_lengths["targets"]))

    @property
    def checkpoint_model(self) -> DecoderOnlyModel:
        """Unscanned: a scanned run's checkpoints hold its layers per layer (`checkpoints.per_layer`), so the
        model a loader rebuilds from them decodes, converts and compresses as any other."""
        if not self.config.scan_layers:
            return self
        return dataclasses.replace(self, config=dataclasses.replace(self.config, scan_layers=False))

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def prompt_shares_cache(self) -> bool:
        return True

    def init_cache(self, batch, max_length, prompt_length=None, *, pages=None):
        """Per layer self-attention keys/values [B, K, Dh, S = max_length] (the prompt's too), and
        cache_index [B]; or with `pages`, block_table [B, ceil(max_length / page_size)] and per layer
        key/value pages [K, num_pages, page_size, Dh]. prompt_length is only checked: the prompt shares
        the max_length slots."""
        if prompt_length is not None and not 0 < prompt_length <= max_length:
            raise ValueError(f"init_cache: prompt_length={prompt_length} must lie in [1, max_length={max_length}]")
        if pages is None:
            return _init_cache(self.module, (batch, max_length))
        cache = _init_cache(self.module, (batch, max_length), pages=pages)
        table = cache[paged_attention.BLOCK_TABLE]
        return {**cache, paged_attention.BLOCK_TABLE: table.replace_boxed(jnp.full_like(table.value, pages.num_pages))}

    def prefill(self, params, tokens, lengths, cache):
        """Writes the right-padded prompts [B, P] (P <= S) at each row's positions; a row's padding is
        overwritten by its next tokens before it could be attended to."""
        cache = _unboxed(cache)
        _check_prompt_fits(tokens.shape[1], _row_positions(cache), "positions")
        lengths = jnp.asarray(lengths, jnp.int32)
        logits, cache = _apply_decode(self.module, params, cache, tokens, lengths=lengths)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return last.astype(jnp.float32), cache

    def decode_step(self, params, tokens, cache):
        logits, cache = _apply_decode(self.module, params, cache, tokens[:, None])
        return logits[:, 0].astype(jnp.float32), cache

    def decode_tokens(self, params, tokens, cache):
        logits, cache = _apply_decode(self.module, params, cache, tokens)
        return logits.astype(jnp.float32), cache

    def prompt_tokens(self, prompt, *, bos_id=None, eos_id=None):
        """[bos_id] + prompt: the prompt is the start of the sequence the model continues."""
        return ([] if bos_id is None else [bos_id]) + list(prompt)

    def score_features(self, inputs, targets, *, bos_id=None, eos_id=None):
        """One sequence [bos] + input + target per row, shifted by one; loss weight on the targets only."""
        features: dict[str, Rows] = {"decoder_input_tokens": [], "decoder_target_tokens": [],
                                     "decoder_loss_weights": []}
        for i, (x, y) in enumerate(zip(inputs, targets)):
            context = self.prompt_tokens(x, bos_id=bos_id)
            if y and not context:
                raise ValueError(f"targets[{i}]: the first token of a sequence cannot be scored without an "
                                 "input or bos_id")
            seq = context + list(y)
            features["decoder_input_tokens"].append(seq[:-1])
            features["decoder_target_tokens"].append(seq[1:])
            features["decoder_loss_weights"].append([0] * (len(seq) - 1 - len(y)) + [1] * len(y))
        return features

    def logits_features(self, tokens, decoder_tokens=None):
        if decoder_tokens is not None:
            raise ValueError("decoder_tokens are only for encoder-decoder models; a decoder-only model takes "
                             "its whole sequence as tokens")
        return {"decoder_input_tokens": [list(row) for row in tokens]}


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel(BaseModel):
    """A T5 1.1 encoder-decoder trained with teacher-forced cross-entropy on (packed) seqio batches.

    Batches come from `seqio.EncDecFeatureConverter`: `encoder_input_tokens` [B, Le] and
    `decoder_{input,target}_tokens`, `decoder_loss_weights` [B, Ld], plus `{encoder,decoder}_segment_ids`
    and `{encoder,decoder}_positions` when packed. Params are initialized with the T5 query scaling
    (`encoder_decoder.scale_query_init`).
    """

    config: encoder_decoder.T5Config = dataclasses.field(default_factory=encoder_decoder.T5Config)
    z_loss: float = 1e-4
    label_smoothing: float = 0.0

    @property
    def module(self) -> nn.Module:
        return encoder_decoder.T5EncoderDecoder(self.config)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def feature_converter_cls(self) -> type:
        import seqio  # imported lazily: the model is usable without the data extra
        return seqio.EncDecFeatureConverter

    def input_shapes(self, batch_size, task_feature_lengths):
        encoder = (batch_size, int(task_feature_lengths["inputs"]))
        decoder = (batch_size, int(task_feature_lengths["targets"]))
        shapes = {name: encoder for name in ["encoder_input_tokens", "encoder_segment_ids", "encoder_positions"]}
        shapes.update({name: decoder for name in ["decoder_input_tokens", "decoder_target_tokens",
                                                  "decoder_loss_weights", "decoder_segment_ids",
                                                  "decoder_positions"]})
        return shapes

    def init_params(self, rng, input_shapes):
        encoder_tokens = jnp.ones(input_shapes["encoder_input_tokens"], jnp.int32)
        decoder_tokens = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
        params = self.module.init(rng, encoder_tokens, decoder_tokens)["params"]
        return encoder_decoder.scale_query_init(params, self.config.head_dim)

    def compute_logits(self, params, batch, rng=None):
        return self.module.apply(
            {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"), decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"), decoder_positions=batch.get("decoder_positions"))

    def training_flops_per_token(self, task_feature_lengths):
        """Per target token; see `encoder_decoder.training_flops_per_token`."""
        return encoder_decoder.training_flops_per_token(
            self.config, int(task_feature_lengths["inputs"]), int(task_feature_lengths["targets"]))

    @property
    def prompt_shares_cache(self) -> bool:
        return False

    def init_cache(self, batch, max_length, prompt_length=None, *, pages=None):
        """Encoder side, for prompts of up to Le = prompt_length tokens: per decoder layer the
        cross-attention keys/values [B, H, Dh, Le], and `encoder_valid` [B, Le]. Decoder side: per layer
        self-attention keys/values [B, H, Dh, S = max_length - prompt_length] (the start token and the
        generated tokens, so S = the most tokens generated), and cache_index [B]."""
        if pages is not None:
            raise NotImplementedError("a paged KV cache is built for decoder-only models; an encoder-decoder model "
                                      "keeps dense rows (its prompt has its own cross-attention cache)")
        if prompt_length is None or not 0 < prompt_length < max_length:
            raise ValueError(f"init_cache: an encoder-decoder cache needs prompt_length (its encoder length) in "
                             f"[1, max_length={max_length}), got {prompt_length}")
        return _init_cache(self.module, (batch, prompt_length), (batch, max_length - prompt_length))

    def prefill(self, params, tokens, lengths, cache):
        """tokens: the encoder inputs [B, P] (P <= Le; padded to Le), lengths: their real tokens. Encodes
        once, keeps the cross-attention keys/values and padding mask in the cache and feeds the decoder
        start token, so the logits predict the first target token."""
        cache = _unboxed(cache)
        encoder_length = cache["decoder"]["encoder_valid"].shape[1]
        _check_prompt_fits(tokens.shape[1], encoder_length, "encoder positions")
        tokens = jnp.pad(tokens, ((0, 0), (0, encoder_length - tokens.shape[1])))
        real = jnp.arange(encoder_length)[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]
        start = jnp.full((tokens.shape[0], 1), DECODER_START_ID, jnp.int32)
        logits, cache = _apply_decode(self.module, params, cache, jnp.where(real, tokens, 0), start)
        return logits[:, 0].astype(jnp.float32), cache

    def decode_step(self, params, tokens, cache):
        logits, cache = _apply_decode(self.module, params, cache, None, tokens[:, None])
        return logits[:, 0].astype(jnp.float32), cache

    def prompt_tokens(self, prompt, *, bos_id=None, eos_id=None):
        """prompt + [eos_id]: the encoder input (the decoder starts from DECODER_START_ID, not bos_id)."""
        return list(prompt) + ([] if eos_id is None else [eos_id])

    def score_features(self, inputs, targets, *, bos_id=None, eos_id=None):
        """Encoder input per `prompt_tokens`; the decoder reads the target shifted right from the start token."""
        return {"encoder_input_tokens": [self.prompt_tokens(x, eos_id=eos_id) for x in inputs],
                "decoder_input_tokens": [([DECODER_START_ID] + list(y))[:-1] for y in targets],
                "decoder_target_tokens": [list(y) for y in targets],
                "decoder_loss_weights": [[1] * len(y) for y in targets]}

    def logits_features(self, tokens, decoder_tokens=None):
        if decoder_tokens is None:
            raise ValueError("an encoder-decoder model needs decoder_tokens [B, Ld] (its decoder inputs) for logits")
        return {"encoder_input_tokens": [list(row) for row in tokens],
                "decoder_input_tokens": [list(row) for row in decoder_tokens]}
