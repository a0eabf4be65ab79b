"""Deferral-driven fallback, end to end with a real Postfix.

A destination's FakeMX answers 4xx (the article's `451 4.7.650`, greylisting's
`450` once, ...). `routemilter postfix-config` gave every address with a next
address in its chain a transport whose last smtp_fallback_relay is the
daemon's deferral listener; the listener answers "not yet" while the message
is younger than the destination's fallback_after and, past it, re-injects the
message to the next address and only then answers 250.

One Postfix and daemon for the module; each test has its own rule and
addresses and counts the copies at every FakeMX (primary, backups, relay, the
sender's MX, and "elsewhere", Postfix's relayhost for anything misrouted), so
a lost or duplicated copy fails the test. The harness's Postfix retries every
1-2 s (minimal_backoff_time 1s, maximal_backoff_time 2s, queue_run_delay 1s).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fakemx import RATE_LIMITED, FakeMX, free_port, start_hosts  # noqa: E402
from routemilter.dsn import parse_dsn  # noqa: E402
from stack import Stack  # noqa: E402

pytestmark = pytest.mark.integration

SENDER = "alice@sender.test"
GREYLISTED = "450 4.2.0 <{rcpt}>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/"
RULES = """
bounces:
  socket: unix:{workdir}/bounce.sock
  reinject: 127.0.0.1:{reinject_port}
  deferral_listen: 127.0.0.1:{deferral_port}
routes:
  via-relay: [mx, "[{relay.host}]:{relay.port}"]
domains:
  family.test: {{}}
rules:
  - name: immediate
    addresses: [a@family.test]
    to:
      - address: a@gmail.test
        fallback_after: 0
        fallback: [a@outlook.test]
  - name: later
    addresses: [b@family.test]
    to:
      - address: b@gmail.test
        fallback_after: 8s
        fallback: [b@outlook.test]
  - name: recovers
    addresses: [c@family.test]
    to:
      - address: c@gmail.test
        fallback_after: 30s
        fallback: [c@outlook.test]
  - name: greylisted
    addresses: [g@family.test]
    to:
      - address: g@gmail.test
        fallback: [g@outlook.test]
  - name: fan-out
    addresses: [f@family.test]
    to:
      - address: f1@gmail.test
        fallback_after: 0
        fallback: [f1@outlook.test]
      - address: f2@gmail.test
        fallback_after: 0
        fallback: [f2@outlook.test]
  - name: mixed
    addresses: [m@family.test]
    to:
      - address: m@gmail.test
        fallback_after: 0
        fallback: [m@outlook.test, m@final.test]
  - name: bounce-then-deferral
    addresses: [bd@family.test]
    to:
      - address: bd@gmail.test
        fallback_after: 4s
        fallback: [bd@outlook.test, bd@final.test]
  - name: exhausted
    addresses: [x@family.test]
    to:
      - address: x@gmail.test
        fallback_after: 0
        fallback: [x@outlook.test]
  - name: relayed
    addresses: [r@family.test]
    to:
      - address: r@gmail.test
        route: via-relay
        fallback_after: 0
        fallback: [r@outlook.test]
  - name: relay-takes-it
    addresses: [s@family.test]
    to:
      - address: s@gmail.test
        route: via-relay
        fallback_after: 0
        fallback: [s@outlook.test]
  - name: reinject-down
    addresses: [n@family.test]
    to:
      - address: n@gmail.test
        fallback_after: 0
        fallback: [n@outlook.test]
  - name: killed
    addresses: [k@family.test]
    to:
      - address: k@gmail.test
        fallback_after: 10s
        fallback: [k@outlook.test]
"""
PRIMARY_REPLIES = {
    "a@gmail.test": [RATE_LIMITED], "b@gmail.test": [RATE_LIMITED], "f1@gmail.test": [RATE_LIMITED],
    "m@gmail.test": [RATE_LIMITED], "x@gmail.test": [RATE_LIMITED], "r@gmail.test": [RATE_LIMITED],
    "s@gmail.test": [RATE_LIMITED], "k@gmail.test": [RATE_LIMITED], "n@gmail.test": [RATE_LIMITED],
    "c@gmail.test": [RATE_LIMITED, RATE_LIMITED, "250 2.1.5 OK"],
    "g@gmail.test": [GREYLISTED, "250 2.1.5 OK"],
}
REFUSE = {
    "bd@gmail.test": "550 5.1.1 <{rcpt}> gmail: no such user",
    "bd@outlook.test": RATE_LIMITED,
    "m@outlook.test": "550 5.2.1 <{rcpt}> outlook: mailbox disabled",
    "x@outlook.test": "550 5.2.1 <{rcpt}> outlook: mailbox disabled",
}


class Env:
    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="rmdef-", dir="/var/tmp")
        os.chmod(self.workdir, 0o755)
        self.hosts = start_hosts(["gmail.test", "outlook.test", "final.test", "sender.test"], 40)
        self.relay = FakeMX("127.0.0.48", free_port("127.0.0.48"), "relay").start()
        self.relay.set_reply("r@gmail.test", RATE_LIMITED)
        self.elsewhere = FakeMX("127.0.0.49", free_port("127.0.0.49"), "elsewhere").start()
        for rcpt, replies in PRIMARY_REPLIES.items():
            self.hosts["gmail.test"].set_replies(rcpt, replies)
        for rcpt, reply in REFUSE.items():
            self.hosts[rcpt.split("@")[1]].set_reply(rcpt, reply)
        self.deferral_port = free_port()
        rules = RULES.format(workdir=self.workdir, reinject_port=free_port(), deferral_port=self.deferral_port,
                             relay=self.relay)
        self.stack = Stack(self.workdir, rules, mx_hosts=dict(self.hosts),
                           postfix_kwargs={"relayhost": f"[{self.elsewhere.host}]:{self.elsewhere.port}"})

    @property
    def all_mx(self):
        return [*self.hosts.values(), self.relay, self.elsewhere]

    def stop(self):
        self.stack.stop()
        for mx in self.all_mx:
            mx.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def arrivals(self, tag: str) -> list[tuple[str, str, object]]:
        return [(mx.name, rcpt, m) for mx in self.all_mx for m in list(mx.messages)
                if tag.encode() in m.data for rcpt in m.rcpt_tos]

    def send(self, rcpt: str, tag: str):
        data = (f"From: Alice <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: deferral {tag}\r\n"
                f"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@sender.test>\r\n"
                f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"\r\nHello {rcpt},\r\nthis is {tag}; it must arrive exactly once.\r\n").encode()
        result = self.stack.postfix.send(SENDER, [rcpt], data)
        assert result.accepted, result
        return result, time.monotonic()

    def settle(self, tag: str, expected: int, timeout: float = 60) -> list:
        """Wait for `expected` copies and an empty queue, then a little longer for extras."""
        deadline = time.monotonic() + timeout
        while len(self.arrivals(tag)) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        self.stack.postfix.wait_queue_empty(max(10, deadline - time.monotonic()))
        time.sleep(3)  # a duplicate would be in flight now (Postfix retries every 1-2 s)
        self.stack.postfix.wait_queue_empty(20)
        got = self.arrivals(tag)
        assert len(got) == expected, (got, self.stack.postfix.log_tail(80), self.stack.daemon.log_text()[-3000:])
        return got

    def rcpt_attempts(self, address: str) -> list[str]:
        return [reply for mx in self.all_mx for rcpt, reply in list(mx.rcpt_log) if rcpt == address]

    def deferral_lines(self, rcpt: str) -> list[str]:
        return [line for line in self.stack.daemon.log_text().splitlines()
                if "routemilter.mail: deferral " in line and f"rcpt=<{rcpt}>" in line]


@pytest.fixture(scope="module")
def env():
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    e = Env()
    try:
        e.stack.start()
        yield e
    finally:
        e.stop()


def test_generated_deferral_transports(env):
    """The stack runs the generated config: a deferral transport per route whose last
    fallback relay is the daemon's listener, one recipient per delivery."""
    listener = f"[127.0.0.1]:{env.deferral_port}"
    fallback = env.stack.postfix.postconf("-P")
    assert f"rmd_mx/unix/smtp_fallback_relay = {listener}" in fallback, fallback
    assert (f"rmd_via_relay/unix/smtp_fallback_relay = [{env.relay.host}]:{env.relay.port},{listener}"
            in fallback), fallback
    assert "rmd_mx_destination_recipient_limit = 1" in env.stack.postfix.postconf("-n")


def test_451_with_fallback_after_0_backup_once_in_the_same_attempt_primary_never(env):
    result, _sent = env.send("a@family.test", "d1-now")
    (name, rcpt, msg), = env.settle("d1-now", 1)
    assert (name, rcpt) == ("outlook.test", "a@outlook.test")
    assert env.rcpt_attempts("a@gmail.test") == [RATE_LIMITED]  # tried once, never delivered
    assert msg.mail_from.startswith("rmc=")  # a fresh token, bound to the copy's own signature
    assert sorted(env.stack.verify_dkim(msg.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    failed = re.search(rb"X-Routemilter-Failed: a@gmail\.test; 4\.0\.0; deferred [^\r\n]*fallback_after 0s",
                       msg.data)
    assert failed, msg.data[:1500]
    assert msg.data.endswith(b"this is d1-now; it must arrive exactly once.\r\n")
    # the same delivery attempt: Postfix delivered the original copy to the listener at its first try
    deliveries = [d for d in env.stack.postfix.deliveries() if d["to"] == "a@gmail.test"]
    assert [d["status"] for d in deliveries] == ["sent"], deliveries
    assert deliveries[0]["relay"].startswith(f"127.0.0.1[127.0.0.1]:{env.deferral_port}"), deliveries
    # one log line for the fallback, with both queue ids
    line, = env.deferral_lines("a@gmail.test")
    assert f"queue_id={result.queue_id} " in line and "decision=fallback" in line, line
    new_id = re.search(r"new_queue_id=(\w+)", line).group(1)
    moved = [d for d in env.stack.postfix.deliveries() if d["qid"] == new_id]
    assert [(d["to"], d["status"]) for d in moved] == [("a@outlook.test", "sent")], (line, moved)


def test_fallback_after_seconds_not_before_once_after(env):
    _result, sent = env.send("b@family.test", "d2-later")
    (name, rcpt, msg), = env.settle("d2-later", 1, timeout=90)
    assert (name, rcpt) == ("outlook.test", "b@outlook.test")
    waited = msg.received_at - (time.time() - (time.monotonic() - sent))
    # `sent` is taken after Postfix's 250, a moment after the milter stamped the copy
    assert waited >= 8 - 0.5, waited
    attempts = env.rcpt_attempts("b@gmail.test")
    assert len(attempts) >= 3 and set(attempts) == {RATE_LIMITED}, attempts  # retried meanwhile
    not_yet = re.findall(r"to=<b@gmail\.test>.*status=deferred .*routemilter: b@gmail\.test deferred this message",
                         env.stack.postfix.log_text())
    assert len(not_yet) >= 2, env.stack.postfix.log_tail(40)


def test_primary_recovering_before_the_deadline_gets_it_alone(env):
    env.send("c@family.test", "d3-recovers")
    (name, rcpt, msg), = env.settle("d3-recovers", 1)
    assert (name, rcpt) == ("gmail.test", "c@gmail.test")
    assert env.rcpt_attempts("c@gmail.test")[:2] == [RATE_LIMITED, RATE_LIMITED]
    assert b"X-Routemilter-Failed" not in msg.data


def test_greylisting_primary_with_the_default_keeps_the_mail(env):
    """450 once, then 250 (postgrey): the default fallback_after (30m) does not hand over."""
    env.send("g@family.test", "d4-grey")
    (name, rcpt, _msg), = env.settle("d4-grey", 1)
    assert (name, rcpt) == ("gmail.test", "g@gmail.test")
    assert env.rcpt_attempts("g@gmail.test")[0].startswith("450 4.2.0")
    assert env.rcpt_attempts("g@outlook.test") == []


def test_fan_out_one_deferred_one_accepting(env):
    _result, _sent = env.send("f@family.test", "d5-fanout")
    got = env.settle("d5-fanout", 2)
    assert sorted((name, rcpt) for name, rcpt, _ in got) == [
        ("gmail.test", "f2@gmail.test"), ("outlook.test", "f1@outlook.test")], got
    assert env.rcpt_attempts("f2@outlook.test") == []
    moved, = [m for name, _, m in got if name == "outlook.test"]
    # moved on at the deferral, not after Postfix's queue lifetime (60 s here) through a bounce
    assert b"X-Routemilter-Failed: f1@gmail.test; 4.0.0; deferred" in moved.data
    assert env.rcpt_attempts("f1@gmail.test") == [RATE_LIMITED]


def test_deferred_then_550_then_third_address(env):
    env.send("m@family.test", "d6-mixed")
    (name, rcpt, msg), = env.settle("d6-mixed", 1)
    assert (name, rcpt) == ("final.test", "m@final.test")
    assert sorted(env.stack.verify_dkim(msg.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    assert b"X-Routemilter-Failed: m@gmail.test; 4.0.0; deferred" in msg.data
    assert b"X-Routemilter-Failed: m@outlook.test; 5.2.1; 550 5.2.1 <m@outlook.test> outlook: mailbox disabled" \
        in msg.data


def test_550_then_deferral_the_backup_gets_its_own_fallback_after(env):
    """The bounce-driven copy to the backup is stamped when it is sent: the backup's
    deferral waits its own 4 s, not the age of the original message."""
    env.send("bd@family.test", "d12-bounce-defer")
    (name, rcpt, msg), = env.settle("d12-bounce-defer", 1, timeout=90)
    assert (name, rcpt) == ("final.test", "bd@final.test")
    assert b"X-Routemilter-Failed: bd@gmail.test; 5.1.1; 550 5.1.1 <bd@gmail.test> gmail: no such user" in msg.data
    assert re.search(rb"X-Routemilter-Failed: bd@outlook\.test; 4\.0\.0; deferred [^\r\n]*fallback_after 4s", msg.data)
    assert len(env.rcpt_attempts("bd@outlook.test")) >= 2  # waited: retried before moving on
    assert env.rcpt_attempts("bd@gmail.test") == [REFUSE["bd@gmail.test"].format(rcpt="bd@gmail.test")]


def test_chain_exhausted_one_bounce_lists_the_deferral_too(env):
    env.send("x@family.test", "d7-exhausted")
    (name, rcpt, msg), = env.settle("d7-exhausted", 1)
    assert (name, rcpt) == ("sender.test", SENDER)
    report = parse_dsn(msg.data)
    assert [r.final_recipient for r in report.failed] == ["x@gmail.test", "x@outlook.test"]
    # The reasons travel as the report's Diagnostic-Code data (the signed human text names
    # only the addresses and status codes: see docs/bounces-security.md).
    reasons = {r.final_recipient: r.diagnostic for r in report.failed}
    assert "deferred (4xx or unreachable" in reasons["x@gmail.test"]
    assert "outlook: mailbox disabled" in reasons["x@outlook.test"]
    text = msg.data.decode("utf-8", "replace")
    assert "<x@gmail.test>" in text and "<x@outlook.test>" in text


def test_relay_route_tries_the_relay_before_moving_on(env):
    env.send("r@family.test", "d8-relay")
    (name, rcpt, _msg), = env.settle("d8-relay", 1)
    assert (name, rcpt) == ("outlook.test", "r@outlook.test")
    assert env.rcpt_attempts("r@gmail.test") == [RATE_LIMITED, RATE_LIMITED]  # the MX, then the relay


def test_relay_route_relay_accepting_keeps_the_mail(env):
    env.send("s@family.test", "d9-relay-ok")
    (name, rcpt, _msg), = env.settle("d9-relay-ok", 1)
    assert (name, rcpt) == ("relay", "s@gmail.test")
    assert env.rcpt_attempts("s@outlook.test") == []


def test_reinjection_failing_keeps_the_copy_in_the_queue(env):
    """The listener answers 250 only once the next address's copy is queued: with the
    re-injection listener unreachable it answers 451, Postfix keeps the copy, and it
    moves on once re-injection works again."""
    path = env.stack.config_path
    good = path.read_text()
    reinject = re.search(r"reinject: (127\.0\.0\.1:\d+)", good).group(1)
    path.write_text(good.replace(f"reinject: {reinject}", f"reinject: 127.0.0.1:{free_port()}"))
    env.stack.daemon.signal(10)  # SIGUSR1: reload
    env.stack.daemon.wait_log("reloaded", timeout=20)
    try:
        env.send("n@family.test", "d11-reinject-down")
        env.stack.postfix.wait_log(r"to=<n@gmail\.test>.*status=deferred .*cannot re-inject", timeout=30)
        time.sleep(3)
        assert env.arrivals("d11-reinject-down") == []
        assert "n@family.test" in env.stack.postfix.queue() or "n@gmail.test" in env.stack.postfix.queue()
    finally:
        path.write_text(good)
        env.stack.daemon.signal(1)
    (name, rcpt, _msg), = env.settle("d11-reinject-down", 1, timeout=60)
    assert (name, rcpt) == ("outlook.test", "n@outlook.test")
    assert [line for line in env.deferral_lines("n@gmail.test") if "decision=fallback" in line
            and "reinject failed" not in line].__len__() == 1


def test_daemon_killed_while_a_deferred_message_waits(env):
    """SIGKILL while the copy waits for fallback_after: Postfix keeps it (the listener is
    unreachable: deferred), and once the daemon is back it moves on once."""
    env.send("k@family.test", "d10-killed")
    env.stack.postfix.wait_log(r"to=<k@gmail\.test>.*status=deferred .*routemilter: k@gmail\.test deferred",
                               timeout=30)
    env.stack.daemon.proc.kill()
    env.stack.daemon.proc.wait(10)
    env.stack.postfix.wait_log(r"to=<k@gmail\.test>.*status=deferred .*(Connection refused|connect to)",
                               timeout=30)
    time.sleep(12)  # past fallback_after with the daemon down: nothing may move
    assert env.arrivals("d10-killed") == []
    with open(env.stack.daemon.log_path, "ab") as log:
        log.write(b"--- restarted ---\n")
    env.stack.daemon.start()
    (name, rcpt, _msg), = env.settle("d10-killed", 1, timeout=60)
    assert (name, rcpt) == ("outlook.test", "k@outlook.test")
    assert len(env.deferral_lines("k@gmail.test")) == 1


def test_nothing_reached_elsewhere(env):
    """Last: no stray copy or bounce left through the relayhost."""
    assert env.elsewhere.messages == [], [(m.mail_from, m.rcpt_tos) for m in env.elsewhere.messages]


# ------------------------------------------ the seed examples on the article's error

EXAMPLES = os.path.join(HERE, "..", "conf", "examples")
SEED_CASES = {
    # example: [(recipient, {address: RCPT reply}, the address that must get it)]
    "approach3-simple-backup.yaml": [
        ("dariusz@mydomain.net", {"dariusz@gmail.com": RATE_LIMITED}, "dariusz@outlook.com"),
    ],
    "approach1-regex-aliases.yaml": [
        ("user1+shop@mydomain.net", {"user1@gmail.com": RATE_LIMITED}, "user1@imx.mydomain.net"),
        # Gmail and ImprovMX both rate limited: the worker's final catch-all
        ("x@user2.mydomain.net", {"user2@gmail.com": RATE_LIMITED, "user2@imx.mydomain.net": RATE_LIMITED},
         "user1@outlook.com"),
    ],
}


@pytest.mark.parametrize("example", sorted(SEED_CASES))
def test_seed_example_moves_on_at_the_articles_451_like_the_worker(example):
    """conf/examples as shipped (plus srs:/bounces:, which every deployment sets): the
    article's 451 4.7.650 from Gmail sends the mail to the worker's backup, once, at once."""
    from stack import destination_domains

    path = os.path.join(EXAMPLES, example)
    workdir = tempfile.mkdtemp(prefix="rmdefs-", dir="/var/tmp")
    os.chmod(workdir, 0o755)
    hosts = start_hosts(destination_domains(path), 50)
    elsewhere = FakeMX("127.0.0.59", free_port("127.0.0.59"), "elsewhere").start()
    for _, replies, _ in SEED_CASES[example]:
        for address, reply in replies.items():
            hosts[address.split("@")[1]].set_reply(address, reply)
    bounces = (f"bounces:\n  socket: unix:{workdir}/bounce.sock\n  reinject: 127.0.0.1:{free_port()}\n"
               f"  deferral_listen: 127.0.0.1:{free_port()}\n")
    with open(path) as f:
        stack = Stack(workdir, bounces + f.read(), mx_hosts=dict(hosts),
                      postfix_kwargs={"relayhost": f"[{elsewhere.host}]:{elsewhere.port}"})
    every = [*hosts.values(), elsewhere]
    try:
        stack.start()
        for n, (rcpt, replies, expected) in enumerate(SEED_CASES[example]):
            tag = f"seed-{n}-{example}"
            data = (f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: {tag}\r\nMessage-ID: <{n}.{example}@sender.test>"
                    f"\r\n\r\n{tag}\r\n").encode()
            started = time.monotonic()
            assert stack.postfix.send(SENDER, [rcpt], data).accepted
            deadline = started + 30
            got = []
            while time.monotonic() < deadline and not got:
                got = [(mx.name, r) for mx in every for m in list(mx.messages) if tag.encode() in m.data
                       for r in m.rcpt_tos]
                time.sleep(0.2)
            stack.postfix.wait_queue_empty(30)
            time.sleep(3)
            got = [(mx.name, r) for mx in every for m in list(mx.messages) if tag.encode() in m.data
                   for r in m.rcpt_tos]
            assert got == [(expected.split("@")[1], expected)], (got, stack.postfix.log_tail(40))
            for address in replies:  # each deferring address was tried once: the first attempt moved on
                tries = [reply for mx in every for r, reply in mx.rcpt_log if r == address]
                assert tries == [RATE_LIMITED], (address, tries)
    finally:
        stack.stop()
        for mx in every:
            mx.stop()
        shutil.rmtree(workdir, ignore_errors=True)
