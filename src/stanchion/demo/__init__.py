"""The reference system: an online shop built from all eight patterns.

``stanchion demo`` runs it; :class:`Demo` is the same thing as a library, for
tests and scripts::

    async with Demo(DemoOptions(port=8700, rate=2)) as demo:
        status, answer = await demo.place_order(
            {"customer": "ada", "region": "eu", "items": [{"sku": "tea", "qty": 1}]}
        )

.. versionadded:: 0.1
"""

from __future__ import annotations

from stanchion.demo._app import Demo, DemoOptions

__all__ = ["Demo", "DemoOptions"]
