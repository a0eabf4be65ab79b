"""The in-memory state store: one-time claims and sliding windows."""
from routemilter.state import MAX_KEYS, MemoryStore


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_claim_is_true_once_until_it_expires():
    clock = Clock()
    store = MemoryStore(clock)
    assert store.claim("token:a", ttl=60)
    assert not store.claim("token:a", ttl=60)
    assert store.claim("token:b", ttl=60)  # another key is independent
    clock.now += 61
    assert store.claim("token:a", ttl=60)


def test_window_counts_only_recent_hits():
    clock = Clock()
    store = MemoryStore(clock)
    for _ in range(3):
        store.window_add("rl:x", 10)
        clock.now += 4
    assert store.window_count("rl:x", 10) == 2  # the first hit is 12 s old
    clock.now += 20
    assert store.window_count("rl:x", 10) == 0
    assert store.window_count("rl:other", 10) == 0


def test_claims_are_bounded_oldest_dropped():
    store = MemoryStore(Clock())
    for i in range(MAX_KEYS + 5):
        store.claim(f"k{i}", 3600)
    assert len(store._claims) == MAX_KEYS
    assert store.claim("k0", 3600)  # dropped as the oldest: claimable again
    assert not store.claim(f"k{MAX_KEYS + 4}", 3600)
