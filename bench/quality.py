"""The seed's tasks measured with their own metrics: the default model fine-tuned on each, against the base model.

    python -m bench.quality [--save] [--processes 2] [--tasks sentiment translation ...]

Each task is a pair of files in examples/ (examples/make_tasks.py writes all but sentiment's): the default method
(LoRA, its `auto` defaults, 3 epochs, batch 4, the real-model test's recipe) trains on the training file through
the worker's training loop in this machine's compute dtype, and the fine-tuned and the base model answer the
held-out file's prompts greedily, as an evaluation's graders read them (workers.training.evaluation). Each task is
scored by the grader its kind of answer calls for (adapters.graders): accuracy (string_check eq) for sentiment, BLEU
for translation, ROUGE-L for summaries, exact match and token F1 (ROUGE-1's F-measure: unigram overlap after
lower-casing) for short answers. One preference run (DPO, the same recipe) teaches a preference the base model
does not have, answers in capital letters, scored as the share of held-out pairs whose preferred answer the model
gives the higher log-probability, and the share of its greedy answers that are the preferred one. Runs are spread
over processes of one torch thread each.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench.common import ROOT, report_runs

EXAMPLES = ROOT / "examples"
FIXED = {"n_epochs": 3, "batch_size": 4}
SEED = 3
ANSWER = {"input": "{{sample.output_text}}", "reference": "{{item.reference_answer}}"}
# task → (what the table calls its metric, grader) pairs
TASKS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "sentiment": [("accuracy", {"type": "string_check", "name": "accuracy", "operation": "eq", **ANSWER})],
    "translation": [("BLEU", {"type": "text_similarity", "name": "bleu", "evaluation_metric": "bleu", **ANSWER})],
    "summaries": [("ROUGE-L", {"type": "text_similarity", "name": "rouge_l", "evaluation_metric": "rouge_l",
                               **ANSWER})],
    "questions": [("exact match", {"type": "string_check", "name": "exact", "operation": "eq", **ANSWER}),
                  ("token F1", {"type": "text_similarity", "name": "f1", "evaluation_metric": "rouge_1", **ANSWER})],
}
PREFERENCE_TASK = "uppercase_preference"


def _setup(objective: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from adapters.base_models import base_info, load_model
    from adapters.compute import compute_plan
    from adapters.methods import DEFAULT_METHOD, METHODS
    from app.services import base_models
    from app.settings import DEFAULT_BASE_MODEL, Settings
    from workers.training.loop import accelerator_for

    settings = Settings()
    path = base_models.local_path(settings, base_models.resolve(settings, DEFAULT_BASE_MODEL))
    plan = compute_plan("cpu")
    method = METHODS[DEFAULT_METHOD]
    return {"settings": settings, "path": path, "tokenizer": AutoTokenizer.from_pretrained(path), "plan": plan,
            "method": method, "base": load_model(path, device="cpu", dtype=plan.dtype),
            "autocast": accelerator_for(plan.dtype, torch.device("cpu")).autocast,
            "hp": lambda n: method.resolve({**FIXED, "objective": objective}, n_examples=n, settings=settings,
                                           base_info=base_info(path))}


def _train(env: dict[str, Any], hp: Any, examples: list[Any]) -> tuple[Any, float]:
    from workers.training.loop import TrainingConfig, TrainingRecipe

    config = TrainingConfig(method=env["method"], hyperparameters=hp, seed=SEED, pad_id=env["tokenizer"].pad_token_id,
                            compute_dtype=env["plan"].dtype, log_every_steps=10_000)
    started = time.perf_counter()
    model, _ = TrainingRecipe(config, base_model=env["base"], train_examples=examples).run()
    return model.eval(), time.perf_counter() - started


def _answers(env: dict[str, Any], model: Any, hp: Any, examples: list[Any]) -> tuple[list[str], list[str]]:
    """The fine-tuned and the base model's greedy answers to the examples' prompts (the adapter disabled)."""
    from workers.training.evaluation import model_metrics
    from workers.training.loop import BatchMaker

    tokenizer = env["tokenizer"]
    common = {"base_model": env["base"], "tokenizer": tokenizer, "examples": examples, "batch_size": 8,
              "autocast": env["autocast"]}
    tuned: list[str] = []
    base: list[str] = []
    model_metrics(model, make=BatchMaker.for_training(env["method"], hp, tokenizer.pad_token_id), answers=tuned,
                  **common)
    with model.disable_adapter():
        model_metrics(model.get_base_model(), make=BatchMaker.for_base_model(
            max_len=hp.max_seq_length, pad_id=tokenizer.pad_token_id), answers=base, **common)
    return tuned, base


def run_task(task: str) -> dict[str, Any]:
    """Fine-tune on the task's training file; grade both models' answers on its held-out file."""
    from adapters.data import encode_dataset, parse_jsonl
    from workers.grading import grade_answers, graded_items

    env = _setup("supervised")
    tokenizer = env["tokenizer"]
    train = encode_dataset(tokenizer, parse_jsonl((EXAMPLES / f"{task}_train.jsonl").read_bytes(),
                                                  max_examples=10_000))
    heldout_file = parse_jsonl((EXAMPLES / f"{task}_heldout.jsonl").read_bytes(), max_examples=10_000)
    heldout = encode_dataset(tokenizer, heldout_file)
    hp = env["hp"](len(train))
    model, seconds = _train(env, hp, train)
    tuned, base = _answers(env, model, hp, heldout)
    graders = [grader for _, grader in TASKS[task]]
    items = graded_items(heldout_file.records, heldout, tokenizer, None)
    grades = grade_answers(graders, items, [tuned, base], lambda *_: [])
    return {"task": task, "train_examples": len(train), "heldout_examples": len(items),
            "seconds": round(seconds, 1), "compute_dtype": env["plan"].dtype,
            "metrics": [{"metric": label, "fine_tuned": tuned_grade["score"], "base": base_grade["score"]}
                        for (label, _), tuned_grade, base_grade in zip(TASKS[task], *grades, strict=True)],
            "samples": [{"reference": item["reference_answer"], "fine_tuned": t, "base": b}
                        for item, t, b in list(zip(items, tuned, base, strict=True))[:3]]}


def run_preference() -> dict[str, Any]:
    """DPO on the preference pairs; how often each model ranks the preferred held-out answer first, and how often
    its greedy answer is the preferred one."""
    from adapters.data import encode_pairs, parse_jsonl
    from workers.training.evaluation import attention, exact_match
    from workers.training.loop import BatchMaker
    from workers.training.preference import preferred_share

    env = _setup("dpo")
    tokenizer = env["tokenizer"]

    def pairs(part: str) -> list[Any]:
        return encode_pairs(tokenizer, parse_jsonl((EXAMPLES / f"{PREFERENCE_TASK}_{part}.jsonl").read_bytes(),
                                                   max_examples=10_000))

    train, heldout = pairs("train"), pairs("heldout")
    hp = env["hp"](len(train))
    model, seconds = _train(env, hp, train)
    make = BatchMaker.for_training(env["method"], hp, tokenizer.pad_token_id)
    base_make = BatchMaker.for_base_model(max_len=hp.max_seq_length, pad_id=tokenizer.pad_token_id)
    preferred = [pair.chosen for pair in heldout]
    with env["autocast"]():
        shares = {"fine_tuned": preferred_share(model, heldout, make=make, batch_size=8)}
        with model.disable_adapter():
            shares["base"] = preferred_share(model, heldout, make=base_make, batch_size=8)
    with attention(env["base"], "sdpa"):  # generation runs with a cached attention, as evaluations do
        answers = {"fine_tuned": exact_match(model, tokenizer, preferred, autocast=env["autocast"])[0]}
    with model.disable_adapter(), attention(env["base"], "sdpa"):
        answers["base"] = exact_match(model.get_base_model(), tokenizer, preferred, autocast=env["autocast"])[0]
    return {"task": PREFERENCE_TASK, "train_examples": len(train), "heldout_examples": len(heldout),
            "seconds": round(seconds, 1), "compute_dtype": env["plan"].dtype,
            "metrics": [{"metric": "preferred answer ranked first (log-probability)", **shares},
                        {"metric": "greedy answer is the preferred one", **answers}]}


def run(task: str) -> dict[str, Any]:
    return run_preference() if task == PREFERENCE_TASK else run_task(task)


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| task | metric | base model | fine-tuned | held-out examples | training examples | training s |",
            "|---|---|---|---|---|---|---|"]
    for result in results:
        kind = "DPO" if result["task"] == PREFERENCE_TASK else "LoRA"
        for metric in result["metrics"]:
            rows.append(f"| {result['task']} ({kind}) | {metric['metric']} | {metric['base']:.3f} | "
                        f"{metric['fine_tuned']:.3f} | {result['heldout_examples']} | {result['train_examples']} | "
                        f"{result['seconds']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", action="store_true", help="write bench/results/quality.json and .md")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tasks", nargs="*", help="only these tasks")
    args = parser.parse_args()
    tasks = [t for t in [*TASKS, PREFERENCE_TASK] if not args.tasks or t in args.tasks]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.processes) as pool:
        results = list(pool.map(run, tasks))
    report_runs("quality", "The seed's tasks: the default model fine-tuned, against the base model", table(results),
                results, seconds=time.perf_counter() - started, processes=args.processes, save=args.save)

if __name__ == "__main__":
    main()
