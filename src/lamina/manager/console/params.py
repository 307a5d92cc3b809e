"""What the console's pages take: query parameters with their bounds, paging, and the view
(request, home, console session) every page renders through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from fastapi.responses import HTMLResponse

from lamina.home import Home
from lamina.manager.console import auth
from lamina.manager.console.render import DEFAULT_PER, Pager, render
from lamina.manager.deps import HomeDep
from lamina.names import MACHINE_PREFIX, NAME_PATTERN

PageNo = Annotated[int, Query(ge=1, le=1_000_000)]
Per = Annotated[int, Query(ge=1, le=500)]
Text = Annotated[str, Query(max_length=100)]
ObjName = Annotated[str, Path(pattern=NAME_PATTERN)]
Mode = Annotated[str, Query(pattern="^(|stateless|stateful)$")]
Kind = Annotated[str, Query(pattern="^(|app|writable)$")]
Sort = Annotated[str, Query(pattern="^(|name|image|mode|hostname|mac|last_boot)$")]
Order = Annotated[str, Query(pattern="^(|asc|desc)$")]
GroupName = Annotated[str, Query(max_length=64)]
# The images page adds up each version's unique bytes: smaller pages.
IMAGES_PER = 20


@dataclass(frozen=True)
class Paging:
    """One page of a list and its name filter (``q``)."""

    page: int
    per: int
    q: str

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per


def _paging(page: PageNo = 1, per: Per = DEFAULT_PER, q: Text = "") -> Paging:
    return Paging(page, per, q)


def _image_paging(
    page: PageNo = 1, per: Annotated[int, Query(ge=1, le=200)] = IMAGES_PER, q: Text = ""
) -> Paging:
    return Paging(page, per, q)


PagingDep = Annotated[Paging, Depends(_paging)]
ImagePagingDep = Annotated[Paging, Depends(_image_paging)]


@dataclass(frozen=True)
class View:
    """A signed-in page request: renders templates with the session's CSRF token and the
    flash messages waiting for it."""

    request: Request
    home: Home
    console: auth.ConsoleSignIn

    def page(self, template: str, **context: Any) -> HTMLResponse:
        with self.home.session() as db:
            flashes = auth.take_flashes(db, self.console)
        return self.render(template, flashes, **context)

    def render(self, template: str, flashes: list[tuple[str, str]], **context: Any) -> HTMLResponse:
        return render(self.request, template, csrf=self.console.csrf, flashes=flashes, **context)

    def missing(self, text: str) -> HTMLResponse:
        with self.home.session() as db:
            flashes = [*auth.take_flashes(db, self.console), ("error", text)]
        return render(
            self.request, "missing.html", status_code=404, csrf=self.console.csrf, flashes=flashes
        )

    def clients(self) -> dict[str, str]:
        """Machine name -> address of the NBD client holding its disk (when this manager
        runs beside the block server)."""
        source = getattr(self.request.app.state, "nbd_totals", None)
        if source is None:
            return {}
        return {e.removeprefix(MACHINE_PREFIX): peer for e, peer in source().machines.items()}

    def nbd_endpoint(self) -> tuple[str, int, bool] | None:
        """(host, port, TLS) of the block server beside this manager, if any; a wildcard
        address is named as the browser named this manager."""
        address = getattr(self.request.app.state, "nbd_address", None)
        if address is None:
            return None
        host, port, tls = address
        if host in ("0.0.0.0", "::", ""):
            host = self.request.url.hostname or "127.0.0.1"
        return host, int(port), bool(tls)

    def nbd_url(self, export: str) -> str | None:
        """The URL a hypervisor opens ``export`` at (when this manager serves NBD too)."""
        endpoint = self.nbd_endpoint()
        if endpoint is None:
            return None
        host, port, tls = endpoint
        host = f"[{host}]" if ":" in host else host
        return f"{'nbds' if tls else 'nbd'}://{host}:{port}/{export}"

    def pager(self, paging: Paging, total: int, **filters: str) -> Pager:
        """The pager of this list; ``filters`` (with ``q``) carry over to its other pages."""
        return Pager(paging.page, paging.per, total, self.request.url.path, filters)


def _view(request: Request, home: HomeDep, console: auth.ConsoleDep) -> View:
    return View(request, home, console)


ViewDep = Annotated[View, Depends(_view)]
