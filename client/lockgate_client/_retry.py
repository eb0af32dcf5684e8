"""Retry policy: exponential backoff with full jitter, bounded by the call's deadline.

Only ``UNAVAILABLE`` is retried: it means the request did not run (the server
was down, restarting, draining, or the model was not ready), so sending it
again is safe for reads. ``infer`` is retried only when the caller says so,
because a request that reached a model with side effects may run twice.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from lockgate_client.errors import LockgateError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """How calls are retried on ``UNAVAILABLE``.

    Attempt ``n`` (from 0) waits a random time in ``[0, min(max_backoff,
    initial_backoff * multiplier**n)]`` ("full jitter") before retrying, so
    many clients recovering from one outage do not retry in lockstep. No retry
    starts after the call's deadline would pass.

    Attributes:
        max_retries: retries after the first attempt (0 disables retrying).
        initial_backoff: upper bound of the first wait, in seconds.
        max_backoff: cap of the wait's upper bound, in seconds.
        multiplier: growth of the upper bound per retry.
        infer: also retry ``infer`` and stream opening (off by default:
            inference may not be idempotent).
    """

    max_retries: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    infer: bool = False

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    @classmethod
    def coerce(cls, value: RetryPolicy | int | None) -> RetryPolicy:
        """Accept the forms ``Client(retries=...)`` takes.

        ``None`` is the default policy; an int ``n`` retries every call,
        ``infer`` included, up to ``n`` times.
        """
        if value is None:
            return cls()
        if isinstance(value, RetryPolicy):
            return value
        return cls(max_retries=int(value), infer=True)

    def backoff(self, retry: int) -> float:
        """The random wait before retry number ``retry`` (from 0)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**retry)
        return random.uniform(0.0, ceiling)


class RetrySchedule:
    """The state of one logical call across its attempts."""

    def __init__(self, max_retries: int, policy: RetryPolicy, timeout: float | None) -> None:
        self._max_retries = max_retries
        self._policy = policy
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._retries = 0

    def remaining(self) -> float | None:
        """Seconds left before the call's deadline (the next attempt's gRPC timeout)."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def next_delay(self, error: LockgateError) -> float | None:
        """How long to wait before retrying after ``error``; None to give up."""
        if error.code != grpc.StatusCode.UNAVAILABLE or self._retries >= self._max_retries:
            return None
        delay = self._policy.backoff(self._retries)
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None
        self._retries += 1
        return delay
