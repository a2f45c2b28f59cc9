"""Learning-rate schedules as pure functions of the step, so that a resumed run needs no state.

``lr_factor(step, total_steps, schedule, warmup_steps)`` multiplies the base learning rate:
a linear warm-up over ``warmup_steps`` (from 1/warmup to 1), then ``constant`` (the method's
default) or ``cosine`` decay from 1 to 0 at ``total_steps`` (SGDR without restarts, Loshchilov
and Hutter 2017). A step counts from 0; the factor of the optimiser's n-th update is
``lr_factor(n, ...)``.
"""

from __future__ import annotations

import math
from typing import Literal

LrSchedule = Literal["constant", "cosine"]
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, total_steps: int, schedule: LrSchedule = "constant", warmup_steps: int = 0) -> float:
    """The learning rate of update ``step`` (0-based) as a fraction of the base rate."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
