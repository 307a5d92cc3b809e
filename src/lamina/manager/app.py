"""The manager's HTTP application (FastAPI), served by ``lamina serve --http``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lamina import __version__
from lamina.errors import LaminaError, http_body, http_status
from lamina.home import Home
from lamina.manager.console import router as console_router
from lamina.manager.limits import BodyLimit, invalid_request
from lamina.manager.routers import admin, agent, data, layer_images, stream


def create_app(home: Home, *, body_bytes: int | None = None) -> FastAPI:
    """``body_bytes``: the cap on request bodies other than uploads (``limits``)."""
    app = FastAPI(title="lamina manager", version=__version__, openapi_url="/openapi.json")
    app.state.home = home
    app.add_middleware(BodyLimit, cap=body_bytes or BodyLimit.default_cap())
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.include_router(data.router)
    app.include_router(layer_images.router)
    app.include_router(agent.router)
    app.include_router(admin.router)
    app.include_router(console_router)
    app.include_router(stream.router)

    @app.exception_handler(LaminaError)
    def lamina_error(_request: Request, exc: LaminaError) -> JSONResponse:
        return JSONResponse(http_body(exc), status_code=http_status(exc))

    @app.get("/api/v1/health", tags=["meta"])
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    return app
