"""Resilience policies: circuit breaker, retry, timeout, bulkhead, rate limiter.

``CircuitBreaker`` follows resilience4j's semantics (count or time window,
slow calls, half-open with exactly N trial calls, forced-open and disabled
states), works on sync and async code (``call``, ``call_async``, ``@breaker``,
``with breaker:``, ``async with breaker:``) and can share its state across
processes through a store URL (``store="redis://..."``).

Also: ``Retry`` (``Exponential`` full-jitter or ``Fixed`` back-off, an
overall deadline that caps the last sleep and attempt, a ``RetryBudget``
shared by many retries), ``Timeout`` (async), ``Bulkhead``, ``RateLimiter``
and ``Policy`` / ``wrap`` to compose them, outermost first::

    RateLimiter -> Bulkhead -> Retry -> CircuitBreaker -> Timeout -> call

Example::

    from stanchion.resilience import CircuitBreaker, CircuitOpenError, State

    breaker = CircuitBreaker("payments", minimum_calls=20, wait_duration_open=30.0)

    @breaker
    async def charge(order_id: str) -> dict[str, object]: ...

Errors (all under ``StanchionError``): ``CircuitOpenError`` (``.name``,
``.retry_after``), ``RetryExhausted``, ``CallTimeout`` (a ``TimeoutError``),
``BulkheadFull``, ``RateLimited``.

.. versionadded:: 0.1
"""

from __future__ import annotations

from stanchion.errors import (
    BulkheadFull,
    CallTimeout,
    CircuitOpenError,
    RateLimited,
    RetryExhausted,
)
from stanchion.resilience._breaker import (
    BreakerEvent,
    CallFailed,
    CallRejected,
    CallSucceeded,
    CircuitBreaker,
    ErrorIgnored,
    SlowCall,
    StateChanged,
)
from stanchion.resilience._core import BreakerMetrics, Exponential, Fixed, State
from stanchion.resilience._policies import (
    Bulkhead,
    Policy,
    RateLimiter,
    Retry,
    RetryBudget,
    RetryEvent,
    Timeout,
    wrap,
)

__all__ = [
    "BreakerEvent",
    "BreakerMetrics",
    "Bulkhead",
    "BulkheadFull",
    "CallFailed",
    "CallRejected",
    "CallSucceeded",
    "CallTimeout",
    "CircuitBreaker",
    "CircuitOpenError",
    "ErrorIgnored",
    "Exponential",
    "Fixed",
    "Policy",
    "RateLimited",
    "RateLimiter",
    "Retry",
    "RetryBudget",
    "RetryEvent",
    "RetryExhausted",
    "SlowCall",
    "State",
    "StateChanged",
    "Timeout",
    "wrap",
]
