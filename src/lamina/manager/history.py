"""The dashboard's last day: boots, bytes served and store size, sampled once a minute by
``lamina serve`` (and at each look), drawn as SVG on the server (no script, no CDN).

Samples are the running totals (``NbdTotals.boots``, bytes read, the store's pack bytes)
kept in memory by the manager beside the block server: a day is 1,440 samples, and a
restart starts the history afresh (as its counters do). A chart of a counter shows its
increase per quarter hour; the store's chart shows its size.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass

from markupsafe import Markup

DAY = 24 * 3600.0
EVERY = 60.0  # seconds between samples
BUCKET = 15 * 60.0  # one bar per quarter hour: 96 bars a day
WIDTH, HEIGHT = 480, 96


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # seconds since the epoch
    boots: int
    read_bytes: int
    store_bytes: int


class History:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples: deque[Sample] = deque(maxlen=int(DAY / EVERY) + 1)

    def add(self, sample: Sample) -> None:
        """Keep ``sample`` if the last one kept is a minute old (or there is none)."""
        with self._lock:
            if not self.samples or sample.at - self.samples[-1].at >= EVERY:
                self.samples.append(sample)

    def day(self, now: Sample) -> list[Sample]:
        """The last day's samples, ``now`` (not kept) last."""
        with self._lock:
            kept = [s for s in self.samples if now.at - s.at <= DAY]
        return [*kept, now]


def increases(samples: list[Sample], field: str, end: float) -> list[float]:
    """How much counter ``field`` grew in each quarter hour of the day up to ``end``."""
    bars = [0.0] * int(DAY / BUCKET)
    for before, after in itertools.pairwise(samples):
        grew = getattr(after, field) - getattr(before, field)
        slot = min(int((after.at - (end - DAY)) // BUCKET), len(bars) - 1)  # end: the last
        if grew > 0 and 0 <= slot < len(bars):
            bars[slot] += grew
    return bars


def levels(samples: list[Sample], field: str, end: float) -> list[float | None]:
    """The last value of gauge ``field`` in each quarter hour (None before the first)."""
    points: list[float | None] = [None] * int(DAY / BUCKET)
    for s in samples:
        slot = min(int((s.at - (end - DAY)) // BUCKET), len(points) - 1)
        if 0 <= slot < len(points):
            points[slot] = getattr(s, field)
    return points


def bar_chart(values: list[float], label: str, total: str) -> Markup:
    """An SVG of ``values`` as bars, oldest left; ``label`` and ``total`` are our own
    text (escaped all the same)."""
    top = max(values) or 1.0
    step = WIDTH / len(values)
    bars = "".join(
        f'<rect x="{i * step:.1f}" y="{HEIGHT - h:.1f}" width="{max(step - 1, 1):.1f}" '
        f'height="{h:.1f}" fill="#3b6fb6"/>'
        for i, v in enumerate(values)
        if (h := v / top * (HEIGHT - 4)) > 0
    )
    return _frame(bars, label, total)


def line_chart(values: list[float | None], label: str, total: str) -> Markup:
    known = [v for v in values if v is not None]
    low, high = (min(known), max(known)) if known else (0.0, 1.0)
    span = (high - low) or 1.0
    step = WIDTH / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{HEIGHT - 2 - (v - low) / span * (HEIGHT - 8):.1f}"
        for i, v in enumerate(values)
        if v is not None
    )
    line = f'<polyline points="{points}" fill="none" stroke="#3b6fb6" stroke-width="2"/>'
    if known:  # the latest value as a dot: a line of one point draws nothing
        x, y = points.rsplit(" ", 1)[-1].split(",")
        line += f'<circle cx="{x}" cy="{y}" r="3" fill="#3b6fb6"/>'
    return _frame(line if known else "", label, total)


def _frame(body: str, label: str, total: str) -> Markup:
    title = Markup.escape(f"{label}: {total}")
    return Markup(
        f'<svg class="chart" role="img" aria-label="{title}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{title}</title>"
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#f4f6f9"/>{body}</svg>'
    )


def now_sample(boots: int, read_bytes: int, store_bytes: int) -> Sample:
    return Sample(time.time(), boots, read_bytes, store_bytes)


def charts(history: History, now: Sample) -> list[Markup]:
    """The dashboard's three charts of the last day, ``now`` included."""
    from lamina.units import human_bytes

    history.add(now)
    day = history.day(now)
    return [
        bar_chart(increases(day, "boots", now.at), "Boots per quarter hour", f"{now.boots}"),
        bar_chart(
            increases(day, "read_bytes", now.at),
            "Bytes served per quarter hour",
            human_bytes(now.read_bytes),
        ),
        line_chart(levels(day, "store_bytes", now.at), "Store size", human_bytes(now.store_bytes)),
    ]
