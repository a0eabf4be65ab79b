"""The daemon fails, Postfix must not accept unrouted mail (milter_default_action
= tempfail from `routemilter postfix-config`), and mail flows again once the
daemon is back.

* SIGKILL between messages: the next client gets 4xx, nothing is queued.
* SIGKILL in the middle of an SMTP transaction (after RCPT, before DATA): 4xx.
* SIGTERM (systemd stop): 4xx until restarted.
* Postfix started while the daemon's socket does not exist: 4xx, then mail
  flows as soon as the daemon starts (no Postfix reload needed).
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from checks import arrivals_of, seed_message, wait_arrivals  # noqa: E402
from fakemx import FakeMX, free_port  # noqa: E402
from stack import Stack  # noqa: E402

pytestmark = pytest.mark.integration

SENDER = "alice@sender.test"
RCPT = "family@mydomain.net"                       # fanout.yaml: email1 + email2 @gmail.com
DESTS = [("gmail.com", "email1@gmail.com"), ("gmail.com", "email2@gmail.com")]
EXAMPLE = os.path.join(HERE, "..", "conf", "examples", "fanout.yaml")


class Env:
    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="rmfault-", dir="/var/tmp")
        self.gmail = FakeMX("127.0.0.2", free_port("127.0.0.2"), "gmail.com").start()
        self.elsewhere = FakeMX("127.0.0.30", free_port("127.0.0.30"), "elsewhere").start()
        with open(EXAMPLE) as f:
            self.stack = Stack(self.workdir, f.read(), mx_hosts={"gmail.com": self.gmail},
                               postfix_kwargs={"relayhost": f"[{self.elsewhere.host}]:{self.elsewhere.port}"})
        self.n = 0

    @property
    def all_mx(self):
        return [self.gmail, self.elsewhere]

    def message(self):
        self.n += 1
        mid = f"fault{self.n}@sender.test"
        return mid, seed_message(SENDER, RCPT, mid, f"fault test {self.n}")

    def assert_flows(self):
        """One message to the fan-out alias arrives once per destination."""
        mid, data = self.message()
        result = self.stack.postfix.send(SENDER, [RCPT], data)
        assert result.accepted, result
        got = wait_arrivals(self.all_mx, mid, 2, timeout=30)
        self.stack.postfix.wait_queue_empty(30)
        time.sleep(0.3)
        got = arrivals_of(self.all_mx, mid)
        assert sorted((n, r) for n, r, _ in got) == DESTS, got

    def assert_refused_4xx(self, result, mid):
        """Refused with a 4xx (client keeps the message); nothing queued or delivered."""
        assert not result.accepted, result
        failure = result.first_failure()
        assert failure and 400 <= failure[1] < 500, result
        self.stack.postfix.wait_queue_empty(10)
        time.sleep(0.5)
        assert arrivals_of(self.all_mx, mid) == []
        return failure

    def restart_daemon(self):
        self.stack.daemon.start()
        assert self.stack.daemon.proc.poll() is None

    def stop(self):
        self.stack.stop()
        self.gmail.stop()
        self.elsewhere.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def env():
    e = Env()
    try:
        e.stack.start()
        print(f"\nPostfix mode={e.stack.postfix.mode} start={e.stack.postfix.start_seconds:.2f}s")
        yield e
    finally:
        e.stop()


@pytest.fixture
def flowing(env):
    """Each test starts and ends with a working daemon."""
    if env.stack.daemon.proc.poll() is not None:
        env.restart_daemon()
    env.assert_flows()
    yield env
    if env.stack.daemon.proc.poll() is not None:
        env.restart_daemon()
    env.assert_flows()


def test_sigkill_tempfails_then_restart_flows(flowing):
    env = flowing
    env.stack.daemon.signal(signal.SIGKILL)
    env.stack.daemon.proc.wait(10)
    mid, data = env.message()
    stage, code, text = env.assert_refused_4xx(env.stack.postfix.send(SENDER, [RCPT], data), mid)
    print(f"daemon SIGKILLed: {stage}: {code} {text}")
    env.restart_daemon()
    env.assert_flows()


def test_sigkill_mid_transaction_tempfails(flowing):
    """Killed after RCPT was accepted: the end of DATA must be 4xx, not 250."""
    env = flowing
    mid, data = env.message()
    s = smtplib.SMTP("127.0.0.1", env.stack.postfix.port, timeout=30)
    try:
        s.ehlo("client.routemilter.test")
        assert s.mail(SENDER, ["BODY=8BITMIME"])[0] == 250
        assert s.rcpt(RCPT)[0] == 250
        env.stack.daemon.signal(signal.SIGKILL)
        env.stack.daemon.proc.wait(10)
        try:
            code, text = s.data(data)
        except smtplib.SMTPDataError as exc:      # DATA command itself refused
            code, text = exc.smtp_code, exc.smtp_error
        except smtplib.SMTPServerDisconnected as exc:
            code, text = 421, str(exc).encode()
    finally:
        s.close()
    print(f"daemon SIGKILLed mid-transaction: DATA -> {code} {text!r}")
    assert 400 <= code < 500, (code, text)
    env.stack.postfix.wait_queue_empty(10)
    time.sleep(0.5)
    assert arrivals_of(env.all_mx, mid) == []


def test_sigterm_tempfails_then_restart_flows(flowing):
    env = flowing
    assert env.stack.daemon.stop() == 0
    mid, data = env.message()
    stage, code, text = env.assert_refused_4xx(env.stack.postfix.send(SENDER, [RCPT], data), mid)
    print(f"daemon stopped (SIGTERM): {stage}: {code} {text}")
    env.restart_daemon()
    env.assert_flows()


def test_socket_missing_when_postfix_starts(flowing):
    """Postfix comes up before the daemon (boot order): 4xx, then mail flows as
    soon as the daemon listens."""
    env = flowing
    env.stack.postfix.stop()
    env.stack.daemon.stop()
    if os.path.exists(env.stack.socket):
        os.unlink(env.stack.socket)
    env.stack.postfix.start()
    assert not os.path.exists(env.stack.socket)
    mid, data = env.message()
    stage, code, text = env.assert_refused_4xx(env.stack.postfix.send(SENDER, [RCPT], data), mid)
    print(f"no daemon socket at Postfix start: {stage}: {code} {text}")
    env.restart_daemon()
    env.assert_flows()


def test_nothing_reached_elsewhere(env):
    assert env.elsewhere.messages == [], [(m.mail_from, m.rcpt_tos) for m in env.elsewhere.messages]
