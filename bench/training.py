"""Training throughput and quality: the plain Hugging Face path against ours, side by side in one run.

    python -m bench.training [--quick] [--save]

The plain path is what the PEFT docs teach: `transformers.Trainer` + `get_peft_model`, a padding collator,
the model in float32. Ours is the worker's path (workers/training): packed rows, logits only where a label
is, the compute dtype this machine does natively (adapters/compute.py). Both train SmolLM2-135M-Instruct
with the same LoRA config for the same number of optimiser steps of the same batch size on
examples/length_spread.jsonl (short, mid-length and long examples mixed), each case in a fresh process
(so peak RSS is its own), cases interleaved. Then LoRA against the other methods on our path.

Effective GFLOP/s counts the same work for both paths, whatever either skips: per real (non-padding)
token 4·N, where N is every weight a token's forward pass multiplies (the LM head included: 2·N forward,
2·N backward to the activations; frozen weights get no weight gradients), plus attention: per layer and
example of L tokens 8·L²·d (QKᵀ and AV, forward and backward, dense square). Skipped work therefore shows
as a higher figure. Utilisation divides it by this machine's matmul peak in the dtype used, measured in the
same run with the same threads. Prints tables, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "examples" / "length_spread.jsonl"
RESULTS = ROOT / "bench" / "results"
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}  # our default, and PEFT's
LEARNING_RATE = 1e-3
SEED = 1


def load_examples(tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """The shipped dataset, encoded, split into training and validation examples (fixed seed)."""
    from adapters.data import encode_dataset, parse_jsonl

    examples = encode_dataset(tokenizer, parse_jsonl(DATASET.read_bytes(), max_examples=10_000))
    order = list(range(len(examples)))
    random.Random(11).shuffle(order)
    valid = [examples[i] for i in order[:16]]
    return [examples[i] for i in order[16:]], valid


def loss_logger(losses: list[float]) -> Any:
    """A Trainer callback that appends every logged training loss to `losses`."""
    from transformers import TrainerCallback

    class LossLogger(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return LossLogger()


def same_order(n: int) -> Any:
    """A sampler giving our loop's shuffle (epoch_order), so a Trainer trains the same batches in the same order."""
    import torch

    from workers.training.loop import epoch_order

    class SameOrder(torch.utils.data.Sampler[int]):
        def __init__(self) -> None:
            self.epoch = 0

        def __len__(self) -> int:
            return n

        def set_epoch(self, epoch: int) -> None:
            # The Trainer says which epoch it is (it may iterate a sampler more than once per epoch).
            self.epoch = epoch

        def __iter__(self) -> Any:
            return iter(epoch_order(n, SEED, self.epoch))

    return SameOrder()


def load_pairs(tokenizer: Any) -> tuple[list[Any], list[Any], list[dict[str, Any]]]:
    """Preference pairs from the same dataset, split as load_examples splits it: each question with its own answer
    preferred and the next line's answer (an answer to another question) not. Returns (training pairs, validation
    pairs, the training lines in TRL's conversational form)."""
    from adapters.data import encode_pairs, parse_jsonl

    records = [json.loads(line) for line in DATASET.read_text().splitlines() if line.strip()]
    answers = [record["messages"][-1] for record in records]

    def other_answer(i: int) -> dict[str, Any]:  # the next line's answer that differs (some questions share one)
        return next(answers[j % len(answers)] for j in range(i + 1, i + len(answers))
                    if answers[j % len(answers)]["content"] != answers[i]["content"])

    lines = [{"input": {"messages": record["messages"][:-1]}, "preferred_output": [answers[i]],
              "non_preferred_output": [other_answer(i)]} for i, record in enumerate(records)]
    pairs = encode_pairs(tokenizer, parse_jsonl("\n".join(json.dumps(line) for line in lines).encode(),
                                                max_examples=10_000))
    order = list(range(len(pairs)))
    random.Random(11).shuffle(order)
    trl_lines = [{"prompt": lines[i]["input"]["messages"], "chosen": lines[i]["preferred_output"],
                  "rejected": lines[i]["non_preferred_output"]} for i in order[16:]]
    return [pairs[i] for i in order[16:]], [pairs[i] for i in order[:16]], trl_lines


def pairs_valid_loss(model: Any, pairs: list[Any], pad_id: int) -> float:
    """The same measure for every preference case (LoRA): the DPO loss (beta 0.1, the base model as the reference) on
    the validation pairs, fp32, through our packed batches."""
    from workers.training.batches import use_packed_attention
    from workers.training.loop import BatchMaker
    from workers.training.preference import score_pairs

    model.eval()
    use_packed_attention(model.get_base_model())
    make = BatchMaker(packed=True, offset=0, max_len=4096, pad_id=pad_id)
    return score_pairs(model, pairs, objective="dpo", make=make, reference_make=make, beta=0.1, gamma=None,
                       batch_size=4).loss


def run_trl_dpo(steps: int, batch_size: int) -> dict[str, Any]:
    """TRL's DPOTrainer with the same LoRA config (TRL makes the adapter, so its reference is the base model with the
    adapter disabled, as ours), float32, as TRL's docs show it; gradient checkpointing off, as on our path; the same
    pairs in the same order as ours."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    _, valid, lines = load_pairs(tokenizer)
    tokens = {"real": 0, "padded": 0}
    losses: list[float] = []

    class Counted(DPOTrainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return same_order(len(lines))  # the pairs, in the order ours trains them

        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            tokens["real"] += int(inputs["attention_mask"].sum())
            tokens["padded"] += int(inputs["attention_mask"].numel())
            return super().compute_loss(model, inputs, *args, **kwargs)

    config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"],
                        bias="none", **LORA)
    args = DPOConfig(output_dir="/tmp/adaptery-bench-trl", per_device_train_batch_size=batch_size, max_steps=steps,
                     learning_rate=LEARNING_RATE, lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
                     report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0, seed=SEED, max_grad_norm=1.0,
                     beta=0.1, max_length=None, gradient_checkpointing=False)
    trainer = Counted(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), args=args,
                      processing_class=tokenizer, train_dataset=Dataset.from_list(lines), peft_config=config,
                      callbacks=[loss_logger(losses)])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "real_tokens": tokens["real"], "padded_tokens": tokens["padded"], "losses": losses,
            "valid_loss": pairs_valid_loss(trainer.model, valid, tokenizer.pad_token_id), "compute_dtype": "float32",
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model_path() -> str:
    from app.services import base_models
    from app.settings import DEFAULT_BASE_MODEL, Settings

    settings = Settings()
    return base_models.local_path(settings, base_models.resolve(settings, DEFAULT_BASE_MODEL))


# ---------------------------------------------------------------- one case, in its own process


def run_hf(steps: int, batch_size: int, bf16: bool) -> dict[str, Any]:
    """Trainer + get_peft_model + a padding collator, as the PEFT docs show it."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from workers.training.batches import padded_batch

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, valid = load_examples(tokenizer)

    def features(examples: list[Any]) -> list[dict[str, list[int]]]:
        return [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                 "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask, strict=True)]}
                for e in examples]

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), LoraConfig(
        task_type=TaskType.CAUSAL_LM, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"], bias="none", **LORA))
    tokens = {"real": 0, "padded": 0}
    losses: list[float] = []

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        return collator(batch)

    args = TrainingArguments(output_dir="/tmp/adaptery-bench-hf", per_device_train_batch_size=batch_size,
                             max_steps=steps, learning_rate=LEARNING_RATE, lr_scheduler_type="linear",
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=bf16,
                             dataloader_num_workers=0, remove_unused_columns=False, seed=SEED, max_grad_norm=1.0)
    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return same_order(len(train))

        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            # Counted where a batch is trained (the data loader may fetch batches ahead).
            tokens["real"] += int(inputs["attention_mask"].sum())
            tokens["padded"] += int(inputs["attention_mask"].numel())
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = SameOrderTrainer(model=model, args=args, train_dataset=features(train), data_collator=collate,
                               callbacks=[loss_logger(losses)])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    valid_loss = validation_loss(model, valid, lambda chunk: padded_batch(chunk, max_len=4096,
                                                                         pad_id=tokenizer.pad_token_id))
    return {"seconds": seconds, "real_tokens": tokens["real"], "padded_tokens": tokens["padded"],
            "losses": losses, "valid_loss": valid_loss, "compute_dtype": "bfloat16" if bf16 else "float32",
            "peak_rss_mb": peak_rss_mb(), "token_lengths": None}


def validation_loss(model: Any, examples: list[Any], make: Any) -> float:
    """The same measure for every case: mean loss per labelled token on the validation examples, fp32."""
    import torch

    from workers.training.batches import batch_loss

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 4):
            batch = make(examples[start:start + 4])
            total += float(batch_loss(model, batch, reduction="sum"))
            count += len(batch.targets)
    return total / count


def run_ours(steps: int, batch_size: int, method_name: str, dtype: str | None = None,
             around_training: Any = None, objective: str = "supervised") -> dict[str, Any]:
    """The worker's training path (loop.train), in this machine's compute dtype unless `dtype` says; a preference
    `objective` trains on load_pairs' pairs. `around_training`: a started torch profiler, recording the training steps
    only."""
    import torch
    from transformers import AutoTokenizer

    from adapters.base_models import base_info, load_model
    from adapters.compute import compute_plan
    from adapters.methods import METHODS
    from app.settings import Settings
    from workers.training.loop import BatchMaker, TrainingCallbacks, TrainingConfig, TrainingRecipe

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    preference = objective != "supervised"
    train_examples, valid = load_pairs(tokenizer)[:2] if preference else load_examples(tokenizer)
    compute_dtype = dtype or compute_plan("cpu").dtype
    method = METHODS[method_name]
    raw = {"batch_size": batch_size, "max_steps": steps, "n_epochs": 50, "max_seq_length": 4096,
           **({"learning_rate": LEARNING_RATE, **LORA} if method_name == "lora" else {}),
           **({"objective": objective} if preference else {})}
    hp = method.resolve(raw, n_examples=len(train_examples), settings=Settings(), base_info=base_info(path))
    losses: list[float] = []
    callbacks = TrainingCallbacks(on_metrics=lambda m: losses.append(m["train_loss"]))
    base = load_model(path, device="cpu", dtype=compute_dtype)
    if around_training is not None:
        around_training.toggle_collection_dynamic(True, around_training.activities)
    started = time.perf_counter()
    config = TrainingConfig(method=method, hyperparameters=hp, seed=SEED, pad_id=tokenizer.pad_token_id,
                            compute_dtype=compute_dtype)
    model, result = TrainingRecipe(config, base_model=base, train_examples=train_examples, callbacks=callbacks).run()
    seconds = time.perf_counter() - started
    if around_training is not None:
        around_training.toggle_collection_dynamic(False, around_training.activities)
    model.base_model.model.to(torch.float32)  # validation in fp32 for every case
    valid_loss = (pairs_valid_loss(model, valid, tokenizer.pad_token_id) if preference else
                  validation_loss(model, valid, BatchMaker.for_training(method, hp, tokenizer.pad_token_id)))
    return {"seconds": seconds, "real_tokens": result.trained_tokens, "padded_tokens": result.trained_tokens,
            "losses": losses, "valid_loss": valid_loss, "compute_dtype": compute_dtype, "peak_rss_mb": peak_rss_mb()}


def case_main(case: str, steps: int, batch_size: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(1)
    if case.startswith("hf_"):
        out = run_hf(steps, batch_size, bf16=case == "hf_bf16")
    elif case == "trl_dpo":
        out = run_trl_dpo(steps, batch_size)
    elif case.startswith("ours_lora_") and case.removeprefix("ours_lora_").split("_")[0] in ("dpo", "orpo", "simpo"):
        objective = case.removeprefix("ours_lora_").split("_")[0]
        out = run_ours(steps, batch_size, "lora", objective=objective,
                       dtype="float32" if case.endswith("_fp32") else None)
    elif case.endswith("_fp32"):
        out = run_ours(steps, batch_size, case.removeprefix("ours_").removesuffix("_fp32"), dtype="float32")
    else:
        out = run_ours(steps, batch_size, case.removeprefix("ours_"))
    print(json.dumps(out))


# ---------------------------------------------------------------- the side-by-side run


def run_case(case: str, steps: int, batch_size: int, threads: int) -> dict[str, Any]:
    env = {**os.environ, "BENCH_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "bench.training", "--case", case, "--steps", str(steps),
                           "--batch-size", str(batch_size)], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["case"] = case
    return result


def shape_gflops(dtype_name: str, tokens: int, d: int, inter: int, repeats: int = 6) -> float:
    """Matmul throughput at the model's own shapes (a packed row of `tokens` through the projections,
    forward: [tokens, d]·[d, d], [tokens, d]·[d, inter], [tokens, inter]·[inter, d]), the most a step's
    big matmuls can run at here; square 1024 matmuls give the machine's peak."""
    import torch

    dtype = getattr(torch, dtype_name)
    x, xi = torch.randn(tokens, d, dtype=dtype), torch.randn(tokens, inter, dtype=dtype)
    weights = [torch.randn(d, d, dtype=dtype), torch.randn(d, inter, dtype=dtype), torch.randn(inter, d, dtype=dtype)]
    inputs = [x, x, xi]
    for a, w in zip(inputs, weights, strict=True):
        a @ w  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        for a, w in zip(inputs, weights, strict=True):
            a @ w
    flops = sum(2 * a.shape[0] * a.shape[1] * w.shape[1] for a, w in zip(inputs, weights, strict=True))
    return flops * repeats / (time.perf_counter() - started) / 1e9


def profile_ours(steps: int, batch_size: int) -> str:
    """Where a step of our LoRA path spends its time: torch's profiler over `steps` steps, top operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        prof.toggle_collection_dynamic(False, [ProfilerActivity.CPU])  # loading is not a step
        run_ours(steps, batch_size, "lora", around_training=prof)
    return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


def model_flops(path: str) -> tuple[float, int, int, int]:
    """(N, layers, hidden size, parameters of the LM head) of the base model, from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    d, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    kv = d // config.num_attention_heads * config.num_key_value_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter  # q, o; k, v; gate, up, down
    head = d * vocab
    return float(per_layer * layers + head), layers, d, head


def effective_gflops(result: dict[str, Any], lengths: Counter[int], n: float, layers: int, d: int,
                     steps_share: float) -> float:
    """4·N per real token plus dense attention, for the tokens this case trained (see the module doc)."""
    attention = sum(count * 8 * length * length * d * layers for length, count in lengths.items())
    work = 4 * n * result["real_tokens"] + attention * steps_share
    return work / result["seconds"] / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (3; preference cases 2)")
    parser.add_argument("--save", action="store_true", help="write bench/results/training.json and .md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--profile", action="store_true",
                        help="profile our LoRA path instead (top operators by time; with --save, to "
                             "bench/results/training_profile.txt)")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 20)
    if args.case:
        case_main(args.case, steps, args.batch_size)
        return
    if args.profile:
        import torch

        torch.set_num_threads(args.threads)
        table = profile_ours(args.steps or 4, args.batch_size)
        print(table)
        if args.save:
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "training_profile.txt").write_text(table + "\n")
        return

    import torch
    from transformers import AutoTokenizer

    from adapters.compute import compute_plan, matmul_gflops

    torch.set_num_threads(args.threads)
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, valid = load_examples(tokenizer)
    lengths = Counter(len(e.input_ids) for e in train)
    plan = compute_plan("cpu")
    peaks = {"float32": matmul_gflops("float32", size=1024, repeats=6),
             "bfloat16": matmul_gflops("bfloat16", size=1024, repeats=6)}
    print(f"dataset: {len(train)} training and {len(valid)} validation examples; tokens per example: "
          f"{min(lengths)}–{max(lengths)}, mean {sum(k * v for k, v in lengths.items()) / len(train):.0f}")
    histogram = Counter(min(length // 100 * 100, 900) for length in (len(e.input_ids) for e in train))
    print("length histogram:", ", ".join(f"{b}–{b + 99}: {histogram[b]}" for b in sorted(histogram)))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    row_tokens = round(args.batch_size * sum(k * v for k, v in lengths.items()) / len(train))
    at_shapes = {name: shape_gflops(name, row_tokens, config.hidden_size, config.intermediate_size)
                 for name in ("float32", "bfloat16")}
    print(f"compute dtype: {plan.reason}; matmul peak ({args.threads} threads): fp32 {peaks['float32']:.0f}, "
          f"bf16 {peaks['bfloat16']:.0f} GFLOP/s; at the model's shapes ({row_tokens} tokens × "
          f"{config.hidden_size}/{config.intermediate_size}): fp32 {at_shapes['float32']:.0f}, bf16 "
          f"{at_shapes['bfloat16']:.0f} GFLOP/s; {steps} steps of batch {args.batch_size}")

    # Our path in float32 too: what packing and label-only logits give without the dtype.
    cases = ["hf_fp32", "ours_lora"] + (["ours_lora_fp32"] if plan.dtype != "float32" else [])
    if plan.dtype == "bfloat16" and not args.quick:
        cases.append("hf_bf16")
    methods = ["ours_adalora", "ours_ia3", "ours_prefix_tuning", "ours_prompt_tuning", "ours_p_tuning"]
    # Preference tuning on pairs made from the same examples: TRL's DPOTrainer beside our DPO and SimPO (no reference
    # pass); a pair's tokens are both its sequences.
    preference = ["trl_dpo", "ours_lora_dpo", "ours_lora_simpo"] + (["ours_lora_dpo_fp32"] if plan.dtype != "float32"
                                                                      else [])
    results = {case: run_case(case, steps, args.batch_size, args.threads) for case in cases + methods}
    # Half as many pairs a step, so a step holds as many sequences as a supervised one; fewer steps, since TRL's
    # step takes tens of seconds here.
    pair_steps, pair_batch = max(2, steps // 4), max(1, args.batch_size // 2)
    results.update({case: run_case(case, pair_steps, pair_batch, args.threads) for case in preference})
    n, layers, d, _ = model_flops(path)
    mean_share = steps * args.batch_size / len(train)  # each case trains this share of the dataset's examples
    rows = []
    for case, r in results.items():
        gflops = effective_gflops(r, lengths, n, layers, d, mean_share)
        r["tok_s"] = r["real_tokens"] / r["seconds"]
        r["effective_gflops"] = gflops
        r["flop_util"] = gflops / peaks[r["compute_dtype"]]
        tail = r["losses"][-max(1, len(r["losses"]) // 4):]
        r["final_train_loss"] = sum(tail) / len(tail)
        rows.append(f"| {case} | {r['compute_dtype']} | {r['tok_s']:.1f} | {r['real_tokens']} | "
                    f"{r['padded_tokens'] - r['real_tokens']} | {gflops:.1f} | {r['flop_util']:.2f} | "
                    f"{r['peak_rss_mb']:.0f} | {r['final_train_loss']:.3f} | {r['valid_loss']:.3f} |")
    header = ("| case | dtype | real tok/s | real tokens | padding tokens | effective GFLOP/s | of peak | peak RSS MB "
              "| train loss (last quarter) | valid loss |")
    table = "\n".join([header, "|---" * 10 + "|", *rows])
    table += ("\n\nThe trl_dpo and ours_lora_dpo/simpo cases train on preference pairs made from the same examples, "
              f"{pair_steps} steps of {pair_batch} pairs (as many sequences a step as the supervised cases); a pair's "
              "tokens are both its sequences, effective GFLOP/s counts the supervised work per token (not comparable "
              "for them), and their valid loss is the DPO loss on the validation pairs.")
    hf, ours = results["hf_fp32"], results["ours_lora"]
    summary = {"hf_trainer_tok_s": round(hf["tok_s"], 2), "ours_tok_s": round(ours["tok_s"], 2),
               "speedup": round(ours["tok_s"] / hf["tok_s"], 2), "ours_flop_util": round(ours["flop_util"], 3),
               "hf_flop_util": round(hf["flop_util"], 3), "hf_final_loss": round(hf["final_train_loss"], 4),
               "ours_final_loss": round(ours["final_train_loss"], 4), "hf_valid_loss": round(hf["valid_loss"], 4),
               "ours_valid_loss": round(ours["valid_loss"], 4), "hf_peak_rss_mb": round(hf["peak_rss_mb"]),
               "ours_peak_rss_mb": round(ours["peak_rss_mb"]), "compute_dtype": plan.dtype,
               "peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
               "model_shape_gflops": {k: round(v, 1) for k, v in at_shapes.items()},
               "ours_util_of_shape_peak": round(ours["effective_gflops"] / at_shapes[ours["compute_dtype"]], 3),
               "dpo": {"trl_tok_s": round(results["trl_dpo"]["tok_s"], 2),
                       "ours_tok_s": round(results["ours_lora_dpo"]["tok_s"], 2),
                       "speedup": round(results["ours_lora_dpo"]["tok_s"] / results["trl_dpo"]["tok_s"], 2),
                       "ours_simpo_tok_s": round(results["ours_lora_simpo"]["tok_s"], 2),
                       "ours_fp32_tok_s": round(results.get("ours_lora_dpo_fp32",
                                                            results["ours_lora_dpo"])["tok_s"], 2),
                       "ours_dpo_of_sft": round(results["ours_lora_dpo"]["tok_s"] / ours["tok_s"], 3),
                       "trl_valid_dpo_loss": round(results["trl_dpo"]["valid_loss"], 4),
                       "ours_valid_dpo_loss": round(results["ours_lora_dpo"]["valid_loss"], 4)},
               "steps": steps, "preference_steps": pair_steps, "preference_batch_pairs": pair_batch,
               "batch_size": args.batch_size, "threads": args.threads, "quick": args.quick,
               "cases": {c: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "losses"}
                         for c, r in results.items()}}
    text = f"## Training benchmark\n\n{table}\n"
    print(text)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "training.md").write_text(text)
        (RESULTS / "training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
