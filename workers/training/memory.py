"""How much of a training step fits in memory at once: the micro-batches a step's examples are split into.

The batch size is a hyperparameter (it changes what the model learns), so it is chosen from the data
(adapters.methods.base.auto_batch_size) and is the same on every machine. Memory only decides how a step's
examples are split into forward/backward passes whose gradients add up to the step's (gradient
accumulation over micro-batches): a worker with little memory trains the same model in more passes.

The estimate per pass is what the backward pass keeps alive, counted from the model's config:
- per token and layer, the activations autograd saves for a frozen Llama-style decoder layer with adapters
  on every projection: the layer inputs and norms, q/k/v and the attention output (8·hidden + 4·kv width)
  and the MLP's gate, up, activation and product (4·intermediate), in the compute dtype (2 bytes for bf16,
  4 for fp32); with gradient checkpointing only each layer's input is kept, plus one layer recomputed;
- per labelled token, the fp32 logits over the vocabulary, their softmax and its gradient (3·vocab·4);
- times 2 for the backward pass's transient buffers and the allocator's slack. Calibrated on SmolLM2-135M
  (one LoRA step, 1,159 and 3,417 tokens, growth of peak RSS): 1.24 MB per token in bf16 and 2.25 MB in
  fp32 measured, 1.35 and 2.7 MB estimated (a factor of 1.5 would have been about 10 % short).
The memory at hand is what the device has free when the job starts (CUDA: free device memory; CPU: the
system's available memory), times `training_memory_fraction`, or `training_memory_mb` when set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from adapters.data import EncodedExample, PreferencePair
from workers.training.batches import labelled_count, token_count

# A supervised example, or a preference pair (whose two sequences always share a pass).
Example = TypeVar("Example", EncodedExample, PreferencePair)

SAFETY = 2.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    bytes_per_token: int
    bytes_per_label: int

    def cost(self, example: EncodedExample | PreferencePair, max_len: int) -> int:
        tokens = token_count(example, max_len)
        labels = labelled_count(example, max_len)
        return tokens * self.bytes_per_token + labels * self.bytes_per_label

    def split(self, examples: list[Example], max_len: int) -> list[list[Example]]:
        """The examples in order, cut into runs whose estimated cost fits the budget (an example that alone
        exceeds it is a micro-batch of its own)."""
        parts: list[list[Example]] = [[]]
        used = 0
        for example in examples:
            cost = self.cost(example, max_len)
            if parts[-1] and used + cost > self.budget_bytes:
                parts.append([])
                used = 0
            parts[-1].append(example)
            used += cost
        return parts

    def describe(self) -> str:
        tokens = self.budget_bytes // max(1, self.bytes_per_token)
        return (f"{self.budget_bytes / MIB:.0f} MiB for activations, about {tokens} tokens per forward/backward "
                f"pass (estimated {self.bytes_per_token / 1024:.0f} KiB per token, "
                f"{self.bytes_per_label / 1024:.0f} KiB per labelled token)")


def bytes_per_token(config: Any, *, dtype_bytes: int, gradient_checkpointing: bool) -> int:
    """Activation bytes the backward pass keeps per token (see the module doc)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_width = hidden // heads * getattr(config, "num_key_value_heads", heads)
    per_layer = 8 * hidden + 4 * kv_width + 4 * getattr(config, "intermediate_size", 4 * hidden)
    values = hidden * layers + per_layer if gradient_checkpointing else per_layer * layers
    return int(values * dtype_bytes * SAFETY)


def bytes_per_label(config: Any) -> int:
    return int(3 * config.vocab_size * 4 * SAFETY)


def memory_at_hand(device: Any) -> int:
    """Free bytes on the device the job trains on."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def plan_memory(config: Any, *, device: Any, compute_dtype: str, gradient_checkpointing: bool,
                limit_mb: int | None, fraction: float) -> MemoryPlan:
    budget = limit_mb * MIB if limit_mb else int(memory_at_hand(device) * fraction)
    dtype_bytes = 2 if compute_dtype in ("bfloat16", "float16") else 4
    return MemoryPlan(budget_bytes=budget,
                      bytes_per_token=bytes_per_token(config, dtype_bytes=dtype_bytes,
                                                      gradient_checkpointing=gradient_checkpointing),
                      bytes_per_label=bytes_per_label(config))
