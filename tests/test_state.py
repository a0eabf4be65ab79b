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


# ------------------------------------------------------------ Redis backend
# Against a real redis-server (tests/redisserver.py) on a unix socket, or on a
# free 127.0.0.1 port; the memory backend runs the same parity tests.

import logging  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

import redisserver  # noqa: E402
from routemilter import state as state_mod  # noqa: E402
from routemilter.ratelimit import RateLimiter  # noqa: E402
from routemilter.state import RedisStore, StateSettings, StoreError, open_store  # noqa: E402

needs_redis = pytest.mark.skipif(not redisserver.available(), reason="redis-server is not installed "
                                 "(scripts/install-deps.sh installs it)")


@pytest.fixture
def redis_server(tmp_path):
    server = redisserver.RedisServer(str(tmp_path)).start()
    yield server
    server.stop()


def redis_store(server, prefix="t:", timeout=0.5, **kw) -> RedisStore:
    return RedisStore(StateSettings("redis", url=server.url, key_prefix=prefix, timeout=timeout, **kw))


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def any_store(request, tmp_path):
    if request.param == "memory":
        yield MemoryStore()
        return
    server = redisserver.RedisServer(str(tmp_path)).start()
    yield redis_store(server)
    server.stop()


def test_parity_claim_once_per_ttl(any_store):
    assert any_store.claim("bounce:tok1", ttl=0.4)
    assert not any_store.claim("bounce:tok1", ttl=0.4)
    assert any_store.claim("bounce:tok2", ttl=0.4)
    time.sleep(0.6)
    assert any_store.claim("bounce:tok1", ttl=0.4)  # expired: claimable again


def test_parity_sliding_window(any_store):
    assert any_store.window_count("rl:x", 0.5) == 0
    any_store.window_add("rl:x", 0.5)
    any_store.window_add("rl:x", 0.5)
    time.sleep(0.3)
    any_store.window_add("rl:x", 0.5)
    assert any_store.window_count("rl:x", 0.5) == 3
    assert any_store.window_count("rl:y", 0.5) == 0
    time.sleep(0.35)  # the first two are now older than the window
    assert any_store.window_count("rl:x", 0.5) == 1
    time.sleep(0.3)
    assert any_store.window_count("rl:x", 0.5) == 0


def test_parity_ping(any_store):
    any_store.ping()


@needs_redis
def test_redis_is_shared_between_hosts_and_outlives_a_restart(redis_server):
    host_a, host_b = redis_store(redis_server), redis_store(redis_server)
    assert host_a.claim("bounce:t", 60)
    assert not host_b.claim("bounce:t", 60)  # the other host sees the claim
    for store in (host_a, host_b, host_a):
        store.window_add("rl:dest", 60)
    assert host_b.window_count("rl:dest", 60) == 3
    host_a.close()
    restarted = redis_store(redis_server)  # the daemon on host A restarted
    assert restarted.window_count("rl:dest", 60) == 3
    assert not restarted.claim("bounce:t", 60)
    other_prefix = redis_store(redis_server, prefix="other:")
    assert other_prefix.window_count("rl:dest", 60) == 0 and other_prefix.claim("bounce:t", 60)


@needs_redis
def test_redis_release_makes_a_claim_available_again(redis_server):
    host_a, host_b = redis_store(redis_server), redis_store(redis_server)
    assert host_a.claim("bounce:r", 60)
    host_a.release("bounce:r")  # the action failed: the retry, on any host, may act
    assert host_b.claim("bounce:r", 60)
    assert not host_a.claim("bounce:r", 60)
    host_b.release("never-claimed")  # no error


@needs_redis
def test_redis_keys_expire_and_windows_stay_small(redis_server):
    import redis

    store = redis_store(redis_server)
    for _ in range(5):
        store.window_add("rl:k", 0.5)
    store.claim("c", 0.5)
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.zcard("t:win:rl:k") == 5 and 0 < raw.pttl("t:win:rl:k") <= 1500
    assert 0 < raw.pttl("t:claim:c") <= 500
    time.sleep(0.7)
    store.window_add("rl:k", 0.5)
    assert raw.zcard("t:win:rl:k") == 1  # trimmed when touched
    time.sleep(1.6)
    assert raw.exists("t:win:rl:k", "t:claim:c") == 0  # nothing left behind


@needs_redis
def test_redis_over_tcp_with_password_file(tmp_path):
    server = redisserver.RedisServer(str(tmp_path), unix=False, password="s3cret-pass").start()
    try:
        (tmp_path / "pw").write_text("s3cret-pass\n")
        config = load_state(tmp_path, f"backend: redis\n  host: 127.0.0.1\n  port: {server.port}\n"
                                      f"  password_file: pw\n  timeout_ms: 300")
        assert config.password == "s3cret-pass" and config.timeout == 0.3
        from routemilter.config import file_mode_problems, loads

        (tmp_path / "pw").chmod(0o644)
        full = loads(f"domains:\n  family.test: {{}}\nstate:\n  backend: redis\n  url: {server.url}\n"
                     f"  password_file: pw\n", str(tmp_path / "routemilter.yaml"))
        assert f"{tmp_path / 'pw'}: mode 0644: others can read; it holds the state store's password (chmod 640)" \
            in file_mode_problems(full), \
            file_mode_problems(full)
        (tmp_path / "pw").chmod(0o600)
        assert "s3cret" not in repr(config)
        store = open_store(config)
        assert store.claim("x", 10) and not store.claim("x", 10)
        wrong = RedisStore(StateSettings("redis", host="127.0.0.1", port=server.port, password="wrong"))
        with pytest.raises(StoreError):
            wrong.claim("y", 10)
    finally:
        server.stop()


@needs_redis
def test_redis_down_is_a_store_error_fast_then_recovers(redis_server, caplog):
    clock = Clock()
    store = RedisStore(StateSettings("redis", url=redis_server.url, key_prefix="t:", timeout=0.3), clock=clock)
    assert store.claim("before", 60)
    store.window_add("w", 60)  # the scripts are loaded into this server
    redis_server.kill()
    with caplog.at_level(logging.ERROR, logger="routemilter.state"):
        for call in (lambda: store.claim("k", 60), lambda: store.window_count("w", 60),
                     lambda: store.window_add("w", 60), store.ping):
            started = time.monotonic()
            with pytest.raises(StoreError):
                call()
            assert time.monotonic() - started < 1.0
    assert sum("failed" in r.message for r in caplog.records) == 1  # logged once, not per call
    redis_server.start()
    with pytest.raises(StoreError, match="retrying in a moment"):
        store.claim("k", 60)  # within RETRY_AFTER: not even tried
    clock.now += state_mod.RETRY_AFTER + 0.1
    assert store.claim("k", 60)  # a new server: empty, so the claim succeeds
    store.window_add("w", 60)  # the new server lacks the scripts: loaded again (NOSCRIPT)
    assert store.window_count("w", 60) == 1
    store.ping()


@needs_redis
def test_redis_hung_server_times_out_within_the_setting(redis_server):
    store = redis_store(redis_server, timeout=0.2)
    store.ping()
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="Timeout"):
            store.claim("hung", 60)
        elapsed = time.monotonic() - started
        assert 0.15 < elapsed < 1.5, elapsed
        started = time.monotonic()
        with pytest.raises(StoreError):
            store.window_count("hung", 60)  # fails at once, does not wait again
        assert time.monotonic() - started < 0.05
    finally:
        redis_server.resume()


# ----------------------------------------------------------- rate limits


class Limit:
    def __init__(self, messages, seconds):
        self.messages, self.seconds = messages, seconds


@needs_redis
def test_rate_limit_holds_across_two_hosts(redis_server):
    limit = Limit(3, 60)
    hosts = [RateLimiter(redis_store(redis_server)), RateLimiter(redis_store(redis_server))]
    accepted = 0
    for attempt in range(6):  # 2N attempts, alternating hosts
        limiter = hosts[attempt % 2]
        if limiter.allowed("me@gmail.test", limit):
            limiter.count("me@gmail.test", limit)
            accepted += 1
    assert accepted == 3
    assert RateLimiter(redis_store(redis_server)).allowed("me@gmail.test", limit) is False  # after a restart


@needs_redis
def test_rate_limit_store_down_uses_this_hosts_counters(redis_server):
    limit = Limit(3, 60)
    host_a, host_b = RateLimiter(redis_store(redis_server)), RateLimiter(redis_store(redis_server))
    host_a.count("d", limit)
    host_b.count("d", limit)
    host_b.count("d", limit)
    assert not host_a.allowed("d", limit)  # shared: 3 of 3
    redis_server.kill()
    # Degraded: each host its own counters, kept all along. Host A sent 1, B sent 2.
    assert host_a.allowed("d", limit)
    host_a.count("d", limit)  # no exception: counted locally
    host_a.count("d", limit)
    assert not host_a.allowed("d", limit)  # 3 of 3 on this host alone
    assert host_b.allowed("d", limit)
    host_b.count("d", limit)
    assert not host_b.allowed("d", limit)


def test_rate_limiter_over_memory_store_counts_once():
    store = MemoryStore()
    limiter = RateLimiter(store)
    assert limiter.local is store
    limit = Limit(2, 60)
    limiter.count("d", limit)
    assert store.window_count("rl:d", 60) == 1
    assert limiter.allowed("d", limit)
    limiter.count("d", limit)
    assert not limiter.allowed("d", limit)


# ------------------------------------------------------------------ config


def load_state(tmp_path, section: str):
    from routemilter.config import loads

    text = f"domains:\n  family.test: {{}}\nstate:\n  {section}\n"
    return loads(text, str(tmp_path / "routemilter.yaml")).state


def test_state_defaults_to_memory(tmp_path):
    from routemilter.config import loads

    assert loads("domains:\n  family.test: {}\n").state == StateSettings()
    assert isinstance(open_store(load_state(tmp_path, "backend: memory")), MemoryStore)


def test_state_config_errors_all_at_once_with_lines(tmp_path):
    from routemilter.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_state(tmp_path, "backend: redis\n  url: http://x\n  host: a\n  timeout_ms: 60000\n"
                             "  key_prefix: 'has space'\n  password_file: missing\n  colour: red")
    problems = "\n".join(err.value.problems)
    for expected in (":3: state: give exactly one of url, host (with port) or socket for backend redis "
                     "(found url, host)",
                     ":5: state.url must start with redis://, rediss:// or unix://",
                     ":7: state.timeout_ms must be a whole number from 10 to 10000",
                     ":8: state.key_prefix must be 1 to 100",
                     ":9: cannot read state.password_file",
                     ":10: unknown key 'colour' in state"):
        assert expected in problems, problems
    with pytest.raises(ConfigError, match=re.escape(":4: state.backend must be memory or redis")):
        load_state(tmp_path, "backend: etcd")
    with pytest.raises(ConfigError, match=re.escape(":5: state.host applies only to backend: redis")):
        load_state(tmp_path, "backend: memory\n  host: x")


def test_state_socket_and_url_forms(tmp_path):
    s = load_state(tmp_path, "backend: redis\n  socket: /run/redis/redis.sock\n  db: 2")
    assert (s.socket, s.db, s.where, s.timeout) == ("/run/redis/redis.sock", 2, "unix:/run/redis/redis.sock", 0.5)
    s = load_state(tmp_path, "backend: redis\n  url: 'redis://:pw@10.0.0.5:6379/1'")
    assert s.where == "redis://10.0.0.5:6379/1"  # never the password


# --------------------------------------------------- check, start, reload


@needs_redis
def test_check_reaches_the_store(redis_server, tmp_path, capsys):
    from routemilter.cli import main

    path = tmp_path / "routemilter.yaml"
    path.write_text(f"domains:\n  family.test: {{}}\nstate:\n  backend: redis\n  url: {redis_server.url}\n")
    assert main(["-c", str(path), "check"]) == 0
    assert f"state: redis at unix://{redis_server.socket} (reachable)" in capsys.readouterr().out
    redis_server.kill()
    assert main(["-c", str(path), "check"]) == 1
    err = capsys.readouterr().err
    assert f"state: redis at unix://{redis_server.socket}: ConnectionError" in err, err


def test_check_memory_backend_needs_no_server(tmp_path, capsys):
    from routemilter.cli import main

    path = tmp_path / "routemilter.yaml"
    path.write_text("domains:\n  family.test: {}\nstate:\n  backend: memory\n")
    assert main(["-c", str(path), "check"]) == 0
    assert "state:" not in capsys.readouterr().out


@needs_redis
def test_daemon_builds_policies_over_one_store_and_keeps_it_on_reload(redis_server, tmp_path, caplog):
    from routemilter.daemon import Daemon

    path = tmp_path / "routemilter.yaml"
    base = "auth:\n  arc: false\n  rate_limit: {messages: 5, seconds: 60}\ndomains:\n  family.test: {}\n"
    path.write_text(base + f"state:\n  backend: redis\n  url: {redis_server.url}\n")
    daemon = Daemon(str(path))
    store = daemon.holder.store
    assert isinstance(store, RedisStore) and daemon.holder.current.auth.limiter.store is store
    path.write_text(base)  # state: removed (memory): kept until a restart
    with caplog.at_level(logging.WARNING, logger="routemilter"):
        assert daemon.reload()
    assert daemon.holder.store is store and daemon.holder.current.auth.limiter.store is store
    assert "state: changed; the running state store is kept until a restart" in caplog.text
