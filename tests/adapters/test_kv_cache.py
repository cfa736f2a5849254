"""The running batch's KV cache: rows joining and leaving keep every row's entries, left-padded with zeros under a
mask, and each change is one copy: the decode cache then adopts the buffers it left room in, and a decode step
appends in place. Both under inference mode (the engine's prefills and steps) and outside it (the scheduler's
reordering of rows), since a view made under inference mode does not record the tensor it views."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from adapters.engine.kv_cache import BatchCache

LAYERS, HEADS, DIM = 2, 3, 4
CONFIG = LlamaConfig(num_hidden_layers=LAYERS, hidden_size=HEADS * DIM * 2, num_attention_heads=HEADS * 2,
                     num_key_value_heads=HEADS)


def rows_of(length: int, rows: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, HEADS, length, DIM, generator=generator) for _ in range(LAYERS)]


MODES: dict[str, Callable[[], Any]] = {"inference mode": torch.inference_mode, "no grad": torch.no_grad}


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> Any:
    with MODES[request.param]():
        yield


@pytest.mark.usefixtures("mode")
def test_rows_join_left_padded_and_leave_with_their_entries() -> None:
    batch = BatchCache(CONFIG)
    long_keys, long_values = rows_of(7, 2, 1), rows_of(7, 2, 2)
    short_keys, short_values = rows_of(3, 1, 3), rows_of(3, 1, 4)
    batch.add(long_keys, long_values)
    batch.add(short_keys, short_values)
    assert batch.mask is not None and batch.mask.tolist()[2] == [0, 0, 0, 0, 1, 1, 1]
    for layer in range(LAYERS):
        assert torch.equal(batch.keys[layer][:2], long_keys[layer])
        assert torch.equal(batch.keys[layer][2:, :, 4:], short_keys[layer])
        assert torch.equal(batch.values[layer][2:, :, 4:], short_values[layer])
        assert bool((batch.keys[layer][2:, :, :4] == 0).all())  # padding is finite: zeros under the mask
    batch.keep([2, 0])  # reordered; a long row still uses every column, so none is dropped
    assert batch.mask.tolist() == [[0, 0, 0, 0, 1, 1, 1], [1] * 7]
    assert torch.equal(batch.values[1][0, :, 4:], short_values[1][0])
    assert torch.equal(batch.keys[0][1], long_keys[0][0])
    batch.keep([0])  # only the short row: its leading padding columns go
    assert batch.mask.tolist() == [[1, 1, 1]] and torch.equal(batch.keys[0], short_keys[0])
    batch.keep([])
    assert batch.rows == 0 and batch.keys == []


@pytest.mark.usefixtures("mode")
def test_decode_steps_append_in_place_into_the_buffers_a_join_laid_out() -> None:
    batch = BatchCache(CONFIG)
    batch.add(rows_of(5, 2, 1), rows_of(5, 2, 2))
    batch.add(rows_of(3, 1, 3), rows_of(3, 1, 4))
    laid_out = batch.keys[0].data_ptr()
    cache = batch.as_dynamic_cache()
    assert cache.layers[0].keys.data_ptr() == laid_out  # adopted, not copied
    step = torch.ones(3, HEADS, 1, DIM)
    keys, _ = cache.layers[0].update(step, step)
    assert keys.shape[2] == 6 and keys.data_ptr() == laid_out and bool((keys[:, :, 5] == 1).all())
    batch.absorb(cache)
    assert batch.mask is not None
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones(3, 1)], dim=1)  # as the engine's step does
    batch.keep([0, 1])  # the last row leaves: the first rows (most of the buffer) stay where they are
    assert batch.keys[0].data_ptr() == laid_out and batch.keys[0].shape == (2, HEADS, 6, DIM)
    again = batch.as_dynamic_cache()
    assert again.layers[0].keys.data_ptr() == laid_out
    keys, _ = again.layers[0].update(2 * step[:2], 2 * step[:2])
    assert keys.shape[2] == 7 and bool((keys[:, :, 6] == 2).all()) and bool((keys[:, :, 5] == 1).all())


@pytest.mark.usefixtures("mode")
def test_a_few_rows_left_of_many_move_to_a_buffer_of_their_own() -> None:
    """Keeping the first row of four as a view would hold the whole four-row buffer for as long as it runs."""
    batch = BatchCache(CONFIG)
    keys = rows_of(5, 4, 1)
    batch.add(keys, rows_of(5, 4, 2))
    laid_out = batch.keys[0].data_ptr()
    batch.keep([0])
    assert batch.keys[0].data_ptr() != laid_out and torch.equal(batch.keys[0], keys[0][:1])
    assert batch.as_dynamic_cache().layers[0].keys.data_ptr() == batch.keys[0].data_ptr()
