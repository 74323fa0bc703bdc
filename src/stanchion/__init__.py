"""stanchion: the eight patterns that hold a distributed service together.

Importing :mod:`stanchion` loads no pattern and no driver; import the pattern
you need (``stanchion.resilience``, ``stanchion.pubsub``, ...).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
