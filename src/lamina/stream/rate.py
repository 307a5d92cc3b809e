"""Bandwidth limit and retry pacing (pure logic: callers pass the clock in)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


class TokenBucket:
    """``rate`` bytes per second on average, bursts up to ``burst`` bytes.

    Background hydration waits for ``delay()`` before each fetch and ``charge``s what it
    received; reads a machine is waiting for are charged too but never wait, so they go
    first and hydration slows down to keep the total at the limit. ``rate=None``: no
    limit.
    """

    def __init__(self, rate: float | None, burst: float | None = None, now: float = 0.0) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (or None for no limit)")
        self.rate = rate
        # One second's worth by default: smooth enough at the scale of 256 KiB chunks.
        self.burst = burst if burst is not None else (rate or 0.0)
        self.tokens = self.burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if self.rate is None:
            return
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def delay(self, now: float) -> float:
        """Seconds to wait before the next background fetch may start."""
        if self.rate is None:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens > 0 else -self.tokens / self.rate

    def charge(self, nbytes: int, now: float) -> None:
        if self.rate is None:
            return
        self._refill(now)
        self.tokens = min(self.burst, self.tokens - nbytes)  # refunds (< 0) stop at full


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt k waits up to min(cap, base * 2**k)."""

    base: float = 0.05
    cap: float = 2.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return float(ceiling / 2 + self.rng.uniform(0, ceiling / 2))

    def reset(self) -> None:
        self.attempt = 0


class RateMeter:
    """Bytes per second over a sliding window, for ``status``."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._samples: list[tuple[float, int]] = []
        self.total = 0

    def add(self, nbytes: int, now: float) -> None:
        self.total += nbytes
        self._samples.append((now, nbytes))
        self._trim(now)

    def _trim(self, now: float) -> None:
        cut = now - self.window
        drop = 0
        while drop < len(self._samples) and self._samples[drop][0] < cut:
            drop += 1
        if drop:
            del self._samples[:drop]

    def rate(self, now: float) -> float:
        self._trim(now)
        if not self._samples:
            return 0.0
        return sum(n for _, n in self._samples) / self.window
