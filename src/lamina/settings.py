"""Process-wide settings from the environment (LAMINA_*), with embedded defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    return Path.home() / ".local" / "share" / "lamina"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAMINA_", extra="ignore")

    home: Path = default_home()
    # SQLite file under home when unset; postgresql+psycopg://... for several managers.
    database_url: str | None = None
