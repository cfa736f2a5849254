"""How each serving kind reaches a row's forward pass, besides the slot bank (low-rank and scaling kinds):
a KV prefix becomes the first entries of the row's cache, virtual tokens become the first embeddings of
its prompt. Builds the inputs of one prefill pass for a group of rows, left-padded to a common width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from adapters.methods import ServingKind, ServingWeights


def kv_prefix_length(weights: ServingWeights | None) -> int:
    """Cache entries that sit before the prompt and are not part of the prefill input (prefix tuning)."""
    return weights.num_virtual_tokens if weights is not None and weights.kind is ServingKind.KV_PREFIX else 0


def virtual_token_count(weights: ServingWeights | None) -> int:
    """Embeddings the prefill input carries in front of the prompt (prompt tuning, P-tuning)."""
    return weights.num_virtual_tokens if weights is not None and weights.kind is ServingKind.VIRTUAL_TOKENS else 0


def kv_prefix_cache(weights: ServingWeights | None, device: torch.device, dtype: torch.dtype) -> DynamicCache:
    """A cache holding the adapter's prefix keys/values (empty for every other kind).

    Every layer keeps all its keys and values, sliding-window layers too (the model's mask applies the window): the
    running batch's cache (kv_cache.py) grows each row in place and needs every layer's entries to line up with the
    row's mask. A cache built from the config would keep only the last window of a sliding layer. The keys and
    values take the model's dtype (a bf16 model on a GPU): attention needs its query, keys and values in one."""
    cache = DynamicCache()
    if weights is not None and weights.kind is ServingKind.KV_PREFIX:
        positions = torch.arange(weights.num_virtual_tokens, device=device)
        for layer, (k, v) in enumerate(weights.kv_prefix):
            cache.update(k.unsqueeze(0).to(dtype), v.unsqueeze(0).to(dtype), layer,
                         cache_kwargs={"cache_position": positions})
    return cache


@dataclass
class PrefillInputs:
    """The model inputs for one prefill pass. Row i's prompt tokens are its last len(prompt_i) columns."""

    model_kwargs: dict[str, Any]
    mask: torch.Tensor  # [rows, kv_prefix + width]: 1 for real entries
    width: int  # input columns: the longest virtual tokens + prompt


def prefill_inputs(prompts: list[list[int]], adapters: list[ServingWeights | None], *, model: Any,
                   device: torch.device) -> PrefillInputs:
    """Left-padded inputs for rows that share a KV prefix (all the same adapter, or none of them have one).

    Rows with virtual tokens take embeddings instead of ids for the whole pass (the same numbers for
    the other rows: ids go through the same embedding table), so they batch with everything else.
    """
    prefix = kv_prefix_length(adapters[0])
    virtual = [virtual_token_count(a) for a in adapters]
    width = max(v + len(p) for v, p in zip(virtual, prompts, strict=True))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), prefix + width, dtype=torch.long)
    for row, (prompt, count) in enumerate(zip(prompts, virtual, strict=True)):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, prefix + width - len(prompt) - count:] = 1
        mask[row, :prefix] = 1
    ids, mask = ids.to(device), mask.to(device)
    kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix:],
                              "past_key_values": kv_prefix_cache(adapters[0], device, model.dtype)}
    if any(virtual):
        embeds = model.get_input_embeddings()(ids)
        for row, (prompt, count, weights) in enumerate(zip(prompts, virtual, adapters, strict=True)):
            if count:
                assert weights is not None and weights.virtual_tokens is not None
                start = width - len(prompt) - count
                embeds[row, start: start + count] = weights.virtual_tokens.to(embeds.dtype)
        kwargs["inputs_embeds"] = embeds
    else:
        kwargs["input_ids"] = ids
    return PrefillInputs(model_kwargs=kwargs, mask=mask, width=width)
