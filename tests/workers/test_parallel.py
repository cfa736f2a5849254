"""Data-parallel training over two real processes (gloo on the CPU) trains the same model as one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.base_models import base_info, load_model
from adapters.data import EncodedExample
from adapters.methods import METHODS
from app.settings import Settings
from tests.workers.conftest import assert_same_weights
from workers.training.loop import Cancelled, TrainingCallbacks, TrainingConfig, TrainingRecipe
from workers.training.memory import MemoryPlan
from workers.training.parallel import DataParallel, Replicas, ReplicaSpec

# End-to-end tier: the ranks are separate processes talking over gloo's sockets.
pytestmark = pytest.mark.e2e

SEED = 5
# Methods with packed rows (LoRA), a budget schedule and a loss penalty (AdaLoRA), and padded rows (prefix).
PARALLEL_METHODS = ["lora", "adalora", "prefix_tuning"]


def config(name: str, n_examples: int, tiny_model_dir: Path, pad_id: int) -> TrainingConfig:
    raw: dict[str, Any] = {"batch_size": 3, "n_epochs": 2}
    if name in ("lora", "adalora"):
        raw["lora_dropout"] = 0  # dropout draws differ between processes; without it the paths must agree
    hp = METHODS[name].resolve(raw, n_examples=n_examples, settings=Settings(),
                               base_info=base_info(str(tiny_model_dir)))
    return TrainingConfig(method=METHODS[name], hyperparameters=hp, seed=SEED, pad_id=pad_id)


def run(name: str, examples: list[EncodedExample], tiny_model_dir: Path, pad_id: int, *,
        parallel: DataParallel | None = None, memory: MemoryPlan | None = None,
        should_stop: Any = lambda: None) -> tuple[list[float], dict[str, torch.Tensor]]:
    losses: list[float] = []
    callbacks = TrainingCallbacks(on_metrics=lambda m: losses.append(m["train_loss"]), should_stop=should_stop)
    model, _ = TrainingRecipe(config(name, len(examples), tiny_model_dir, pad_id),
                              base_model=load_model(str(tiny_model_dir), device="cpu", dtype="float32"),
                              train_examples=examples, callbacks=callbacks, memory=memory, parallel=parallel).run()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def spec(name: str, examples: list[EncodedExample], tiny_model_dir: Path, pad_id: int,
         memory: MemoryPlan | None = None) -> ReplicaSpec:
    return ReplicaSpec(model_path=str(tiny_model_dir), device_type="cpu",
                       config=config(name, len(examples), tiny_model_dir, pad_id), train_examples=examples,
                       torch_threads=1, memory=memory)


@pytest.mark.parametrize("name", PARALLEL_METHODS)
def test_two_processes_train_the_single_process_model(name: str, examples: list[EncodedExample],
                                                      tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    pad = tiny_tokenizer.pad_token_id
    alone, alone_weights = run(name, examples, tiny_model_dir, pad)
    replicas = Replicas(spec(name, examples, tiny_model_dir, pad), world=2)
    with replicas as parallel:
        together, together_weights = run(name, examples, tiny_model_dir, pad, parallel=parallel)
    assert replicas.exit_codes == [0]
    assert together == pytest.approx(alone, rel=1e-5)
    assert_same_weights(together_weights, alone_weights,
                        learning_rate=config(name, len(examples), tiny_model_dir, pad).hyperparameters.learning_rate)


def test_memory_split_and_data_parallel_together(examples: list[EncodedExample], tiny_model_dir: Path,
                                                 tiny_tokenizer: Any) -> None:
    pad = tiny_tokenizer.pad_token_id
    small = MemoryPlan(budget_bytes=40 * 1000, bytes_per_token=1000, bytes_per_label=0)
    alone, alone_weights = run("lora", examples, tiny_model_dir, pad)
    replicas = Replicas(spec("lora", examples, tiny_model_dir, pad, memory=small), world=2)
    with replicas as parallel:
        together, together_weights = run("lora", examples, tiny_model_dir, pad, parallel=parallel, memory=small)
    assert replicas.exit_codes == [0]
    assert together == pytest.approx(alone, rel=1e-5)
    assert_same_weights(together_weights, alone_weights,
                        learning_rate=config("lora", len(examples), tiny_model_dir, pad).hyperparameters.learning_rate)


def test_a_stop_on_rank_0_ends_the_replicas(examples: list[EncodedExample], tiny_model_dir: Path,
                                            tiny_tokenizer: Any) -> None:
    pad = tiny_tokenizer.pad_token_id
    checks = iter(range(100))
    replicas = Replicas(spec("lora", examples, tiny_model_dir, pad), world=2)
    with pytest.raises(Cancelled), replicas as parallel:
        run("lora", examples, tiny_model_dir, pad, parallel=parallel,
            should_stop=lambda: Cancelled() if next(checks) == 2 else None)
    assert replicas.exit_codes == [0]  # the replica left cleanly, not killed


def test_every_example_of_a_step_goes_to_exactly_one_rank(examples: list[EncodedExample]) -> None:
    for world in (1, 2, 3, 5):
        for size in (1, 2, 5, len(examples)):
            chunk = examples[:size]
            shares = [DataParallel(rank, world).share(chunk, 4096) for rank in range(world)]
            assert sorted(id(e) for share in shares for e in share) == sorted(id(e) for e in chunk)
            assert shares[0], "rank 0 always trains something (it adds the method's loss penalty)"
            where = {id(e): i for i, e in enumerate(chunk)}
            for share in shares:  # each share keeps the step's order
                assert [where[id(e)] for e in share] == sorted(where[id(e)] for e in share)
            tokens = [sum(len(e.input_ids) for e in share) for share in shares]
            longest = max(len(e.input_ids) for e in chunk)
            assert max(tokens) - min(tokens) <= longest  # balanced by tokens, within one example


def test_the_group_listens_on_loopback_only(examples: list[EncodedExample], tiny_model_dir: Path,
                                            tiny_tokenizer: Any) -> None:
    """A job's ranks meet through a file in its private folder and talk over the loopback interface: nothing of
    the group listens where another host (or another tenant's code on the network) could connect."""
    import os

    import psutil

    pad = tiny_tokenizer.pad_token_id
    replicas = Replicas(spec("lora", examples, tiny_model_dir, pad), world=2)
    with replicas as parallel:
        pids = {os.getpid(), *(p.pid for p in replicas.processes)}
        listening = [c.laddr for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        run("lora", examples, tiny_model_dir, pad, parallel=parallel)
    assert replicas.exit_codes == [0]
    assert all(address.ip in ("127.0.0.1", "::1") for address in listening), listening
