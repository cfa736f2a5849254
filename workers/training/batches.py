"""Training batches that spend no compute on padding or on positions without a label.

Methods whose adapter lives in the weights (LoRA, AdaLoRA, IA³) get *packed* batches: every example of
the batch in one row, one after another, position ids restarting at each example, and attention that
stays inside each example (`packed_attention`, registered with transformers as an attention
implementation: causal scaled-dot-product attention per example, so no token attends across a
boundary and no attention is computed for pairs that a mask would throw away; a family's sliding windows
and soft-capped scores are kept). Methods that put something in front of the input (prefix tuning's keys
and values, the virtual tokens of prompt tuning and P-tuning) cannot share one row between examples, so
they get right-padded rows as before.

Either way the language-model head and the loss run only at the positions whose next token carries
a label (`logits_to_keep`), which in chat data is a few tokens per example; the loss is the same mean
over labelled tokens the plain path computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)

from adapters.data import EncodedExample, PreferencePair

PACKED_ATTENTION = "adaptery_packed"
# On CPU, PyTorch's flash attention in bf16 takes 2-6x as long as its float32 kernel for a sequence of 16-128
# tokens, forward and backward (on an AMX Xeon, with the casts counted: bench/results/attention.md), and about as
# long at 256; chat examples are mostly that short. So an example up to this long attends in float32 on CPU.
CPU_FP32_ATTENTION_MAX_TOKENS = 256
# transformers' SDPA attention, with the same float32 rule (sdpa_attention), for rows that are not packed.
SDPA_ATTENTION = "adaptery_sdpa"


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example: `cu_seq_lens_q` holds the examples' boundaries in the
    row (the keyword transformers' variable-length attention uses). Returns [batch, tokens, heads, dim].

    A layer with a sliding window (Mistral, Gemma 2 and 3, Qwen with use_sliding_window) or soft-capped scores
    (Gemma 2) gets them too, as the family's own attention computes them: SDPA has neither, so those layers compute
    each example's scores explicitly."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        raise ValueError("packed attention needs cu_seq_lens_q (the examples' boundaries in the row)")
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    dropout_p = dropout if module.training else 0.0
    pieces = []
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if (window is None or end - start <= window) and softcap is None:
            half = half_attention_on_cpu(query, end - start)
            if half is not None:
                with torch.autocast("cpu", enabled=False):
                    pieces.append(F.scaled_dot_product_attention(
                        q.float(), k.float(), v.float(), is_causal=True, scale=scaling, enable_gqa=gqa,
                        dropout_p=dropout_p).to(half))
                continue
            pieces.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa,
                                                         dropout_p=dropout_p))
        else:
            pieces.append(_explicit_attention(q, k, v, scaling=scaling, window=window, softcap=softcap,
                                              dropout_p=dropout_p))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def half_attention_on_cpu(query: torch.Tensor, keys: int) -> torch.dtype | None:
    """The half precision that attention over `keys` keys would run in on CPU (the query's own, or autocast's), where
    it should run in float32 instead (CPU_FP32_ATTENTION_MAX_TOKENS); None where it runs as it is."""
    if query.device.type != "cpu" or keys > CPU_FP32_ATTENTION_MAX_TOKENS:
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention, in float32 where half_attention_on_cpu says: the padded rows of the methods that
    cannot pack (their virtual tokens and prefixes included in the keys)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    half = half_attention_on_cpu(query, key.shape[2])
    if half is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(half), weights


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float | None,
                        window: int | None, softcap: float | None, dropout_p: float) -> torch.Tensor:
    """One example's causal attention as transformers' eager attention computes it: scores scaled, soft-capped
    (tanh), masked to the causal window (a key at most `window - 1` positions back), softmax in float32."""
    if k.shape[1] != q.shape[1]:  # grouped queries: each key/value head serves several query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    n = q.shape[2]
    position = torch.arange(n, device=q.device)
    distance = position[:, None] - position[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = F.dropout(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype), p=dropout_p)
    return weights @ v


def register_attention(implementation: str) -> None:
    """Make PACKED_ATTENTION or SDPA_ATTENTION known to transformers in this process (idempotent; any other name is
    transformers' own)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if implementation == PACKED_ATTENTION:
        AttentionInterface.register(PACKED_ATTENTION, packed_attention)  # its boundaries are its mask
    elif implementation == SDPA_ATTENTION:
        AttentionInterface.register(SDPA_ATTENTION, sdpa_attention)
        AttentionMaskInterface.register(SDPA_ATTENTION, sdpa_mask)


def available(model: Any, implementation: str) -> str:
    """`implementation`, or eager attention where it is SDPA and the family has no SDPA path (Gemma 2: SDPA cannot
    soft-cap)."""
    if implementation in ("sdpa", SDPA_ATTENTION) and not getattr(model, "_supports_sdpa", True):
        return "eager"
    return implementation


def use_attention(model: Any, implementation: str) -> None:
    """Switch a transformers model to `implementation` (registered first where it is ours), or to eager attention
    where the family cannot run it."""
    implementation = available(model, implementation)
    register_attention(implementation)
    model.set_attn_implementation(implementation)


def use_packed_attention(model: Any) -> None:
    """Switch a transformers model to packed attention."""
    use_attention(model, PACKED_ATTENTION)


@dataclass
class TrainingBatch:
    """Model inputs, where the loss is read, and what it should predict there."""

    inputs: dict[str, torch.Tensor]
    # Positions whose logits the loss needs, as transformers' `logits_to_keep` takes them (one index list
    # for every row), and for each label the row and the index into that list.
    keep: torch.Tensor
    label_rows: torch.Tensor
    label_index: torch.Tensor
    targets: torch.Tensor
    real_tokens: int
    # The example (its index in the list the batch was made from) each label belongs to: sequence log-probabilities.
    label_example: torch.Tensor

    def to(self, device: torch.device | str) -> TrainingBatch:
        return TrainingBatch({k: v.to(device) for k, v in self.inputs.items()}, self.keep.to(device),
                             self.label_rows.to(device), self.label_index.to(device), self.targets.to(device),
                             self.real_tokens, self.label_example.to(device))


def labelled_count(example: EncodedExample | PreferencePair, max_len: int) -> int:
    """How many labels the example (a pair: both its sequences) has within max_len (as many as _labels returns)."""
    if isinstance(example, PreferencePair):
        return labelled_count(example.chosen, max_len) + labelled_count(example.rejected, max_len)
    return sum(example.loss_mask[1:max_len])


def token_count(example: EncodedExample | PreferencePair, max_len: int) -> int:
    """The tokens a forward pass reads for the example (a pair: both its sequences), each cut to max_len."""
    if isinstance(example, PreferencePair):
        return token_count(example.chosen, max_len) + token_count(example.rejected, max_len)
    return min(len(example.input_ids), max_len)


def _labels(example: EncodedExample, max_len: int) -> tuple[list[int], list[int]]:
    """(positions, targets): the logits at position t - 1 predict trained token t."""
    ids, mask = example.input_ids[:max_len], example.loss_mask[:max_len]
    positions = [t - 1 for t in range(1, len(ids)) if mask[t]]
    return positions, [ids[t + 1] for t in positions]


def packed_batch(examples: list[EncodedExample], *, max_len: int) -> TrainingBatch:
    """Every example in one row, without padding; attention stays within each example."""
    ids: list[int] = []
    positions: list[int] = []
    bounds = [0]
    keep: list[int] = []
    targets: list[int] = []
    owners: list[int] = []
    for index, example in enumerate(examples):
        start = len(ids)
        tokens = example.input_ids[:max_len]
        ids += tokens
        positions += range(len(tokens))
        bounds.append(len(ids))
        label_positions, label_targets = _labels(example, max_len)
        keep += [start + p for p in label_positions]
        targets += label_targets
        owners += [index] * len(label_targets)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    inputs = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
              "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": torch.tensor(longest),
              "max_length_k": torch.tensor(longest)}
    return TrainingBatch(inputs=inputs, keep=torch.tensor(keep), label_rows=torch.zeros(len(keep), dtype=torch.long),
                         label_index=torch.arange(len(keep)), targets=torch.tensor(targets), real_tokens=len(ids),
                         label_example=torch.tensor(owners, dtype=torch.long))


def padded_batch(examples: list[EncodedExample], *, max_len: int, pad_id: int, offset: int = 0) -> TrainingBatch:
    """Right-padded rows (for methods that put something in front of each example's input); `offset` is
    how many positions such a method adds in front of the input (virtual tokens)."""
    rows = [e.input_ids[:max_len] for e in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labelled: list[tuple[int, int, int]] = []  # (row, position, target)
    for row, (tokens, example) in enumerate(zip(rows, examples, strict=True)):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
        label_positions, label_targets = _labels(example, max_len)
        labelled += [(row, p, t) for p, t in zip(label_positions, label_targets, strict=True)]
    keep = sorted({p for _, p, _ in labelled})
    where = {p: i for i, p in enumerate(keep)}
    return TrainingBatch(
        inputs={"input_ids": input_ids, "attention_mask": attention},
        keep=torch.tensor([p + offset for p in keep]),
        label_rows=torch.tensor([r for r, _, _ in labelled]),
        label_index=torch.tensor([where[p] for _, p, _ in labelled]),
        targets=torch.tensor([t for _, _, t in labelled]), real_tokens=int(attention.sum()),
        label_example=torch.tensor([r for r, _, _ in labelled], dtype=torch.long))


def labelled_logits(model: Any, batch: TrainingBatch) -> torch.Tensor:
    """The logits that predict each label ([labels, vocabulary]), computed only at those positions."""
    logits = model(**batch.inputs, logits_to_keep=batch.keep, use_cache=False).logits
    return logits[batch.label_rows, batch.label_index]


def sequence_logps(logits: torch.Tensor, batch: TrainingBatch, sequences: int) -> torch.Tensor:
    """Each example's log-probability of its labelled tokens (summed over them), from `labelled_logits`."""
    token_logps = torch.gather(logits.float().log_softmax(-1), 1, batch.targets[:, None]).squeeze(1)
    return torch.zeros(sequences, device=token_logps.device).index_add(0, batch.label_example, token_logps)


def batch_loss(model: Any, batch: TrainingBatch, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the labelled tokens (mean, or sum for evaluation), computing logits only there."""
    return F.cross_entropy(labelled_logits(model, batch).float(), batch.targets, reduction=reduction)
