"""The training loop's data order: every epoch trains its own shuffle, the one a resumed run recomputes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.base_models import base_info, load_model
from adapters.data import EncodedExample
from adapters.methods import METHODS
from app.settings import Settings
from tests.workers.conftest import assert_same_weights
from workers.training import loop
from workers.training.loop import TrainingCallbacks, TrainingConfig, TrainingRecipe, epoch_order


def test_each_epoch_trains_its_own_shuffle(examples: list[EncodedExample], tiny_model_dir: Path,
                                          tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    batch_size, epochs, seed = 3, 3, 7
    method = METHODS["lora"]
    hp = method.resolve({"batch_size": batch_size, "n_epochs": epochs}, n_examples=len(examples),
                        settings=Settings(), base_info=base_info(str(tiny_model_dir)))
    trained: list[list[int]] = []
    make_batch = loop.BatchMaker.__call__

    def recording(self: loop.BatchMaker, chunk: list[EncodedExample]) -> Any:
        trained.append([next(i for i, e in enumerate(examples) if e is example) for example in chunk])
        return make_batch(self, chunk)

    monkeypatch.setattr(loop.BatchMaker, "__call__", recording)
    _, result = TrainingRecipe(TrainingConfig(method=method, hyperparameters=hp, seed=seed,
                                              pad_id=tiny_tokenizer.pad_token_id),
                               base_model=load_model(str(tiny_model_dir), device="cpu", dtype="float32"),
                               train_examples=examples).run()

    per_epoch = -(-len(examples) // batch_size)
    assert result.steps == per_epoch * epochs == len(trained)
    orders = [[i for chunk in trained[e * per_epoch:(e + 1) * per_epoch] for i in chunk] for e in range(epochs)]
    # Epoch e is exactly epoch_order(seed, e), cut into batches: what a run resumed in that epoch recomputes.
    assert orders == [epoch_order(len(examples), seed, e) for e in range(epochs)]
    assert len({tuple(order) for order in orders}) == epochs, "every epoch must be shuffled anew"


def test_every_step_loss_equals_the_plain_trainer_path(examples: list[EncodedExample], tiny_model_dir: Path,
                                                       tiny_tokenizer: Any) -> None:
    """transformers.Trainer + get_peft_model + a padding collator, fed the same batches in the same order,
    logs the same training loss at every step of two epochs as our loop (fp32, LoRA without dropout)."""
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    batch_size, epochs, seed = 3, 2, 7
    method = METHODS["lora"]
    hp = method.resolve({"batch_size": batch_size, "n_epochs": epochs, "learning_rate": 5e-3, "lora_dropout": 0},
                        n_examples=len(examples), settings=Settings(), base_info=base_info(str(tiny_model_dir)))
    steps = -(-len(examples) // batch_size) * epochs

    ours: list[float] = []
    TrainingRecipe(TrainingConfig(method=method, hyperparameters=hp, seed=seed, pad_id=tiny_tokenizer.pad_token_id),
                   base_model=load_model(str(tiny_model_dir), device="cpu", dtype="float32"), train_examples=examples,
                   callbacks=TrainingCallbacks(on_metrics=lambda m: ours.append(m["train_loss"]))).run()

    class SameOrder(torch.utils.data.Sampler[int]):
        def __init__(self) -> None:
            self.epoch = 0

        def __len__(self) -> int:
            return len(examples)

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self) -> Any:
            return iter(epoch_order(len(examples), seed, self.epoch))

    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SameOrder()

    class Losses(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs:
                plain.append(float(logs["loss"]))

    plain: list[float] = []
    features = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                 "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask, strict=True)]}
                for e in examples]
    base = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    torch.manual_seed(seed)  # LoRA's A matrices start from the same draw as in our loop (seed_everything)
    model = get_peft_model(base, method.peft_config(hp, total_steps=steps))
    args = TrainingArguments(output_dir=str(tiny_model_dir.parent / "trainer-parity"), num_train_epochs=epochs,
                             per_device_train_batch_size=batch_size, learning_rate=hp.learning_rate,
                             lr_scheduler_type="linear", weight_decay=hp.weight_decay, max_grad_norm=1.0,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=seed,
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
    SameOrderTrainer(model=model, args=args, train_dataset=features, callbacks=[Losses()],
                     data_collator=DataCollatorForSeq2Seq(tiny_tokenizer, padding=True)).train()

    assert len(ours) == len(plain) == steps
    assert ours == pytest.approx(plain, rel=1e-4, abs=1e-5)


def test_a_step_split_by_memory_trains_the_same_model(examples: list[EncodedExample], tiny_model_dir: Path,
                                                      tiny_tokenizer: Any) -> None:
    """A memory budget too small for a whole batch splits each step into several forward/backward passes
    whose gradients add up: the same loss at every step and the same adapter as one pass per step."""
    import torch

    from workers.training.memory import MemoryPlan

    method = METHODS["lora"]
    hp = method.resolve({"batch_size": 4, "n_epochs": 2, "learning_rate": 5e-3, "lora_dropout": 0},
                        n_examples=len(examples), settings=Settings(), base_info=base_info(str(tiny_model_dir)))

    def run(memory: MemoryPlan | None) -> tuple[list[float], list[str], dict[str, torch.Tensor]]:
        losses: list[float] = []
        messages: list[str] = []
        callbacks = TrainingCallbacks(on_metrics=lambda m: losses.append(m["train_loss"]), on_info=messages.append)
        model, _ = TrainingRecipe(TrainingConfig(method=method, hyperparameters=hp, seed=3,
                                                 pad_id=tiny_tokenizer.pad_token_id),
                                  base_model=load_model(str(tiny_model_dir), device="cpu", dtype="float32"),
                                  train_examples=examples, callbacks=callbacks, memory=memory).run()
        return losses, messages, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, _, whole_weights = run(None)
    # Room for 100 tokens per pass: the examples are 41-74 tokens, so every step takes 2-4 passes.
    small = MemoryPlan(budget_bytes=100 * 1000, bytes_per_token=1000, bytes_per_label=0)
    assert max(len(small.split(examples[i:i + 4], 4096)) for i in range(0, len(examples), 4)) > 1
    split, messages, split_weights = run(small)
    assert split == pytest.approx(whole, rel=1e-5)
    assert_same_weights(split_weights, whole_weights, learning_rate=hp.learning_rate)
    assert any("run in several passes" in m for m in messages), messages


def test_memory_plan_splits_in_order_within_the_budget(examples: list[EncodedExample]) -> None:
    from workers.training.memory import MemoryPlan

    plan = MemoryPlan(budget_bytes=100, bytes_per_token=1, bytes_per_label=0)
    parts = plan.split(examples, 4096)
    assert [e for part in parts for e in part] == examples  # nothing lost, reordered or repeated
    for part in parts:
        assert len(part) == 1 or sum(plan.cost(e, 4096) for e in part) <= 100
    huge = MemoryPlan(budget_bytes=10**12, bytes_per_token=1, bytes_per_label=0)
    assert huge.split(examples, 4096) == [examples]


def test_the_activation_estimate_follows_dtype_and_checkpointing(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig

    from workers.training.memory import bytes_per_token

    config = AutoConfig.from_pretrained(tiny_model_dir)
    fp32 = bytes_per_token(config, dtype_bytes=4, gradient_checkpointing=False)
    assert bytes_per_token(config, dtype_bytes=2, gradient_checkpointing=False) * 2 == pytest.approx(fp32, abs=2)
    assert bytes_per_token(config, dtype_bytes=4, gradient_checkpointing=True) < fp32


@pytest.mark.parametrize("name", ["lora", "adalora", "prompt_tuning"])
def test_bf16_training_sets_up_cpu_attention_and_the_methods_hook(name: str, examples: list[EncodedExample],
                                                                  tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """A bf16 run on CPU trains packed methods with packed attention and the others with sdpa_attention (both attend
    short sequences in float32), and calls the method's before_training hook (AdaLoRA's rank count in bf16)."""
    import torch

    from workers.training.batches import PACKED_ATTENTION, SDPA_ATTENTION

    method = METHODS[name]
    hp = method.resolve({"batch_size": 4, "n_epochs": 1}, n_examples=len(examples), settings=Settings(),
                        base_info=base_info(str(tiny_model_dir)))
    config = TrainingConfig(method=method, hyperparameters=hp, seed=1, pad_id=tiny_tokenizer.pad_token_id,
                            compute_dtype="bfloat16")
    recipe = TrainingRecipe(config,
                            base_model=load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16"),
                            train_examples=examples)
    recipe.setup()
    expected = PACKED_ATTENTION if method.packs_examples else SDPA_ATTENTION
    assert recipe.base_model.config._attn_implementation == expected == recipe.make.attention
    ranknums = [p for n, p in recipe.model.named_parameters() if "ranknum" in n]
    assert bool(ranknums) == (name == "adalora")
    assert all(p.dtype == torch.bfloat16 for p in ranknums)
