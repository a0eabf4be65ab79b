"""Hostile input through the real Postfix: what a remote client can actually send.

tests/test_hostile_input.py drives the milter directly (including what a
lenient MTA might pass on); here the same kinds of input go through Postfix
first. For each: the SMTP answer the client gets, the daemon still alive, one
log line, and (when accepted) delivery to the routed destination only.
"""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from fakemx import FakeMX, free_port
from stack import Stack

pytestmark = pytest.mark.integration

RULES = """
domains:
  family.test:
    catch_all:
      to: [catch@gmail.test]
rules:
  - name: me
    addresses: [me@family.test]
    to: [me@gmail.test]
  - name: away
    addresses: [away@family.test]
    to: [away@loop.test]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    import os
    import tempfile

    workdir = tempfile.mkdtemp(prefix="rmhs-", dir="/var/tmp")
    os.chmod(workdir, 0o755)
    gmail = FakeMX("127.0.0.40", free_port("127.0.0.40"), "gmail.test").start()
    leak = FakeMX("127.0.0.41", free_port("127.0.0.41"), "family.test").start()
    loop = FakeMX("127.0.0.43", free_port("127.0.0.43"), "loop.test").start()
    s = Stack(workdir, RULES, mx_hosts={"gmail.test": gmail, "family.test": leak, "loop.test": loop})
    try:
        s.start()
        yield s
        assert s.daemon.proc.poll() is None, "the daemon died:\n" + s.daemon.log_text()[-3000:]
        assert leak.messages == [], "mail for a managed domain left unrewritten"
    finally:
        s.stop()
        gmail.stop()
        leak.stop()
        loop.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def message(subject: str, extra_headers: bytes = b"", body: bytes = b"hello\r\n") -> bytes:
    return (b"From: Alice <alice@sender.test>\r\nTo: someone@family.test\r\nSubject: " + subject.encode()
            + b"\r\nMessage-ID: <" + subject.encode() + b"@sender.test>\r\n" + extra_headers + b"\r\n" + body)


def arrived(stack, subject: str, timeout: float = 60):
    gmail = stack.mx_hosts["gmail.test"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in list(gmail.messages) if b"\r\nSubject: " + subject.encode() + b"\r\n" in m.data]
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{subject} did not arrive\n{stack.postfix.log_tail()}")


def daemon_line(stack, marker: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [x for x in stack.daemon.log_text().splitlines() if marker in x]
        if lines:
            return lines[-1]
        time.sleep(0.1)
    raise AssertionError(f"no daemon log line with {marker!r}")


def test_smtputf8_and_null_sender(stack):
    pf = stack.postfix
    r = pf.send("jörg@absender.test", ["jöe@family.test"], message("utf8"))
    assert r.accepted, r
    [m] = arrived(stack, "utf8")
    assert m.rcpt_tos == ["catch@gmail.test"] and "jörg" in m.mail_from and m.mail_from.startswith("SRS0=")
    assert "SMTPUTF8" in [o.upper() for o in m.mail_options]
    r = pf.send("", ["me@family.test"], message("nullsender"))
    assert r.accepted, r
    [m] = arrived(stack, "nullsender")
    assert m.mail_from in ("", "<>") and m.rcpt_tos == ["me@gmail.test"]
    assert "from=<>" in daemon_line(stack, "me@family.test->me:me@gmail.test")


def test_malformed_and_huge_addresses_get_5xx(stack):
    pf = stack.postfix
    for rcpt in ("a b@family.test", "x" * 300 + "@family.test", "<>", "@family.test"):
        r = pf.send("alice@sender.test", [rcpt], message("bad"))
        code = r.rcpt.get(rcpt, (None,))[0] if r.rcpt else (r.mail or (None,))[0]
        assert code is not None and 500 <= code < 600, (rcpt, r)


def test_1200_recipients_over_two_transactions(stack):
    pf = stack.postfix
    rcpts = [f"user{i}@family.test" for i in range(1200)]
    r = pf.send("alice@sender.test", rcpts, message("many"), timeout=120)
    assert r.accepted, r.first_failure()
    codes = [r.rcpt[x][0] for x in rcpts]
    assert codes[:1000] == [250] * 1000
    assert set(codes[1000:]) == {452}  # Postfix's smtpd_recipient_limit: the client keeps these
    r2 = pf.send("alice@sender.test", rcpts[1000:], message("many2"), timeout=120)
    assert r2.accepted, r2.first_failure()
    assert [m.rcpt_tos for m in arrived(stack, "many")] == [["catch@gmail.test"]]  # fanned in once
    assert [m.rcpt_tos for m in arrived(stack, "many2")] == [["catch@gmail.test"]]


@pytest.mark.parametrize("name, extra", [
    ("bare-lf", b"X-Bare-LF: a\nBcc: victim@evil.test\r\n"),
    ("bare-cr", b"X-Bare-CR: a\rBcc: victim@evil.test\r\n"),
    ("nul", b"X-Nul: before\x00after\r\n"),
    ("8bit", b"X-8bit: \xff\xfe\x80 junk \xc3\x28\r\n"),
    ("1mb-line", b"X-Huge: " + b"a" * (1 << 20) + b"\r\n"),  # Postfix splits it at line_length_limit
    # One folded header of ~95 KiB (under header_size_limit): Postfix hands it to the
    # milter in one packet, over libmilter's default 64 KiB limit.
    ("95k-folded", b"X-Folded: " + b"\r\n\t".join([b"b" * 95] * 1000) + b"\r\n"),
])
def test_hostile_headers(stack, name, extra):
    r = stack.postfix.send("alice@sender.test", ["me@family.test"], message(name, extra), timeout=120)
    assert r.accepted, (name, r.first_failure(), stack.daemon.log_text()[-2000:])
    [m] = arrived(stack, name)
    assert m.rcpt_tos == ["me@gmail.test"]  # never the injected Bcc
    assert b"DKIM-Signature:" in m.data
    assert stack.daemon.proc.poll() is None


def test_50mib_body(stack):
    body = (b"y" * 998 + b"\r\n") * (50 * 1024 * 1024 // 1000)
    started = time.monotonic()
    r = stack.postfix.send("alice@sender.test", ["me@family.test"], message("big", body=body), timeout=300)
    assert r.accepted, r.first_failure()
    [m] = arrived(stack, "big", timeout=180)
    print(f"\n50 MiB through Postfix and routemilter: {time.monotonic() - started:.1f}s, {len(m.data)} bytes")
    assert len(m.data) > 50 * 1024 * 1024
    assert stack.verify_dkim(m.data), "DKIM signatures on the 50 MiB message do not verify"


def test_connection_cut_mid_data(stack):
    pf = stack.postfix
    s = socket.create_connection(("127.0.0.1", pf.port), timeout=30)
    f = s.makefile("rb")
    f.readline()
    for command in (b"EHLO cut.test", b"MAIL FROM:<alice@sender.test>", b"RCPT TO:<me@family.test>", b"DATA"):
        s.sendall(command + b"\r\n")
        while True:
            line = f.readline()
            if line[3:4] != b"-":
                break
        assert line[:1] in (b"2", b"3"), (command, line)
    s.sendall(b"From: alice@sender.test\r\nSubject: cut\r\n\r\nhalf a mess")
    s.shutdown(socket.SHUT_RDWR)
    s.close()
    pf.wait_log(r"lost connection after DATA", timeout=30)
    # Nothing half-received is delivered, and the next message goes through.
    r = pf.send("alice@sender.test", ["me@family.test"], message("after-cut"))
    assert r.accepted, r
    arrived(stack, "after-cut")
    assert not [m for m in stack.mx_hosts["gmail.test"].messages if b"Subject: cut" in m.data]


def test_forwarding_loop_is_stopped(stack):
    # away@family.test goes to away@loop.test, whose owner forwards everything back to
    # away@family.test (a loop through a provider's forwarding). The second pass carries
    # our own trace header: refused with 554 5.4.6, so the loop ends after one round.
    pf = stack.postfix
    loop = stack.mx_hosts["loop.test"]
    r = pf.send("alice@sender.test", ["away@family.test"], message("loop"))
    assert r.accepted, r
    [first] = loop.wait_for(1, timeout=60)
    assert b"X-Routemilter: mx.routemilter.test" in first.data
    back = pf.send(first.mail_from, ["away@family.test"], first.data.replace(b"\r\n.", b"\r\n.."))
    assert back.data and back.data[0] == 554 and back.data[1].startswith("5.4.6"), back
    time.sleep(2)
    assert len(loop.messages) == 1
    assert "loop trace_headers=" in daemon_line(stack, "refused:554 5.4.6")


def test_not_an_open_relay_for_outside_clients(stack):
    # A client outside mynetworks (127.0.0.50 here): Postfix's relay_domains, generated by
    # `routemilter postfix-config`, lets it reach the managed domain and nothing else.
    import smtplib

    pf = stack.postfix
    pf.set_main(mynetworks="127.0.0.1/32")
    try:
        time.sleep(2)
        client = smtplib.SMTP(timeout=30, source_address=("127.0.0.50", 0))
        client.connect("127.0.0.1", pf.port)
        client.ehlo("outside.test")
        assert client.mail("spammer@evil.test")[0] == 250
        replies = {rcpt: client.rcpt(rcpt) for rcpt in
                   ("victim@evil.test", "victim@family.test.evil.test", "victim@[127.0.0.99]",
                    "victim%evil.test@family.test", "me@family.test")}
        client.quit()
    finally:
        pf.set_main(mynetworks="127.0.0.0/8")
    for rcpt in ("victim@evil.test", "victim@family.test.evil.test", "victim@[127.0.0.99]"):
        code, text = replies[rcpt]
        assert code in (454, 554) and b"Relay access denied" in text, (rcpt, code, text)
    assert replies["me@family.test"][0] == 250, replies
    # Sender-specified routing inside a relay domain: Postfix refuses it (allow_untrusted_routing=no).
    assert replies["victim%evil.test@family.test"][0] in (454, 554), replies
