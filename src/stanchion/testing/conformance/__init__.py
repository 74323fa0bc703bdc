"""Conformance suites, one per pattern, run over every backend.

Each pattern adds a module here (``stanchion.testing.conformance.pubsub``, ...)
holding its suite as plain test functions or classes that take a
``backend_url`` fixture; ``tests/conformance/`` parametrises them over every
backend and third parties can run them against their own.
"""
