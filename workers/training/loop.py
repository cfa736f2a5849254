"""The training loop: a frozen base model plus one PEFT method, trained on masked token losses.

A plain loop rather than transformers.Trainer, so that method hooks (AdaLoRA's budget allocation),
cancellation at step boundaries, events and checkpoints are explicit and cheap, and batches waste no
compute (batches.py: packed rows, logits only where a label is).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters.data import EncodedExample
from adapters.methods import AdapterMethod, total_steps
from workers.training.batches import (
    PACKED_ATTENTION,
    TrainingBatch,
    labelled_count,
    labelled_logits,
    packed_batch,
    padded_batch,
    use_packed_attention,
)
from workers.training.memory import MemoryPlan
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


@dataclass
class TrainingCallbacks:
    """How the loop talks to the outside world (the job row, the event log, the artifact store)."""

    on_metrics: Callable[[dict[str, Any]], None]
    on_progress: Callable[[int, int, float, float | None], None]
    # None to go on; an exception instance to stop with (Cancelled, LeaseLost, ...), checked every step.
    should_stop: Callable[[], Exception | None]
    # (model, optimizer, scheduler, position, metrics, epoch_end): save a checkpoint.
    on_checkpoint: Callable[..., None]
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


def trainable_examples(examples: list[EncodedExample], max_len: int) -> list[EncodedExample]:
    """Drop examples that have nothing left to learn from after truncation to max_len."""
    # The label of token t is predicted at t-1, so a trained token at position 0 teaches nothing.
    return [e for e in examples if any(e.loss_mask[1:max_len])]


class BatchMaker:
    """Turns a list of examples into a TrainingBatch the way the method allows (packed or padded)."""

    def __init__(self, method: AdapterMethod | None, hp: dict[str, Any], pad_id: int):
        """`method` None: batches for the base model alone (packed, nothing in front of the input)."""
        self.packed = method is None or method.packs_examples
        self.offset = 0 if method is None else method.input_offset(hp)
        self.max_len, self.pad_id = hp["max_seq_length"], pad_id

    @property
    def attention(self) -> str:
        """The attention implementation these batches need."""
        return PACKED_ATTENTION if self.packed else "sdpa"

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


def train(*, base_model: Any, method: AdapterMethod, hyperparameters: dict[str, Any], seed: int,
          train_examples: list[EncodedExample], valid_examples: list[EncodedExample], pad_id: int,
          eval_every_steps: int, log_every_steps: int, callbacks: TrainingCallbacks, checkpoint_steps: int = 0,
          resume: Any = None, after_step: Callable[[int], None] | None = None,
          compute_dtype: str = "float32", initial_weights: Callable[[Any], None] | None = None,
          max_valid_examples: int | None = None, memory: MemoryPlan | None = None,
          parallel: DataParallel | None = None) -> tuple[Any, TrainingResult]:
    """Train a PEFT adapter on `base_model` (modified in place); returns the PeftModel and a summary.

    `compute_dtype` "bfloat16" trains under bf16 autocast (the frozen base should be stored in bf16; PEFT
    keeps adapter weights, and so the optimiser state, in fp32). `resume` (a checkpoints.ResumeState)
    continues from a checkpoint: same weights, optimiser, scheduler, RNG and data position, so the result
    matches an uninterrupted run. `initial_weights(model)` loads the adapter weights a new job starts from
    (`from_model`). Periodic validations score the first `max_valid_examples` validation examples. `memory`
    splits a step whose examples do not fit at once into several forward/backward passes (memory.py).
    `parallel`: this process's rank in a data-parallel job (parallel.py); each rank trains its share of a
    step and the gradients are summed, so the step is the single-process one.
    """
    from peft import get_peft_model
    from transformers import get_scheduler

    from workers.training import checkpoints
    from workers.training.evaluation import score

    seed_everything(seed)
    hp = hyperparameters
    max_len = hp["max_seq_length"]
    examples = trainable_examples(train_examples, max_len)
    if not examples:
        raise ValueError(f"no example has trainable tokens within max_seq_length={max_len}")
    if len(examples) < len(train_examples) and resume is None:
        callbacks.on_message(f"{len(train_examples) - len(examples)} example(s) have no trainable tokens "
                             f"within max_seq_length={max_len} and were skipped.")
    valid = trainable_examples(valid_examples, max_len)[:max_valid_examples]
    steps_total = total_steps(len(examples), hp)
    if hp.get("gradient_checkpointing"):
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base_model, method.peft_config(hp, total_steps=steps_total,
                                                          base_model_path=getattr(base_model, "name_or_path", None)))
    if initial_weights is not None and resume is None:
        initial_weights(model)
    if compute_dtype != "float32":
        # Under autocast the adapter's matmuls run in the compute dtype anyway; PEFT's cast of every adapter
        # input to the fp32 adapter weights would copy each activation (and run dropout on the copy) for nothing.
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False  # type: ignore[attr-defined]
    make = BatchMaker(method, hp, pad_id)
    base_model.set_attn_implementation("sdpa")
    if make.packed:
        use_packed_attention(base_model)
    accelerator = accelerator_for(compute_dtype, next(base_model.parameters()).device)
    device = next(base_model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    scheduler = get_scheduler(SCHEDULERS[hp.get("lr_scheduler", "linear")], optimizer,
                              num_warmup_steps=int(hp["warmup_ratio"] * steps_total), num_training_steps=steps_total)
    patience = hp.get("early_stopping_patience") if valid else None
    # Early stopping needs validations often enough to notice a turn: about ten per job by default.
    eval_every = eval_every_steps or max(1, math.ceil(steps_total / (10 if patience else 4)))
    batch_size = hp["batch_size"]
    steps_per_epoch = math.ceil(len(examples) / batch_size)

    def passes(chunk: list[EncodedExample]) -> list[list[EncodedExample]]:
        """This process's forward/backward passes of a step: its share (data parallel), cut to fit memory."""
        mine = chunk if parallel is None else parallel.share(chunk, max_len)
        return [mine] if memory is None else memory.split(mine, max_len)

    if memory is not None and resume is None:
        order = epoch_order(len(examples), seed, 0)
        counts = [len(passes([examples[i] for i in order[j:j + batch_size]])) for j in range(0, len(order), batch_size)]
        several = sum(n > 1 for n in counts)
        callbacks.on_info(f"Memory: {memory.describe()}. "
                          + (f"{several} of the first epoch's {len(counts)} steps run in several passes "
                             f"(up to {max(counts)}), their gradients added up." if several
                             else "Every step runs in one pass."))
    position = Position(step=0, epoch=0, batch=0, trained_tokens=0)
    if resume is not None:
        checkpoints.restore(resume, model=model, optimizer=optimizer, scheduler=scheduler)
        position = Position(step=resume.step, epoch=resume.epoch, batch=resume.batch,
                            trained_tokens=resume.trained_tokens, **resume.early_stopping)
    leader = parallel is None or parallel.leader
    if parallel is not None:
        parallel.broadcast_parameters(params)  # rank 0 alone loaded `initial_weights`

    model.train()
    callbacks.on_progress(position.step, steps_total, position.epoch + position.batch / steps_per_epoch, None)
    callbacks.on_training_start()
    # Per-step values stay tensors (no host sync) until a metrics event or checkpoint reads them.
    last_loss: torch.Tensor | None = None
    last_correct: torch.Tensor | None = None
    last_labels = 0
    grad_norm: torch.Tensor | None = None
    valid_metrics: dict[str, float] = {}
    stopped_early = False
    started, started_step = time.monotonic(), position.step
    logged_at, logged_tokens = started, position.trained_tokens

    def checkpoint_metrics() -> dict[str, Any]:
        values: dict[str, Any] = {"step": position.step}
        if last_loss is not None:
            values["train_loss"] = round(float(last_loss), 6)
            values["train_mean_token_accuracy"] = round(int(last_correct or 0) / max(1, last_labels), 6)
        values.update(valid_metrics)
        return values

    while position.epoch < hp["n_epochs"] and position.step < steps_total and not stopped_early:
        order = epoch_order(len(examples), seed, position.epoch)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        while position.batch < len(batches) and position.step < steps_total:
            stop = callbacks.should_stop()
            if parallel is not None and parallel.stop_together(stop is not None) and not leader:
                raise ReplicaStopped
            if stop is not None:
                if isinstance(stop, HandBack) and position.step > 0:  # Paused and TimeLimit too
                    callbacks.on_checkpoint(model, optimizer, scheduler, position, checkpoint_metrics(), False)
                raise stop
            chunk = [examples[i] for i in batches[position.batch]]
            parts = [make(part).to(device) for part in passes(chunk)]
            labels = sum(labelled_count(example, max_len) for example in chunk)
            step_loss, step_correct = torch.zeros((), device=device), torch.zeros((), device=device)
            for index, batch in enumerate(parts):
                with accelerator.autocast():
                    logits = labelled_logits(model, batch)
                    # Summed over the pass and divided by the step's labels: the passes' gradients add up to
                    # those of the whole batch's mean loss.
                    loss = torch.nn.functional.cross_entropy(logits.float(), batch.targets, reduction="sum") / labels
                    extra = method.regularisation(model) if index == 0 and leader else None  # once per step
                    total_loss = loss if extra is None else loss + extra
                accelerator.backward(total_loss)
                step_loss += loss.detach()
                step_correct += (logits.detach().argmax(-1) == batch.targets).sum()
            step_tokens = sum(min(len(example.input_ids), max_len) for example in chunk)
            position.trained_tokens += step_tokens
            if parallel is not None:
                step_loss, step_correct = parallel.sum_gradients(params, [step_loss, step_correct])
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            position.step += 1
            position.batch += 1
            method.after_optimizer_step(model, position.step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss, last_labels, last_correct = step_loss, labels, step_correct
            callbacks.on_step(position.step, step_tokens)
            trained_at = time.monotonic()
            step = position.step
            epoch_float = position.epoch + position.batch / steps_per_epoch
            validated = bool(valid) and (step % eval_every == 0 or step == steps_total)
            new_best = False
            if validated:
                with accelerator.autocast():
                    scores = score(model, valid, make=make, batch_size=batch_size)
                valid_metrics = {"valid_loss": round(scores.loss, 6),
                                 "valid_mean_token_accuracy": round(scores.mean_token_accuracy, 6)}
                if position.best_valid_loss is None or scores.loss < position.best_valid_loss:
                    position.best_valid_loss, position.best_step = scores.loss, step
                    position.validations_since_best, new_best = 0, True
                else:
                    position.validations_since_best += 1
                    stopped_early = patience is not None and position.validations_since_best >= patience
            if parallel is not None:
                stopped_early = parallel.agree(stopped_early)  # rank 0 validates
            if step % log_every_steps == 0 or step == steps_total or validated or stopped_early:
                # Training throughput since the last metrics event, validation time left out.
                speed = (position.trained_tokens - logged_tokens) / max(1e-9, trained_at - logged_at)
                metrics = checkpoint_metrics() | {
                    "epoch": round(epoch_float, 4), "learning_rate": scheduler.get_last_lr()[0],
                    "grad_norm": round(float(grad_norm), 6), "total_steps": steps_total,
                    "tokens_per_second": round(speed, 1)}
                if not validated:
                    metrics = {k: v for k, v in metrics.items() if not k.startswith("valid_")}
                callbacks.on_metrics(metrics)
                logged_at, logged_tokens = time.monotonic(), position.trained_tokens
            elapsed = time.monotonic() - started
            callbacks.on_progress(step, steps_total, epoch_float,
                                  elapsed / (step - started_step) * (steps_total - step))
            epoch_done = position.batch == len(batches) or step == steps_total
            if epoch_done:
                position.epoch += 1
                position.batch = 0
            # With early stopping every new best is a checkpoint, so the best weights are always on disk.
            if (epoch_done or stopped_early or (checkpoint_steps and step % checkpoint_steps == 0)
                    or (patience is not None and new_best)):
                callbacks.on_checkpoint(model, optimizer, scheduler, position, checkpoint_metrics(), epoch_done)
            if after_step is not None:
                after_step(step)
            if stopped_early or epoch_done:
                break  # an epoch done: the outer loop shuffles the next one
    kept = position.step
    if stopped_early and position.best_step is not None and position.best_step != position.step:
        callbacks.restore_weights(model, position.best_step)
        kept = position.best_step
    final_valid = valid_metrics.get("valid_loss")
    return model, TrainingResult(steps=position.step, trained_tokens=position.trained_tokens,
                                 final_train_loss=None if last_loss is None else float(last_loss),
                                 final_valid_loss=final_valid, kept_step=kept, stopped_early=stopped_early,
                                 last_metrics=checkpoint_metrics())
