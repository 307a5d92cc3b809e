"""Alembic migrations of the manager's database, run by ``lamina.manager.db.migrate``.

env.py      the Alembic environment (runs on the connection lamina hands over)
versions/   one module per schema change, 0001 ... (``db.SCHEMA_HEAD`` is the newest)
"""
