"""Per-destination rate limits, so one noisy sender cannot get this server
throttled by a mailbox provider (`451 4.7.650 ... rate limited due to IP reputation`).

A sliding window per key (a destination address, or sender and destination):
`allowed()` is asked at RCPT, `count()` is called for each accepted forward.
The windows live in the state store (state.py): with Redis, shared by every MX
host and kept across restarts; with the memory backend, per process.

When the shared store cannot answer, the limit is not dropped and mail is not
refused for it: this host's own counters (kept alongside all the time) decide,
so each host still holds its own traffic to the limit until the store is back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .state import MemoryStore, Store, StoreError

if TYPE_CHECKING:
    from .authconfig import RateLimit


class RateLimiter:
    """The windows of one daemon: its state store is passed in (PolicyHolder.store);
    without one, the limiter gets a store of its own (tests, a single check)."""

    def __init__(self, store: Store | None = None):
        self.store: Store = store if store is not None else MemoryStore()
        # The degraded-mode counters: this host's own forwards, always counted.
        self.local: Store = self.store if isinstance(self.store, MemoryStore) else MemoryStore()

    def allowed(self, key: str, limit: RateLimit) -> bool:
        key = "rl:" + key
        try:
            count = self.store.window_count(key, limit.seconds)
        except StoreError:
            count = self.local.window_count(key, limit.seconds)
        return count < limit.messages

    def count(self, key: str, limit: RateLimit) -> None:
        key = "rl:" + key
        if self.local is not self.store:
            self.local.window_add(key, limit.seconds)
        try:
            self.store.window_add(key, limit.seconds)
        except StoreError:
            pass  # counted locally above; the store's error is logged by the store
