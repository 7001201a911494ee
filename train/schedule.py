"""The learning-rate schedule: linear warmup, then cosine or linear decay to a floor, or constant."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the peak LR for the optimizer step `step` (0-based); picklable, unlike a lambda."""

    max_steps: int
    warmup_steps: int = 0
    shape: str = "cosine"
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.shape == "constant":
            return 1.0
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.shape == "linear":  # YaRN's and LongRoPE's get_linear_schedule_with_warmup (with min_ratio 0)
            return self.min_ratio + (1 - self.min_ratio) * (1 - progress)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
