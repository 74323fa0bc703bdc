"""Shared breaker-state stores: memory (one process) and Redis."""
