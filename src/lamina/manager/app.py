"""The manager's HTTP application (FastAPI), served by ``lamina serve --http``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from lamina import __version__
from lamina.home import Home
from lamina.manager.routers import data


def create_app(home: Home) -> FastAPI:
    app = FastAPI(title="lamina manager", version=__version__, openapi_url="/openapi.json")
    app.state.home = home
    app.include_router(data.router)

    @app.get("/api/v1/health", tags=["meta"])
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    return app
