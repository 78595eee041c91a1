"""Seconds per optimiser step and ETAs: cheap enough to run on every step.

No Lightning here: the callback feeds :class:`StepTimer` one timestamp per optimiser step.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

__all__ = ["StepTimer", "format_duration"]


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` / ``m:ss`` (``"?"`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepTimer:
    """Median wall-clock seconds per optimiser step over the last ``window`` steps.

    The first ``warmup`` steps (compilation, caches, the first batch's workers) are not timed.
    The median of a long window moves slowly, so it is recomputed every ``refresh`` steps.
    """

    def __init__(self, warmup: int = 3, window: int = 256, refresh: int = 16) -> None:
        self.warmup = warmup
        self.refresh = refresh
        self.durations: deque[float] = deque(maxlen=window)
        self.steps_seen = 0
        self._last: float | None = None
        self._median: tuple[int, float | None] = (-1, None)

    def start(self, now: float | None = None) -> None:
        """Start timing (the next :meth:`step` measures from here)."""
        self._last = time.perf_counter() if now is None else now

    def step(self, now: float | None = None) -> None:
        """One optimiser step ended at ``now``."""
        now = time.perf_counter() if now is None else now
        if self._last is not None:
            self.steps_seen += 1
            if self.steps_seen > self.warmup:
                self.durations.append(now - self._last)
        self._last = now

    def seconds_per_step(self) -> float | None:
        """Median seconds per step after the warm-up (``None`` before any timed step)."""
        cached_at, cached = self._median
        if cached is not None and self.steps_seen - cached_at < self.refresh:
            return cached
        value = float(np.median(self.durations)) if self.durations else None
        self._median = (self.steps_seen, value)
        return value
