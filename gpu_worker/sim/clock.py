"""The simulation's virtual clock: time moves only when the driver says a step or an idle gap took that long."""

from __future__ import annotations


class VirtualClock:
    """Seconds since the simulation began. Calling it reads the time, so it can stand in for time.monotonic."""

    def __init__(self, start: float = 0.0):
        self._now = float(start)

    @property
    def now(self) -> float:
        return self._now

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Moves forward by `seconds` (>= 0); returns the new time."""
        if not seconds >= 0:  # NOTE: written so that NaN is refused too
            raise ValueError(f"the clock only moves forward, got {seconds!r} s")
        self._now += seconds
        return self._now

    def advance_to(self, t: float) -> float:
        """Moves forward to time t (not before now); returns the new time."""
        if not t >= self._now:
            raise ValueError(f"the clock only moves forward: now {self._now!r}, asked for {t!r}")
        self._now = float(t)
        return self._now
