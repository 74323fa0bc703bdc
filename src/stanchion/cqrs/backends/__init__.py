"""Read-model backends: one thin adapter per engine (SQLite, PostgreSQL, Redis)."""
