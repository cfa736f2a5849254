"""Preference tuning: DPO's and KTO's losses and gradients equal TRL's DPOTrainer and KTOTrainer on the same batch,
SimPO's and ORPO's losses equal TRL's, and a run of each objective through the training loop moves every method
towards the preferred (or good) answers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.base_models import base_info, load_model
from adapters.data import EncodedExample, FeedbackExample, PreferencePair, encode_any, encode_pairs, parse_jsonl
from adapters.methods import METHODS
from app.settings import Settings
from workers.training.batches import use_packed_attention
from workers.training.loop import BatchMaker, TrainingCallbacks, TrainingConfig, TrainingRecipe
from workers.training.preference import (
    PairLogps,
    feedback_logps,
    kto_loss,
    mismatched,
    objective_loss,
    pair_logps,
    preferred_share,
    score_feedback,
)

BETA = 0.1


def preference_lines(n: int) -> list[dict[str, Any]]:
    """Pairs whose preferred answer is always "yes, gladly" and the other always "no": a preference the base
    model does not have."""
    return [{"input": {"messages": [{"role": "user", "content": f"Could you help me with task {i}?"}]},
             "preferred_output": [{"role": "assistant", "content": "Yes, gladly."}],
             "non_preferred_output": [{"role": "assistant", "content": f"No. {'Never ' * (i % 3)}"}]}
            for i in range(n)]


def pairs_of(tokenizer: Any, lines: list[dict[str, Any]]) -> list[PreferencePair]:
    raw = "\n".join(json.dumps(line) for line in lines).encode()
    return encode_pairs(tokenizer, parse_jsonl(raw, max_examples=1000))


LORA_TARGETS = ["q_proj", "v_proj", "up_proj"]


def trl_twin(trainer_class: Any, config_class: Any, dataset: list[dict[str, Any]], model_dir: Path, tokenizer: Any,
             folder: Path) -> tuple[Any, Any, list[dict[str, Any]], torch.Tensor]:
    """TRL's trainer for `dataset` with a LoRA adapter it makes from a config (so its reference is the base model),
    the adapter's weights drawn at random (a trained adapter: the model differs from the reference at once), and the
    same adapter on our side. Returns (TRL's trainer, our PeftModel, TRL's tokenised rows, TRL's loss on them, its
    gradients computed)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    trainer = trainer_class(model=load_model(str(model_dir), device="cpu", dtype="float32"), peft_config=config,
                            processing_class=tokenizer, train_dataset=Dataset.from_list(dataset),
                            args=config_class(output_dir=str(folder), beta=BETA,
                                              per_device_train_batch_size=len(dataset), report_to=[], use_cpu=True,
                                              bf16=False, fp16=False))
    theirs = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
    ours = get_peft_model(load_model(str(model_dir), device="cpu", dtype="float32"), config)
    ours.load_state_dict(theirs.state_dict())
    use_packed_attention(ours.get_base_model())
    ours.train()
    rows = list(trainer.train_dataset)
    theirs.train()
    their_loss = trainer.compute_loss(theirs, trainer.data_collator(rows))
    their_loss.backward()
    return trainer, ours, rows, their_loss


def assert_same_loss_and_gradients(ours: Any, theirs: Any, our_loss: torch.Tensor, their_loss: torch.Tensor) -> None:
    assert abs(float(our_loss) - float(their_loss)) < 1e-4, (float(our_loss), float(their_loss))
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name, grad in our_grads.items():
        assert grad is not None and torch.allclose(grad, their_grads[name], atol=1e-4, rtol=1e-3), name


def sequence(prompt: list[int], answer: list[int]) -> EncodedExample:
    return EncodedExample(input_ids=prompt + answer, loss_mask=[0] * len(prompt) + [1] * len(answer))


def test_dpo_loss_and_gradients_equal_trls_dpo_trainer(tiny_model_dir: Path, tiny_tokenizer: Any,
                                                       tmp_path: Path) -> None:
    """TRL tokenises the same conversations; both sides then train on TRL's token ids, fp32, LoRA without dropout,
    the reference being the base model (the adapter disabled) on both: TRL makes the adapter from a config, so it
    takes the base model as the reference, as our loop does."""
    from trl import DPOConfig, DPOTrainer

    lines = preference_lines(4)
    trainer, ours, rows, their_loss = trl_twin(
        DPOTrainer, DPOConfig, [{"prompt": line["input"]["messages"], "chosen": line["preferred_output"],
                                 "rejected": line["non_preferred_output"]} for line in lines],
        tiny_model_dir, tiny_tokenizer, tmp_path)
    pairs = [PreferencePair(sequence(row["prompt_ids"], row["chosen_ids"]),
                            sequence(row["prompt_ids"], row["rejected_ids"])) for row in rows]
    # Our own encoding of the lines gives the same tokens.
    assert [(p.chosen.input_ids, p.rejected.input_ids) for p in pairs] == \
           [(p.chosen.input_ids, p.rejected.input_ids) for p in pairs_of(tiny_tokenizer, lines)]
    make = BatchMaker(packed=True, offset=0, max_len=1024, pad_id=tiny_tokenizer.pad_token_id)
    logps = pair_logps(ours, make, pairs, "cpu", reference_make=make)
    our_loss, _ = objective_loss("dpo", logps, beta=BETA, gamma=None, pairs=len(pairs),
                                 chosen_tokens=float(logps.chosen_tokens.sum()))
    our_loss.backward()
    assert abs(float(our_loss) - math.log(2)) > 0.05, "the policy must differ from the reference"
    assert_same_loss_and_gradients(ours, trainer.model, our_loss, their_loss)


def test_simpo_and_orpo_losses_equal_trls(tiny_tokenizer: Any) -> None:
    """The reference-free objectives on the same log-probabilities: SimPO equals TRL's CPO loss with loss_type
    "simpo" (length-normalised log-probabilities), ORPO equals TRL's ORPO loss (the preferred answers' next-token
    loss minus its odds-ratio term)."""
    from types import SimpleNamespace

    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    torch.manual_seed(1)
    tokens = torch.tensor([3.0, 5.0, 2.0]), torch.tensor([4.0, 1.0, 6.0])
    logps = PairLogps(chosen=-torch.rand(3) * tokens[0] * 2, rejected=-torch.rand(3) * tokens[1] * 2,
                      chosen_tokens=tokens[0], rejected_tokens=tokens[1])
    averages = logps.chosen / tokens[0], logps.rejected / tokens[1]
    trainer = SimpleNamespace(alpha=0.0, beta=2.0, simpo_gamma=1.0, loss_type="simpo", label_smoothing=0.0,
                              accelerator=SimpleNamespace(device="cpu"))
    theirs, _, _ = CPOTrainer.cpo_loss(trainer, *averages)
    ours, _ = objective_loss("simpo", logps, beta=2.0, gamma=1.0, pairs=3, chosen_tokens=float(tokens[0].sum()))
    assert torch.allclose(ours, theirs.mean(), atol=1e-6)

    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    ratio_terms, *_ = ORPOTrainer.odds_ratio_loss(trainer, *averages)
    nll = -logps.chosen.sum() / tokens[0].sum()  # cross-entropy over all the preferred answers' tokens
    ours, _ = objective_loss("orpo", logps, beta=0.1, gamma=None, pairs=3, chosen_tokens=float(tokens[0].sum()))
    assert torch.allclose(ours, nll - ratio_terms.mean(), atol=1e-6)


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_a_preference_run_moves_every_method_towards_the_preferred_answers(method_name: str, objective: str,
                                                                            tiny_model_dir: Path,
                                                                            tiny_tokenizer: Any) -> None:
    """Every registered method trains for every preference objective through the loop: its loss falls, every
    training pair ends with a positive reward margin (DPO: the preferred answer gained against the base model, the
    reference, more than the other), the preferred answer is the more likely one at least as often as with the base
    model, and the metrics are the pairs' (not token accuracy)."""
    pairs = pairs_of(tiny_tokenizer, preference_lines(8))
    method = METHODS[method_name]
    hp = method.resolve({"objective": objective, "batch_size": 4, "n_epochs": 6}, n_examples=len(pairs),
                        settings=Settings(), base_info=base_info(str(tiny_model_dir)))
    assert hp.objective == objective and hp.beta == {"dpo": BETA, "orpo": 0.1, "simpo": 2.0}[objective]
    assert hp.gamma == (1.0 if objective == "simpo" else None)
    base = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    metrics: list[dict[str, Any]] = []
    model, result = TrainingRecipe(
        TrainingConfig(method=method, hyperparameters=hp, seed=3, pad_id=tiny_tokenizer.pad_token_id),
        base_model=base, train_examples=pairs, valid_examples=pairs,
        callbacks=TrainingCallbacks(on_metrics=metrics.append)).run()

    first, last = metrics[0], metrics[-1]
    assert {"train_loss", "train_preference_accuracy", "train_reward_margin"} <= set(last)
    assert "train_mean_token_accuracy" not in last
    assert last["train_loss"] < first["train_loss"] - 0.05 and last["train_reward_margin"] > 0
    assert last["valid_preference_accuracy"] == 1.0 and last["valid_reward_margin"] > 0
    make = BatchMaker.for_training(method, hp, tiny_tokenizer.pad_token_id)
    base_make = BatchMaker.for_base_model(max_len=hp.max_seq_length, pad_id=tiny_tokenizer.pad_token_id)
    model.eval()
    tuned = preferred_share(model, pairs, make=make, batch_size=4)
    with model.disable_adapter():
        plain = preferred_share(model, pairs, make=base_make, batch_size=4)
    assert tuned >= plain, (tuned, plain)


def feedback_lines(n: int) -> list[dict[str, Any]]:
    """Answers marked good (the agreement) and bad (the refusal), alternately."""
    def answer(i: int) -> str:
        return "Yes, gladly." if i % 2 == 0 else f"No. {'Never ' * (i % 3)}"

    return [{"input": {"messages": [{"role": "user", "content": f"Could you help me with task {i}?"}]},
             "output": [{"role": "assistant", "content": answer(i)}], "label": i % 2 == 0} for i in range(n)]


def feedback_of(tokenizer: Any, lines: list[dict[str, Any]]) -> list[FeedbackExample]:
    raw = "\n".join(json.dumps(line) for line in lines).encode()
    examples = encode_any(tokenizer, parse_jsonl(raw, max_examples=1000))
    assert all(isinstance(e, FeedbackExample) for e in examples)
    return examples  # type: ignore[return-value]


def test_kto_loss_and_gradients_equal_trls_kto_trainer(tiny_model_dir: Path, tiny_tokenizer: Any,
                                                       tmp_path: Path) -> None:
    """As for DPO: TRL tokenises, both sides train on its token ids (its mismatched sequences for the KL term
    included), fp32, LoRA without dropout, the base model as the reference."""
    from trl import KTOConfig, KTOTrainer

    lines = feedback_lines(4)
    trainer, ours, rows, their_loss = trl_twin(
        KTOTrainer, KTOConfig, [{"prompt": line["input"]["messages"], "completion": line["output"],
                                 "label": line["label"]} for line in lines],
        tiny_model_dir, tiny_tokenizer, tmp_path)
    examples = [FeedbackExample(sequence(row["prompt_ids"], row["completion_ids"]), bool(row["label"]),
                                len(row["prompt_ids"])) for row in rows]
    kl_sequences = [sequence(row["prompt_ids"], row["KL_completion_ids"]) for row in rows]
    # Our own encoding gives the same tokens, and the same mismatched sequences (each prompt, the previous answer).
    encoded = feedback_of(tiny_tokenizer, lines)
    assert [e.input_ids for e in examples] == [e.input_ids for e in encoded]
    assert [s.input_ids for s in kl_sequences] == [s.input_ids for s in mismatched(encoded)]
    make = BatchMaker(packed=True, offset=0, max_len=1024, pad_id=tiny_tokenizer.pad_token_id)
    our_loss, _ = kto_loss(feedback_logps(ours, make, make, examples, "cpu", kl_sequences=kl_sequences), beta=BETA,
                           examples=len(examples))
    our_loss.backward()
    assert abs(float(our_loss) - 0.5) > 0.01, "the policy must differ from the reference"
    assert_same_loss_and_gradients(ours, trainer.model, our_loss, their_loss)


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_a_kto_run_moves_every_method_towards_the_good_answers(method_name: str, tiny_model_dir: Path,
                                                               tiny_tokenizer: Any) -> None:
    """Every method trains for KTO through the loop: the loss falls, the good answers become likelier and the bad
    ones less likely than under the base model, and every validation example is ranked right."""
    examples = feedback_of(tiny_tokenizer, feedback_lines(8))
    method = METHODS[method_name]
    hp = method.resolve({"objective": "kto", "batch_size": 4, "n_epochs": 6}, n_examples=len(examples),
                        settings=Settings(), base_info=base_info(str(tiny_model_dir)))
    assert (hp.objective, hp.beta, hp.gamma) == ("kto", BETA, None)
    metrics: list[dict[str, Any]] = []
    model, _ = TrainingRecipe(
        TrainingConfig(method=method, hyperparameters=hp, seed=3, pad_id=tiny_tokenizer.pad_token_id),
        base_model=load_model(str(tiny_model_dir), device="cpu", dtype="float32"), train_examples=examples,
        valid_examples=examples, callbacks=TrainingCallbacks(on_metrics=metrics.append)).run()
    first, last = metrics[0], metrics[-1]
    assert {"train_loss", "train_preference_accuracy", "train_reward_margin"} <= set(last)
    assert last["train_loss"] < first["train_loss"] and last["valid_preference_accuracy"] == 1.0, (first, last)
    model.eval()
    scores = score_feedback(model, examples, make=BatchMaker.for_training(method, hp, tiny_tokenizer.pad_token_id),
                            reference_make=BatchMaker.for_base_model(max_len=hp.max_seq_length,
                                                                     pad_id=tiny_tokenizer.pad_token_id),
                            beta=BETA, batch_size=4)
    assert scores.desirable_logratio is not None and scores.desirable_logratio > 0
    assert scores.undesirable_logratio is not None and scores.undesirable_logratio < 0


def test_orpo_stays_finite_when_an_answer_is_certain() -> None:
    """An answer the model already gives with probability 1 (mean log-probability 0, which ORPO's own next-token term
    drives towards) has no odds: the loss and its gradient stay finite, never NaN."""
    from workers.training.preference import log1mexp

    x = torch.tensor([0.0, -1e-9, -0.5, -3.0], requires_grad=True)
    values = log1mexp(x)
    values.sum().backward()
    assert torch.isfinite(values).all() and x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.allclose(values[2:], torch.log(1 - torch.exp(x[2:].detach())))
    chosen = torch.tensor([-1e-9, -2.0], requires_grad=True)
    logps = PairLogps(chosen=chosen, rejected=torch.tensor([-4.0, -6.0]), chosen_tokens=torch.tensor([1.0, 2.0]),
                      rejected_tokens=torch.tensor([2.0, 3.0]))
    loss, _ = objective_loss("orpo", logps, beta=0.1, gamma=None, pairs=2, chosen_tokens=3.0)
    loss.backward()
    assert torch.isfinite(loss) and chosen.grad is not None and torch.isfinite(chosen.grad).all()


def test_preference_figures_are_measured_without_dropout(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """Validation and end reports score in eval mode (no dropout), whatever mode training left the model in, and
    leave it in that mode: the same figures twice."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(str(tiny_model_dir), device="cpu", dtype="float32"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=LORA_TARGETS,
                                      init_lora_weights=False))
    use_packed_attention(model.get_base_model())
    model.train()
    pairs = pairs_of(tiny_tokenizer, preference_lines(4))
    make = BatchMaker(packed=True, offset=0, max_len=1024, pad_id=tiny_tokenizer.pad_token_id)
    from workers.training.preference import score_pairs

    first, second = (score_pairs(model, pairs, objective="dpo", make=make, reference_make=make, beta=BETA, gamma=None,
                                 batch_size=2) for _ in range(2))
    assert first == second and model.training
    examples = feedback_of(tiny_tokenizer, feedback_lines(4))
    once, again = (score_feedback(model, examples, make=make, reference_make=make, beta=BETA, batch_size=2)
                   for _ in range(2))
    assert once == again and model.training
