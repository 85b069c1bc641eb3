"""DistillationTrainer: a student trained on a frozen teacher's outputs in one jitted step.

Online teacher. The teacher is any model the library supports, rebuilt from the model spec stored with
its Orbax checkpoint (`models.loading`; older checkpoints: their gin text) and restored params-only onto the student's
mesh with its own logical-axis shardings. Its params enter the jitted train step as an argument
(`Trainer.step_inputs`; never closed over as constants, never donated), run forward only under
`stop_gradient`, and are never updated (they are not an argument of the gradient).

Offline teacher. `python -m lmops_jax.distillation dump_topk <the run's flags>` runs the teacher once
over the run's training stream and stores, per token, its top-k log-probs and ids, the log-prob of
the target (for `teacher_loss`) and the tokens themselves (see `TopKStore`). With `topk_dir` set, the
trainer reads batch i's entry for step i instead of running the teacher and uses
`TokenLosses.kd_from_topk` (forward KL over the k ids plus one tail bucket holding the mass the
teacher put outside its top-k). Every batch is checked token for token against the stored one.

On-policy (GKD, Agarwal et al. 2024). With `gkd_lambda` > 0, a fraction lambda of steps (drawn from
the seed and step, so a resumed run draws the same) replaces each row's targets after its first
`gkd_prompt_length` tokens by a sample from the current student (`decoding.generate` inside the
jitted step, over the student's decode API and KV cache: `sample_from_student`). Teacher and student
then score the sampled rows and the loss is the KD term alone
on the sampled tokens. Rows are treated as one sequence each (exact for `synthetic_lm`).

Hidden states (`hidden_states`). With `hidden_layer_pairs`, the loss adds, per pair, its weight times a
cosine or MSE loss between the student's and the teacher's module outputs (through a learned map, a
student parameter, when the widths differ).

Cross-tokenizer (`kd_loss='uld'`, `token_alignment`). The teacher reads its own tokenization of the
student's text (built on the host per batch) and the KD term is the ULD distance (`losses.uld`) between
the two next-token distributions at aligned positions (both predict a token starting at the same byte
of the text); elsewhere it is 0. Offline stores hold the aligned teacher top-k per student position.

Per weighted token the student minimizes
    alpha * KD(teacher, student; kind, temperature, beta)  +  (1 - alpha) * CE(student, targets)  +  z-loss
      + sum over hidden pairs of weight * hidden-state loss
(`alpha` and `temperature` may be optax schedules of the step). Losses are sums normalized by the whole
batch's token weight, so gradient accumulation matches the large batch as for `Trainer`. When the
rules shard the vocabulary over a mesh axis of size > 1 (`tp` presets), KD, CE, argmax and the top-k
KD run per vocabulary shard (`losses.vocab_parallel.VocabParallelTokenLosses`, else the plain
`losses.TokenLosses`, which `losses.kd_loss` uses): full-vocabulary logits are never gathered.
Metrics (per weighted token): `kd_loss`, `ce_loss`, `teacher_agreement` (top-1), `teacher_loss` (the
teacher's CE on the batch), `hidden_loss` (with hidden pairs), `aligned` (cross-tokenizer, in place of
teacher_agreement and teacher_loss: the fraction of tokens aligned); per step: `kd_alpha`,
`kd_temperature`, `on_policy`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp

from lmops_jax import checkpoints, losses
from lmops_jax.inference import decoding
from lmops_jax.losses import vocab_parallel as vp
from lmops_jax.distillation import hidden_states as hs
from lmops_jax.distillation import token_alignment as ta
from lmops_jax.distillation.topk_store import (TOPK_IDS, TOPK_LOGPROBS, TARGET_LOGPROB, TopKBatches, TopKStore,
                                          check_teacher_vocabulary, dump_teacher_topk, student_vocabulary,
                                          teacher_vocabulary)
from lmops_jax.models import loading
from lmops_jax.models.model import BaseModel
from lmops_jax.training.trainer import Trainer

ScalarOrSchedule = float | Callable[[Any], Any]
ON_POLICY = "gkd_on_policy"  # batch key: int32 [B], 1 for rows sampled from the student
ULD = "uld"  # KD_LOSS of cross-tokenizer distillation

__all__ = ["DistillationTrainer", "TopKStore", "dump_teacher_topk", "sample_from_student", "main"]


def _shift_right(targets: jax.Array) -> jax.Array:
    return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


def sample_from_student(model: BaseModel, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                        prompt_length: int, temperature: float = 1.0, eos_id: int = 1) -> dict[str, jax.Array]:
    """The batch with each row's targets after `prompt_length` tokens sampled from the model (jittable).

    Each row is taken as one sequence from position 0: the prompt is its first `prompt_length` targets,
    the continuation fills the row. Returns the batch with new `decoder_target_tokens`,
    `decoder_input_tokens` (targets shifted right), `decoder_loss_weights` (1 on sampled tokens up to
    and including EOS), segment ids 1 and positions 0..L-1 (when the batch has them).
    Sampling runs through the model's decode API: `prefill` of the row's decoder inputs up to the
    prompt's end (0 + prompt, as the feature converter shifts them), then `decode_step` over the KV
    cache. The model must read its prompt as the start of its sequence (decoder-only, LoRA or not).
    """
    targets = batch["decoder_target_tokens"]
    size, length = targets.shape
    if not 0 <= prompt_length < length:
        raise ValueError(f"prompt_length must lie in [0, {length}) (the targets length), got {prompt_length}")
    prompt = targets[:, :prompt_length]
    ones = jnp.ones_like(targets)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=targets.dtype), targets.shape)
    cache = model.init_cache(size, length, prompt_length + 1)
    initial, state = model.prefill(params, _shift_right(targets)[:, :prompt_length + 1],
                                   jnp.full((size,), prompt_length + 1, jnp.int32), cache)
    step = functools.partial(model.decode_step, params)
    out = decoding.generate(initial, state, step, max_new_tokens=length - prompt_length, eos_id=eos_id,
                            method="sample", rng=rng, temperature=temperature)
    new_targets = jnp.concatenate([prompt, out.tokens.astype(targets.dtype)], axis=1)
    sampled = jnp.arange(length - prompt_length)[None, :] < out.lengths[:, None]
    weights = jnp.concatenate([jnp.zeros((size, prompt_length), bool), sampled], axis=1)
    new = dict(batch)
    new.update(decoder_target_tokens=new_targets, decoder_input_tokens=_shift_right(new_targets),
               decoder_loss_weights=weights.astype(batch["decoder_loss_weights"].dtype))
    if "decoder_segment_ids" in batch:
        new["decoder_segment_ids"] = ones
    if "decoder_positions" in batch:
        new["decoder_positions"] = positions
    return new


@dataclasses.dataclass
class DistillationTrainer(Trainer):
    """Trainer whose loss mixes a KD term against a frozen teacher with the hard-label loss.

    Attributes (beyond Trainer's):
      teacher_checkpoint: Orbax checkpoint of the teacher (TEACHER_CHECKPOINT); its stored model spec
        builds the teacher model. With `topk_dir` only its spec is read (for the vocabulary checks).
      kd_loss: 'forward_kl', 'reverse_kl' or 'jsd' (KD_LOSS); offline top-k supports 'forward_kl'; 'uld':
        cross-tokenizer distillation (the teacher's vocabulary may differ; module docstring).
      kd_temperature: softmax temperature T > 0, constant or schedule (KD_TEMPERATURE); KD is scaled by T^2.
      kd_alpha: weight of the KD term in [0, 1], constant or schedule (KD_ALPHA).
      kd_beta: JSD mixture weight of the teacher (KD_BETA).
      teacher_model: overrides the model built from the checkpoint's spec.
      teacher_params: Python API: the teacher's params (then `teacher_model` is required and no
        checkpoint is read); they are placed on the teacher's shardings.
      topk_dir: offline mode: a `dump_topk` store of this run's stream (KD_TOPK_DIR).
      gkd_lambda: fraction of on-policy steps, in [0, 1] (GKD_LAMBDA); needs the online teacher.
      gkd_prompt_length: tokens of each row kept as the prompt of on-policy samples (GKD_PROMPT_LENGTH).
      gkd_temperature: sampling temperature of on-policy samples.
      gkd_eos_id: EOS id ending on-policy samples (-1: never).
      vocab_parallel: None decides from the rules (vocabulary sharded over a mesh axis of size > 1);
        False always uses the plain losses (GSPMD may gather the vocabulary); True requires sharding.
      hidden_layer_pairs: [(student module path, teacher module path), ...] (HIDDEN_LAYER_PAIRS).
      hidden_loss: 'cosine' or 'mse' (HIDDEN_LOSS).
      hidden_weights: one weight for every pair, or one per pair (HIDDEN_WEIGHTS).
      teacher_length: 'uld': tokens per teacher row (KD_TEACHER_LENGTH); None: the student's targets length.
      teacher_vocabulary: 'uld': the teacher's seqio vocabulary or tokenizer path; None: its checkpoint's.
    """

    teacher_checkpoint: str | None = None
    kd_loss: str = "forward_kl"
    kd_temperature: ScalarOrSchedule = 1.0
    kd_alpha: ScalarOrSchedule = 0.5
    kd_beta: float = 0.5
    teacher_model: BaseModel | None = None
    teacher_params: Any = None
    topk_dir: str | None = None
    gkd_lambda: float = 0.0
    gkd_prompt_length: int = 0
    gkd_temperature: float = 1.0
    gkd_eos_id: int = 1
    vocab_parallel: bool | None = None
    hidden_layer_pairs: Sequence[Sequence[str]] = ()
    hidden_loss: str = "cosine"
    hidden_weights: float | Sequence[float] = 1.0
    teacher_length: int | None = None
    teacher_vocabulary: Any = None

    def __post_init__(self):
        if self.kd_loss not in (*losses.KD_KINDS, ULD):
            raise ValueError(f"unknown KD_LOSS {self.kd_loss!r}; choose one of {(*losses.KD_KINDS, ULD)}")
        self.cross_tokenizer = self.kd_loss == ULD
        losses.check_kd_args("forward_kl" if self.cross_tokenizer else self.kd_loss, self.kd_temperature, self.kd_beta)
        if isinstance(self.kd_alpha, (int, float)) and not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"KD_ALPHA must lie in [0, 1], got {self.kd_alpha}")
        if not 0.0 <= self.gkd_lambda <= 1.0:
            raise ValueError(f"GKD_LAMBDA must lie in [0, 1], got {self.gkd_lambda}")
        self.offline = bool(self.topk_dir)
        self._teacher_vocabulary = None
        if self.teacher_params is not None and self.teacher_model is None:
            raise ValueError("DistillationTrainer: teacher_params need teacher_model (the model they belong to)")
        if self.teacher_model is None:
            if not self.teacher_checkpoint and not self.offline:
                raise ValueError("DistillationTrainer needs teacher_checkpoint (gin macro TEACHER_CHECKPOINT), "
                                 "or teacher_model and teacher_params")
            if self.teacher_checkpoint:
                teacher = loading.read_spec(self.teacher_checkpoint)
                self.teacher_model, self._teacher_vocabulary = teacher.model, teacher.vocabulary
        if self.teacher_model is not None:
            self._check_teacher_matches(self.teacher_model)
        if self.offline:
            self._init_offline()
        else:
            abstract, self._teacher_shardings = loading.param_shardings(self.teacher_model, self.partitioner)
            if self.teacher_params is None:
                self.teacher_params = checkpoints.restore_params(
                    self.teacher_checkpoint, abstract, self._teacher_shardings)
            else:
                self.teacher_params = jax.device_put(self.teacher_params, self._teacher_shardings)
        if self.gkd_lambda > 0:
            if self.offline:
                raise ValueError("on-policy distillation (GKD_LAMBDA > 0) needs the online teacher to score the "
                                 "student's samples; unset KD_TOPK_DIR")
            if "encoder_input_tokens" in self.model.input_shapes(1, {"inputs": 1, "targets": 1}):
                raise NotImplementedError("on-policy distillation samples decoder-only rows; encoder-decoder "
                                          "students are not supported yet")
            if not 0 <= self.gkd_prompt_length < int(self.task_feature_lengths["targets"]):
                raise ValueError(f"GKD_PROMPT_LENGTH={self.gkd_prompt_length} must lie in [0, targets length "
                                 f"{self.task_feature_lengths['targets']})")
        self._aligner: ta.TokenAligner | None = None
        if self.cross_tokenizer:
            self._check_cross_tokenizer()
        self.hidden_pairs = hs.parse_pairs(self.hidden_layer_pairs, self.hidden_weights)
        if self.hidden_pairs:
            self.model = self._with_hidden_maps()
        self.token_losses = self._token_losses()
        if self.cross_tokenizer and type(self.token_losses) is not losses.TokenLosses:
            raise NotImplementedError("KD_LOSS='uld' sorts whole distributions; a vocabulary sharded over the mesh "
                                      "(tp rules) is not supported: use rules that keep the vocabulary whole")
        super().__post_init__()

    # --------------------------------------------------------------------------------------- set-up
    def _check_teacher_matches(self, teacher: BaseModel) -> None:
        if teacher.vocab_size != self.model.vocab_size and not self.cross_tokenizer:
            raise ValueError(
                f"teacher and student must share a vocabulary: teacher vocab_size={teacher.vocab_size}, "
                f"student vocab_size={self.model.vocab_size}")
        if teacher.feature_converter_cls is not self.model.feature_converter_cls:
            raise ValueError(
                f"teacher and student must read the same batches: the teacher's feature converter is "
                f"{teacher.feature_converter_cls.__name__}, the student's {self.model.feature_converter_cls.__name__}")

    def _check_cross_tokenizer(self) -> None:
        """What KD_LOSS='uld' needs: decoder-only teacher and student, teacher-forced batches, no hidden pairs."""
        for who, m in (("student", self.model), ("teacher", self.teacher_model)):
            if m is not None and "encoder_input_tokens" in m.input_shapes(1, {"inputs": 1, "targets": 1}):
                raise NotImplementedError(f"cross-tokenizer distillation aligns decoder-only sequences; the {who} is "
                                          f"an encoder-decoder model ({type(m).__name__})")
        if self.gkd_lambda > 0:
            raise NotImplementedError("on-policy distillation with KD_LOSS='uld' would re-tokenize the student's "
                                      "samples for the teacher inside the step; set GKD_LAMBDA=0")
        if self.hidden_layer_pairs:
            raise ValueError("HIDDEN_LAYER_PAIRS compare hidden states position by position, which KD_LOSS='uld' "
                             "(different tokenizations of the text) does not have; unset one of them")
        if self.teacher_length is not None and self.teacher_length < 1:
            raise ValueError(f"KD_TEACHER_LENGTH must be >= 1 (or None), got {self.teacher_length}")

    def _with_hidden_maps(self) -> hs.HiddenMapsModel:
        """The student with a learned map for every pair whose widths differ (needs the online teacher)."""
        if self.offline:
            raise ValueError("HIDDEN_LAYER_PAIRS need the teacher's hidden states, which an offline top-k store "
                             "(KD_TOPK_DIR) does not hold; unset one of them")
        if self.hidden_loss not in hs.HIDDEN_LOSSES:
            raise ValueError(f"unknown HIDDEN_LOSS {self.hidden_loss!r}; choose one of {hs.HIDDEN_LOSSES}")
        student = hs.hidden_widths(self.model, [p.student for p in self.hidden_pairs])
        teacher = hs.hidden_widths(self.teacher_model, [p.teacher for p in self.hidden_pairs])
        maps = tuple((i, student[p.student], teacher[p.teacher]) for i, p in enumerate(self.hidden_pairs)
                     if student[p.student] != teacher[p.teacher])
        return hs.HiddenMapsModel(self.model, maps)

    def _init_offline(self) -> None:
        if self.kd_loss not in ("forward_kl", ULD):
            raise ValueError(f"offline top-k distillation (KD_TOPK_DIR) supports KD_LOSS='forward_kl' only (or "
                             f"'uld' across tokenizers), got {self.kd_loss!r}: the teacher's distribution beyond its "
                             "top-k is unknown")
        self.store = TopKStore(self.topk_dir)
        meta = self.store.meta
        vocab = self.teacher_model.vocab_size if self.cross_tokenizer else self.model.vocab_size
        expected = {"vocab_size": vocab, "batch_size": self.batch_size, "cross_tokenizer": self.cross_tokenizer,
                    "task_feature_lengths": {k: int(v) for k, v in self.task_feature_lengths.items()}}
        for key, value in expected.items():
            if meta.get(key, False if key == "cross_tokenizer" else None) != value:  # older stores: same tokenizer
                raise ValueError(f"top-k store {self.topk_dir} was dumped with {key}={meta.get(key)!r}, this run "
                                 f"has {key}={value!r}; dump it again with this run's flags")
        if self.store.num_batches < self.num_train_steps:
            raise ValueError(f"top-k store {self.topk_dir} holds {self.store.num_batches} batches, fewer than the "
                             f"run's {self.num_train_steps} steps; dump with num_batches >= TRAIN_STEPS")
        self.teacher_params, self._teacher_shardings = (), ()

    def _token_losses(self) -> losses.TokenLosses:
        """The loss object of `loss_fn`: vocabulary-parallel when the rules shard the logits' vocabulary
        over a mesh axis of size > 1 (unless `vocab_parallel` is False), else plain."""
        micro = self.batch_size // self.num_microbatches
        shape = (micro, int(self.task_feature_lengths["targets"]), self.model.vocab_size)
        spec = tuple(self.partitioner.spec(("batch", "length", "act_vocab"), shape))
        vocab = spec[2] if len(spec) > 2 else None
        axes = () if vocab is None else ((vocab,) if isinstance(vocab, str) else tuple(vocab))
        sharded = math.prod(self.partitioner.axis_sizes[a] for a in axes) > 1
        if self.vocab_parallel is False or (not sharded and self.vocab_parallel is None):
            return losses.TokenLosses()
        if not sharded:
            raise ValueError(f"vocab_parallel=True but the rules {self.partitioner.rules} do not shard the "
                             f"vocabulary of logits {shape} over a mesh axis of size > 1")
        if len(axes) != 1:
            raise NotImplementedError(f"the vocabulary is sharded over several mesh axes {axes}; the vocabulary-"
                                      "parallel losses take one axis")
        return vp.VocabParallelTokenLosses(self.partitioner.mesh, axes[0], spec[0] if spec else None)

    def step_inputs(self) -> Any:
        return self.teacher_params

    def step_input_shardings(self) -> Any:
        return self._teacher_shardings

    def check_data(self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int]) -> None:
        """Teacher (its checkpoint's vocabulary) and student task must share the vocabulary; the top-k
        store must come from this task and seed. Cross-tokenizer: builds the aligner of the two vocabularies."""
        if self.cross_tokenizer:
            self._aligner = ta.TokenAligner(
                student_vocabulary(mixture_or_task_name),
                teacher_vocabulary(self.teacher_vocabulary, self._teacher_vocabulary),
                self.teacher_length or int(self.task_feature_lengths["targets"]))
        else:
            check_teacher_vocabulary(self._teacher_vocabulary, mixture_or_task_name)
        if self.offline:
            meta = self.store.meta
            for key, value in (("mixture_or_task_name", mixture_or_task_name), ("seed", self.seed)):
                if meta.get(key) != value:
                    raise ValueError(f"top-k store {self.topk_dir} was dumped with {key}={meta.get(key)!r}, this "
                                     f"run has {key}={value!r}")

    # ------------------------------------------------------------------------------------- the loss
    def loss_fn(self, params, batch, rng, loss_normalizer, inputs, step):
        student_logits, student_hidden = self._student_forward(params, batch, rng)
        targets = batch["decoder_target_tokens"]
        weights = batch["decoder_loss_weights"].astype(jnp.float32)
        alpha = losses.resolve_schedule(self.kd_alpha, step)
        temperature = losses.resolve_schedule(self.kd_temperature, step)
        kd, per_token, teacher_hidden = self._teacher_terms(student_logits, batch, inputs, temperature)
        ce_and_z, z = self.token_losses.cross_entropy(student_logits, targets, z_loss=self.model.z_loss,
                                                      label_smoothing=self.model.label_smoothing)
        ce = ce_and_z - z
        if ON_POLICY in batch:  # sampled rows: their "targets" are the student's own tokens, so KD only
            alpha = jnp.where(batch[ON_POLICY][:, None] > 0, 1.0, alpha)
        token_loss = alpha * kd + (1.0 - alpha) * ce + z
        if self.hidden_pairs:
            per_token["hidden_loss"] = sum(
                pair.weight * hs.hidden_state_loss(student_hidden[pair.student], teacher_hidden[pair.teacher],
                                                   self.model.map_kernel(params, i), self.hidden_loss)
                for i, pair in enumerate(self.hidden_pairs))
            token_loss = token_loss + per_token["hidden_loss"]
        sums = lambda x: jnp.sum(x * weights)  # noqa: E731
        metrics = {"loss_sum": sums(token_loss), "kd_loss_sum": sums(kd), "ce_loss_sum": sums(ce), "z_loss_sum": sums(z),
                   "correct_sum": sums((self.token_losses.argmax(student_logits) == targets).astype(jnp.float32)),
                   "weight_sum": jnp.sum(weights)}
        metrics.update({f"{name}_sum": sums(value) for name, value in per_token.items()})
        return metrics["loss_sum"] / loss_normalizer, metrics

    def _student_forward(self, params, batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(student logits [B, L, V], {module path: hidden state} of the hidden pairs' student modules)."""
        if not self.hidden_pairs:
            return self.model.compute_logits(params, batch, rng), {}
        return hs.forward_with_hidden(self.model.base, self.model.student_params(params), batch,
                                      [p.student for p in self.hidden_pairs])

    def _teacher_forward(self, teacher_params, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(teacher logits, {module path: hidden state}), neither differentiated."""
        teacher_params = jax.lax.stop_gradient(teacher_params)
        if self.hidden_pairs:
            out = hs.forward_with_hidden(self.teacher_model, teacher_params, batch, [p.teacher for p in self.hidden_pairs])
        else:
            out = self.teacher_model.compute_logits(teacher_params, batch), {}
        return jax.lax.stop_gradient(out)

    def _teacher_terms(self, student_logits, batch, inputs, temperature):
        """(KD per token [B, L], teacher metrics per token {name: [B, L]}, teacher hidden states)."""
        token_losses = self.token_losses
        if self.cross_tokenizer:
            aligned = batch[ta.ALIGNED].astype(jnp.float32)
            if self.offline:
                kd = losses.uld_from_topk(student_logits, batch[TOPK_LOGPROBS], temperature=temperature)
            else:
                teacher_logits, _ = self._teacher_forward(inputs, ta.teacher_batch(batch))
                at_aligned = jnp.take_along_axis(teacher_logits, batch[ta.ALIGNED_INDEX][..., None], axis=1)
                kd = losses.uld(student_logits, at_aligned, temperature=temperature)
            return kd * aligned, {"aligned": aligned}, {}
        if self.offline:
            kd = token_losses.kd_from_topk(student_logits, batch[TOPK_LOGPROBS], batch[TOPK_IDS],
                                           temperature=temperature)
            teacher_top1, teacher_ce, hidden = batch[TOPK_IDS][..., 0], -batch[TARGET_LOGPROB].astype(jnp.float32), {}
        else:
            teacher_logits, hidden = self._teacher_forward(inputs, batch)
            kd = token_losses.kd(student_logits, teacher_logits, kind=self.kd_loss, temperature=temperature,
                                 beta=self.kd_beta)
            teacher_top1 = token_losses.argmax(teacher_logits)
            teacher_ce, _ = token_losses.cross_entropy(teacher_logits, batch["decoder_target_tokens"])
        agreement = (token_losses.argmax(student_logits) == teacher_top1).astype(jnp.float32)
        return kd, {"teacher_agreement": agreement, "teacher_loss": teacher_ce}, hidden

    def _train_step(self, state, batch, inputs):
        on_policy = jnp.zeros((), bool)
        if self.gkd_lambda > 0:
            choose, sample_key = jax.random.split(jax.random.fold_in(jax.random.key(self.seed + 2), state.step))
            on_policy = jax.random.uniform(choose) < self.gkd_lambda
            rows = batch["decoder_target_tokens"].shape[0]

            def sampled(b):
                b = sample_from_student(self.model, jax.lax.stop_gradient(state.params), b, sample_key,
                                        prompt_length=self.gkd_prompt_length, temperature=self.gkd_temperature,
                                        eos_id=self.gkd_eos_id)
                return {**b, ON_POLICY: jnp.ones((rows,), jnp.int32)}

            batch = jax.lax.cond(on_policy, sampled, lambda b: {**b, ON_POLICY: jnp.zeros((rows,), jnp.int32)},
                                 dict(batch))
        new_state, metrics = super()._train_step(state, batch, inputs)
        metrics["kd_alpha"] = jnp.asarray(losses.resolve_schedule(self.kd_alpha, state.step), jnp.float32)
        metrics["kd_temperature"] = jnp.asarray(losses.resolve_schedule(self.kd_temperature, state.step), jnp.float32)
        metrics["on_policy"] = on_policy.astype(jnp.float32)
        return new_state, metrics

    def fit(self, state, train_batches: Iterator, **kwargs):
        """Trainer.fit; offline, each batch first gets its stored teacher top-k (checked token for token);
        cross-tokenizer online, the teacher's tokenization and the alignment (`token_alignment`)."""
        if self.offline:
            train_batches = TopKBatches(train_batches, self.store, self.batch_sharding)
        elif self.cross_tokenizer:
            if self._aligner is None:
                raise ValueError("KD_LOSS='uld' aligns the student's task with the teacher's vocabulary: call "
                                 "check_data(task, lengths) before fit (train() does)")
            train_batches = ta.AlignedBatches(train_batches, self._aligner, self.batch_sharding)
        return super().fit(state, train_batches, **kwargs)


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lmops_jax.distillation dump_topk <the distillation run's flags>`: writes KD_TOPK_DIR."""
    from lmops_jax.cli import runner
    from lmops_jax.distillation import topk_store

    dump_topk = runner.GinJob(
        topk_store.dump_teacher_topk, "gin_configs/runs/distill.gin",
        help="run the teacher once over the run's training stream and store its top-k log-probs; takes the "
             "distillation run's flags plus --gin.KD_TOPK_DIR (and --gin.KD_TOPK)")
    return runner.run("python -m lmops_jax.distillation", "Offline distillation (docs/distillation.md).",
                      {"dump_topk": dump_topk}, argv)
