"""Test-only fault injection for the worker, read from ADAPTERY_FAULT_INJECTION (never set in production)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class FaultInjector:
    """Faults from a text like "step_delay=0.1,exit_at_step=7,exit_in_checkpoint_at_step=10"."""

    step_delay: float = 0.0
    exit_at_step: int = 0
    exit_in_checkpoint_at_step: int = 0

    @classmethod
    def parse(cls, text: str) -> FaultInjector:
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            values[key] = float(value) if key == "step_delay" else int(value)
        return cls(**values)

    def after_step(self, step: int) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.exit_at_step and step >= self.exit_at_step:
            os._exit(137)  # like kill -9: no cleanup, no exception handlers

    def during_checkpoint(self, step: int) -> None:
        if self.exit_in_checkpoint_at_step and step == self.exit_in_checkpoint_at_step:
            os._exit(137)
