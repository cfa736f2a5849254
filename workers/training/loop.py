"""The training loop: a frozen base model plus one PEFT method, trained on masked token losses.

A plain loop rather than transformers.Trainer, so that method hooks (AdaLoRA's budget allocation),
cancellation at step boundaries, events and checkpoints are explicit and cheap, and batches waste no
compute (batches.py: packed rows, logits only where a label is).

One run is a `TrainingRecipe` with a typed `TrainingConfig`: `setup()` builds the adapter, optimiser and
schedule (or restores them from a checkpoint); `run()` repeats `step()` (one optimiser step, in one or several
forward/backward passes) with `validate()` and `checkpoint()` where due, and `finish()` reports how it ended.
The job's runner gives the recipe callbacks to its job row, events and artifact store. A rank > 0 of a
data-parallel job runs a `ReplicaRecipe`: the same setup and steps, its share of each, and nothing else.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters.data import EncodedExample, FeedbackExample, PreferencePair
from adapters.methods import AdapterMethod, total_steps
from adapters.methods.base import PREFERENCE_OBJECTIVES, ResolvedHyperparameters
from workers.training.batches import (
    PACKED_ATTENTION,
    SDPA_ATTENTION,
    TrainingBatch,
    labelled_count,
    labelled_logits,
    packed_batch,
    padded_batch,
    token_count,
    use_attention,
)
from workers.training.memory import Example, MemoryPlan
from workers.training.parallel import DataParallel, ReplicaStopped


class Cancelled(Exception):
    """The job was cancelled; training stopped at a step boundary."""


class LeaseLost(Exception):
    """Another worker owns the job now; stop without writing anything."""


class HandBack(Exception):
    """The worker is shutting down: checkpoint, then give the job back to the queue."""


class Paused(HandBack):
    """The client paused the job: checkpoint, then release the worker."""


class TimeLimit(HandBack):
    """The job reached its soft time limit: checkpoint, then fail with code "timeout"."""


def _ignore(*_: Any) -> None:
    return None


@dataclass
class TrainingCallbacks:
    """How the loop talks to the outside world (the job row, the event log, the artifact store). Each does
    nothing unless given: a benchmark or a test gives only what it watches."""

    on_metrics: Callable[[dict[str, Any]], None] = _ignore
    on_progress: Callable[[int, int, float, float | None], None] = _ignore
    # None to go on; an exception instance to stop with (Cancelled, LeaseLost, ...), checked every step.
    should_stop: Callable[[], Exception | None] = _ignore
    # (model, optimizer, scheduler, position, metrics, epoch_end): save a checkpoint.
    on_checkpoint: Callable[..., None] = _ignore
    on_message: Callable[[str], None] = field(default=lambda _: None)  # a warning
    on_info: Callable[[str], None] = field(default=lambda _: None)
    # (step, tokens it trained): after every optimiser step (metrics counters).
    on_step: Callable[[int, int], None] = field(default=lambda step, tokens: None)
    # Called once, right before the first step of this attempt (start-up is over: model, data, optimiser).
    on_training_start: Callable[[], None] = field(default=lambda: None)
    # (model, step): load the adapter weights of the checkpoint at that step (early stopping keeps the best).
    restore_weights: Callable[[Any, int], None] = field(default=lambda model, step: None)


@dataclass
class Position:
    step: int
    epoch: int  # the epoch in progress
    batch: int  # batches of that epoch already done
    trained_tokens: int
    # Early stopping: the lowest validation loss so far, its step, and validations since then.
    best_valid_loss: float | None = None
    best_step: int | None = None
    validations_since_best: int = 0


@dataclass
class TrainingResult:
    steps: int
    trained_tokens: int
    final_train_loss: float | None
    final_valid_loss: float | None
    # The step whose weights the returned model holds (earlier than `steps` after early stopping).
    kept_step: int = 0
    stopped_early: bool = False
    last_metrics: dict[str, Any] = field(default_factory=dict)


def trainable_examples(examples: list[Example], max_len: int) -> list[Example]:
    """Drop examples (pairs: either of whose sequences) that have nothing left to learn from after truncation to
    max_len."""
    return [e for e in examples if has_trained_tokens(e, max_len)]


def has_trained_tokens(example: EncodedExample | PreferencePair | FeedbackExample, max_len: int) -> bool:
    if isinstance(example, PreferencePair):
        return has_trained_tokens(example.chosen, max_len) and has_trained_tokens(example.rejected, max_len)
    # The label of token t is predicted at t-1, so a trained token at position 0 teaches nothing.
    return any(example.loss_mask[1:max_len])


class BatchMaker:
    """Turns a list of examples into a TrainingBatch the way a method allows: packed rows, or one example a row
    padded with `offset` positions in front for the method's virtual tokens."""

    def __init__(self, *, packed: bool, offset: int, max_len: int, pad_id: int):
        self.packed, self.offset, self.max_len, self.pad_id = packed, offset, max_len, pad_id

    @classmethod
    def for_training(cls, method: AdapterMethod[Any], hp: ResolvedHyperparameters, pad_id: int) -> BatchMaker:
        return cls(packed=method.packs_examples, offset=method.input_offset(hp), max_len=hp.max_seq_length,
                   pad_id=pad_id)

    @classmethod
    def for_saved_adapter(cls, method: AdapterMethod[Any], config: dict[str, Any], *, max_len: int,
                          pad_id: int) -> BatchMaker:
        """Batches for an adapter as saved (its adapter_config.json says what goes in front of the input)."""
        return cls(packed=method.packs_examples, offset=method.saved_input_offset(config), max_len=max_len,
                   pad_id=pad_id)

    @classmethod
    def for_base_model(cls, *, max_len: int, pad_id: int) -> BatchMaker:
        """Batches for the base model alone: packed, nothing in front of the input."""
        return cls(packed=True, offset=0, max_len=max_len, pad_id=pad_id)

    @property
    def attention(self) -> str:
        """The attention implementation these batches need."""
        return PACKED_ATTENTION if self.packed else SDPA_ATTENTION

    def __call__(self, examples: list[EncodedExample]) -> TrainingBatch:
        if self.packed:
            return packed_batch(examples, max_len=self.max_len)
        return padded_batch(examples, max_len=self.max_len, pad_id=self.pad_id, offset=self.offset)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % (2**32))
    except ImportError:
        pass


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffle of one epoch, a function of (seed, epoch) alone: a resumed run sees the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


_accelerator: Any = None


def accelerator_for(compute_dtype: str, device: torch.device) -> Any:
    """The process's accelerate.Accelerator for this compute dtype (bf16 autocast, or none for fp32)."""
    global _accelerator
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = "bf16" if compute_dtype == "bfloat16" else "no"
    if _accelerator is None or _accelerator.mixed_precision != precision:
        # accelerate keeps one state per process and refuses another precision; a process that trains in
        # two dtypes (tests; a changed setting) starts a new one.
        AcceleratorState._reset_state(reset_partial_state=True)
        _accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    return _accelerator


SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass(frozen=True)
class TrainingConfig:
    """What decides a training run besides its data: the method, its resolved hyperparameters, the seed, the
    compute dtype, and how often the run logs, validates and checkpoints."""

    method: AdapterMethod[Any]
    hyperparameters: ResolvedHyperparameters
    seed: int
    pad_id: int
    # "bfloat16" trains under bf16 autocast (the frozen base should be stored in bf16; PEFT keeps adapter weights,
    # and so the optimiser state, in fp32).
    compute_dtype: str = "float32"
    # 0: about four validations per run (ten with early stopping), and one at the last step.
    eval_every_steps: int = 0
    log_every_steps: int = 1
    # A resumable checkpoint every N steps as well as at each epoch's end; 0: epoch ends only.
    checkpoint_steps: int = 0
    # Periodic validations score the first N validation examples (None: all of them).
    max_valid_examples: int | None = None


@dataclass
class StepTotals:
    """One optimiser step's statistics (tensors: no host sync until something reads them)."""

    loss: torch.Tensor  # the step's mean loss per labelled token (summed over the ranks of a data-parallel step)
    correct: torch.Tensor  # labelled tokens predicted right (preference objectives: pairs ranked right)
    labels: int  # labelled tokens (preference objectives: pairs)
    tokens: int  # tokens this step trained (its examples, cut to max_seq_length)
    margin: torch.Tensor | None = None  # preference objectives: the pairs' reward margins, summed


class TrainingRecipe:
    """One training run of a PEFT adapter on `base_model` (which it modifies in place): the single process, or
    rank 0 of a data-parallel job (`parallel`), which alone validates, logs and checkpoints.

    `resume` (a checkpoints.ResumeState) continues from a checkpoint: same weights, optimiser, scheduler, RNG and
    data position, so the result matches an uninterrupted run. `initial_weights(model)` loads the adapter weights a
    new job starts from (`from_model`). `memory` splits a step whose examples do not fit at once into several
    forward/backward passes (memory.py). `after_step(step)` runs after each step (fault injection in tests).
    The examples are EncodedExamples, or PreferencePairs for a preference objective (hyperparameters.objective)."""

    def __init__(self, config: TrainingConfig, *, base_model: Any, train_examples: list[Any],
                 valid_examples: list[Any] | None = None, callbacks: TrainingCallbacks | None = None,
                 resume: Any = None, initial_weights: Callable[[Any], None] | None = None,
                 memory: MemoryPlan | None = None, parallel: DataParallel | None = None,
                 after_step: Callable[[int], None] | None = None):
        self.config, self.hp = config, config.hyperparameters
        self.method = config.method
        self.base_model = base_model
        self.train_examples, self.valid_examples = train_examples, valid_examples or []
        self.callbacks = callbacks or TrainingCallbacks()
        self.resume, self.initial_weights = resume, initial_weights
        self.memory, self.parallel, self.after_step = memory, parallel, after_step
        self.stopped_early = False
        # Per-step values stay tensors (no host sync) until a metrics event or checkpoint reads them.
        self.last: StepTotals | None = None
        self.grad_norm: torch.Tensor | None = None
        self.valid_metrics: dict[str, float] = {}

    @property
    def leader(self) -> bool:
        return self.parallel is None or self.parallel.leader

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        """Data, the PEFT model, optimiser and schedule; restored from `resume` when given."""
        from peft import get_peft_model
        from transformers import get_scheduler

        from workers.training import checkpoints

        hp = self.hp
        seed_everything(self.config.seed)
        self.examples = trainable_examples(self.train_examples, hp.max_seq_length)
        if not self.examples:
            raise ValueError(f"no example has trainable tokens within max_seq_length={hp.max_seq_length}")
        if len(self.examples) < len(self.train_examples) and self.resume is None:
            self.callbacks.on_message(f"{len(self.train_examples) - len(self.examples)} example(s) have no trainable "
                                      f"tokens within max_seq_length={hp.max_seq_length} and were skipped.")
        self.valid = trainable_examples(self.valid_examples, hp.max_seq_length)[:self.config.max_valid_examples]
        self.steps_total = total_steps(len(self.examples), hp)
        self.steps_per_epoch = math.ceil(len(self.examples) / hp.batch_size)
        if hp.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = get_peft_model(self.base_model, self.method.peft_config(
            hp, total_steps=self.steps_total, base_model_path=getattr(self.base_model, "name_or_path", None)))
        if self.initial_weights is not None and self.resume is None and self.leader:
            self.initial_weights(self.model)
        if self.config.compute_dtype != "float32":
            # Under autocast the adapter's matmuls run in the compute dtype anyway; PEFT's cast of every adapter
            # input to the fp32 adapter weights would copy each activation (and run dropout on the copy) for nothing.
            from peft.tuners.tuners_utils import BaseTunerLayer

            for module in self.model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.cast_input_dtype_enabled = False  # type: ignore[attr-defined]
        self.method.before_training(self.model, self.config.compute_dtype)
        self.make = BatchMaker.for_training(self.method, hp, self.config.pad_id)
        self.preference = hp.objective in PREFERENCE_OBJECTIVES
        # The reference (the base model: the adapter disabled) reads the same tokens with nothing in front of them.
        self.reference_make = BatchMaker(packed=self.make.packed, offset=0, max_len=hp.max_seq_length,
                                         pad_id=self.config.pad_id)
        use_attention(self.base_model, self.make.attention)
        self.device = next(self.base_model.parameters()).device
        self.accelerator = accelerator_for(self.config.compute_dtype, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        self.scheduler = get_scheduler(SCHEDULERS[hp.lr_scheduler], self.optimizer,
                                       num_warmup_steps=int(hp.warmup_ratio * self.steps_total),
                                       num_training_steps=self.steps_total)
        self.patience = hp.early_stopping_patience if self.valid else None
        # Early stopping needs validations often enough to notice a turn: about ten per job by default.
        self.eval_every = self.config.eval_every_steps or max(1, math.ceil(self.steps_total / (10 if self.patience
                                                                                                else 4)))
        if self.memory is not None and self.resume is None:
            self.callbacks.on_info(self._memory_report(self.memory))
        self.position = Position(step=0, epoch=0, batch=0, trained_tokens=0)
        if self.resume is not None:
            checkpoints.restore(self.resume, model=self.model, method=self.method, optimizer=self.optimizer,
                                scheduler=self.scheduler)
            self.position = Position(step=self.resume.step, epoch=self.resume.epoch, batch=self.resume.batch,
                                     trained_tokens=self.resume.trained_tokens, **self.resume.early_stopping)
        if self.parallel is not None:
            self.parallel.broadcast_parameters(self.params)  # rank 0 alone loaded `initial_weights`
        self.model.train()

    def _memory_report(self, memory: MemoryPlan) -> str:
        order = epoch_order(len(self.examples), self.config.seed, 0)
        size = self.hp.batch_size
        counts = [len(self.passes([self.examples[i] for i in order[j:j + size]])) for j in range(0, len(order), size)]
        several = sum(n > 1 for n in counts)
        return f"Memory: {memory.describe()}. " + (
            f"{several} of the first epoch's {len(counts)} steps run in several passes (up to {max(counts)}), "
            "their gradients added up." if several else "Every step runs in one pass.")

    # ------------------------------------------------------------ the schedule and one step

    def schedule(self) -> Iterator[list[EncodedExample]]:
        """The remaining steps' examples, from the position on: each epoch its own shuffle (epoch_order), so a
        resumed run recomputes exactly the order it left. The caller's step moves the position."""
        hp, position = self.hp, self.position
        while position.epoch < hp.n_epochs and position.step < self.steps_total and not self.stopped_early:
            epoch = position.epoch
            order = epoch_order(len(self.examples), self.config.seed, epoch)
            self.epoch_batches = [order[i:i + hp.batch_size] for i in range(0, len(order), hp.batch_size)]
            while position.epoch == epoch and position.step < self.steps_total and not self.stopped_early:
                yield [self.examples[i] for i in self.epoch_batches[position.batch]]

    def passes(self, chunk: list[Any]) -> list[list[Any]]:
        """This process's forward/backward passes of a step: its share (data parallel), cut to fit memory."""
        max_len = self.hp.max_seq_length
        mine = chunk if self.parallel is None else self.parallel.share(chunk, max_len)
        return [mine] if self.memory is None else self.memory.split(mine, max_len)

    def step(self, chunk: list[Any]) -> StepTotals:
        """One optimiser step on `chunk`: this process's passes, gradients summed over the ranks, the update."""
        max_len = self.hp.max_seq_length
        loss_sum, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        margin = torch.zeros((), device=self.device)
        # Each pass's loss is summed over its labels (pairs) and divided by the step's: the passes' gradients add up
        # to those of the whole batch's mean loss.
        labels = len(chunk) if self.preference else sum(labelled_count(example, max_len) for example in chunk)
        for index, part in enumerate(self.passes(chunk)):
            with self.accelerator.autocast():
                if self.preference:
                    loss, right, margins = (self._feedback_loss(part, chunk) if self.hp.objective == "kto"
                                            else self._pair_loss(part, chunk))
                    margin += margins.sum()
                else:
                    batch = self.make(part).to(self.device)
                    logits = labelled_logits(self.model, batch)
                    loss = torch.nn.functional.cross_entropy(logits.float(), batch.targets, reduction="sum") / labels
                    right = (logits.detach().argmax(-1) == batch.targets).sum()
                extra = self.method.regularisation(self.model) if index == 0 and self.leader else None  # once a step
                total = loss if extra is None else loss + extra
            self.accelerator.backward(total)
            loss_sum += loss.detach()
            correct += right
        tokens = sum(token_count(example, max_len) for example in chunk)
        self.position.trained_tokens += tokens
        if self.parallel is not None:
            loss_sum, correct, margin = self.parallel.sum_gradients(self.params, [loss_sum, correct, margin])
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.position.step += 1
        self.position.batch += 1
        self.method.after_optimizer_step(self.model, self.position.step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepTotals(loss=loss_sum, correct=correct, labels=labels, tokens=tokens,
                          margin=margin if self.preference else None)

    def _pair_loss(self, pairs: list[PreferencePair], step: list[PreferencePair]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass's pairs under the job's preference objective (preference.py): (its loss, summed and divided by
        the step's pairs or labels; the pairs ranked right; their reward margins, detached). Only DPO reads the
        reference."""
        from workers.training.preference import REFERENCE_OBJECTIVES, objective_loss, pair_logps

        objective = self.hp.objective
        logps = pair_logps(self.model, self.make, pairs, self.device,
                           reference_make=self.reference_make if objective in REFERENCE_OBJECTIVES else None)
        chosen_tokens = sum(labelled_count(pair.chosen, self.hp.max_seq_length) for pair in step)
        loss, margins = objective_loss(objective, logps, beta=float(self.hp.beta or 0.0), gamma=self.hp.gamma,
                                       pairs=len(step), chosen_tokens=chosen_tokens)
        return loss, (margins > 0).sum(), margins

    def _feedback_loss(self, examples: list[FeedbackExample], step: list[FeedbackExample]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """KTO on one pass's examples (preference.py): (its loss, summed and divided by the step's examples; the
        examples ranked right; their signed rewards, detached)."""
        from workers.training.preference import feedback_logps, kto_loss

        logps = feedback_logps(self.model, self.make, self.reference_make, examples, self.device)
        loss, signed = kto_loss(logps, beta=float(self.hp.beta or 0.0), examples=len(step))
        return loss, (signed > 0).sum(), signed

    def end_of_epoch(self) -> bool:
        """After a step: whether it ended its epoch (the last batch, or the run's last step); if so the position
        moves to the next epoch's start."""
        done = self.position.batch == len(self.epoch_batches) or self.position.step == self.steps_total
        if done:
            self.position.epoch += 1
            self.position.batch = 0
        return done

    # ------------------------------------------------------------ the run

    def run(self) -> tuple[Any, TrainingResult]:
        """Set up, train every remaining step, and finish; returns the PeftModel and a summary."""
        self.setup()
        position = self.position
        self.callbacks.on_progress(position.step, self.steps_total,
                                   position.epoch + position.batch / self.steps_per_epoch, None)
        self.callbacks.on_training_start()
        self.started, self.started_step = time.monotonic(), position.step
        self.logged_at, self.logged_tokens = self.started, position.trained_tokens
        for chunk in self.schedule():
            self.stop_if_asked()
            self.last = self.step(chunk)
            self.callbacks.on_step(position.step, self.last.tokens)
            trained_at = time.monotonic()
            validated, new_best = self.validate_if_due()
            if self.parallel is not None:
                self.stopped_early = self.parallel.agree(self.stopped_early)  # rank 0 validates
            self.report(trained_at, validated)
            epoch_done = self.end_of_epoch()
            # With early stopping every new best is a checkpoint, so the best weights are always on disk.
            every = self.config.checkpoint_steps
            if (epoch_done or self.stopped_early or (every and position.step % every == 0)
                    or (self.patience is not None and new_best)):
                self.checkpoint(epoch_done)
            if self.after_step is not None:
                self.after_step(position.step)
        return self.finish()

    def stop_if_asked(self) -> None:
        """Raise what `should_stop` returns (the ranks agree on it first), checkpointing a hand-back."""
        stop = self.callbacks.should_stop()
        if self.parallel is not None:
            self.parallel.stop_together(stop is not None)
        if stop is not None:
            if isinstance(stop, HandBack) and self.position.step > 0:  # Paused and TimeLimit too
                self.checkpoint(False)
            raise stop

    def validate_if_due(self) -> tuple[bool, bool]:
        """Validate when due (every eval_every steps and at the last); (validated, a new best loss)."""
        step = self.position.step
        if not self.valid or (step % self.eval_every and step != self.steps_total):
            return False, False
        loss = self.validate()
        position = self.position
        if position.best_valid_loss is None or loss < position.best_valid_loss:
            position.best_valid_loss, position.best_step, position.validations_since_best = loss, step, 0
            return True, True
        position.validations_since_best += 1
        self.stopped_early = self.patience is not None and position.validations_since_best >= self.patience
        return True, False

    def validate(self) -> float:
        """Loss and token accuracy on the validation examples (preference objectives: the loss, the pairs ranked
        right and the mean reward margin), the metrics' valid_*; returns the loss."""
        from workers.training.evaluation import score
        from workers.training.preference import score_feedback, score_pairs

        if self.hp.objective == "kto":
            with self.accelerator.autocast():
                feedback = score_feedback(self.model, self.valid, make=self.make, reference_make=self.reference_make,
                                          beta=float(self.hp.beta or 0.0), batch_size=self.hp.batch_size)
            self.valid_metrics = {"valid_loss": round(feedback.loss, 6),
                                  "valid_preference_accuracy": round(feedback.accuracy, 6),
                                  "valid_reward_margin": round(feedback.reward_margin, 6)}
            return feedback.loss
        if self.preference:
            with self.accelerator.autocast():
                pairs = score_pairs(self.model, self.valid, objective=self.hp.objective, make=self.make,
                                    reference_make=self.reference_make, beta=float(self.hp.beta or 0.0),
                                    gamma=self.hp.gamma, batch_size=self.hp.batch_size)
            self.valid_metrics = {"valid_loss": round(pairs.loss, 6),
                                  "valid_preference_accuracy": round(pairs.accuracy, 6),
                                  "valid_reward_margin": round(pairs.reward_margin, 6)}
            return pairs.loss
        with self.accelerator.autocast():
            scores = score(self.model, self.valid, make=self.make, batch_size=self.hp.batch_size)
        self.valid_metrics = {"valid_loss": round(scores.loss, 6),
                              "valid_mean_token_accuracy": round(scores.mean_token_accuracy, 6)}
        return scores.loss

    def metrics(self) -> dict[str, Any]:
        """The latest step's training metrics and the latest validation's (what a checkpoint records)."""
        values: dict[str, Any] = {"step": self.position.step}
        if self.last is not None:
            values["train_loss"] = round(float(self.last.loss), 6)
            accuracy = round(int(self.last.correct) / max(1, self.last.labels), 6)
            if self.last.margin is None:
                values["train_mean_token_accuracy"] = accuracy
            else:
                values["train_preference_accuracy"] = accuracy
                values["train_reward_margin"] = round(float(self.last.margin) / max(1, self.last.labels), 6)
        values.update(self.valid_metrics)
        return values

    def report(self, trained_at: float, validated: bool) -> None:
        """A metrics event when one is due, and the progress (with an estimate of the time left) every step."""
        position, step = self.position, self.position.step
        epoch_float = position.epoch + position.batch / self.steps_per_epoch
        if step % self.config.log_every_steps == 0 or step == self.steps_total or validated or self.stopped_early:
            # Training throughput since the last metrics event, validation time left out.
            speed = (position.trained_tokens - self.logged_tokens) / max(1e-9, trained_at - self.logged_at)
            metrics = self.metrics() | {
                "epoch": round(epoch_float, 4), "learning_rate": self.scheduler.get_last_lr()[0],
                "grad_norm": round(float(self.grad_norm if self.grad_norm is not None else 0.0), 6),
                "total_steps": self.steps_total, "tokens_per_second": round(speed, 1)}
            if not validated:
                metrics = {k: v for k, v in metrics.items() if not k.startswith("valid_")}
            self.callbacks.on_metrics(metrics)
            self.logged_at, self.logged_tokens = time.monotonic(), position.trained_tokens
        elapsed = time.monotonic() - self.started
        self.callbacks.on_progress(step, self.steps_total, epoch_float,
                                   elapsed / (step - self.started_step) * (self.steps_total - step))

    def checkpoint(self, epoch_end: bool) -> None:
        self.callbacks.on_checkpoint(self.model, self.optimizer, self.scheduler, self.position, self.metrics(),
                                     epoch_end)

    def finish(self) -> tuple[Any, TrainingResult]:
        """The trained model (the best checkpoint's weights after early stopping) and the run's summary."""
        position, kept = self.position, self.position.step
        if self.stopped_early and position.best_step is not None and position.best_step != position.step:
            self.callbacks.restore_weights(self.model, position.best_step)
            kept = position.best_step
        return self.model, TrainingResult(
            steps=position.step, trained_tokens=position.trained_tokens,
            final_train_loss=None if self.last is None else float(self.last.loss),
            final_valid_loss=self.valid_metrics.get("valid_loss"), kept_step=kept, stopped_early=self.stopped_early,
            last_metrics=self.metrics())


class ReplicaRecipe(TrainingRecipe):
    """A rank > 0 of a data-parallel job: the same setup and steps as rank 0, training its share of each step.
    It validates, logs and checkpoints nothing (rank 0 does), and leaves when rank 0 stops or stops early."""

    def __init__(self, config: TrainingConfig, *, base_model: Any, train_examples: list[EncodedExample],
                 parallel: DataParallel, resume: Any = None, memory: MemoryPlan | None = None):
        if parallel.leader:
            raise ValueError("rank 0 runs the TrainingRecipe, not a replica")
        super().__init__(config, base_model=base_model, train_examples=train_examples, resume=resume, memory=memory,
                         parallel=parallel)

    def run(self) -> tuple[Any, TrainingResult]:
        self.setup()
        assert self.parallel is not None
        for chunk in self.schedule():
            if self.parallel.stop_together(False):
                raise ReplicaStopped
            self.last = self.step(chunk)
            self.stopped_early = self.parallel.agree(False)  # rank 0's decision
            self.end_of_epoch()
        return self.model, TrainingResult(steps=self.position.step, trained_tokens=self.position.trained_tokens,
                                          final_train_loss=None, final_valid_loss=None)
