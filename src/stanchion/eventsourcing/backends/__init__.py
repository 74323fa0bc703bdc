"""Event store engines: ``_memory``, ``_sqlite``, ``_postgres`` (thin adapters)."""
