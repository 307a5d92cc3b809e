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
    # The block server's limits on what any client may cost it (lamina.nbd.limits, and
    # docs/security.md); unset: the defaults there.
    nbd_connections_per_address: int | None = None
    nbd_handshake_timeout: float | None = None
    nbd_idle_timeout: float | None = None
    nbd_stall_timeout: float | None = None
    nbd_reply_bytes: int | None = None
    nbd_total_reply_bytes: int | None = None

    # The manager's: the cap on request bodies other than uploads (lamina.manager.limits),
    # and the bytes of chunks a machine may have uploaded that no saved layer holds yet.
    http_body_bytes: int | None = None
    upload_quota_bytes: int | None = None
    # Bytes a compressed image archive may unpack to in HOME/tmp (lamina.layer.unpack).
    import_unpack_bytes: int | None = None

    def nbd_limits(self) -> dict[str, float | int]:
        """The NBD limits set in the environment, by ``Limits`` field name."""
        prefix = "nbd_"
        return {
            name.removeprefix(prefix): value
            for name, value in self.model_dump().items()
            if name.startswith(prefix) and value is not None
        }
