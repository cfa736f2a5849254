"""The GPU check: LoRA training and mixed-adapter serving on a 0.5B- or 1.5B-shaped model on a CUDA GPU,
side by side with the plain Hugging Face / PEFT way in the same run.

    python -m bench.gpu_check [--shape 0.5b|1.5b] [--quantization 4bit|8bit] [--save]     (make gpu-check)

The model is a Llama-architecture decoder with Qwen2.5-0.5B's (or 1.5B's) shape — hidden size, layers, heads,
grouped KV heads, MLP width — randomly initialised (no download) with SmolLM2's tokenizer, held in bfloat16
(float16 on a GPU without bf16). Random weights train and decode at the same speed as trained ones; what they
say nothing about is quality.

- Training: the worker's path (workers/training: packed rows, logits only where a label is) against
  `transformers.Trainer` + `get_peft_model` with a padding collator (as the PEFT docs teach), the same LoRA
  (rank 8 on the seven projections), steps, batch size and examples (examples/length_spread.jsonl), each in
  this process one after the other; tokens per second count real (non-padding) tokens, the first steps
  (CUDA start-up, kernel choice) included for both.
- Serving: the engine's continuous batch (base only, 8 and 32 rows each with its own LoRA adapter) against
  PEFT's `generate` with `adapter_names` (its mixed batch) and plain `generate`, greedy, the same prompts and
  token counts; generated tokens per second, median of the repeats after a warm-up.
- With --quantization, the base's projections are quantised by bitsandbytes (QLoRA) for our path and PEFT's.

`--shape tiny --device cpu` runs the same code on a 2-layer model on a CPU in under a minute (a smoke test of
the script, not a measurement). Prints a table, then one JSON line; --save writes bench/results/gpu_check.*.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import RESULTS, hardware, md_table, median, ratio, rounded

# Llama-architecture shapes of the Qwen2.5 models (grouped KV heads, tied embeddings), with SmolLM2's vocabulary.
SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "tie_word_embeddings": True},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": True},
}
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(message: str) -> None:
    print(f"[gpu-check] {message}", flush=True)


def tokenizer_source(given: str | None) -> str:
    """A folder holding SmolLM2's tokenizer: `given`, or the packaged default model (converted when needed)."""
    if given:
        return given
    from app.services import base_models
    from app.settings import DEFAULT_BASE_MODEL, Settings

    settings = Settings()
    return base_models.local_path(settings, base_models.resolve(settings, DEFAULT_BASE_MODEL))


def build_model(folder: Path, shape: str, tokenizer_path: str, dtype: str) -> int:
    """A random model of `shape` saved at `folder` with the tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         max_position_embeddings=4096, **SHAPES[shape])
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- training


@contextlib.contextmanager
def profiled(name: str, enabled: bool, device: str, steps: int) -> Iterator[None]:
    """With --profile: torch.profiler around one path's training; the top operations by device time (self CPU time
    on a CPU) go to bench/results/gpu_check_profile_<name>.txt, with the kernels launched per step, which says
    whether a path is bound by launches rather than by arithmetic."""
    if not enabled:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        yield
    synchronize(device)
    events = prof.key_averages()
    kernels = sum(e.count for e in events if on_gpu and e.device_type == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total", row_limit=25)
    text = f"{name}: {steps} steps, {kernels / max(steps, 1):.0f} device kernels per step\n\n{table}\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gpu_check_profile_{name}.txt").write_text(text)
    log(f"profile of {name}: {kernels / max(steps, 1):.0f} device kernels per step")


def train_ours(path: str, device: str, dtype: str, quantization: str | None, steps: int, batch_size: int
               ) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from adapters.base_models import base_info, load_model
    from adapters.methods import METHODS
    from app.settings import Settings
    from bench.training import LEARNING_RATE, SEED, load_examples
    from workers.training.loop import TrainingCallbacks, TrainingConfig, TrainingRecipe

    tokenizer = AutoTokenizer.from_pretrained(path)
    examples, _valid = load_examples(tokenizer)
    method = METHODS["lora"]
    raw = {"batch_size": batch_size, "max_steps": steps, "n_epochs": 50, "max_seq_length": 4096,
           "learning_rate": LEARNING_RATE, **LORA}
    hp = method.resolve(raw, n_examples=len(examples), settings=Settings(), base_info=base_info(path))
    losses: list[float] = []
    base = load_model(path, device=device, dtype=dtype, quantization=quantization)
    synchronize(device)
    started = time.perf_counter()
    config = TrainingConfig(method=method, hyperparameters=hp, seed=SEED, pad_id=tokenizer.pad_token_id,
                            compute_dtype=dtype)
    callbacks = TrainingCallbacks(on_metrics=lambda m: losses.append(m["train_loss"]))
    _model, result = TrainingRecipe(config, base_model=base, train_examples=examples, callbacks=callbacks).run()
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    del base, _model
    free_memory(device)
    return {"seconds": seconds, "tokens": result.trained_tokens, "tok_s": result.trained_tokens / seconds,
            "first_loss": losses[0], "last_loss": losses[-1], "peak_gib": peak}


def train_hf(path: str, device: str, dtype: str, quantization: str | None, steps: int, batch_size: int
             ) -> dict[str, Any]:
    """Trainer + get_peft_model + a padding collator, in the same dtype (bf16/fp16 mixed precision)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from adapters.base_models import load_model
    from bench.training import LEARNING_RATE, SEED, load_examples

    tokenizer = AutoTokenizer.from_pretrained(path)
    examples, _valid = load_examples(tokenizer)
    features = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                 "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask, strict=True)]}
                for e in examples]
    base = load_model(path, device=device, dtype=dtype, quantization=quantization)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=TARGETS, bias="none",
                                            **LORA))
    tokens = {"real": 0}
    losses: list[float] = []

    class Count(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class Counting(Trainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            tokens["real"] += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    on_gpu = device.startswith("cuda")
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="adaptery-gpu-check-hf-"),
                             per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=LEARNING_RATE,
                             lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=not on_gpu, bf16=on_gpu and dtype == "bfloat16",
                             fp16=on_gpu and dtype == "float16", dataloader_num_workers=0,
                             remove_unused_columns=False, seed=SEED, max_grad_norm=1.0,
                             disable_tqdm=True)
    trainer = Counting(model=model, args=args, train_dataset=features,
                       data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                       callbacks=[Count()])
    synchronize(device)
    started = time.perf_counter()
    trainer.train()
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    shutil.rmtree(args.output_dir, ignore_errors=True)
    del trainer, model, base
    free_memory(device)
    return {"seconds": seconds, "tokens": tokens["real"], "tok_s": tokens["real"] / seconds,
            "first_loss": losses[0], "last_loss": losses[-1], "peak_gib": peak}


# ---------------------------------------------------------------- serving


def random_adapters(model: Any, folder: Path, count: int) -> list[Path]:
    """`count` random rank-8 LoRA adapters (A and B non-zero, so each moves the logits), saved by PEFT."""
    import math

    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(target_modules=TARGETS, init_lora_weights=False,
                                                  task_type="CAUSAL_LM", **LORA))
    params = [(n, p) for n, p in peft_model.named_parameters() if ".lora_" in n]
    paths = []
    for i in range(count):
        generator = torch.Generator(device=params[0][1].device).manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in params:
                std = 1 / math.sqrt(param.shape[1]) if ".lora_A." in name else 0.1 / math.sqrt(param.shape[1])
                param.normal_(0.0, std, generator=generator)
        paths.append(folder / f"adapter-{i:02d}")
        peft_model.save_pretrained(str(paths[-1]), safe_serialization=True)
    peft_model.unload()
    return paths


def serve(path: str, device: str, dtype: str, quantization: str | None, folder: Path, max_tokens: int,
          prompt_len: int, repeats: int) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, GenerationConfig

    from adapters.base_models import load_model
    from adapters.engine import AdapterRef, BaseRuntime, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(path)
    engine_model = load_model(path, device=device, dtype=dtype, quantization=quantization)
    peft_base = load_model(path, device=device, dtype=dtype, quantization=quantization)
    paths = random_adapters(peft_base, folder, 32)
    log("serving: 32 adapters made")
    runtime = BaseRuntime(engine_model, tokenizer, cache_size=32, max_rank=64, max_batch=32)
    loaded = [runtime.adapters.load(AdapterRef(key=f"a{i}", folder=p, base_model="gpu-check"))
              for i, p in enumerate(paths)]
    for adapter in loaded:
        runtime.activate(adapter)
    peft_model = PeftModel.from_pretrained(peft_base, str(paths[0]), adapter_name="a0")
    for i in range(1, 32):
        peft_model.load_adapter(str(paths[i]), adapter_name=f"a{i}")
    peft_model.eval()
    log("serving: engine and PEFT ready")

    rng = random.Random(7)
    vocab = list(range(1000, 20000))
    prompts = [[rng.choice(vocab) for _ in range(prompt_len)] for _ in range(32)]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    def engine(rows: list[list[int]], adapters: list[Any], n: int) -> tuple[int, float, list[list[int]]]:
        started = time.perf_counter()
        with runtime.wakeup:
            sequences = [runtime.submit(p, a, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
                         for p, a in zip(rows, adapters, strict=True)]
        done = [s.wait() for s in sequences]
        return sum(len(g.token_ids) for g in done), time.perf_counter() - started, [g.token_ids for g in done]

    def hf(model: Any, rows: list[list[int]], n: int, names: list[str] | None) -> tuple[int, float, list[list[int]]]:
        ids = torch.tensor(rows, device=device)
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad,
                                  eos_token_id=eos)
        extra = {"adapter_names": names} if names is not None else {}
        synchronize(device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 **extra)
        synchronize(device)
        elapsed = time.perf_counter() - started
        new = out[:, ids.shape[1]:].tolist()
        return sum(len(r) for r in new), elapsed, new

    def hf_plain(n: int) -> tuple[int, float, list[list[int]]]:
        with peft_model.disable_adapter():
            return hf(peft_model, p8, n, None)

    p8, p32 = prompts[:8], prompts
    names8 = [f"a{i}" for i in range(8)]
    names32 = [f"a{i}" for i in range(32)]
    cases = {
        "base8": lambda n: engine(p8, [None] * 8, n),
        "mixed8": lambda n: engine(p8, loaded[:8], n),
        "base32": lambda n: engine(p32, [None] * 32, n),
        "mixed32": lambda n: engine(p32, loaded, n),
        "peft_base8": lambda n: runtime.call(lambda: hf_plain(n)),
        "peft_mixed8": lambda n: runtime.call(lambda: hf(peft_model, p8, n, names8)),
        "peft_mixed32": lambda n: runtime.call(lambda: hf(peft_model, p32, n, names32)),
    }

    for name, fn in cases.items():  # warm-up: allocator, kernel choice, lazy initialisation
        warm = time.perf_counter()
        fn(4)
        log(f"serving: {name} warmed up in {time.perf_counter() - warm:.1f}s")
    rates: dict[str, list[float]] = {k: [] for k in cases}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for name, fn in cases.items():
            tokens, seconds, rows = fn(max_tokens)
            rates[name].append(tokens / seconds)
            outputs[name] = rows
        log("serving: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))
    runtime.close()
    # Honesty: the adapters change the answers, and the engine's mixed batch answers as PEFT's does (greedy, in
    # bf16 two correct implementations may part after a near-tie, so this counts rows that agree on the first 8).
    check = {
        "mixed8_rows_differing_from_base": sum(a != b for a, b in zip(outputs["mixed8"], outputs["base8"],
                                                                      strict=True)),
        "mixed8_rows_agreeing_with_peft_first8": sum(a[:8] == b[:8] for a, b in zip(
            outputs["mixed8"], outputs["peft_mixed8"], strict=True)),
    }
    return {"tok_s": {k: median(v) for k, v in rates.items()}, "tok_s_all": rates, "check": check}


# ---------------------------------------------------------------- the run


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def ratios(training: dict[str, Any], s: dict[str, float]) -> dict[str, float]:
    out = {}
    if training:
        out["train ours/hf_peft"] = ratio(training["ours"]["tok_s"], training["hf_peft"]["tok_s"])
    if s:
        out.update({"mixed8/base8": ratio(s["mixed8"], s["base8"]), "mixed32/base32": ratio(s["mixed32"], s["base32"]),
                    "mixed8/peft_mixed8": ratio(s["mixed8"], s["peft_mixed8"]),
                    "mixed32/peft_mixed32": ratio(s["mixed32"], s["peft_mixed32"])})
    return out


def render(r: dict[str, Any]) -> str:
    t, s = r["training"], r["serving"]["tok_s"]
    train_rows = [[name, f"{t[name]['tok_s']:.0f}", f"{t[name]['seconds']:.1f}", f"{t[name]['peak_gib']:.2f}",
                   f"{t[name]['first_loss']:.2f} → {t[name]['last_loss']:.2f}"] for name in t]
    serve_rows = [[name, f"{s[name]:.0f}"] for name in s]
    ratios = r["ratios"]
    return "\n".join([
        f"GPU check: {r['shape']} ({r['parameters'] / 1e6:.0f}M parameters), {r['dtype']}"
        + (f", {r['quantization']}" if r["quantization"] else "") + f", on {r['device_name']}",
        "", f"Training: LoRA r=8 on 7 projections, {r['steps']} steps of {r['batch_size']} examples", "",
        md_table(["path", "tokens/s", "seconds", "peak GiB", "train loss"], train_rows), "",
        f"Serving: greedy, {r['prompt_len']}-token prompts, {r['max_tokens']} new tokens per row, "
        f"median of {r['repeats']}", "",
        md_table(["case", "generated tokens/s"], serve_rows), "",
        md_table(["ratio", "value"], [[k, f"{v:.2f}"] for k, v in ratios.items()]), "",
        f"checks: {json.dumps(r['serving']['check'])}",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quantization", choices=["4bit", "8bit"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="profile each training path (bench/results/gpu_check_profile_*.txt)")
    parser.add_argument("--parts", default="training,serving", help="what to measure: training, serving or both")
    parser.add_argument("--tokenizer", help="a folder with SmolLM2's tokenizer (default: the packaged model's)")
    parser.add_argument("--save", action="store_true", help="write bench/results/gpu_check*")
    a = parser.parse_args(argv)

    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "`--shape tiny --device cpu` runs the script's code on a CPU")
    from adapters.compute import serving_dtype

    dtype = serving_dtype(a.device)
    if not a.device.startswith("cuda"):
        dtype = "float32"
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="adaptery-gpu-check-"))
    try:
        parameters = build_model(folder / "model", a.shape, tokenizer_source(a.tokenizer), dtype)
        path = str(folder / "model")
        log(f"built a {a.shape} model ({parameters / 1e6:.0f}M parameters) in {time.perf_counter() - started:.0f}s")
        training: dict[str, Any] = {}
        serving: dict[str, Any] = {"tok_s": {}, "check": {}}
        for name, fn in (("ours", train_ours), ("hf_peft", train_hf)) if "training" in a.parts else ():
            with profiled(name, a.profile, a.device, a.steps):
                training[name] = fn(path, a.device, dtype, a.quantization, a.steps, a.batch_size)
            log(f"training {name}: {training[name]['tok_s']:.0f} tokens/s in {training[name]['seconds']:.1f}s")
        if "serving" in a.parts:
            serving = serve(path, a.device, dtype, a.quantization, folder / "adapters", a.max_tokens, a.prompt_len,
                            a.repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    s = serving["tok_s"]
    result = {
        "shape": a.shape, "parameters": parameters, "dtype": dtype, "quantization": a.quantization,
        "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "steps": a.steps, "batch_size": a.batch_size, "max_tokens": a.max_tokens, "prompt_len": a.prompt_len,
        "repeats": a.repeats, "training": training, "serving": serving,
        "ratios": ratios(training, s),
        "hardware": hardware(), "seconds": time.perf_counter() - started,
    }
    table = render(result)
    print(table)
    if a.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = "gpu_check" + (f"_{a.shape}" if a.shape != "0.5b" else "") + (f"_{a.quantization}" if a.quantization
                                                                                else "")
        (RESULTS / f"{stem}.json").write_text(json.dumps(rounded(result), indent=2) + "\n")
        (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(json.dumps(rounded(result)))


if __name__ == "__main__":
    main()
