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
from workers.training.batches import TrainingBatch, batch_loss, packed_batch, padded_batch, use_packed_attention


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
    on_message: Callable[[str], None] = field(default=lambda _: None)
    # Called once, right before the first step of this attempt (start-up is over: model, data, optimiser).
    on_training_start: Callable[[], None] = field(default=lambda: None)


@dataclass
class Position:
    step: int
    epoch: int  # the epoch in progress
    batch: int  # batches of that epoch already done
    trained_tokens: int


@dataclass
class TrainingResult:
    steps: int
    trained_tokens: int
    final_train_loss: float | None
    final_valid_loss: float | None


def trainable_examples(examples: list[EncodedExample], max_len: int) -> list[EncodedExample]:
    """Drop examples that have nothing left to learn from after truncation to max_len."""
    # The label of token t is predicted at t-1, so a trained token at position 0 teaches nothing.
    return [e for e in examples if any(e.loss_mask[1:max_len])]


class BatchMaker:
    """Turns a list of examples into a TrainingBatch the way the method allows (packed or padded)."""

    def __init__(self, method: AdapterMethod, hp: dict[str, Any], pad_id: int):
        self.packed = method.packs_examples
        self.max_len, self.pad_id, self.offset = hp["max_seq_length"], pad_id, method.input_offset(hp)

    def __call__(self, examples: list[EncodedExample]) -> TrainingBatch:
        if self.packed:
            return packed_batch(examples, max_len=self.max_len)
        return padded_batch(examples, max_len=self.max_len, pad_id=self.pad_id, offset=self.offset)


@torch.no_grad()
def evaluate(model: Any, examples: list[EncodedExample], *, make: BatchMaker, batch_size: int) -> float:
    """Mean loss per trained token over the examples."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = make(examples[start:start + batch_size]).to(device)
        total_loss += float(batch_loss(model, batch, reduction="sum"))
        total_tokens += len(batch.targets)
    if was_training:
        model.train()
    return total_loss / max(1, total_tokens)


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


def train(*, base_model: Any, method: AdapterMethod, hyperparameters: dict[str, Any], seed: int,
          train_examples: list[EncodedExample], valid_examples: list[EncodedExample], pad_id: int,
          eval_every_steps: int, log_every_steps: int, callbacks: TrainingCallbacks, checkpoint_steps: int = 0,
          resume: Any = None, after_step: Callable[[int], None] | None = None,
          compute_dtype: str = "float32") -> tuple[Any, TrainingResult]:
    """Train a PEFT adapter on `base_model` (modified in place); returns the PeftModel and a summary.

    `compute_dtype` "bfloat16" trains under bf16 autocast (the frozen base should be stored in bf16; PEFT
    keeps adapter weights, and so the optimiser state, in fp32). `resume` (a checkpoints.ResumeState)
    continues from a checkpoint: same weights, optimiser, scheduler, RNG and data position, so the result
    matches an uninterrupted run.
    """
    from peft import get_peft_model
    from transformers import get_scheduler

    from workers.training import checkpoints

    seed_everything(seed)
    hp = hyperparameters
    max_len = hp["max_seq_length"]
    examples = trainable_examples(train_examples, max_len)
    if not examples:
        raise ValueError(f"no example has trainable tokens within max_seq_length={max_len}")
    if len(examples) < len(train_examples) and resume is None:
        callbacks.on_message(f"{len(train_examples) - len(examples)} example(s) have no trainable tokens "
                             f"within max_seq_length={max_len} and were skipped.")
    valid = trainable_examples(valid_examples, max_len)
    steps_total = total_steps(len(examples), hp)
    model = get_peft_model(base_model, method.peft_config(hp, total_steps=steps_total,
                                                          base_model_path=getattr(base_model, "name_or_path", None)))
    make = BatchMaker(method, hp, pad_id)
    if make.packed:
        use_packed_attention(base_model)
    accelerator = accelerator_for(compute_dtype, next(base_model.parameters()).device)
    device = next(base_model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(hp["warmup_ratio"] * steps_total),
                              num_training_steps=steps_total)
    eval_every = eval_every_steps or max(1, math.ceil(steps_total / 4))
    batch_size = hp["batch_size"]
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    position = Position(step=0, epoch=0, batch=0, trained_tokens=0)
    if resume is not None:
        checkpoints.restore(resume, model=model, optimizer=optimizer, scheduler=scheduler)
        position = Position(step=resume.step, epoch=resume.epoch, batch=resume.batch,
                            trained_tokens=resume.trained_tokens)

    model.train()
    callbacks.on_progress(position.step, steps_total, position.epoch + position.batch / steps_per_epoch, None)
    callbacks.on_training_start()
    last_train_loss: float | None = None
    last_valid_loss: float | None = None
    started, started_step = time.monotonic(), position.step
    while position.epoch < hp["n_epochs"] and position.step < steps_total:
        order = epoch_order(len(examples), seed, position.epoch)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        while position.batch < len(batches) and position.step < steps_total:
            stop = callbacks.should_stop()
            if stop is not None:
                if isinstance(stop, HandBack) and position.step > 0:  # Paused and TimeLimit too
                    callbacks.on_checkpoint(model, optimizer, scheduler, position,
                                            {"step": position.step, "train_loss": last_train_loss}, False)
                raise stop
            chunk = [examples[i] for i in batches[position.batch]]
            batch = make(chunk).to(device)
            with accelerator.autocast():
                loss = batch_loss(model, batch)
                extra = method.regularisation(model)
                if extra is not None:
                    loss = loss + extra
            accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            position.step += 1
            position.batch += 1
            method.after_optimizer_step(model, position.step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position.trained_tokens += batch.real_tokens
            last_train_loss = float(loss.detach())
            step = position.step
            epoch_float = position.epoch + position.batch / steps_per_epoch
            metrics: dict[str, Any] = {"step": step, "train_loss": round(last_train_loss, 6), "epoch": round(
                epoch_float, 4), "learning_rate": scheduler.get_last_lr()[0], "total_steps": steps_total}
            if valid and (step % eval_every == 0 or step == steps_total):
                with accelerator.autocast():
                    last_valid_loss = evaluate(model, valid, make=make, batch_size=batch_size)
                metrics["valid_loss"] = round(last_valid_loss, 6)
            if step % log_every_steps == 0 or step == steps_total or "valid_loss" in metrics:
                callbacks.on_metrics(metrics)
            elapsed = time.monotonic() - started
            callbacks.on_progress(step, steps_total, epoch_float,
                                  elapsed / (step - started_step) * (steps_total - step))
            epoch_done = position.batch == len(batches) or step == steps_total
            if epoch_done:
                position.epoch += 1
                position.batch = 0
            if epoch_done or (checkpoint_steps and step % checkpoint_steps == 0):
                checkpoint_metrics: dict[str, Any] = {"step": step, "train_loss": last_train_loss}
                if valid:
                    checkpoint_metrics["valid_loss"] = last_valid_loss
                callbacks.on_checkpoint(model, optimizer, scheduler, position, checkpoint_metrics, epoch_done)
            if after_step is not None:
                after_step(step)
    return model, TrainingResult(steps=position.step, trained_tokens=position.trained_tokens,
                                 final_train_loss=last_train_loss, final_valid_loss=last_valid_loss)
