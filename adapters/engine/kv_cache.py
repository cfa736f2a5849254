"""The running batch's key/value cache: left-padded rows that grow in place, copied once when rows join or leave
(transformers' DynamicCache concatenates, copying the whole cache, on every step)."""

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

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take `keys`/`values` ([rows, kv_heads, capacity, head_dim], the first `length` columns filled) as the
        layer's buffers, without copying them."""
        self.lazy_initialization(keys, values)
        self._keys, self._values = keys, values
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys, self.values
        assert keys is not None and values is not None, "adopt() first"
        length, new = keys.shape[2], key_states.shape[2]
        if length + new > self._keys.shape[2]:
            capacity = 2 * (length + new)
            self._keys, self._values = _with_room(keys, capacity), _with_room(values, capacity)
        self._keys[:, :, length: length + new].copy_(key_states)
        self._values[:, :, length: length + new].copy_(value_states)
        self.keys, self.values = self._keys[:, :, : length + new], self._values[:, :, : length + new]
        return self.keys, self.values


def _with_room(t: torch.Tensor, capacity: int) -> torch.Tensor:
    buffer = t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3])
    buffer[:, :, : t.shape[2]].copy_(t)
    return buffer


class BatchCache:
    """The running batch's KV cache: per layer [rows, kv_heads, length, head_dim], left-padded.

    Each layer's tensor is a view of the first columns of a buffer with `SPARE` more columns of room (kept in
    `_rooms`), which the decode steps fill in place (see GrowingLayer). Rows joining or leaving are written once
    into new buffers, room included: with a long batch of another tenant's rows, each copy of the whole cache
    costs tens of milliseconds on a CPU, and a short request joins and leaves once each. (The buffers are kept
    explicitly: under inference mode, where the engine runs, a view does not record the tensor it views.)
    """

    SPARE = 64  # columns of room for the next decode steps

    def __init__(self, config: Any):
        self.config = config
        self.keys: list[torch.Tensor] = []  # views of the buffers: the filled columns
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [rows, length], 1 for real entries
        self._rooms: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, the buffers behind keys/values
        self._cache: Any = None

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def as_dynamic_cache(self) -> Any:
        if self._cache is None:
            cache = DynamicCache(config=self.config)
            for index, (k, (k_room, v_room)) in enumerate(zip(self.keys, self._rooms, strict=True)):
                layer = GrowingLayer()
                layer.adopt(k_room, v_room, k.shape[2])
                cache.layers[index] = layer
            self._cache = cache
        return self._cache

    def absorb(self, cache: Any) -> None:
        """Take the tensors back from the DynamicCache after a forward step appended to it."""
        self._cache = cache
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]
        self._rooms = [(layer._keys, layer._values) for layer in cache.layers]

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor | None = None) -> None:
        """Append rows ([n, kv_heads, len, head_dim] per layer, `mask` [n, len] marking real entries;
        all real when None), padding on the left."""
        self._cache = None
        new_len = keys[0].shape[2]
        new_mask = mask if mask is not None else torch.ones(keys[0].shape[0], new_len, dtype=torch.long,
                                                            device=keys[0].device)
        if self.mask is None:
            width, olds = new_len, [(None, None)] * len(keys)
        else:
            width, olds = max(self.mask.shape[1], new_len), list(zip(self.keys, self.values, strict=True))
        self._rooms = [(self._laid_out([k_old, k], width), self._laid_out([v_old, v], width))
                       for (k_old, v_old), k, v in zip(olds, keys, values, strict=True)]
        self.keys = [k_room[:, :, :width] for k_room, _ in self._rooms]
        self.values = [v_room[:, :, :width] for _, v_room in self._rooms]

        def pad_mask(m: torch.Tensor, to: int) -> torch.Tensor:
            return m if m.shape[1] == to else torch.cat([m.new_zeros(m.shape[0], to - m.shape[1]), m], dim=1)

        self.mask = new_mask if self.mask is None else torch.cat([pad_mask(self.mask, width),
                                                                  pad_mask(new_mask, width)])

    def _laid_out(self, parts: list[torch.Tensor | None], width: int) -> torch.Tensor:
        """A new buffer of `width` columns plus room holding the rows of `parts` (None: nothing), in order,
        right-aligned; the padding on their left is zeroed (masked out, but it must be finite)."""
        present = [t for t in parts if t is not None]
        first = present[0]
        buffer = first.new_empty(sum(t.shape[0] for t in present), first.shape[1], width + self.SPARE,
                                 first.shape[3])
        row = 0
        for part in present:
            pad = width - part.shape[2]
            if pad:
                buffer[row: row + part.shape[0], :, :pad].zero_()
            buffer[row: row + part.shape[0], :, pad:width].copy_(part)
            row += part.shape[0]
        return buffer

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, and drop leading columns that are padding in every remaining row."""
        self._cache = None
        if not rows:
            self.keys, self.values, self.mask, self._rooms = [], [], None, []
            return
        assert self.mask is not None
        held = self.mask.shape[0]
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = mask[:, start:]
        # The first rows, every column, and most of the buffer still in use: views of the same buffers.
        if rows == list(range(len(rows))) and start == 0 and 2 * len(rows) >= held:
            n = len(rows)
            self._rooms = [(k_room[:n], v_room[:n]) for k_room, v_room in self._rooms]
        else:
            self._rooms = [(self._rows_of(k[:, :, start:], index), self._rows_of(v[:, :, start:], index))
                           for k, v in zip(self.keys, self.values, strict=True)]
        length = self.keys[0].shape[2] - start
        self.keys = [k_room[:, :, :length] for k_room, _ in self._rooms]
        self.values = [v_room[:, :, :length] for _, v_room in self._rooms]

    def _rows_of(self, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """A new buffer with room holding rows `index` of `t`, in order."""
        buffer = t.new_empty(len(index), t.shape[1], t.shape[2] + self.SPARE, t.shape[3])
        if t.device.type == "cpu":  # one copy, row by row (a gather would allocate and copy twice)
            for i, row in enumerate(index.tolist()):
                buffer[i, :, : t.shape[2]].copy_(t[row])
        else:  # on a GPU one gather beats a kernel launch per row
            buffer[:, :, : t.shape[2]].copy_(t.index_select(0, index))
        return buffer
