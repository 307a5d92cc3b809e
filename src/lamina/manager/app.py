"""The manager's HTTP application (FastAPI), served by ``lamina serve --http``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lamina import __version__
from lamina.errors import LaminaError, http_body, http_status
from lamina.home import Home
from lamina.manager import metrics
from lamina.manager.console import router as console_router
from lamina.manager.history import History
from lamina.manager.limits import BodyLimit, invalid_request
from lamina.manager.routers import admin, agent, boot, data, layer_images, stream
from lamina.manager.services.netboot import NetbootSettings


def create_app(
    home: Home, netboot: NetbootSettings | None = None, *, body_bytes: int | None = None
) -> FastAPI:
    """``body_bytes``: the cap on request bodies other than uploads (``limits``)."""
    from lamina.netboot.bootfiles import BootCache

    app = FastAPI(title="lamina manager", version=__version__, openapi_url="/openapi.json")
    app.state.home = home
    app.state.netboot = netboot or NetbootSettings()
    app.state.boot_cache = BootCache(home.root / "cache" / "boot")
    app.add_middleware(BodyLimit, cap=body_bytes or BodyLimit.default_cap())
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.state.http_meter = metrics.HttpMeter()
    app.state.history = History()  # the dashboard's last day (see manager.history)
    app.state.nbd_totals = None  # set by `lamina serve` when it serves NBD too
    app.state.nbd_address = None  # (host, port, tls), likewise
    app.add_middleware(metrics.HttpMetrics, meter=app.state.http_meter)
    app.include_router(data.router)
    app.include_router(layer_images.router)
    app.include_router(agent.router)
    app.include_router(admin.router)
    app.include_router(console_router)
    app.include_router(stream.router)
    app.include_router(boot.router)
    app.include_router(metrics.router)

    _errors(app)

    @app.get("/api/v1/health", tags=["meta"])
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    return app


def create_boot_app(home: Home, netboot: NetbootSettings) -> FastAPI:
    """Network boot alone (``serve --boot-http``): the routes firmware uses, nothing else."""
    from lamina.netboot.bootfiles import BootCache

    app = FastAPI(title="lamina network boot", version=__version__, openapi_url=None)
    app.state.home = home
    app.state.netboot = netboot
    app.state.boot_cache = BootCache(home.root / "cache" / "boot")
    app.include_router(boot.router)
    _errors(app)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(LaminaError)
    def lamina_error(_request: Request, exc: LaminaError) -> JSONResponse:
        return JSONResponse(http_body(exc), status_code=http_status(exc))
