"""Two MX hosts sharing state in one Redis: real Postfix on each, each with its own
routemilter daemon, the same config, SRS secret and DKIM keys, and one
redis-server started by this test on 127.0.0.1 (tests/redisserver.py).

* A rate limit of N per window holds for both hosts together: 2N attempts split
  over the hosts, N accepted (with per-host memory counters it would be 2N).
* Killing the Redis server in the middle of a load loses no mail: every message
  is accepted (rate limits fall back to each host's own counters) and arrives once.
* A forward sent through host A is bounced later by its destination; the bounce
  goes to host B (any MX of the SRS domain), which verifies A's token and A's
  DKIM signature with the shared secrets and sends the fallback copy, once.
* The same bounce replayed to either host does nothing more (the shared one-time
  claim); a bounce arriving while Redis is down is deferred (451 from the bounce
  handler, Postfix keeps it) and acted on once Redis is back.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import redisserver  # noqa: E402
from dnsserver import DNSServer  # noqa: E402
from fakemx import free_port, start_hosts  # noqa: E402
from stack import Stack  # noqa: E402

pytestmark = pytest.mark.integration

N = 3  # the rate limit under test: N per hour to one destination
LOAD = 40  # messages in the Redis-kill load
SENDER = "alice@sender.test"
RULES = """
state:
  backend: redis
  url: {redis_url}
  key_prefix: "mh:"
  timeout_ms: 500
auth:
  dns_server: {dns}
  dns_timeout: 2
  rules:
    limited: {{rate_limit: {{messages: {n}, seconds: 3600}}}}
    load: {{rate_limit: {{messages: 100000, seconds: 3600}}}}
bounces:
  socket: unix:{workdir}/bounce.sock
  reinject: 127.0.0.1:{reinject_port}
domains:
  family.test: {{}}
rules:
  - name: limited
    addresses: [limited@family.test]
    to: [limited@gmail.test]
  - name: load
    addresses: [load@family.test]
    to: [load@gmail.test]
  - name: backup
    addresses: [a@family.test]
    to:
      - address: a@gmail.test
        fallback: [a@outlook.test]
"""


@pytest.fixture(scope="module")
def env():
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    if not redisserver.available():
        pytest.fail("redis-server missing: run scripts/install-deps.sh")
    top = tempfile.mkdtemp(prefix="rmmh-", dir="/var/tmp")
    os.chmod(top, 0o755)
    redis = redisserver.RedisServer(top, unix=False).start()
    dns = DNSServer().start()
    mx = start_hosts(["gmail.test", "outlook.test", "sender.test"], 40)
    hosts: list[Stack] = []
    try:
        for name in ("a", "b"):
            workdir = os.path.join(top, name)
            os.makedirs(workdir)
            os.chmod(workdir, 0o755)
            if hosts:  # the same DKIM keys on every host
                shutil.copytree(os.path.join(hosts[0].workdir, "keys"), os.path.join(workdir, "keys"))
            rules = RULES.format(redis_url=redis.url, dns=dns.address, n=N, workdir=workdir,
                                 reinject_port=free_port())
            stack = Stack(workdir, rules, mx_hosts=mx)
            hosts.append(stack)
            stack.start()
        hosts[1].keys = hosts[0].keys
        yield hosts, redis, mx
    finally:
        for stack in hosts:
            stack.stop()
        for server in mx.values():
            server.stop()
        dns.stop()
        redis.stop()
        shutil.rmtree(top, ignore_errors=True)


def message(to: str, tag: str) -> bytes:
    return (f"From: Alice <{SENDER}>\r\nTo: <{to}>\r\nSubject: {tag}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@sender.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nthis is {tag}; exactly once.\r\n").encode()


def arrivals(mx: dict, tag: str) -> list[tuple[str, str, object]]:
    return [(server.name, rcpt, m) for server in mx.values() for m in list(server.messages)
            for rcpt in m.rcpt_tos if f"this is {tag};".encode() in m.data]


def settle(hosts, mx, tag_prefix: str, expected: int, timeout: float = 90) -> list:
    """Wait for `expected` arrivals of messages whose tag starts with tag_prefix, then
    for both queues to empty, then a little longer: a duplicate would show up."""
    def got():
        return [a for server in mx.values() for m in list(server.messages) for a in
                [(server.name, r, m) for r in m.rcpt_tos] if f"this is {tag_prefix}".encode() in m.data]
    deadline = time.monotonic() + timeout
    while len(got()) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    for stack in hosts:
        stack.postfix.wait_queue_empty(max(10, deadline - time.monotonic()))
    time.sleep(2)
    result = got()
    assert len(result) == expected, (len(result), [h.daemon.log_text()[-2000:] for h in hosts])
    return result


BOUNCED: dict[str, tuple[bytes, str]] = {}  # the first bounce, for the replay test


def late_dsn(delivered) -> bytes:
    """The DSN a destination that accepted `delivered` and bounced it later would send."""
    return (b"From: Mail Delivery Subsystem <mailer-daemon@gmail.test>\r\nTo: " + delivered.mail_from.encode()
            + b"\r\nSubject: Delivery Status Notification (Failure)\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/report; boundary=\"000x\"; report-type=delivery-status\r\n\r\n"
            b"--000x\r\nContent-Type: text/plain\r\n\r\nThe recipient's inbox is full.\r\n"
            b"--000x\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; gmail.test\r\n\r\n"
            b"Final-Recipient: rfc822; a@gmail.test\r\nAction: failed\r\nStatus: 5.2.2\r\n"
            b"Diagnostic-Code: smtp; 552 5.2.2 The recipient's inbox is out of storage space\r\n\r\n"
            b"--000x\r\nContent-Type: message/rfc822\r\n\r\n" + delivered.data + b"\r\n--000x--\r\n")


def test_rate_limit_holds_across_both_hosts(env):
    hosts, _redis, mx = env
    accepted, deferred = [], []
    for attempt in range(2 * N):
        host = hosts[attempt % 2]
        tag = f"rl-{attempt}"
        r = host.postfix.send(SENDER, ["limited@family.test"], message("limited@family.test", tag))
        if r.accepted:
            accepted.append((attempt % 2, tag))
        else:
            code, text = r.rcpt["limited@family.test"]
            assert code == 451 and "4.7.1" in text and "limited@gmail.test" in text, r
            deferred.append(attempt % 2)
    assert len(accepted) == N and len(deferred) == N, (accepted, deferred)
    assert {h for h, _ in accepted} == {0, 1} and set(deferred) == {0, 1}  # each host accepted and refused
    got = settle(hosts, mx, "rl-", N)
    assert sorted(rcpt for _, rcpt, _ in got) == ["limited@gmail.test"] * N


def test_killing_redis_mid_load_loses_no_mail(env):
    hosts, redis, mx = env
    results: list[tuple[str, object]] = []
    sent = threading.Semaphore(0)

    def sender(index: int):
        for i in range(index, LOAD, 2):
            tag = f"load-{i:03d}"
            results.append((tag, hosts[index].postfix.send(SENDER, ["load@family.test"],
                                                           message("load@family.test", tag))))
            sent.release()

    threads = [threading.Thread(target=sender, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    try:
        for _ in range(LOAD // 3):
            assert sent.acquire(timeout=120)
        redis.kill()  # SIGKILL, in the middle of the load
        killed_after = len(results)
    finally:
        for t in threads:
            t.join(300)
    assert killed_after < LOAD
    refused = [(tag, r.first_failure()) for tag, r in results if not r.accepted]
    assert refused == [], refused  # degraded mode: each host's own counters decide, nothing tempfailed
    got = settle(hosts, mx, "load-", LOAD)
    tags = sorted(m.data.split(b"this is ")[1].split(b";")[0].decode() for _, _, m in got)
    assert tags == [f"load-{i:03d}" for i in range(LOAD)]  # each exactly once
    for stack in hosts:
        assert "state store redis at" in stack.daemon.log_text()  # the outage was logged
    redis.start()  # back (empty) for the tests after this one
    time.sleep(2.5)  # RETRY_AFTER: the daemons try the server again after it


def test_bounce_from_host_a_is_handled_by_host_b_once(env):
    hosts, _redis, mx = env
    a, b = hosts
    tag = "bounce-ab"
    r = a.postfix.send(SENDER, ["a@family.test"], message("a@family.test", tag))
    assert r.accepted, r
    (name, rcpt, delivered), = settle(hosts, mx, tag, 1)
    assert (name, rcpt) == ("gmail.test", "a@gmail.test")
    token = delivered.mail_from
    assert token.startswith(("rmb=", "rmc="))
    # The destination accepted it, then bounced it (over quota); its DSN goes to an MX
    # of the SRS domain: host B, which never saw the forward.
    dsn = late_dsn(delivered)
    BOUNCED["ab"] = (dsn, token)
    r = b.postfix.send("", [token], dsn)
    assert r.accepted, r
    got = settle(hosts, mx, tag, 2)
    (name, rcpt, fallback), = [g for g in got if g[0] != "gmail.test"]
    assert (name, rcpt) == ("outlook.test", "a@outlook.test")
    assert sorted(b.verify_dkim(fallback.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    assert "bounce rcpt=<" + token in b.daemon.log_text()
    assert "bounce rcpt=<" not in a.daemon.log_text()


def test_replayed_bounce_is_ignored_on_either_host(env):
    """The same DSN again, to host B and to host A: the shared claim says the action
    was taken; nothing more is sent (the replay is answered 250 and logged)."""
    hosts, _redis, mx = env
    dsn, token = BOUNCED["ab"]
    before = len(arrivals(mx, "bounce-ab"))
    for host in hosts[::-1]:
        r = host.postfix.send("", [token], dsn)
        assert r.accepted, r
    for host in hosts:
        host.postfix.wait_queue_empty(60)
    deadline = time.monotonic() + 30
    while sum(h.daemon.log_text().count("replay-ignored") for h in hosts) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    assert len(arrivals(mx, "bounce-ab")) == before
    for host in hosts:
        assert "replay-ignored" in host.daemon.log_text()


def test_bounce_while_redis_is_down_is_deferred_then_acted_on_once(env):
    """The one-time claim cannot be taken: the bounce handler answers 451, Postfix keeps
    the bounce; once Redis is back the retry sends the fallback, once."""
    hosts, redis, mx = env
    a, b = hosts
    tag = "bounce-down"
    r = a.postfix.send(SENDER, ["a@family.test"], message("a@family.test", tag))
    assert r.accepted, r
    (_, _, delivered), = settle(hosts, mx, tag, 1)
    dsn = late_dsn(delivered)
    redis.kill()
    try:
        r = b.postfix.send("", [delivered.mail_from], dsn)
        assert r.accepted, r  # the MTA took it: from here on it is in B's queue
        b.postfix.wait_log(r"rm_bounce.*status=deferred", timeout=45)
        time.sleep(2)
        assert len(arrivals(mx, tag)) == 1
    finally:
        redis.start()
    time.sleep(2.5)  # RETRY_AFTER
    b.postfix.flush()
    got = settle(hosts, mx, tag, 2)
    assert sorted(name for name, _, _ in got) == ["gmail.test", "outlook.test"]
