"""State that outlives one message: one-time claims and sliding-window counters.

Most of routemilter's state travels in signed addresses (SRS, bounce tokens),
so any MX host with the same secrets can act on it. What cannot (a token used
for one action only, rate limits) lives behind this small interface, so the
backend can be the daemon's memory (one host, the default) or a shared Redis
or Valkey server for several hosts (`state:` in the config). The daemon creates
one store at start and keeps it across reloads (`PolicyHolder.store`).

A store that cannot answer raises StoreError; each feature decides what that
means (rate limits: this host's own counters; one-time bounce actions: 451,
the MTA retries). See docs/multi-host.md.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from .config.yamlcheck import Checker

log = logging.getLogger("routemilter.state")

MAX_KEYS = 100_000  # memory bound per kind of key: the oldest are dropped beyond it
T = TypeVar("T")


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

    def ping(self) -> None:
        """Raise StoreError unless the store can answer."""


class MemoryStore:
    """In-process backend: shared by all connections of one daemon, thread-safe,
    bounded in size; starts empty after a restart and is not shared between hosts."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._claims: OrderedDict[str, float] = OrderedDict()  # key -> expiry
        self._windows: dict[str, deque[float]] = {}  # key -> times of the hits

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

    def _window(self, key: str, window: float) -> deque[float]:
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

    def ping(self) -> None:
        return None


# ------------------------------------------------------------------ Redis

# Both scripts read the Redis server's clock, not the caller's: every host
# counts in one time base, whatever its own clock says. Scores are microseconds.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
"""
_COUNT = _NOW + "return redis.call('ZCARD', KEYS[1])"
_ADD = _NOW + """
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) / 1000) + 1000)
return 1
"""
RETRY_AFTER = 2.0  # seconds: after a failure, fail at once instead of waiting on a dead server again


class RedisStore:
    """Redis or Valkey (redis-py): shared by every host that points at the same
    server and key prefix, and kept across restarts. Claims are `SET NX PX`;
    a sliding window is a sorted set of hits trimmed and counted by one Lua
    script (atomic, on the server's clock). Every failure is a StoreError,
    raised within `timeout` seconds; after one, calls fail at once for
    RETRY_AFTER seconds so a dead server cannot add its timeout to every message."""

    def __init__(self, settings: StateSettings, clock: Callable[[], float] = time.monotonic):
        import redis  # noqa: PLC0415 - optional dependency, only for this backend
        from redis.backoff import NoBackoff  # noqa: PLC0415
        from redis.retry import Retry  # noqa: PLC0415

        self._errors = (redis.RedisError, OSError)
        options: dict[str, Any] = dict(
            socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout,
            retry=Retry(NoBackoff(), 0), client_name="routemilter")  # no retries: the MTA retries
        if settings.password:
            options["password"] = settings.password
        if settings.url:
            self._client = redis.Redis.from_url(settings.url, **options)
        else:
            # with a socket there is no host; redis-py ignores the host then
            self._client = redis.Redis(host=settings.host or "localhost", port=settings.port, db=settings.db,
                                       unix_socket_path=settings.socket, **options)
        self.where = settings.where
        self._prefix = settings.key_prefix
        self._count = self._client.register_script(_COUNT)
        self._add = self._client.register_script(_ADD)
        self._owner = f"{socket.gethostname()}:{os.getpid()}".encode()
        self._clock = clock
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        if self._down and self._clock() < self._down_until:
            raise StoreError(f"redis at {self.where} unreachable (retrying in a moment)")
        try:
            result = fn()
        except self._errors as exc:
            with self._lock:
                self._down_until = self._clock() + RETRY_AFTER
                if not self._down:
                    log.error("state store redis at %s failed (%s: %s): rate limits use this host's own "
                              "counters, one-time bounce actions are deferred (451) until it is back",
                              self.where, what, exc)
                self._down = True
            raise StoreError(f"redis at {self.where}: {type(exc).__name__}: {exc}") from None
        if self._down:
            with self._lock:
                if self._down:
                    log.warning("state store redis at %s is back", self.where)
                self._down = False
        return result

    def claim(self, key: str, ttl: float) -> bool:
        return bool(self._call("claim", lambda: self._client.set(
            self._prefix + "claim:" + key, self._owner, nx=True, px=max(1, int(ttl * 1000)))))

    def release(self, key: str) -> None:
        """Forget a claim (its action failed and will be retried)."""
        self._call("release", lambda: self._client.delete(self._prefix + "claim:" + key))

    def window_count(self, key: str, window: float) -> int:
        return int(self._call("window_count", lambda: self._count(
            keys=[self._prefix + "win:" + key], args=[int(window * 1_000_000)])))

    def window_add(self, key: str, window: float) -> None:
        self._call("window_add", lambda: self._add(
            keys=[self._prefix + "win:" + key], args=[int(window * 1_000_000), os.urandom(9).hex()]))

    def ping(self) -> None:
        """StoreError unless the server answers (used at start and by `routemilter check`)."""
        self._call("ping", self._client.ping)

    def close(self) -> None:
        self._client.close()


# ----------------------------------------------------------------- config


@dataclass(frozen=True)
class StateSettings:
    """`state:` in the config. Read once at start (see docs/multi-host.md)."""

    backend: str = "memory"  # memory | redis
    url: str | None = None  # redis://host:port/db, rediss://..., unix:///path
    host: str | None = None
    port: int = 6379
    socket: str | None = None  # unix socket path
    db: int = 0
    password: str | None = None  # from password_file
    key_prefix: str = "routemilter:"
    timeout: float = 0.5  # seconds per operation (timeout_ms in the YAML)

    @property
    def where(self) -> str:
        """The server, for messages (no password)."""
        if self.url:
            scheme, _, rest = self.url.partition("://")
            return f"{scheme}://{rest.rpartition('@')[2]}"
        return f"unix:{self.socket}" if self.socket else f"{self.host}:{self.port}"

    def __repr__(self) -> str:  # never the password
        return f"StateSettings(backend={self.backend!r}, where={self.where!r}, key_prefix={self.key_prefix!r})"


_STATE_KEYS = {"backend", "url", "host", "port", "socket", "db", "password_file", "key_prefix", "timeout_ms"}




def parse_state(c: Checker, raw: Any, line: int, config_path: str) -> StateSettings:
    """Validate `state:` (errors collected with their line)."""
    if raw is None:
        return StateSettings()
    m = c.mapping(raw, "state", line, _STATE_KEYS)
    backend = m.get("backend", "memory")
    if backend not in ("memory", "redis"):
        c.error(c.line_of(m, "backend"), "state.backend must be memory or redis")
        return StateSettings()
    if backend == "memory":
        extra = sorted(set(m) - {"backend"})
        if extra:
            c.error(c.line_of(m, extra[0]), f"state.{extra[0]} applies only to backend: redis")
        return StateSettings()
    try:
        import redis  # noqa: F401, PLC0415
    except ImportError:
        c.error(c.line_of(m, "backend"), "state.backend redis needs the Python package redis "
                                         "(pip install 'routemilter[redis]')")
    given = [k for k in ("url", "host", "socket") if k in m]
    if len(given) != 1:
        c.error(line, "state: give exactly one of url, host (with port) or socket for backend redis"
                      + (f" (found {', '.join(given)})" if given else ""))
    url = m.get("url")
    if url is not None and (not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://"))):
        c.error(c.line_of(m, "url"), "state.url must start with redis://, rediss:// or unix://")
        url = None
    host = m.get("host")
    if host is not None and (not isinstance(host, str) or not host or any(ch.isspace() for ch in host)):
        c.error(c.line_of(m, "host"), "state.host must be a host name or address")
        host = None
    sock = m.get("socket")
    if sock is not None and (not isinstance(sock, str) or not sock.startswith("/")):
        c.error(c.line_of(m, "socket"), "state.socket must be an absolute path")
        sock = None
    if "port" in m and "host" not in m:
        c.error(c.line_of(m, "port"), "state.port goes with state.host")
    port = _whole(c, m, "port", 6379, 1, 65535)
    db = _whole(c, m, "db", 0, 0, 1000)
    timeout_ms = _whole(c, m, "timeout_ms", 500, 10, 10000)
    prefix = m.get("key_prefix", "routemilter:")
    if not isinstance(prefix, str) or not 1 <= len(prefix) <= 100 or any(ord(ch) < 33 for ch in prefix):
        c.error(c.line_of(m, "key_prefix"), "state.key_prefix must be 1 to 100 printable characters without spaces")
        prefix = "routemilter:"
    password = None
    if "password_file" in m and c.read_secrets:
        pline = c.line_of(m, "password_file")
        name = m["password_file"]
        if not isinstance(name, str):
            c.error(pline, "state.password_file must be a path")
        else:
            path = name if os.path.isabs(name) else os.path.join(os.path.dirname(config_path) or ".", name)
            c.files.append((path, "password"))  # config.file_mode_problems: not readable by others
            try:
                password = Path(path).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                c.error(pline, f"cannot read state.password_file {path}: {getattr(exc, 'strerror', None) or exc}")
            else:
                if not password:
                    c.error(pline, f"state.password_file {path} is empty")
    return StateSettings("redis", url, host, port, sock, db, password or None, prefix, timeout_ms / 1000)


def _whole(c: Checker, m: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = m.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        c.error(c.line_of(m, key), f"state.{key} must be a whole number from {low} to {high}")
        return default
    return value


def open_store(settings: StateSettings | None) -> Store:
    """The store the settings name. Connects lazily: a server that is down at
    start is reported by ping(), and mail still flows (see docs/multi-host.md)."""
    if settings is not None and settings.backend == "redis":
        return RedisStore(settings)
    return MemoryStore()
