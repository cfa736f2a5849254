"""Training attention on CPU: PyTorch's bf16 scaled-dot-product attention against the same bf16 inputs attended in
float32 (cast up, attended, cast back), forward and backward, one example of each length, at the default base
model's head shapes. This decides workers.training.batches.CPU_FP32_ATTENTION_MAX_TOKENS.

    python -m bench.attention [--threads 1] [--save]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.common import RESULTS, hardware, md_table, median, rounded

LENGTHS = (16, 32, 64, 128, 192, 256, 320, 384, 512, 768)
REPEATS = 5  # timed rounds per case (median), each of ROUND calls
ROUND = 10


def case_ms(length: int, *, float32: bool, heads: int, kv_heads: int, head_dim: int) -> float:
    """Median milliseconds of one causal attention call, forward and backward, on bf16 inputs of `length`."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, n, length, head_dim, generator=generator, dtype=torch.bfloat16).requires_grad_()
               for n in (heads, kv_heads, kv_heads))

    def call() -> None:
        inputs = (q.float(), k.float(), v.float()) if float32 else (q, k, v)
        out = F.scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=heads != kv_heads)
        out.to(torch.bfloat16).sum().backward()

    for _ in range(3):
        call()
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(ROUND):
            call()
        times.append((time.perf_counter() - started) / ROUND * 1e3)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a training process has one by default)")
    parser.add_argument("--save", action="store_true", help="write bench/results/attention.json and .md")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from bench.training import model_path

    torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(model_path())
    shape = {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
             "head_dim": config.hidden_size // config.num_attention_heads}
    rows: list[dict[str, Any]] = []
    for length in LENGTHS:
        bf16 = case_ms(length, float32=False, **shape)
        fp32 = case_ms(length, float32=True, **shape)
        rows.append({"tokens": length, "bf16_ms": bf16, "fp32_on_bf16_inputs_ms": fp32, "ratio": fp32 / bf16})
    table = md_table(["tokens", "bf16 SDPA ms", "float32 SDPA on bf16 inputs ms", "float32 / bf16"],
                     [[r["tokens"], f"{r['bf16_ms']:.2f}", f"{r['fp32_on_bf16_inputs_ms']:.2f}", f"{r['ratio']:.2f}"]
                      for r in rows])
    info = hardware()
    text = (f"## Training attention on CPU ({info['cpu_model']}, {args.threads} torch thread(s), torch "
            f"{info['torch']})\n\nOne causal attention call, forward and backward, at the default base model's heads "
            f"({shape['heads']} query, {shape['kv_heads']} key/value, {shape['head_dim']} wide); median of "
            f"{REPEATS} rounds of {ROUND} calls.\n\n{table}\n")
    print(text)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "attention.md").write_text(text)
        (RESULTS / "attention.json").write_text(json.dumps(rounded({"hardware": info, "threads": args.threads,
                                                                    "shape": shape, "rows": rows}), indent=2))


if __name__ == "__main__":
    main()
