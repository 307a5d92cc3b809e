"""The machine agent: reports boot, applies identity, and makes what is mounted on the
machine what the manager wants (layers at login, live attach/detach, writable layers).

daemon.py           ``lamina agent``: the process, its control socket, login/logout, the long-poll
host.py             the agent's files on a host and its control socket (``run/agent.sock``)
reconcile.py        desired state vs mounted state -> attach/detach actions (pure)
fetch.py            layer data between the manager and this host's store
lazy.py             layer versions attached lazily: metadata now, data on first read
local_versions.py   the agent's local copy of the manager's layer versions (its own database)
"""
