"""Per-destination rate limits, so one noisy sender cannot get this server
throttled by a mailbox provider (`451 4.7.650 ... rate limited due to IP reputation`).

A sliding window per key (a destination address, or sender and destination):
`allowed()` is asked at RCPT, `count()` is called for each accepted forward. The
counters live in the daemon's memory, shared by all connections and kept across
config reloads (`RateLimiter.shared()`); they are per process, not shared
between several MX hosts, and start empty after a restart.
"""

from __future__ import annotations

import threading
import time
from collections import deque

MAX_KEYS = 100_000  # bound on memory: the oldest keys are dropped beyond it


class RateLimiter:
    _shared: "RateLimiter | None" = None

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._hits: dict[str, deque] = {}

    @classmethod
    def shared(cls) -> "RateLimiter":
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def _window(self, key: str, limit) -> deque:
        hits = self._hits.get(key)
        if hits is None:
            if len(self._hits) >= MAX_KEYS:
                for old in list(self._hits)[: MAX_KEYS // 10]:
                    del self._hits[old]
            hits = self._hits[key] = deque()
        cutoff = self._clock() - limit.seconds
        while hits and hits[0] <= cutoff:
            hits.popleft()
        return hits

    def allowed(self, key: str, limit) -> bool:
        with self._lock:
            return len(self._window(key, limit)) < limit.messages

    def count(self, key: str, limit) -> None:
        with self._lock:
            self._window(key, limit).append(self._clock())
