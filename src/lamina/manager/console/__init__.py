"""The web console, served by ``lamina serve`` at ``/`` beside the API: server-rendered
pages (Jinja2, autoescaped), a small hand-written script that polls JSON fragments for
live state, and every asset shipped in the package (it works offline).

auth.py     sign-in: one-time login tokens, the sign-in cookie, CSRF tokens
params.py   what pages take: query parameters, paging, the view they render through
render.py   the Jinja2 environment, formatting filters, pagination, security headers
pages.py    pages (GET): dashboard, machines, images, layers, users and groups
live.py     live JSON fragments the page script polls
act.py      how an action runs an admin operation: message, or a confirmation step
actions.py  actions (POST): sign in and out; machines, images, layers
access_actions.py   actions (POST): users, groups, members, entitlements
"""

from fastapi import APIRouter

from lamina.manager.console.access_actions import router as access_actions_router
from lamina.manager.console.actions import router as actions_router
from lamina.manager.console.live import router as live_router
from lamina.manager.console.pages import router as pages_router

router = APIRouter(include_in_schema=False)
router.include_router(pages_router)
router.include_router(actions_router)
router.include_router(access_actions_router)
router.include_router(live_router)

__all__ = ["router"]
