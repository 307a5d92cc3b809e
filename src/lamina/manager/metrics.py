"""``GET /metrics``: what the server does, in the Prometheus text exposition format (0.0.4).

    # HELP lamina_nbd_read_bytes_total Bytes read by NBD clients, by export.
    # TYPE lamina_nbd_read_bytes_total counter
    lamina_nbd_read_bytes_total{export="machine/desk-001"} 16777216

Three sources: the block server's counters (``NbdTotals``, summed over its worker
processes by ``serve``, which hands the manager a function returning them), this
process's HTTP calls (``HttpMeter``, an ASGI middleware), and the home (store size and
chunks, delta bytes), read at each scrape. Counters are per process: a restart starts
them at zero, which Prometheus's ``rate()`` takes as a reset. The route needs a token
that may read the admin API (an admin or a helpdesk account).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from lamina import __version__
from lamina.home import Home
from lamina.manager.deps import ReaderDep
from lamina.manager.nbdtotals import NbdTotals

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds. Most API calls answer in 1-20 ms; a login under a storm took up to 2 s.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOGIN_ROUTES = {"/api/v1/agent/login": "agent", "/console/login": "console"}


# -- this process's HTTP calls -------------------------------------------------------------


class HttpMeter:
    """Latency of the HTTP calls by method and route (the route's template, so that ten
    thousand machines make one series), answers by status code, logins by outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.buckets: dict[tuple[str, str], list[int]] = {}
        self.sums: dict[tuple[str, str], float] = {}
        self.codes: Counter[tuple[str, str, int]] = Counter()
        self.logins: Counter[tuple[str, str]] = Counter()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (method, route)
            counts = self.buckets.setdefault(key, [0] * (len(BUCKETS) + 1))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1  # +Inf: every observation
            self.sums[key] = self.sums.get(key, 0.0) + seconds
            self.codes[(method, route, status)] += 1
            kind = LOGIN_ROUTES.get(route)
            if kind is not None and method == "POST":
                self.logins[(kind, "ok" if status < 400 else "refused")] += 1


class HttpMetrics:
    """ASGI middleware feeding an ``HttpMeter`` (no per-request objects beyond a closure:
    it sits in front of the login storm's path)."""

    def __init__(self, app: Any, meter: HttpMeter) -> None:
        self.app = app
        self.meter = meter

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.meter.observe(scope["method"], route, status, time.perf_counter() - started)


# -- the text format ---------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Exposition:
    """Families in the text format: HELP and TYPE once, then the samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float]],
        suffix: str = "",
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{suffix}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str, meter: HttpMeter) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        with meter._lock:
            series = sorted((k, list(v), meter.sums[k]) for k, v in meter.buckets.items())
        for (method, route), counts, total in series:
            base = {"method": method, "route": route}
            for bound, n in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
                self.lines.append(f"{name}_bucket{_labels({**base, 'le': bound})} {n}")
            self.lines.append(f"{name}_sum{_labels(base)} {_number(total)}")
            self.lines.append(f"{name}_count{_labels(base)} {counts[-1]}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _allocated(folder: Path) -> tuple[int, int]:
    """(files, bytes on disk) under ``folder`` (sparse deltas count what they hold)."""
    files = size = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:  # removed while we looked
                continue
            files += 1
            size += st.st_blocks * 512
    return files, size


def _nbd(out: Exposition, nbd: NbdTotals) -> None:
    rows = sorted(nbd.exports.items())
    out.family("lamina_nbd_connections", "gauge", "Open NBD connections.", [({}, nbd.connections)])
    out.family(
        "lamina_machines_connected",
        "gauge",
        "Machines whose export an NBD client holds open.",
        [({}, len(nbd.machines))],
    )
    for i, (name, what) in enumerate(
        (
            ("lamina_nbd_requests_total", "NBD requests served, by export."),
            ("lamina_nbd_read_bytes_total", "Bytes read by NBD clients, by export."),
            ("lamina_nbd_written_bytes_total", "Bytes written by NBD clients, by export."),
            ("lamina_nbd_request_errors_total", "NBD requests answered with an error."),
        )
    ):
        out.family(name, "counter", what, (({"export": e}, row[i]) for e, row in rows))
    out.family(
        "lamina_machine_boots_total",
        "counter",
        "Machine disks opened over NBD (a VM starting, or reconnecting).",
        [({}, nbd.boots)],
    )
    out.family(
        "lamina_errors_total",
        "counter",
        "Refusals and failures of the block server, by kind (the log event's name).",
        (({"kind": k}, n) for k, n in sorted(nbd.errors.items())),
    )


def render(home: Home, meter: HttpMeter, nbd: NbdTotals | None) -> str:
    out = Exposition()
    out.family(
        "lamina_build_info", "gauge", "The running version.", [({"version": __version__}, 1)]
    )
    if nbd is not None:
        _nbd(out, nbd)
    with meter._lock:
        logins = sorted(meter.logins.items())
        codes = sorted(meter.codes.items())
    out.family(
        "lamina_logins_total",
        "counter",
        "Logins through this manager (agent: a user on a machine; console: an administrator).",
        (({"kind": kind, "result": result}, n) for (kind, result), n in logins),
    )
    usage = home.store.usage()
    out.family(
        "lamina_store_bytes", "gauge", "Bytes of the chunk store's packs.", [({}, usage.pack_bytes)]
    )
    out.family("lamina_store_chunks", "gauge", "Chunks in the chunk store.", [({}, usage.chunks)])
    out.family("lamina_store_packs", "gauge", "Pack files of the chunk store.", [({}, usage.packs)])
    deltas, delta_bytes = _allocated(home.deltas_dir)
    out.family(
        "lamina_delta_bytes", "gauge", "Bytes on disk of machine deltas.", [({}, delta_bytes)]
    )
    out.family("lamina_delta_files", "gauge", "Files of machine deltas.", [({}, deltas)])
    out.family(
        "lamina_http_responses_total",
        "counter",
        "HTTP answers of this manager, by method, route and status code.",
        (({"method": m, "route": r, "code": str(c)}, n) for (m, r, c), n in codes),
    )
    out.histogram(
        "lamina_http_request_duration_seconds", "Time to answer an HTTP call, by route.", meter
    )
    return out.text()


router = APIRouter(tags=["meta"])


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request, _caller: ReaderDep) -> PlainTextResponse:
    # the block server's counters live on this loop: read them here, the disk off it
    state = request.app.state
    source: Callable[[], NbdTotals] | None = state.nbd_totals
    nbd = source() if source is not None else None
    text = await run_in_threadpool(render, state.home, state.http_meter, nbd)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)
