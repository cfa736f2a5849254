"""How each method's `auto` defaults were chosen: a small grid around them on the shipped task, measured.

    python -m bench.defaults [--save] [--processes 2]

The task is the real-model test's: SmolLM2-135M-Instruct learns examples/sentiment_train.jsonl (80 chat
examples, answer POSITIVE or NEGATIVE) with batch 4 for 3 epochs, through the worker's training loop
(loop.train, this machine's compute dtype), and answers the 24 held-out reviews of
examples/sentiment_heldout.jsonl greedily. Every run is scored after each epoch (exact match and loss on
the held-out set), so one run gives the 1-, 2- and 3-epoch figures. The grid per method: the default
learning rate, a third of it and three times it; for LoRA rank 4 and 16 and no dropout; for the prompt methods 8 and
32 virtual tokens. Runs are spread over processes of one torch thread each.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench.common import ROOT, report_runs

TRAIN = ROOT / "examples" / "sentiment_train.jsonl"
HELDOUT = ROOT / "examples" / "sentiment_heldout.jsonl"
FIXED = {"n_epochs": 3, "batch_size": 4}
SEED = 3


def grid() -> list[tuple[str, dict[str, Any]]]:
    """(method, hyperparameters beyond FIXED) for every run."""
    from adapters.methods import METHODS

    runs: list[tuple[str, dict[str, Any]]] = []
    for name, method in METHODS.items():
        rate = method.default_learning_rate
        runs += [(name, {}), (name, {"learning_rate": rate / 3}), (name, {"learning_rate": rate * 3})]
        if name == "lora":
            runs += [(name, {"r": 4}), (name, {"r": 16})]
        if name in ("lora", "adalora"):  # both default to no dropout
            runs += [(name, {"lora_dropout": 0.05})]
        if "num_virtual_tokens" in method.resolved.model_fields:
            runs += [(name, {"num_virtual_tokens": 8}), (name, {"num_virtual_tokens": 32})]
    return runs


def run(name: str, extra: dict[str, Any], seed: int = SEED) -> dict[str, Any]:
    """Train one adapter; score it on the held-out set after every epoch."""
    import torch

    torch.set_num_threads(1)
    from adapters.base_models import base_info, load_model
    from adapters.compute import compute_plan
    from adapters.data import encode_dataset, parse_jsonl
    from adapters.methods import METHODS
    from app.services import base_models
    from app.settings import DEFAULT_BASE_MODEL, Settings
    from workers.training.evaluation import model_metrics
    from workers.training.loop import BatchMaker, TrainingCallbacks, TrainingConfig, TrainingRecipe, accelerator_for

    settings = Settings()
    path = base_models.local_path(settings, base_models.resolve(settings, DEFAULT_BASE_MODEL))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    train_examples = encode_dataset(tokenizer, parse_jsonl(TRAIN.read_bytes(), max_examples=10_000))
    heldout = encode_dataset(tokenizer, parse_jsonl(HELDOUT.read_bytes(), max_examples=10_000))
    plan = compute_plan("cpu")
    method = METHODS[name]
    hp = method.resolve({**FIXED, **extra}, n_examples=len(train_examples), settings=settings,
                        base_info=base_info(path))
    base = load_model(path, device="cpu", dtype=plan.dtype)
    autocast = accelerator_for(plan.dtype, torch.device("cpu")).autocast
    epochs: list[dict[str, Any]] = []

    def on_checkpoint(model: Any, optimizer: Any, scheduler: Any, position: Any, metrics: dict[str, Any],
                      epoch_end: bool) -> None:
        if epoch_end:
            scores = model_metrics(model, base_model=base, tokenizer=tokenizer, examples=heldout,
                                   make=BatchMaker.for_training(method, hp, tokenizer.pad_token_id), batch_size=8,
                                   autocast=autocast)
            epochs.append({"epoch": position.epoch, "exact_match": scores["exact_match"], "loss": scores["loss"]})

    config = TrainingConfig(method=method, hyperparameters=hp, seed=seed, pad_id=tokenizer.pad_token_id,
                            compute_dtype=plan.dtype, log_every_steps=10_000)
    started = time.perf_counter()
    TrainingRecipe(config, base_model=base, train_examples=train_examples,
                   callbacks=TrainingCallbacks(on_checkpoint=on_checkpoint)).run()
    return {"method": name, "setting": extra, "seed": seed, "learning_rate": hp.learning_rate, "epochs": epochs,
            "seconds": round(time.perf_counter() - started, 1), "compute_dtype": plan.dtype}


def describe(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()) or "defaults"


def main() -> None:
    from adapters.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", action="store_true", help="write bench/results/defaults.json and .md")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--methods", nargs="*", help="only these methods")
    parser.add_argument("--seeds", nargs="*", type=int,
                        help="instead of the grid, each method's defaults at each of these seeds")
    args = parser.parse_args()
    if args.seeds:
        runs = [(name, {}, seed) for name in (args.methods or list(METHODS)) for seed in args.seeds]
    else:
        runs = [(name, extra, SEED) for name, extra in grid() if not args.methods or name in args.methods]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.processes) as pool:
        results = list(pool.map(run, *zip(*runs, strict=True)))
    rows = []
    for r in results:
        by_epoch = {e["epoch"]: e for e in r["epochs"]}
        scores = " | ".join(f"{by_epoch[e]['exact_match'] * 24:.0f}/24" if e in by_epoch else "–" for e in (1, 2, 3))
        loss = by_epoch[3]["loss"] if 3 in by_epoch else float("nan")
        run_name = f"defaults, seed {r['seed']}" if args.seeds else describe(r["setting"])
        rows.append(f"| {r['method']} | {run_name} | {r['learning_rate']:g} | {scores} | {loss:.3f} |")
    table = "\n".join(["| method | run | learning rate | exact match after epoch 1 | 2 | 3 | held-out loss (epoch 3) |",
                       "|---|---|---|---|---|---|---|", *rows])
    # A run of some methods only is saved beside the whole grid's results, not over them.
    name = "_".join(["defaults", *(["seeds"] if args.seeds else []), *(args.methods or [])])
    report_runs(name, "Method defaults on the sentiment task", table, results,
                seconds=time.perf_counter() - started, processes=args.processes, save=args.save)

if __name__ == "__main__":
    main()
