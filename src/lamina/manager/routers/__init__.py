"""HTTP routers of the manager, one module per area."""
