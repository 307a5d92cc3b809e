"""Server-side rendering: one Jinja2 environment with autoescaping on for every template
(anything from the database or the request is text, never markup), formatting filters,
pagination, and the headers every console response carries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined

from lamina import units
from lamina.names import NAME_PATTERN, USER_PATTERN, html_pattern

# No inline script or style is ever needed, so a strict policy turns any markup that got
# through escaping into inert text; frames are refused (clickjacking of action buttons).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not "no-referrer": Chromium then sends "Origin: null" on the console's own forms.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def human_bytes(n: float | None) -> str:
    return "—" if n is None else units.human_bytes(n)


def ago(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "never"
    if when.tzinfo is None:  # SQLite hands back naive datetimes; they were written in UTC
        when = when.replace(tzinfo=UTC)
    seconds = int(((now or datetime.now(UTC)) - when).total_seconds())
    if seconds < 5:
        return "just now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def stamp(when: datetime | None) -> str:
    if when is None:
        return ""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def number(n: float) -> str:
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


_env = Environment(
    loader=PackageLoader("lamina.manager.console", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(bytes=human_bytes, ago=ago, stamp=stamp, number=number)
# Client-side checks of the names a form takes: the patterns lamina.names checks.
_env.globals.update(
    name_pattern=html_pattern(NAME_PATTERN), user_pattern=html_pattern(USER_PATTERN)
)


@dataclass(frozen=True, slots=True)
class Pager:
    """One page of a server-side listing, with links that keep the filters."""

    page: int
    per: int
    total: int
    path: str
    filters: dict[str, str]

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per))

    @property
    def first(self) -> int:
        return min(self.total, self.offset + 1)

    @property
    def last(self) -> int:
        return min(self.total, self.offset + self.per)

    def url(self, page: int) -> str:
        params = {k: v for k, v in self.filters.items() if v} | {"page": str(page)}
        if self.per != DEFAULT_PER:
            params["per"] = str(self.per)
        return f"{self.path}?{urlencode(params)}"

    def query(self) -> str:
        """The query string of this very page (for live updates and ``next``)."""
        return self.url(self.page).partition("?")[2]

    def query_with(self, **changed: str) -> str:
        """The query string of the first page with some filters changed (a sort order)."""
        params = {k: v for k, v in (self.filters | changed).items() if v}
        if self.per != DEFAULT_PER:
            params["per"] = str(self.per)
        return urlencode(params)


DEFAULT_PER = 50


def here(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def render(
    request: Request, template: str, *, status_code: int = 200, **context: Any
) -> HTMLResponse:
    context.setdefault("csrf", "")
    context.setdefault("flashes", [])
    context.setdefault("live", None)
    html = _env.get_template(template).render(
        request_path=request.url.path, here=here(request), **context
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)
