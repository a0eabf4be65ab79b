"""Relay-level fallback through a real Postfix configured by `routemilter postfix-config`.

Routes become Postfix transports with `smtp_fallback_relay` (mtaconfig.py); the
stack maps only the `mx` hop to the destination domain's FakeMX, everything
else (transport names, next hops, fallback relays) is the generated config.

* a primary MX answering the seeds' `451 4.7.650 ... rate limited due to IP
  reputation` (at RCPT, or after DATA): the copy arrives via the fallback
  relay, once;
* relay-first routes whose first relay resets the connection, is down, or
  hangs: the copy arrives via the second relay, once;
* fan-out where one destination is rate limited and the other is not (on
  different hosts, and on the same host): each copy arrives exactly once.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from checks import SRS0, OpenDKIM, added_headers, arrivals_of, seed_message, wait_arrivals  # noqa: E402
from fakemx import RATE_LIMITED, FakeMX, free_port  # noqa: E402
from stack import Stack  # noqa: E402

pytestmark = pytest.mark.integration

SENDER = "alice@sender.test"

RULES = """
routes:
  mx-then-relay: [mx, "[{fb.host}]:{fb.port}"]
  relays-reset: ["[{relay_a.host}]:{relay_a.port}", "[{relay_b.host}]:{relay_b.port}"]
  relays-down: ["[127.0.0.23]:{dead_port}", "[{relay_b.host}]:{relay_b.port}"]
  relays-hang: ["[{relay_hang.host}]:{relay_hang.port}", "[{relay_b.host}]:{relay_b.port}"]
domains:
  family.test: {{}}
rules:
  - name: dariusz
    addresses: [dariusz@family.test]
    to:
      - address: dariusz@ratelimited.test
        route: mx-then-relay
  - name: data-stage
    addresses: [data@family.test]
    to:
      - address: someone@datalimited.test
        route: mx-then-relay
  - name: relay-reset
    addresses: [reset@family.test]
    to:
      - address: far1@far.test
        route: relays-reset
  - name: relay-down
    addresses: [down@family.test]
    to:
      - address: far2@far.test
        route: relays-down
  - name: relay-hang
    addresses: [hang@family.test]
    to:
      - address: far3@far.test
        route: relays-hang
  - name: parents
    addresses: [parents@family.test]
    to:
      - address: mum@ratelimited.test
        route: mx-then-relay
      - address: dad@gmail.test
  - name: siblings
    addresses: [siblings@family.test]
    to:
      - address: ok@partial.test
        route: mx-then-relay
      - address: limited@partial.test
        route: mx-then-relay
"""


class Env:
    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="rmrelay-", dir="/var/tmp")
        self.started: list[FakeMX] = []
        self.mx = {d: self._mx(f"127.0.0.{2 + i}", d) for i, d in enumerate(
            ["ratelimited.test", "datalimited.test", "gmail.test", "partial.test"])}
        self.fb = self._mx("127.0.0.20", "fallback-relay")
        self.relay_a = self._mx("127.0.0.21", "relay-a")
        self.relay_b = self._mx("127.0.0.22", "relay-b")
        self.relay_hang = self._mx("127.0.0.24", "relay-hang", hang_seconds=15)
        self.elsewhere = self._mx("127.0.0.30", "elsewhere")
        self.mx["ratelimited.test"].set_reply("*", RATE_LIMITED)
        self.mx["datalimited.test"].data_reply = RATE_LIMITED
        self.mx["partial.test"].set_reply("limited@partial.test", RATE_LIMITED)
        self.relay_a.set_mode("reset")
        self.relay_hang.set_mode("hang")
        rules = RULES.format(fb=self.fb, relay_a=self.relay_a, relay_b=self.relay_b,
                             relay_hang=self.relay_hang, dead_port=free_port("127.0.0.23"))
        self.stack = Stack(self.workdir, rules, mx_hosts=dict(self.mx),
                           postfix_kwargs={"relayhost": f"[{self.elsewhere.host}]:{self.elsewhere.port}"})
        self.n = 0

    def _mx(self, host, name, **kw):
        mx = FakeMX(host, free_port(host), name, **kw).start()
        self.started.append(mx)
        return mx

    def stop(self):
        self.stack.stop()
        for mx in self.started:
            mx.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def send(self, rcpt: str, expect: int, timeout: float = 30.0):
        """Send one message to rcpt; wait (bounded) for `expect` copies and an empty queue."""
        self.n += 1
        mid = f"relay{self.n}.{rcpt.split('@')[0]}@sender.test"
        data = seed_message(SENDER, rcpt, mid, f"relay test {self.n}")
        result = self.stack.postfix.send(SENDER, [rcpt], data)
        assert result.accepted, result
        wait_arrivals(self.started, mid, expect, timeout)
        self.stack.postfix.wait_queue_empty(timeout)
        time.sleep(0.5)  # a duplicate would be in flight now
        return result, data, arrivals_of(self.started, mid)


@pytest.fixture(scope="module")
def env():
    e = Env()
    try:
        e.stack.start()
        e.opendkim = OpenDKIM(e.workdir, e.stack.keys, e.stack.dkim_domain)
        print(f"\nPostfix mode={e.stack.postfix.mode} start={e.stack.postfix.start_seconds:.2f}s")
        yield e
    finally:
        e.stop()


def check_copy(env, msg, original):
    """A relayed copy is still a proper forward: SRS, both signatures, same bytes."""
    assert SRS0.match(msg.mail_from) and env.stack.srs.reverse(msg.mail_from) == SENDER, msg.mail_from
    assert sorted(env.stack.verify_dkim(msg.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    assert env.opendkim.verify(msg.data) == {"rsa": "pass", "ed": "pass"}
    added_headers(msg.data, original)


def delivery(env, queue_rcpt):
    """Postfix's final delivery lines for a destination address."""
    return [d for d in env.stack.postfix.deliveries() if d["to"] == queue_rcpt]


def test_generated_transports_are_in_use(env):
    """The stack runs the generated master.cf services and transport map."""
    master = env.stack.postfix.postconf("-M")
    for service in ("rm_mx_then_relay", "rm_relays_reset", "rm_relays_down", "rm_relays_hang"):
        assert f"{service} " in master or f"{service}\t" in master, master
    fallback = env.stack.postfix.postconf("-P")
    assert f"rm_mx_then_relay/unix/smtp_fallback_relay = [{env.fb.host}]:{env.fb.port}" in fallback, fallback


def test_rate_limited_mx_falls_back_to_relay_once(env):
    _result, data, got = env.send("dariusz@family.test", 1)
    assert [(name, rcpt) for name, rcpt, _ in got] == [("fallback-relay", "dariusz@ratelimited.test")], got
    limited = env.mx["ratelimited.test"]
    assert ("dariusz@ratelimited.test", RATE_LIMITED) in limited.rcpt_log
    assert not any("dariusz" in r for m in limited.messages for r in m.rcpt_tos)
    lines = delivery(env, "dariusz@ratelimited.test")
    assert [d["status"] for d in lines] == ["sent"], lines
    assert lines[0]["relay"].startswith(f"{env.fb.host}[{env.fb.host}]:{env.fb.port}"), lines
    check_copy(env, got[0][2], data)


def test_rate_limited_after_data_falls_back_to_relay_once(env):
    """The same 451 4.7.650 as the reply to the message content (after DATA)."""
    _result, data, got = env.send("data@family.test", 1)
    assert [(name, rcpt) for name, rcpt, _ in got] == [("fallback-relay", "someone@datalimited.test")], got
    primary = env.mx["datalimited.test"]
    assert [r for r, _ in primary.rcpt_log] == ["someone@datalimited.test"]  # tried first
    assert primary.messages == []                                            # content refused 451
    check_copy(env, got[0][2], data)


@pytest.mark.parametrize("rcpt, dest", [("reset@family.test", "far1@far.test"),
                                        ("down@family.test", "far2@far.test"),
                                        ("hang@family.test", "far3@far.test")],
                         ids=["first-relay-resets", "first-relay-down", "first-relay-hangs"])
def test_relay_first_route_moves_to_second_relay(env, rcpt, dest):
    _result, data, got = env.send(rcpt, 1, timeout=45)
    assert [(name, r) for name, r, _ in got] == [("relay-b", dest)], got
    lines = delivery(env, dest)
    assert [d["status"] for d in lines] == ["sent"], lines
    assert lines[0]["relay"].startswith(f"{env.relay_b.host}["), lines
    check_copy(env, got[0][2], data)


def test_fanout_one_rate_limited_one_not_each_once(env):
    _result, data, got = env.send("parents@family.test", 2)
    assert sorted((name, rcpt) for name, rcpt, _ in got) == [
        ("fallback-relay", "mum@ratelimited.test"), ("gmail.test", "dad@gmail.test")], got
    for _, _, msg in got:
        check_copy(env, msg, data)


def test_fanout_same_host_one_recipient_rate_limited_each_once(env):
    """One SMTP session to partial.test: ok@ gets 250, limited@ gets 451. The
    451 recipient alone moves on to the fallback relay; ok@ is not re-sent."""
    _result, data, got = env.send("siblings@family.test", 2)
    assert sorted((name, rcpt) for name, rcpt, _ in got) == [
        ("fallback-relay", "limited@partial.test"), ("partial.test", "ok@partial.test")], got
    for _, _, msg in got:
        check_copy(env, msg, data)


def test_nothing_reached_elsewhere(env):
    """Last: no bounce and no stray copy left the stack through the relayhost."""
    assert env.elsewhere.messages == [], [(m.mail_from, m.rcpt_tos) for m in env.elsewhere.messages]
    assert env.relay_a.messages == [] and env.relay_hang.messages == []
