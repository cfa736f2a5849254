"""Adapter slots on the frozen projections: many adapters on one base model, chosen per batch row.

Each hooked projection (an nn.Linear, or GPT-2's Conv1D: the same map with its weight stored [in, out])
keeps preallocated slots. Low-rank adapters (LoRA, AdaLoRA) are stored
transposed and contiguous as the matmuls read them, Aᵀ [slots, in, r] and Bᵀ [slots, r, out], with
the scale folded into B; channel-scaling adapters (IA³) are vectors, [slots, in] for a projection's
input and [slots, out] for its output (ones in every other slot). Loading an adapter into a slot is an
in-place copy. The base matmul runs once for the whole batch; hooks then scale each row's input or
output and add each row's low-rank correction with two batched matmuls, whatever the mix of adapters.
Which slot each row reads is decided once per step (a RoutingPlan) and reused by every projection.

Sibling projections that read the same input (q/k/v, gate/up) keep their A factors side by side in one
tensor, so the first of them to run makes one matmul for all (fewer, larger kernels: the factors are read
in one pass) and the others take their slice of its result.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters.methods import ChannelScale, LoraFactors, ServingKind, ServingWeights


@dataclass
class RoutingPlan:
    """How the rows of one forward pass map onto slots (slot 0 holds nothing: the base model).

    Built once per step and reused by every projection. The scheduler keeps rows sorted by slot,
    so a batch of distinct adapters usually covers consecutive slots and reads them as views.
    """

    single_slot: int | None = None  # every row uses this slot
    first_slot: int | None = None  # row i uses slot first_slot + i: slice views, no copy
    slots: torch.Tensor | None = None  # otherwise each row's slot, gathered per projection
    low_rank: bool = False  # some row's slot holds a low-rank adapter
    scaling: bool = False  # some row's slot holds channel scales

    @staticmethod
    def build(row_slots: list[int], device: torch.device, *, low_rank_slots: set[int],
              scaling_slots: set[int]) -> RoutingPlan:
        used = set(row_slots)
        low_rank, scaling = bool(used & low_rank_slots), bool(used & scaling_slots)
        if len(used) == 1:
            return RoutingPlan(single_slot=row_slots[0], low_rank=low_rank, scaling=scaling)
        first = row_slots[0]
        if first > 0 and row_slots == list(range(first, first + len(row_slots))):
            return RoutingPlan(first_slot=first, low_rank=low_rank, scaling=scaling)
        return RoutingPlan(slots=torch.tensor(row_slots, dtype=torch.long, device=device), low_rank=low_rank,
                           scaling=scaling)

    def rows_of(self, per_slot: torch.Tensor, rows: int) -> torch.Tensor:
        """`per_slot` [slots, ...] read for each row: [1, ...] (one slot), a view, or a gather."""
        if self.single_slot is not None:
            return per_slot[self.single_slot: self.single_slot + 1]
        if self.first_slot is not None:
            return per_slot[self.first_slot: self.first_slot + rows]
        assert self.slots is not None
        return per_slot.index_select(0, self.slots)


# Projections of one parent module that read the same input in the model families served.
SHARED_INPUT_SIBLINGS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"}))


def is_projection(module: nn.Module) -> bool:
    """A module the slot bank can hook: y = x·Wᵀ + b over the last dimension."""
    return isinstance(module, nn.Linear | Conv1D)


def projection_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a projection; Conv1D stores its weight [in, out]."""
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    assert isinstance(module, nn.Linear)
    return module.in_features, module.out_features


class SharedDown:
    """The A factors of sibling projections that read the same input, side by side: [slots, in, members·r].

    A member that runs with a new input (or a new routing plan) multiplies it by all the factors at once and
    keeps the product; the siblings that follow with the same input tensor take their slice of it. A sibling
    whose input is another tensor (an input scale made a new one) multiplies its own input afresh: the result
    is right whatever the model does, only the saving is lost.
    """

    def __init__(self, n_members: int, n_slots: int, in_features: int, rank: int, device: torch.device,
                 dtype: torch.dtype):
        self.n_members = n_members
        self.rank = rank
        self.a_t = torch.zeros(n_slots, in_features, n_members * rank, device=device, dtype=dtype)
        self._input: torch.Tensor | None = None
        self._plan: RoutingPlan | None = None
        self._product: torch.Tensor | None = None
        self._served = 0

    def member(self, index: int) -> torch.Tensor:
        """One member's Aᵀ [slots, in, r] (a view)."""
        return self.a_t[:, :, index * self.rank: (index + 1) * self.rank]

    def grow_rank(self, rank: int) -> None:
        a_t = self.a_t.new_zeros(self.a_t.shape[0], self.a_t.shape[1], self.n_members * rank)
        for i in range(self.n_members):
            a_t[:, :, i * rank: i * rank + self.rank] = self.member(i)
        self.a_t, self.rank = a_t, rank
        self.forget()

    def forget(self) -> None:
        self._input = self._plan = self._product = None
        self._served = 0

    def down(self, index: int, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """x·Aᵀ of member `index` for the plan's rows: [rows, tokens, r]."""
        if self.n_members == 1:
            return self._multiply(x, self.a_t, plan)
        if x is not self._input or plan is not self._plan:
            self._input, self._plan, self._served = x, plan, 0
            self._product = self._multiply(x, self.a_t, plan)
        assert self._product is not None
        result = self._product[..., index * self.rank: (index + 1) * self.rank]
        self._served += 1
        if self._served == self.n_members:  # every sibling served: keep no activations alive
            self.forget()
        return result

    @staticmethod
    def _multiply(x: torch.Tensor, a_t: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        x = x.to(a_t.dtype)  # a no-op unless the factors are float32 under a low-precision model (a CPU)
        if plan.single_slot is not None:
            return x @ a_t[plan.single_slot]
        return torch.bmm(x, plan.rows_of(a_t, x.shape[0]))


class SlotLinear:
    """The slot tensors and hooks of one projection."""

    def __init__(self, module: nn.Module, bank: SlotBank, shared: SharedDown, index: int):
        self.module = module
        self.bank = bank
        self.in_features, self.out_features = projection_features(module)
        self.shared, self.index = shared, index  # Aᵀ lives in `shared`, beside its siblings'
        # Transposed (x @ a_t, then @ b_t) and contiguous: a batched matmul over strided slices costs twice as much.
        self.b_t = torch.zeros(bank.n_slots, bank.rank, self.out_features, device=module.weight.device,
                               dtype=bank.factor_dtype)
        # Channel scales are allocated the first time an adapter scales this projection.
        self.in_scale: torch.Tensor | None = None
        self.out_scale: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)
        self.pre_handle: Any = None

    @property
    def a_t(self) -> torch.Tensor:
        return self.shared.member(self.index)

    def grow_rank(self, rank: int) -> None:
        """Widen Bᵀ to `rank` (the shared Aᵀ grows once per sibling group, in SlotBank)."""
        b_t = self.b_t.new_zeros(self.b_t.shape[0], rank, self.b_t.shape[2])
        b_t[:, : self.b_t.shape[1]] = self.b_t
        self.b_t = b_t

    def scale_rows(self, side: str) -> torch.Tensor:
        """The [slots, features] scale tensor of one side, allocated (all ones) on first use."""
        weight = self.module.weight
        if side == "input":
            if self.in_scale is None:
                self.in_scale = torch.ones(self.bank.n_slots, self.in_features, device=weight.device,
                                           dtype=self.bank.dtype)
                self.pre_handle = self.module.register_forward_pre_hook(self._pre_hook)
            return self.in_scale
        if self.out_scale is None:
            self.out_scale = torch.ones(self.bank.n_slots, self.out_features, device=weight.device,
                                        dtype=self.bank.dtype)
        return self.out_scale

    def reset(self, slot: int) -> None:
        self.a_t[slot].zero_()
        self.b_t[slot].zero_()
        for scale in (self.in_scale, self.out_scale):
            if scale is not None:
                scale[slot].fill_(1.0)

    def _pre_hook(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        plan = self.bank.plan
        if plan is None or not plan.scaling or self.in_scale is None:
            return None
        x = args[0]  # [rows, tokens, in]: a new tensor, the caller's input (the residual stream) stays as it is
        return (x * plan.rows_of(self.in_scale, x.shape[0]).unsqueeze(1), *args[1:])

    def _hook(self, _module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        plan = self.bank.plan
        if plan is None or plan.single_slot == 0:
            return output
        # The projection's output is a fresh tensor nobody else holds yet: scale and add in place.
        if plan.scaling and self.out_scale is not None:
            output.mul_(plan.rows_of(self.out_scale, output.shape[0]).unsqueeze(1))
        if not plan.low_rank:
            return output
        down = self.shared.down(self.index, args[0], plan)  # [rows, tokens, r], in the factors' dtype
        if plan.single_slot is not None:
            return output.add_(down @ self.b_t[plan.single_slot])
        if down.dtype == output.dtype:
            return output.baddbmm_(down, plan.rows_of(self.b_t, down.shape[0]))
        return output.add_(torch.bmm(down, plan.rows_of(self.b_t, down.shape[0])))


class SlotBank:
    """All hooked projections of one base model, with `n_slots - 1` adapter slots (slot 0: none)."""

    def __init__(self, model: nn.Module, module_suffixes: set[str], *, n_slots: int, rank: int = 8):
        self.n_slots = n_slots + 1
        self.rank = rank
        self.plan: RoutingPlan | None = None
        self.low_rank_slots: set[int] = set()
        self.scaling_slots: set[int] = set()
        self.device = next(model.parameters()).device
        # The dtype activations flow in: the embeddings' (a quantised projection's weight is int8/uint8).
        self.dtype = model.get_input_embeddings().weight.dtype  # type: ignore[operator]
        # The low-rank factors' dtype. On a CPU float32, whatever the model's: a bf16 matmul as small as a factor
        # (8 rows by 576 by rank 8) costs 30-50 us there against 5-13 in float32, so a bf16 model's mixed batch
        # spent more on its adapters than on the base model. The row's input is cast up once per sibling group and
        # the correction added back in the model's dtype.
        self.factor_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.modules: dict[str, SlotLinear] = {}
        self.shared: list[SharedDown] = []
        hooked = {name: module for name, module in model.named_modules()
                  if is_projection(module) and name.rsplit(".", 1)[-1] in module_suffixes}
        for members in self._sibling_groups(hooked):
            first = hooked[members[0]]
            shared = SharedDown(len(members), self.n_slots, projection_features(first)[0], rank,
                                first.weight.device, self.factor_dtype)
            self.shared.append(shared)
            for index, name in enumerate(members):
                self.modules[name] = SlotLinear(hooked[name], self, shared, index)

    @staticmethod
    def _sibling_groups(hooked: dict[str, nn.Module]) -> list[list[str]]:
        """Hooked projections in groups that share their A factors: known siblings of one parent with the
        same input width and kind; every other projection alone."""
        groups: dict[tuple[str, int, int, type], list[str]] = {}
        alone: list[list[str]] = []
        for name, module in hooked.items():
            parent, _, suffix = name.rpartition(".")
            family = next((i for i, s in enumerate(SHARED_INPUT_SIBLINGS) if suffix in s), None)
            if family is None:
                alone.append([name])
            else:
                key = (parent, family, projection_features(module)[0], type(module))
                groups.setdefault(key, []).append(name)
        return [*groups.values(), *alone]

    def check(self, weights: ServingWeights) -> None:
        """Raise KeyError/ValueError if these weights do not fit this base model (before any copy)."""
        targets = weights.low_rank if weights.kind is ServingKind.LOW_RANK else weights.scales
        missing = [name for name in targets if name not in self.modules]
        if missing:
            raise KeyError(f"adapter targets modules the base model does not have: {missing[:5]}")
        for name, factors in weights.low_rank.items():
            hooked = self.modules[name]
            if factors.a.shape[1] != hooked.in_features or factors.b.shape[0] != hooked.out_features:
                raise ValueError(f"adapter weights for {name} have shapes {tuple(factors.a.shape)}/"
                                 f"{tuple(factors.b.shape)}, which do not fit the base projection "
                                 f"{hooked.in_features}→{hooked.out_features}")
        for name, scale in weights.scales.items():
            hooked = self.modules[name]
            features = hooked.in_features if scale.side == "input" else hooked.out_features
            if scale.vector.shape != (features,):
                raise ValueError(f"adapter scales for {name}'s {scale.side} have {tuple(scale.vector.shape)} values; "
                                 f"the base projection has {features}")

    def write(self, slot: int, weights: ServingWeights) -> None:
        """Copy an adapter into a slot, in place; projections it does not target get nothing (zeros, ones)."""
        self.check(weights)
        # Slot tensors stay normal tensors even when a write happens inside inference mode (a request's
        # prefill): a tensor allocated there could never be updated in place outside it again.
        with torch.inference_mode(False), torch.no_grad():
            if weights.kind is ServingKind.LOW_RANK:
                self._write_low_rank(slot, weights.low_rank)
            else:
                self._write_scales(slot, weights.scales)

    def _write_low_rank(self, slot: int, factors: dict[str, LoraFactors]) -> None:
        rank = max(f.a.shape[0] for f in factors.values())
        if rank > self.rank:
            for shared in self.shared:
                shared.grow_rank(rank)
            for hooked in self.modules.values():
                hooked.grow_rank(rank)
            self.rank = rank
        for name, hooked in self.modules.items():
            hooked.reset(slot)
            f = factors.get(name)
            if f is None:
                continue
            r = f.a.shape[0]
            hooked.a_t[slot, :, :r].copy_(f.a.transpose(0, 1))
            hooked.b_t[slot, :r].copy_((f.b * f.scale).transpose(0, 1))
        self.scaling_slots.discard(slot)
        self.low_rank_slots.add(slot)

    def _write_scales(self, slot: int, scales: dict[str, ChannelScale]) -> None:
        for name, hooked in self.modules.items():
            hooked.reset(slot)
            scale = scales.get(name)
            if scale is not None:
                hooked.scale_rows(scale.side)[slot].copy_(scale.vector)
        self.low_rank_slots.discard(slot)
        self.scaling_slots.add(slot)

    def clear(self, slot: int) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for hooked in self.modules.values():
                hooked.reset(slot)
        self.low_rank_slots.discard(slot)
        self.scaling_slots.discard(slot)

    @contextmanager
    def route(self, row_slots: list[int]) -> Iterator[None]:
        previous = self.plan
        self.plan = RoutingPlan.build(row_slots, self.device, low_rank_slots=self.low_rank_slots,
                                      scaling_slots=self.scaling_slots)
        try:
            yield
        finally:
            self.plan = previous
            for shared in self.shared:  # a forward pass that stopped half way holds no activations
                shared.forget()
