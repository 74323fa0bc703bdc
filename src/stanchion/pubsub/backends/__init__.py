"""Thin adapters, one per engine, implementing :mod:`stanchion.pubsub._backend`."""
