"""State that outlives one message: one-time claims and sliding-window counters.

Most of routemilter's state travels in signed addresses (SRS, bounce tokens),
so any MX host with the same secrets can act on it. What cannot (a token used
for one action only, rate limits) lives behind this small interface, so the
backend can be the daemon's memory (one host, the default) or a shared store
for several hosts. The daemon creates one store and keeps it across reloads
(`PolicyHolder.store`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import Callable, Protocol

MAX_KEYS = 100_000  # memory bound per kind of key: the oldest are dropped beyond it


class StoreError(Exception):
    """The store could not answer (a shared store is down or too slow)."""


class Store(Protocol):
    def claim(self, key: str, ttl: float) -> bool:
        """Record `key` for `ttl` seconds; True only for the first claim in that time."""

    def release(self, key: str) -> None:
        """Forget a claim (its action failed and will be retried)."""

    def window_count(self, key: str, window: float) -> int:
        """How many times `key` was added in the last `window` seconds."""

    def window_add(self, key: str, window: float) -> None:
        """Count one more occurrence of `key` now (kept for `window` seconds)."""


class MemoryStore:
    """In-process backend: shared by all connections of one daemon, thread-safe,
    bounded in size; starts empty after a restart and is not shared between hosts."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._claims: OrderedDict[str, float] = OrderedDict()  # key -> expiry
        self._windows: dict[str, deque] = {}

    def claim(self, key: str, ttl: float) -> bool:
        now = self._clock()
        with self._lock:
            expiry = self._claims.get(key)
            if expiry is not None and expiry > now:
                return False
            self._claims[key] = now + ttl
            self._claims.move_to_end(key)
            while len(self._claims) > MAX_KEYS:
                self._claims.popitem(last=False)
            return True

    def release(self, key: str) -> None:
        with self._lock:
            self._claims.pop(key, None)

    def _window(self, key: str, window: float) -> deque:
        hits = self._windows.get(key)
        if hits is None:
            if len(self._windows) >= MAX_KEYS:
                for old in list(self._windows)[: MAX_KEYS // 10]:
                    del self._windows[old]
            hits = self._windows[key] = deque()
        cutoff = self._clock() - window
        while hits and hits[0] <= cutoff:
            hits.popleft()
        return hits

    def window_count(self, key: str, window: float) -> int:
        with self._lock:
            return len(self._window(key, window))

    def window_add(self, key: str, window: float) -> None:
        with self._lock:
            self._window(key, window).append(self._clock())
