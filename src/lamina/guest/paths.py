"""Where the guest kit puts things inside a machine (paths relative to its root), and the
manager-side setting machines need to find the manager."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from lamina.errors import UsageError

if TYPE_CHECKING:
    from lamina.home import Home

PREFIX: Final = "opt/lamina"  # the agent's packages, its launcher and helpers
HOME: Final = "var/lib/lamina"  # the agent's lamina home: local store, layer cache, mounts
SESSIONS: Final = "var/lib/lamina/sessions"  # composed roots, one per logged-in user
CONFIG: Final = "etc/lamina"
AGENT_ENV: Final = "etc/lamina/agent.env"  # LAMINA_MANAGER, LAMINA_TOKEN (root only)
SYSTEM: Final = "etc/lamina/system.json"  # which layer this root was built as
UNIT: Final = "lamina-agent.service"
# The seed's mount point in the initramfs, and the directory of the kit's files on it.
SEED_KIT_DIR: Final = "lamina"


def check_agent_url(url: str) -> str:
    """An http(s) URL with a host, as machines will use it (no trailing slash)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"bad agent URL {url!r}: expected http://HOST[:PORT] or https://...")
    if parts.query or parts.fragment:
        raise UsageError(f"bad agent URL {url!r}: no query or fragment")
    return url.rstrip("/")


def set_agent_url(home: Home, url: str) -> str | None:
    """Record the manager's URL for machines' seeds ('' clears it)."""
    from lamina.manager.services import settings

    value = check_agent_url(url) if url else None
    with home.session() as session:
        settings.put(session, settings.AGENT_URL, value)
    return value
