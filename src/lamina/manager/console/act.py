"""How a console action runs an admin operation: through ``HomeAdmin`` (the services the
API and the CLI use), answered with a redirect back and a message, or, for a change that
would lose data (``Unconfirmed``), with a confirmation page that says what would be lost
and repeats the same form with ``confirm=1`` (a step of its own, not a script's prompt).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from lamina.errors import LaminaError, Unconfirmed
from lamina.home import Home
from lamina.manager.admin import HomeAdmin
from lamina.manager.console import auth
from lamina.manager.console.render import render
from lamina.manager.deps import HomeDep

Next = Annotated[str, Form(alias="next", max_length=2000)]
Confirm = Annotated[bool, Form()]


def local(path: str, default: str) -> str:
    """``path`` if it stays on this site (no scheme, no host, no header tricks)."""
    if (
        path.startswith("/")
        and not path.startswith("//")
        and "\\" not in path
        and not any(c in path for c in "\r\n\t")
    ):
        return path
    return default


@dataclass(frozen=True)
class Act:
    """A signed-in, CSRF-checked action request."""

    request: Request
    home: Home
    console: auth.ConsoleSignIn

    @property
    def admin(self) -> HomeAdmin:
        return HomeAdmin(self.home, self.console.actor())

    def back(self, next_: str, default: str, kind: str, text: str) -> RedirectResponse:
        with self.home.session() as db:
            auth.flash(db, self.console, kind, text)
        return RedirectResponse(local(next_, default), status_code=303)

    def run(
        self,
        label: str,
        next_: str,
        default: str,
        operation: Callable[[HomeAdmin], str],
        *,
        form: Mapping[str, str] | None = None,
    ) -> Response:
        """Run ``operation`` (it returns the message to show); a refusal comes back as
        "LABEL: why". ``form`` (the fields the action was posted with) lets a change that
        would lose data ask for confirmation instead of failing."""
        try:
            text = operation(self.admin)
        except Unconfirmed as exc:
            if form is None:
                return self.back(next_, default, "error", f"{label}: {exc}")
            return self.confirm(label, str(exc), next_, default, form)
        except LaminaError as exc:
            return self.back(next_, default, "error", f"{label}: {exc}")
        return self.back(next_, default, "ok", text)

    def confirm(
        self, label: str, why: str, next_: str, default: str, form: Mapping[str, str]
    ) -> HTMLResponse:
        return render(
            self.request,
            "confirm.html",
            csrf=self.console.csrf,
            label=label,
            why=why.replace(" (--force)", ""),  # the CLI's word; here the button confirms
            action=self.request.url.path,
            fields=dict(form),
            back=local(next_, default),
        )


def _act(request: Request, home: HomeDep, console: auth.CsrfDep) -> Act:
    return Act(request, home, console)


ActDep = Annotated[Act, Depends(_act)]
