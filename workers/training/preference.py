"""Preference objectives on pairs of answers to one prompt: DPO's loss, the pair statistics a preference job reports,
and how often a model prefers the preferred answer.

A pair's two sequences (prompt + preferred answer, prompt + the other) go into one forward pass through the same
batches supervised training uses (packed rows where the method allows, logits only where a label is); a sequence's
log-probability is the sum over its answer's tokens. The reference is the base model: the same PeftModel with its
adapter disabled (PEFT's `disable_adapter`), under no_grad, so no second copy of the model is held. DPO's loss per
pair is -log σ(β · ((log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l)))), TRL's `sigmoid` loss; the
quantity inside σ is the pair's reward margin, and a pair is ranked right when it is positive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)

from adapters.data import PreferencePair
from workers.training.batches import TrainingBatch, labelled_logits, sequence_logps

MakeBatch = Callable[[list[Any]], TrainingBatch]


def pair_logps(model: Any, make: MakeBatch, pairs: list[PreferencePair], device: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities of the preferred answers, of the others), one per pair, in one forward pass."""
    sequences = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    batch = make(sequences).to(device)
    logps = sequence_logps(labelled_logits(model, batch), batch, len(sequences))
    return logps[:len(pairs)], logps[len(pairs):]


def reference_logps(model: Any, make: MakeBatch, pairs: list[PreferencePair], device: Any
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """pair_logps of the base model: the adapter disabled, no gradient. `make` builds batches for the base model
    (no virtual tokens in front of the input)."""
    with torch.no_grad(), model.disable_adapter():
        return pair_logps(model, make, pairs, device)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             *, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(each pair's loss, each pair's reward margin)."""
    margins = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margins), margins


@dataclass
class PairScores:
    """A preference objective's figures over a set of pairs (the validation file's, for instance)."""

    loss: float
    accuracy: float  # pairs whose reward margin is positive
    reward_margin: float  # the mean margin
    chosen_logps: float  # the mean log-probability of the preferred answers
    rejected_logps: float


def score_pairs(model: Any, pairs: list[PreferencePair], *, make: MakeBatch, reference_make: MakeBatch,
                beta: float, batch_size: int) -> PairScores:
    device = next(model.parameters()).device
    losses, margins, chosen_all, rejected_all = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            part = pairs[start:start + batch_size]
            chosen, rejected = pair_logps(model, make, part, device)
            loss, margin = dpo_loss(chosen, rejected, *reference_logps(model, reference_make, part, device),
                                    beta=beta)
            losses.append(loss)
            margins.append(margin)
            chosen_all.append(chosen)
            rejected_all.append(rejected)
    margin = torch.cat(margins)
    return PairScores(loss=float(torch.cat(losses).mean()), accuracy=float((margin > 0).float().mean()),
                      reward_margin=float(margin.mean()), chosen_logps=float(torch.cat(chosen_all).mean()),
                      rejected_logps=float(torch.cat(rejected_all).mean()))


def preferred_share(model: Any, pairs: list[PreferencePair], *, make: MakeBatch, batch_size: int) -> float:
    """How often `model` gives the preferred answer the higher log-probability: what a preference job should raise
    above the base model's share (the base model: call it on the PeftModel inside `disable_adapter`, with batches for
    the base model)."""
    device = next(model.parameters()).device
    right = 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chosen, rejected = pair_logps(model, make, pairs[start:start + batch_size], device)
            right += int((chosen > rejected).sum())
    return right / max(1, len(pairs))
