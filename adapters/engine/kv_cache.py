"""The running batch's key/value cache: left-padded rows that grow in place, re-laid out only when rows
join or leave (transformers' DynamicCache concatenates, copying the whole cache, on every step)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends each step's keys/values into spare capacity instead of concatenating.

    DynamicLayer copies the whole cache on every step (torch.cat); here a step writes one column and the
    layer exposes a view of the filled part. Capacity doubles when it runs out.
    """

    def install(self, keys: torch.Tensor, values: torch.Tensor, spare: int) -> None:
        self.lazy_initialization(keys, values)
        self._keys = self._with_room(keys, keys.shape[2] + spare)
        self._values = self._with_room(values, values.shape[2] + spare)
        self.keys, self.values = self._keys[:, :, : keys.shape[2]], self._values[:, :, : values.shape[2]]

    @staticmethod
    def _with_room(t: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3])
        buffer[:, :, : t.shape[2]].copy_(t)
        return buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys, self.values
        assert keys is not None and values is not None, "install() first"
        length, new = keys.shape[2], key_states.shape[2]
        if length + new > self._keys.shape[2]:
            capacity = 2 * (length + new)
            self._keys, self._values = self._with_room(keys, capacity), self._with_room(values, capacity)
        self._keys[:, :, length: length + new].copy_(key_states)
        self._values[:, :, length: length + new].copy_(value_states)
        self.keys, self.values = self._keys[:, :, : length + new], self._values[:, :, : length + new]
        return self.keys, self.values


class BatchCache:
    """The running batch's KV cache: per layer [rows, kv_heads, length, head_dim], left-padded.

    The same cache object serves step after step (the model appends to it in place, see GrowingLayer);
    it is rebuilt only when rows join or leave.
    """

    SPARE = 64  # columns of room for the next decode steps

    def __init__(self, config: Any):
        self.config = config
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [rows, length], 1 for real entries
        self._cache: Any = None

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def as_dynamic_cache(self) -> Any:
        if self._cache is None:
            cache = DynamicCache(config=self.config)
            for index, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
                layer = GrowingLayer()
                layer.install(k, v, self.SPARE)
                cache.layers[index] = layer
            self._cache = cache
        return self._cache

    def absorb(self, cache: Any) -> None:
        """Take the tensors back from the DynamicCache after a forward step appended to it."""
        self._cache = cache
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor | None = None) -> None:
        """Append rows ([n, kv_heads, len, head_dim] per layer, `mask` [n, len] marking real entries;
        all real when None), padding on the left."""
        self._cache = None
        new_len = keys[0].shape[2]
        new_mask = mask if mask is not None else torch.ones(keys[0].shape[0], new_len, dtype=torch.long,
                                                            device=keys[0].device)
        if self.mask is None:
            self.keys, self.values, self.mask = list(keys), list(values), new_mask
            return
        length = self.mask.shape[1]
        width = max(length, new_len)

        def pad(t: torch.Tensor, to: int) -> torch.Tensor:
            if t.shape[2] == to:
                return t
            return torch.cat([t.new_zeros(t.shape[0], t.shape[1], to - t.shape[2], t.shape[3]), t], dim=2)

        def pad_mask(m: torch.Tensor, to: int) -> torch.Tensor:
            return m if m.shape[1] == to else torch.cat([m.new_zeros(m.shape[0], to - m.shape[1]), m], dim=1)

        self.keys = [torch.cat([pad(a, width), pad(b, width)]) for a, b in zip(self.keys, keys, strict=True)]
        self.values = [torch.cat([pad(a, width), pad(b, width)]) for a, b in zip(self.values, values, strict=True)]
        self.mask = torch.cat([pad_mask(self.mask, width), pad_mask(new_mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, and drop leading columns that are padding in every remaining row."""
        self._cache = None
        if not rows:
            self.keys, self.values, self.mask = [], [], None
            return
        assert self.mask is not None
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = mask[:, start:]
        self.keys = [k.index_select(0, index)[:, :, start:] for k in self.keys]
        self.values = [v.index_select(0, index)[:, :, start:] for v in self.values]
