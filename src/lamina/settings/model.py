"""The settings' model (pydantic-settings), kept apart so that importing ``lamina.settings``
costs nothing until ``load`` is called. Its sources, strongest first: the flags given to
``load``, ``LAMINA_*`` variables (``LAMINA_SERVE__NBD`` for a table's key), the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from lamina.settings import ENV_PREFIX, config_path, default_home, read_config


class ServeSettings(BaseModel):
    """``lamina serve``'s listeners and TLS ([serve] in the file)."""

    model_config = ConfigDict(extra="forbid")

    nbd: str = "127.0.0.1:10809"
    http: str = "127.0.0.1:8480"
    workers: int | None = None
    tls: bool = False
    insecure: bool = False
    tls_names: list[str] = []
    https_cert: Path | None = None
    https_key: Path | None = None
    # The manager's URL as machines reach it, for their seeds ('' clears the kept one).
    agent_url: str | None = None


class AgentSettings(BaseModel):
    """``lamina agent``'s folders ([agent] in the file)."""

    model_config = ConfigDict(extra="forbid")

    root: Path | None = None
    etc: Path | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_ignore_empty=True,
        extra="forbid",
    )

    home: Path = default_home()
    # SQLite file under home when unset; postgresql+psycopg://... for several managers.
    database_url: str | None = None
    # s3://BUCKET[/PREFIX]: the packs in a bucket (recorded in the home on first use).
    store_url: str | None = None
    s3_endpoint_url: str | None = None
    # The disk cache of a bucket-backed store, such as 8G.
    store_cache_bytes: str | None = None
    # A manager to work through, its admin (or, for the agent, machine) token and CA.
    manager: str | None = None
    token: str | None = None
    ca: Path | None = None
    debug: bool = False
    # The agent attaches app layers on their metadata, their data read on demand.
    lazy_layers: bool = False
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
    # A block server among several on one database: its name, the NBD address machines
    # dial for it, seconds between its heartbeats (lost after three missed).
    server_name: str | None = None
    advertise: str | None = None
    heartbeat: float = Field(default=5.0, ge=0.1)
    # Seconds an import's or gc's lease on a shared bucket lasts without renewal.
    store_lease: float | None = Field(default=None, gt=0)
    serve: ServeSettings = ServeSettings()
    agent: AgentSettings = AgentSettings()

    def nbd_limits(self) -> dict[str, float | int]:
        """The NBD limits set, by ``Limits`` field name."""
        prefix = "nbd_"
        return {
            name.removeprefix(prefix): value
            for name, value in self.model_dump().items()
            if name.startswith(prefix) and value is not None
        }

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, FileSource(settings_cls)


class FileSource(PydanticBaseSettingsSource):
    """The configuration file's values (an absent default file gives none)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ returns the whole file at once

    def __call__(self) -> dict[str, Any]:
        return read_config(config_path())
