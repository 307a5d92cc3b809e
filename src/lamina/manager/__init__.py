"""The manager: the database, the services that hold its rules, the HTTP API and console.

db.py               engines, sessions and migrations (SQLite with WAL, PostgreSQL)
home.py             open_home: a home with the manager's database; init_home makes one
backup.py           lamina backup and restore: a consistent copy of a home, brought back
models/             the tables (SQLAlchemy), one module per area
migrations/         their schema changes (Alembic)
services/           the operations, one transaction's worth of work each, with their rules
admin.py            the admin operations as one interface: on a home, or through the API
views.py            rows as the API's Public schemas (the API, CLI and console show the same)
schemas.py          the API's request and response bodies (pydantic)
deps.py             FastAPI dependencies: home, database session, caller
routers/            the HTTP API: admin, agent, data (manifests, chunks), stream
console/            the web console
app.py              the FastAPI application
limits.py           request bodies bounded before authentication; 422s that echo nothing
metrics.py          GET /metrics (Prometheus text): NBD counters, HTTP latency, store, deltas
nbdtotals.py        the block server's counters, kept by NBD workers (no HTTP framework)
history.py          the dashboard's last day: samples a minute, drawn as SVG charts
agent_db.py         the agent API's database thread and change watcher
client.py           a small client of the HTTP API (CLI ``--manager``, the agent)
entitlements.py     which layers a user gets on a machine, in which order (pure)
layer_records.py    the layer code's LayerRecords over a home's database
rebase_records.py   the rebase code's RebaseRecords over a home's database
store_leases.py     a shared bucket's import leases and condemned packs as database rows
"""
