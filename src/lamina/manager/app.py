"""The manager's HTTP application (FastAPI), served by ``lamina serve --http``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lamina import __version__
from lamina.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    InvalidInput,
    LaminaError,
    LimitExceeded,
    NotFound,
    UsageError,
)
from lamina.home import Home
from lamina.manager.console import router as console_router
from lamina.manager.limits import BodyLimit, invalid_request
from lamina.manager.routers import admin, agent, data, stream

# Lamina's errors as HTTP statuses (anything else stays a 500).
STATUS: list[tuple[type[LaminaError], int]] = [
    (NotFound, 404),
    (AlreadyExists, 409),
    (Conflict, 409),
    (UsageError, 422),
    (InvalidInput, 422),
    (Forbidden, 403),
    (LimitExceeded, 413),
]
# An error's message is said, never at any length (it may quote what was asked).
_DETAIL = 500


def create_app(home: Home, *, body_bytes: int | None = None) -> FastAPI:
    """``body_bytes``: the cap on request bodies other than uploads (``limits``)."""
    app = FastAPI(title="lamina manager", version=__version__, openapi_url="/openapi.json")
    app.state.home = home
    app.add_middleware(BodyLimit, cap=body_bytes or BodyLimit.default_cap())
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.include_router(data.router)
    app.include_router(agent.router)
    app.include_router(admin.router)
    app.include_router(console_router)
    app.include_router(stream.router)

    @app.exception_handler(LaminaError)
    def lamina_error(_request: Request, exc: LaminaError) -> JSONResponse:
        code = next((c for kind, c in STATUS if isinstance(exc, kind)), 500)
        detail = str(exc)
        if len(detail) > _DETAIL:
            detail = detail[:_DETAIL] + "..."
        return JSONResponse({"detail": detail}, status_code=code)

    @app.get("/api/v1/health", tags=["meta"])
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    return app
