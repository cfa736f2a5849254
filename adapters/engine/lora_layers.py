"""Many LoRA adapters on one set of frozen projections, chosen per batch row.

Each hooked nn.Linear keeps preallocated adapter slots, stored transposed and contiguous as the
matmuls read them, Aᵀ [slots, in, r] and Bᵀ [slots, r, out], with the scale folded into B; loading an
adapter into a slot is an in-place copy. The base matmul runs
once for the whole batch; a forward hook then adds every row's low-rank correction with two
batched matmuls, whatever the mix of adapters. Which slot each row reads is decided once per step
(a RoutingPlan) and reused by every projection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class LoraFactors:
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float


@dataclass
class RoutingPlan:
    """How the rows of one forward pass map onto slots (slot 0 holds zeros: the base model).

    Built once per step and reused by every projection. The scheduler keeps rows sorted by slot,
    so a batch of distinct adapters usually covers consecutive slots and reads them as views.
    """

    single_slot: int | None = None  # every row uses this slot
    first_slot: int | None = None  # row i uses slot first_slot + i: slice views, no copy
    slots: torch.Tensor | None = None  # otherwise each row's slot, gathered per projection

    @staticmethod
    def build(row_slots: list[int], device: torch.device) -> RoutingPlan:
        if len(set(row_slots)) == 1:
            return RoutingPlan(single_slot=row_slots[0])
        first = row_slots[0]
        if first > 0 and row_slots == list(range(first, first + len(row_slots))):
            return RoutingPlan(first_slot=first)
        return RoutingPlan(slots=torch.tensor(row_slots, dtype=torch.long, device=device))


class SlotLinear:
    """The slot tensors and forward hook of one projection."""

    def __init__(self, module: nn.Linear, bank: LoraBank):
        self.module = module
        self.bank = bank
        # Transposed (x @ a_t, then @ b_t) and contiguous: a batched matmul over strided slices costs twice as much.
        self.a_t = torch.zeros(bank.n_slots, module.in_features, bank.rank, device=module.weight.device,
                               dtype=module.weight.dtype)
        self.b_t = torch.zeros(bank.n_slots, bank.rank, module.out_features, device=module.weight.device,
                               dtype=module.weight.dtype)
        self.handle = module.register_forward_hook(self._hook)

    def grow_rank(self, rank: int) -> None:
        a_t = self.a_t.new_zeros(self.a_t.shape[0], self.a_t.shape[1], rank)
        b_t = self.b_t.new_zeros(self.b_t.shape[0], rank, self.b_t.shape[2])
        a_t[:, :, : self.a_t.shape[2]] = self.a_t
        b_t[:, : self.b_t.shape[1]] = self.b_t
        self.a_t, self.b_t = a_t, b_t

    def _hook(self, _module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        plan = self.bank.plan
        if plan is None or plan.single_slot == 0 or not self.bank.occupied:
            return output
        x = args[0]  # [rows, tokens, in]
        # The projection's output is a fresh tensor nobody else holds yet: add in place.
        if plan.single_slot is not None:
            slot = plan.single_slot
            return output.add_((x @ self.a_t[slot]) @ self.b_t[slot])
        if plan.first_slot is not None:
            a_t = self.a_t[plan.first_slot: plan.first_slot + x.shape[0]]
            b_t = self.b_t[plan.first_slot: plan.first_slot + x.shape[0]]
        else:
            assert plan.slots is not None
            a_t, b_t = self.a_t.index_select(0, plan.slots), self.b_t.index_select(0, plan.slots)
        return output.baddbmm_(torch.bmm(x, a_t), b_t)


class LoraBank:
    """All hooked projections of one base model, with `n_slots - 1` adapter slots (slot 0: none)."""

    def __init__(self, model: nn.Module, module_suffixes: set[str], *, n_slots: int, rank: int = 8):
        self.n_slots = n_slots + 1
        self.rank = rank
        self.plan: RoutingPlan | None = None
        self.occupied: set[int] = set()
        self.device = next(model.parameters()).device
        self.modules: dict[str, SlotLinear] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in module_suffixes:
                self.modules[name] = SlotLinear(module, self)

    def check(self, factors: dict[str, LoraFactors]) -> None:
        """Raise KeyError/ValueError if these factors do not fit this base model (before any copy)."""
        missing = [name for name in factors if name not in self.modules]
        if missing:
            raise KeyError(f"adapter targets modules the base model does not have: {missing[:5]}")
        for name, f in factors.items():
            module = self.modules[name].module
            if f.a.shape[1] != module.in_features or f.b.shape[0] != module.out_features:
                raise ValueError(f"adapter weights for {name} have shapes {tuple(f.a.shape)}/{tuple(f.b.shape)}, "
                                 f"which do not fit the base projection {module.in_features}→{module.out_features}")

    def write(self, slot: int, factors: dict[str, LoraFactors]) -> None:
        """Copy an adapter into a slot, in place; projections it does not target get zeros."""
        self.check(factors)
        rank = max(f.a.shape[0] for f in factors.values())
        if rank > self.rank:
            for hooked in self.modules.values():
                hooked.grow_rank(rank)
            self.rank = rank
        with torch.no_grad():
            for name, hooked in self.modules.items():
                hooked.a_t[slot].zero_()
                hooked.b_t[slot].zero_()
                f = factors.get(name)
                if f is None:
                    continue
                r = f.a.shape[0]
                hooked.a_t[slot, :, :r].copy_(f.a.transpose(0, 1))
                hooked.b_t[slot, :r].copy_((f.b * f.scale).transpose(0, 1))
        self.occupied.add(slot)

    def clear(self, slot: int) -> None:
        with torch.no_grad():
            for hooked in self.modules.values():
                hooked.a_t[slot].zero_()
                hooked.b_t[slot].zero_()
        self.occupied.discard(slot)

    @contextmanager
    def route(self, row_slots: list[int]) -> Iterator[None]:
        previous = self.plan
        self.plan = RoutingPlan.build(row_slots, self.device)
        try:
            yield
        finally:
            self.plan = previous
