"""Preference objectives on pairs of answers to one prompt (DPO, ORPO, SimPO): their losses, the pair statistics a
preference job reports, and how often a model prefers the preferred answer.

A pair's two sequences (prompt + preferred answer y_w, prompt + the other y_l) go into one forward pass through the
same batches supervised training uses (packed rows where the method allows, logits only where a label is); a
sequence's log-probability log π(y) is the sum over its answer's tokens, and |y| its answer's length in tokens.

- DPO (Rafailov et al.; TRL's `sigmoid` loss): -log σ(β · ((log π(y_w) - log π_ref(y_w)) - (log π(y_l) -
  log π_ref(y_l)))). The reference is the base model: the same PeftModel with its adapter disabled (PEFT's
  `disable_adapter`), under no_grad, so no second copy of the model is held.
- SimPO (Meng et al.; TRL's CPO `simpo` loss): -log σ(β · (log π(y_w)/|y_w| - log π(y_l)/|y_l|) - γ); no reference.
- ORPO (Hong et al.; TRL's ORPO): the preferred answers' next-token loss, minus λ (`beta`) · log σ(log odds(y_w) -
  log odds(y_l)) with odds(y) = p/(1 - p) of p = exp(log π(y)/|y|); no reference.

A pair's reward margin is β times the difference of the two answers' rewards (DPO: log-ratios to the reference;
ORPO and SimPO: length-normalised log-probabilities, as TRL reports them); a pair is ranked right when it is
positive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)

from adapters.data import PreferencePair
from workers.training.batches import TrainingBatch, labelled_logits, sequence_logps

MakeBatch = Callable[[list[Any]], TrainingBatch]
REFERENCE_OBJECTIVES = ("dpo",)  # the objectives that need the reference pass


@dataclass
class PairLogps:
    """One forward pass's pairs: the answers' summed log-probabilities and lengths (and the reference's)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


def _logps(model: Any, make: MakeBatch, pairs: list[PreferencePair], device: Any
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probabilities of every sequence, preferred answers first; their label counts)."""
    sequences = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    batch = make(sequences).to(device)
    logps = sequence_logps(labelled_logits(model, batch), batch, len(sequences))
    tokens = torch.zeros(len(sequences), device=logps.device).index_add(
        0, batch.label_example, torch.ones(len(batch.label_example), device=logps.device))
    return logps, tokens


def pair_logps(model: Any, make: MakeBatch, pairs: list[PreferencePair], device: Any, *,
               reference_make: MakeBatch | None = None) -> PairLogps:
    """The pairs' log-probabilities under `model`; with `reference_make` (batches for the base model: no virtual
    tokens in front of the input), also under the base model (the adapter disabled, no gradient)."""
    logps, tokens = _logps(model, make, pairs, device)
    n = len(pairs)
    result = PairLogps(chosen=logps[:n], rejected=logps[n:], chosen_tokens=tokens[:n], rejected_tokens=tokens[n:])
    if reference_make is not None:
        with torch.no_grad(), model.disable_adapter():
            reference, _ = _logps(model, reference_make, pairs, device)
        result.ref_chosen, result.ref_rejected = reference[:n], reference[n:]
    return result


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def objective_loss(objective: str, logps: PairLogps, *, beta: float, gamma: float | None, pairs: int,
                   chosen_tokens: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the objective's loss over these pairs, summed and divided by `pairs` — ORPO's next-token part by
    `chosen_tokens`, the preferred answers' labels — so that passes add up to the step's mean; each pair's reward
    margin, detached)."""
    if objective == "dpo":
        assert logps.ref_chosen is not None and logps.ref_rejected is not None, "DPO needs the reference pass"
        margins = beta * ((logps.chosen - logps.ref_chosen) - (logps.rejected - logps.ref_rejected))
        return -F.logsigmoid(margins).sum() / pairs, margins.detach()
    chosen = logps.chosen / logps.chosen_tokens.clamp(min=1)
    rejected = logps.rejected / logps.rejected_tokens.clamp(min=1)
    margins = beta * (chosen - rejected)
    if objective == "simpo":
        return -F.logsigmoid(margins - (gamma or 0.0)).sum() / pairs, margins.detach()
    if objective == "orpo":
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        nll = -logps.chosen.sum() / chosen_tokens
        return nll - beta * F.logsigmoid(log_odds).sum() / pairs, margins.detach()
    raise ValueError(f"not a preference objective: {objective}")


@dataclass
class PairScores:
    """A preference objective's figures over a set of pairs (the validation file's, for instance)."""

    loss: float
    accuracy: float  # pairs whose reward margin is positive
    reward_margin: float  # the mean margin
    chosen_logps: float  # the mean log-probability of the preferred answers
    rejected_logps: float


def score_pairs(model: Any, pairs: list[PreferencePair], *, objective: str, make: MakeBatch,
                reference_make: MakeBatch, beta: float, gamma: float | None, batch_size: int) -> PairScores:
    """The objective's loss over all the pairs (as one batch would have it), the pairs ranked right, the mean
    margin and log-probabilities."""
    device = next(model.parameters()).device
    parts = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            parts.append(pair_logps(model, make, pairs[start:start + batch_size], device,
                                    reference_make=reference_make if objective in REFERENCE_OBJECTIVES else None))
    joined = PairLogps(**{f.name: None if getattr(parts[0], f.name) is None
                          else torch.cat([getattr(part, f.name) for part in parts]) for f in fields(PairLogps)})
    loss, margins = objective_loss(objective, joined, beta=beta, gamma=gamma, pairs=len(pairs),
                                   chosen_tokens=float(joined.chosen_tokens.sum()))
    return PairScores(loss=float(loss), accuracy=float((margins > 0).float().mean()),
                      reward_margin=float(margins.mean()), chosen_logps=float(joined.chosen.mean()),
                      rejected_logps=float(joined.rejected.mean()))


def preferred_share(model: Any, pairs: list[PreferencePair], *, make: MakeBatch, batch_size: int) -> float:
    """How often `model` gives the preferred answer the higher log-probability: what a preference job should raise
    above the base model's share (the base model: call it on the PeftModel inside `disable_adapter`, with batches for
    the base model)."""
    device = next(model.parameters()).device
    right = 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            logps = pair_logps(model, make, pairs[start:start + batch_size], device)
            right += int((logps.chosen > logps.rejected).sum())
    return right / max(1, len(pairs))
