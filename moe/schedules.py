"""Schedules: the number of active experts k over training (SMoE-Dropout) and the bias rate.

All functions are pure: step in, value out, so a resumed run recomputes the same values from the
step it saved.
"""

from __future__ import annotations

import math

from moe.config import MoEConfig
from moe.errors import UserError


def _clip(k: int, k_min: int, k_max: int) -> int:
    return max(k_min, min(k_max, k))


def k_at_step(config: MoEConfig, step: int) -> int:
    """Active experts at optimizer step ``step`` (0-based) under ``config.k_schedule``.

    With t = min(step, T) / T and T = ``k_schedule_steps``:

    - constant:    top_k
    - linear:      round((k_max - k_min) * t) + k_min           (SMoE-Dropout's ``linear_increase``)
    - cosine:      round((k_min - k_max) * cos(pi t / 2) + k_max) (its ``cosine_increase``)
    - exponential: round(k_min * (k_max / k_min) ** t)          (geometric growth)
    - multistep:   k_min, 2 k_min, 4 k_min, ..., k_max held for equal spans of [0, T]
    """
    if step < 0:
        raise UserError(f"k_at_step: step must be >= 0, got {step}")
    if config.k_schedule == "constant":
        return config.top_k
    k_min, k_max, total = config.k_min, config.k_max, config.k_schedule_steps
    t = min(step, total) / total
    if config.k_schedule == "linear":
        k = round((k_max - k_min) * t) + k_min
    elif config.k_schedule == "cosine":
        k = round((k_min - k_max) * math.cos(math.pi * t / 2) + k_max)
    elif config.k_schedule == "exponential":
        k = round(k_min * (k_max / k_min) ** t)
    else:  # multistep
        levels = multistep_levels(k_min, k_max)
        k = levels[min(int(t * (len(levels) - 1)), len(levels) - 1)] if len(levels) > 1 else levels[0]
    return _clip(k, k_min, k_max)


def multistep_levels(k_min: int, k_max: int) -> list[int]:
    """k_min, 2 k_min, 4 k_min, ... below k_max, then k_max (e.g. 1, 2, 4, 8, 16)."""
    levels = [k_min]
    while levels[-1] * 2 < k_max:
        levels.append(levels[-1] * 2)
    if levels[-1] != k_max:
        levels.append(k_max)
    return levels


def bias_rate_at_update(config: MoEConfig, update: int) -> float:
    """Bias step size for the ``update``-th bias update (0-based)."""
    if config.bias_update_schedule == "constant":
        return config.bias_update_rate
    return config.bias_update_rate / (1.0 + update / config.bias_update_t0)
