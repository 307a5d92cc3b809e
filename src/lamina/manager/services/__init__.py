"""Service functions: keyword-only, one transaction's worth of work each; SQL lives here."""
