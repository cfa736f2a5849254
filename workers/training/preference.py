"""Preference objectives: on pairs of answers to one prompt (DPO, ORPO, SimPO) and on single answers marked good or
bad (KTO); their losses, the statistics a preference job reports, and how often a model prefers the preferred answer.

A pair's two sequences (prompt + preferred answer y_w, prompt + the other y_l) go into one forward pass through the
same batches supervised training uses (packed rows where the method allows, logits only where a label is); a
sequence's log-probability log π(y) is the sum over its answer's tokens, and |y| its answer's length in tokens.

- DPO (Rafailov et al.; TRL's `sigmoid` loss): -log σ(β · ((log π(y_w) - log π_ref(y_w)) - (log π(y_l) -
  log π_ref(y_l)))). The reference is the base model: the same PeftModel with its adapter disabled (PEFT's
  `disable_adapter`), under no_grad, so no second copy of the model is held.
- SimPO (Meng et al.; TRL's CPO `simpo` loss): -log σ(β · (log π(y_w)/|y_w| - log π(y_l)/|y_l|) - γ); no reference.
- ORPO (Hong et al.; TRL's ORPO): the preferred answers' next-token loss, minus λ (`beta`) · log σ(log odds(y_w) -
  log odds(y_l)) with odds(y) = p/(1 - p) of p = exp(log π(y)/|y|); no reference.

- KTO (Ethayarajh et al.; TRL's `KTOTrainer`): for a good answer 1 - σ(β · (r - z)), for a bad one
  1 - σ(β · (z - r)), where r = log π(y) - log π_ref(y) and z, the reference point, is the batch's mean log-ratio on
  mismatched sequences (each prompt with the previous example's answer), at least 0 and without gradient. The
  reference is the base model, as for DPO.

A pair's reward margin is β times the difference of the two answers' rewards (DPO: log-ratios to the reference;
ORPO and SimPO: length-normalised log-probabilities, as TRL reports them); a pair is ranked right when it is
positive. A feedback example's signed reward is β · r for a good answer and -β · r for a bad one; it is ranked right
when that is positive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)

from adapters.data import EncodedExample, FeedbackExample, PreferencePair
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
    return _sequence_logps(model, make, [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs], device)


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


LN2 = 0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2. An answer of probability 1 (x = 0) has
    no odds, so x is held below -1e-6; each branch gets an input it is finite at, because torch.where differentiates
    both (an infinite branch not taken still makes a NaN gradient)."""
    x = x.clamp(max=-1e-6)
    return torch.where(x < -LN2, torch.log1p(-torch.exp(x.clamp(max=-LN2))), torch.log(-torch.expm1(x.clamp(min=-LN2))))


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


@contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """The model in eval mode (no dropout) for a measurement, and back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
    with torch.no_grad(), evaluating(model):
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


# ---------------------------------------------------------------- KTO: single answers marked good or bad


def mismatched(examples: list[FeedbackExample]) -> list[EncodedExample]:
    """Each prompt followed by the previous example's answer (the first by the last's), as TRL pairs them."""
    return [example.with_answer_of(examples[i - 1]) for i, example in enumerate(examples)]


@dataclass
class FeedbackLogps:
    """One pass's feedback examples: the answers' log-probabilities under the model and the base model, and the same
    for the mismatched sequences (the KL estimate)."""

    policy: torch.Tensor
    reference: torch.Tensor
    kl_policy: torch.Tensor
    kl_reference: torch.Tensor
    desirable: torch.Tensor  # bool, one per example


def feedback_logps(model: Any, make: MakeBatch, reference_make: MakeBatch, examples: list[FeedbackExample],
                   device: Any, *, kl_sequences: list[EncodedExample] | None = None) -> FeedbackLogps:
    """The model's pass (with gradient) and three without: the model on the mismatched sequences, and the base model
    (the adapter disabled) on both the examples and the mismatched sequences, in one batch."""
    kl_sequences = mismatched(examples) if kl_sequences is None else kl_sequences
    answers = [example.example for example in examples]
    policy, _ = _sequence_logps(model, make, answers, device)
    with torch.no_grad():
        kl_policy, _ = _sequence_logps(model, make, kl_sequences, device)
        with model.disable_adapter():
            reference, _ = _sequence_logps(model, reference_make, answers + kl_sequences, device)
    n = len(examples)
    return FeedbackLogps(policy=policy, reference=reference[:n], kl_policy=kl_policy, kl_reference=reference[n:],
                         desirable=torch.tensor([example.desirable for example in examples], device=policy.device))


def kto_loss(logps: FeedbackLogps, *, beta: float, examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(KTO's loss over these examples, summed and divided by `examples`; each example's signed reward, detached)."""
    z = (logps.kl_policy - logps.kl_reference).mean().clamp(min=0).detach()
    ratio = logps.policy - logps.reference
    losses = torch.where(logps.desirable, 1 - torch.sigmoid(beta * (ratio - z)), 1 - torch.sigmoid(beta * (z - ratio)))
    rewards = beta * ratio.detach()
    return losses.sum() / examples, torch.where(logps.desirable, rewards, -rewards)


@dataclass
class FeedbackScores:
    """KTO's figures over a set of feedback examples (the validation file's, for instance)."""

    loss: float
    accuracy: float  # examples whose signed reward is positive: good answers made likelier, bad ones less likely
    reward_margin: float  # the mean signed reward
    desirable_logratio: float | None  # the mean log π(y) - log π_ref(y) of the good answers (None: there are none)
    undesirable_logratio: float | None


def score_feedback(model: Any, examples: list[FeedbackExample], *, make: MakeBatch, reference_make: MakeBatch,
                   beta: float, batch_size: int) -> FeedbackScores:
    device = next(model.parameters()).device
    losses, signed, ratios, desirable = [], [], [], []
    with torch.no_grad(), evaluating(model):
        for start in range(0, len(examples), batch_size):
            logps = feedback_logps(model, make, reference_make, examples[start:start + batch_size], device)
            loss, rewards = kto_loss(logps, beta=beta, examples=1)
            losses.append(float(loss))
            signed.append(rewards)
            ratios.append(logps.policy - logps.reference)
            desirable.append(logps.desirable)
    ratio, good = torch.cat(ratios), torch.cat(desirable)

    def mean(values: torch.Tensor) -> float | None:
        return float(values.mean()) if len(values) else None

    rewards = torch.cat(signed)
    return FeedbackScores(loss=sum(losses) / len(examples), accuracy=float((rewards > 0).float().mean()),
                          reward_margin=float(rewards.mean()), desirable_logratio=mean(ratio[good]),
                          undesirable_logratio=mean(ratio[~good]))


def _sequence_logps(model: Any, make: MakeBatch, sequences: list[EncodedExample], device: Any
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(each sequence's summed log-probability of its labelled tokens, its label count)."""
    batch = make(sequences).to(device)
    logps = sequence_logps(labelled_logits(model, batch), batch, len(sequences))
    tokens = torch.zeros(len(sequences), device=logps.device).index_add(
        0, batch.label_example, torch.ones(len(batch.label_example), device=logps.device))
    return logps, tokens


def preferred_share(model: Any, pairs: list[PreferencePair], *, make: MakeBatch, batch_size: int) -> float:
    """How often `model` gives the preferred answer the higher log-probability: what a preference job should raise
    above the base model's share (the base model: call it on the PeftModel inside `disable_adapter`, with batches for
    the base model)."""
    device = next(model.parameters()).device
    right = 0
    with torch.no_grad(), evaluating(model):
        for start in range(0, len(pairs), batch_size):
            logps = pair_logps(model, make, pairs[start:start + batch_size], device)
            right += int((logps.chosen > logps.rejected).sum())
    return right / max(1, len(pairs))
