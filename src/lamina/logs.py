"""Structured logs: one JSON object per line on stderr (or a file), for every connection."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER = "lamina"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry, default=str)


def setup(level: str = "info", stream: Any = None) -> logging.Logger:
    log = logging.getLogger(LOGGER)
    log.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False
    return log


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, name, extra={"fields": fields})


class Steps:
    """Seconds per step of one piece of work, for its log line ("fetch 0.41 s, mount ...")."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._done: list[str] = []

    def step(self, name: str) -> str:
        """Close the step ``name``; returns every step so far."""
        now = time.monotonic()
        self._done.append(f"{name} {now - self._last:.2f} s")
        self._last = now
        return ", ".join(self._done)

    def split(self, name: str, seconds: float) -> None:
        """Close ``name``, a part of the running step measured by its own code: the next
        ``step`` gets the rest."""
        if seconds > 0:
            self._done.append(f"{name} {seconds:.2f} s")
            self._last += seconds
