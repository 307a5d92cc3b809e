"""Console sign-in: one-time login tokens, sign-ins held by a cookie, CSRF tokens.

``lamina serve`` prints a login URL with a one-time token (as Jupyter does); exchanging it
signs the browser in, held by an HttpOnly, SameSite=Strict cookie. The admin token is
accepted on the login form too, so an admin who lost the URL can get in again.

Tokens and sign-ins live in the database (the ``settings`` table, under ``console.`` keys)
rather than in memory, so every manager over one database honours them; only SHA-256
hashes of the secrets are stored, and redeeming a login token deletes its row in the same
statement that checks it, so of two managers racing for one token only one wins.

Every state-changing request must carry the sign-in's CSRF token, as a form field or an
``X-CSRF-Token`` header; a request from another origin is refused as well.
"""

from __future__ import annotations

import hmac
import json
import secrets
import sys
import time
from dataclasses import dataclass, replace
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request, Response, status
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from lamina.home import Home
from lamina.manager.deps import HomeDep, client_address
from lamina.manager.models import Setting
from lamina.manager.services import accounts
from lamina.manager.services.audit import Actor
from lamina.manager.services.machines import hash_token

COOKIE = "lamina_console"
LOGIN_PREFIX = "console.login."
SIGN_IN_PREFIX = "console.session."
LOGIN_TTL = 24 * 3600.0  # an unused login URL expires after a day
SIGN_IN_TTL = 12 * 3600.0  # an idle sign-in ends after 12 hours
MAX_FLASHES = 5


def _dump(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False)  # the column counts characters: no \\uXXXX


def _prune(db: Session, now: float) -> None:
    """Forget expired login tokens and sign-ins (a few rows; done at each sign-in)."""
    for row in db.scalars(select(Setting).where(Setting.key.startswith("console."))):
        try:
            expires = float(json.loads(row.value)["expires"])
        except (ValueError, KeyError, TypeError):
            expires = 0.0
        if expires < now:
            db.delete(row)


def new_login_token(db: Session) -> str:
    now = time.time()
    _prune(db, now)
    token = secrets.token_urlsafe(32)
    db.add(
        Setting(
            key=LOGIN_PREFIX + hash_token(token), value=json.dumps({"expires": now + LOGIN_TTL})
        )
    )
    db.flush()
    return token


def _start(db: Session, account: accounts.Account) -> str:
    sid = secrets.token_urlsafe(32)
    value = {
        "csrf": secrets.token_urlsafe(32),
        "expires": time.time() + SIGN_IN_TTL,
        "flash": [],
        "account": account.name,
        "role": account.role,
    }
    db.add(Setting(key=SIGN_IN_PREFIX + hash_token(sid), value=_dump(value)))
    db.flush()
    return sid


def redeem(db: Session, token: str) -> str | None:
    """A new sign-in id for a valid one-time token (which is used up), or for the admin
    token; None for anything else."""
    if not token or len(token) > 200:
        return None
    now = time.time()
    key = LOGIN_PREFIX + hash_token(token)
    row = db.get(Setting, key)
    if row is not None:
        expires = float(json.loads(row.value).get("expires", 0))
        # The delete decides: a token another manager redeemed a moment ago is gone here.
        gone = db.execute(delete(Setting).where(Setting.key == key)).rowcount  # type: ignore[attr-defined]
        db.expunge(row)
        if gone == 1 and expires >= now:  # printed by `lamina serve`: the built-in admin
            _prune(db, now)
            return _start(db, accounts.Account(accounts.BUILT_IN, "admin", built_in=True))
        return None
    account = accounts.by_token(db, token)  # an account's token signs it in
    if account is not None:
        _prune(db, now)
        return _start(db, account)
    return None


@dataclass(frozen=True, slots=True)
class ConsoleSignIn:
    key: str  # settings key of the sign-in
    csrf: str
    account: str = accounts.BUILT_IN
    role: str = "admin"
    address: str = ""

    def actor(self) -> Actor:
        return Actor(self.account, "console", self.address, self.role)


def lookup(db: Session, sid: str) -> ConsoleSignIn | None:
    if not sid or len(sid) > 200:
        return None
    key = SIGN_IN_PREFIX + hash_token(sid)
    row = db.get(Setting, key)
    if row is None:
        return None
    value = json.loads(row.value)
    now = time.time()
    if float(value.get("expires", 0)) < now:
        db.delete(row)
        return None
    if value["expires"] - now < SIGN_IN_TTL / 2:  # sliding expiry, one write per half-life
        value["expires"] = now + SIGN_IN_TTL
        row.value = _dump(value)
    return ConsoleSignIn(
        key,
        str(value["csrf"]),
        str(value.get("account", accounts.BUILT_IN)),
        str(value.get("role", "admin")),
    )


def end(db: Session, console: ConsoleSignIn) -> None:
    db.execute(delete(Setting).where(Setting.key == console.key))


def flash(db: Session, console: ConsoleSignIn, kind: str, text: str) -> None:
    """A message for the next page this sign-in sees (``ok`` or ``error``)."""
    row = db.get(Setting, console.key)
    if row is None:
        return
    value = json.loads(row.value)
    # Bounded (5 x 300 characters) to fit the settings column (4,000) on PostgreSQL too.
    value["flash"] = [*value.get("flash", []), [kind, text[:300]]][-MAX_FLASHES:]
    row.value = _dump(value)


def take_flashes(db: Session, console: ConsoleSignIn) -> list[tuple[str, str]]:
    row = db.get(Setting, console.key)
    if row is None:
        return []
    value = json.loads(row.value)
    found = [(str(k), str(t)) for k, t in value.get("flash", [])]
    if found:
        value["flash"] = []
        row.value = _dump(value)
    return found


def set_cookie(request: Request, response: Response, sid: str) -> None:
    response.set_cookie(
        COOKIE,
        sid,
        max_age=int(SIGN_IN_TTL),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


# -- dependencies -----------------------------------------------------------------------------


def console_sign_in(request: Request, home: HomeDep) -> ConsoleSignIn:
    """The console sign-in; pages redirect to the login page without one."""
    sid = request.cookies.get(COOKIE, "")
    found = None
    if sid:
        with home.session() as db:
            found = lookup(db, sid)
    if found is None:
        if request.url.path.startswith("/live/") or request.method != "GET":
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "not signed in to the console")
        raise HTTPException(status.HTTP_303_SEE_OTHER, headers={"Location": "/login"})
    return replace(found, address=client_address(request))


ConsoleDep = Annotated[ConsoleSignIn, Depends(console_sign_in)]


def _same_origin(request: Request) -> bool:
    """False only for a request that names another origin. Browsers send Origin on every
    POST, but "null" under some privacy settings and none in old versions; the CSRF token
    decides those."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def require_csrf(request: Request, console: ConsoleDep) -> ConsoleSignIn:
    """The sign-in, for a state-changing request that proves it came from a console page."""
    sent = request.headers.get("x-csrf-token")
    if sent is None:
        form = await request.form()
        value = form.get("csrf")
        sent = value if isinstance(value, str) else ""
    if not _same_origin(request) or not sent or not hmac.compare_digest(sent, console.csrf):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token")
    if console.role != "admin" and request.url.path != "/logout":
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"account {console.account!r} ({console.role}) is read-only"
        )
    return console


CsrfDep = Annotated[ConsoleSignIn, Depends(require_csrf)]


def login_url(home: Home, address: tuple[str, int], *, scheme: str = "http") -> str:
    """A fresh one-time login URL for a manager listening on ``address``."""
    host, port = address
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    with home.session() as db:
        token = new_login_token(db)
    return f"{scheme}://{host}:{port}/login?token={token}"


def print_login_url(home: Home, address: tuple[str, int], *, https: bool = False) -> None:
    url = login_url(home, address, scheme="https" if https else "http")
    sys.stderr.write(f"lamina console: {url}\n")
    sys.stderr.flush()
