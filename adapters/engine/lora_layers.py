"""Many LoRA adapters on one set of frozen projections, chosen per batch row.

The base model's nn.Linear modules stay as they are; a forward hook adds each row's low-rank
correction (x·Aᵀ)·Bᵀ·scale after the base matmul, which runs once for the whole batch. AdaLoRA
adapters arrive here already folded into the same A/B form (see adapter_loader).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class LoraFactors:
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float


@dataclass
class BatchRouting:
    """Which adapter each row of the current forward pass uses (None: the base model)."""

    row_adapters: list[str | None] = field(default_factory=list)

    def groups(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for row, key in enumerate(self.row_adapters):
            if key is not None:
                out.setdefault(key, []).append(row)
        return out


class MultiLoraLinear:
    """The per-module state and hook: adapter key → factors for this module."""

    def __init__(self, module: nn.Linear, routing: BatchRouting):
        self.module = module
        self.routing = routing
        self.factors: dict[str, LoraFactors] = {}
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not self.factors:
            return output
        groups = {k: rows for k, rows in self.routing.groups().items() if k in self.factors}
        if not groups:
            return output
        x = args[0]
        if len(groups) == 1:
            key, rows = next(iter(groups.items()))
            if len(rows) == x.shape[0]:
                f = self.factors[key]
                return output + (x @ f.a.T) @ f.b.T * f.scale
        output = output.clone()
        for key, rows in groups.items():
            f = self.factors[key]
            index = torch.tensor(rows, device=x.device)
            output[index] += (x[index] @ f.a.T) @ f.b.T * f.scale
        return output


class LoraRegistry:
    """All hooked projections of one base model, and the adapters currently attached to them."""

    def __init__(self, model: nn.Module, module_suffixes: set[str]):
        self.routing = BatchRouting()
        self.modules: dict[str, MultiLoraLinear] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in module_suffixes:
                self.modules[name] = MultiLoraLinear(module, self.routing)

    def attach(self, key: str, factors: dict[str, LoraFactors]) -> None:
        missing = [name for name in factors if name not in self.modules]
        if missing:
            raise KeyError(f"adapter targets modules the base model does not have: {missing[:5]}")
        for name, f in factors.items():
            module = self.modules[name].module
            if f.a.shape[1] != module.in_features or f.b.shape[0] != module.out_features:
                raise ValueError(f"adapter weights for {name} have shapes {tuple(f.a.shape)}/{tuple(f.b.shape)}, "
                                 f"which do not fit the base projection {module.in_features}→{module.out_features}")
        for name, f in factors.items():
            self.modules[name].factors[key] = f

    def detach(self, key: str) -> None:
        for hooked in self.modules.values():
            hooked.factors.pop(key, None)

    @contextmanager
    def route(self, row_adapters: list[str | None]) -> Iterator[None]:
        previous = self.routing.row_adapters
        self.routing.row_adapters = row_adapters
        try:
            yield
        finally:
            self.routing.row_adapters = previous
