"""Address-level fallback through bounces, end to end with a real Postfix.

Postfix refuses nothing itself here: a destination's FakeMX answers 550 at
RCPT, Postfix bounces to the bounce token routemilter set as envelope sender,
the bounce is delivered over LMTP to the routemilter daemon, which re-injects
the returned original to the next address of that destination's chain, or
sends the original sender one bounce listing every failure.

One Postfix and daemon for the module (start-up is the slow part); each test
uses its own rule and addresses, and checks every FakeMX for exactly the
deliveries it expects, so a lost or duplicated message fails the test.
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

from fakemx import start_hosts  # noqa: E402
from itconfig import bounces, fallback_rule, family, reinject_unix  # noqa: E402
from routemilter.config import SRSSettings  # noqa: E402
from routemilter.dsn import parse_dsn  # noqa: E402
from routemilter.tokens import TokenCodec  # noqa: E402
from stack import SRS_DOMAIN, SRS_SECRET, Stack  # noqa: E402

pytestmark = pytest.mark.integration

SENDER = "alice@sender.test"


def rules(workdir: str) -> str:
    return bounces(workdir, reinject_unix(workdir)) + family(
        fallback_rule("backup", "a@family.test", "a@gmail.test", "a@outlook.test", "a@final.test"),
        fallback_rule("catch-all", "b@family.test", "b@gmail.test", "b@outlook.test", "b@final.test"),
        fallback_rule("all-fail", "c@family.test", "c@gmail.test", "c@outlook.test", "c@final.test"),
        """\
  - name: fan-out
    addresses: [d@family.test]
    to:
      - address: d1@gmail.test
        fallback: [d1@outlook.test]
      - address: d2@gmail.test
        fallback: [d2@outlook.test]
""",
        fallback_rule("delivered", "e@family.test", "e@gmail.test", "e@outlook.test"))


REFUSE = {
    "a@gmail.test": "550 5.1.1 <{rcpt}> gmail: no such user",
    "b@gmail.test": "550 5.1.1 <{rcpt}> gmail: no such user",
    "b@outlook.test": "550 5.2.1 <{rcpt}> outlook: mailbox disabled",
    "c@gmail.test": "550 5.1.1 <{rcpt}> gmail: no such user",
    "c@outlook.test": "550 5.2.1 <{rcpt}> outlook: mailbox disabled",
    "c@final.test": "552 5.2.2 <{rcpt}> final: over quota",
    "d1@gmail.test": "550 5.1.1 <{rcpt}> gmail: no such user",
}


@pytest.fixture(scope="module")
def stack():
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    workdir = tempfile.mkdtemp(prefix="rmbf-", dir="/var/tmp")
    os.chmod(workdir, 0o755)
    hosts = start_hosts(["gmail.test", "outlook.test", "final.test", "sender.test"], 20)
    for rcpt, reply in REFUSE.items():
        hosts[rcpt.split("@")[1]].set_reply(rcpt, reply)
    s = Stack(workdir, rules(workdir), mx_hosts=hosts, postfix_kwargs={"public_dir": f"{workdir}/public"})
    try:
        s.start()
        yield s
    finally:
        s.stop()
        for mx in hosts.values():
            mx.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def message(to: str, tag: str) -> bytes:
    return (f"From: Alice <{SENDER}>\r\nTo: <{to}>\r\nSubject: fallback {tag}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@sender.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"\r\nHello {to},\r\nthis is {tag}; it must arrive exactly once.\r\n").encode()


def arrivals(stack: Stack, tag: str) -> list[tuple[str, str, object]]:
    """(mx, rcpt, message) of everything carrying this test's tag."""
    return [(name, rcpt, msg) for name, rcpt, msg in stack.arrivals() if tag.encode() in msg.data]


def settle(stack: Stack, tag: str, expected: int, timeout: float = 60) -> list:
    """Wait for `expected` arrivals and an empty queue, then a little longer for extras."""
    deadline = time.monotonic() + timeout
    while len(arrivals(stack, tag)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    stack.postfix.wait_queue_empty(max(5, deadline - time.monotonic()))
    time.sleep(2)  # anything duplicated would show up now
    stack.postfix.wait_queue_empty(20)
    got = arrivals(stack, tag)
    assert len(got) == expected, (got, stack.postfix.log_tail(60), stack.daemon.log_text()[-3000:])
    return got


def send(stack: Stack, rcpt: str, tag: str):
    result = stack.postfix.send(SENDER, [rcpt], message(rcpt, tag))
    assert result.accepted, result
    return result


def test_primary_550_backup_gets_the_original_once_dkim_valid(stack):
    send(stack, "a@family.test", "t1-backup")
    (name, rcpt, msg), = settle(stack, "t1-backup", 1)
    assert (name, rcpt) == ("outlook.test", "a@outlook.test")
    assert msg.mail_from.startswith("rmc=") and msg.mail_from.endswith("@" + SRS_DOMAIN)
    assert sorted(stack.verify_dkim(msg.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    assert b"Subject: fallback t1-backup" in msg.data
    assert msg.data.endswith(b"\r\nHello a@family.test,\r\nthis is t1-backup; it must arrive exactly once.\r\n")
    assert b"X-Routemilter-Failed: a@gmail.test; 5.1.1; 550 5.1.1 <a@gmail.test> gmail: no such user" in msg.data
    assert ("a@gmail.test", REFUSE["a@gmail.test"].format(rcpt="a@gmail.test")) in \
        stack.mx_hosts["gmail.test"].rcpt_log


def test_primary_and_backup_550_final_catch_all_receives(stack):
    send(stack, "b@family.test", "t2-catch")
    (name, rcpt, msg), = settle(stack, "t2-catch", 1)
    assert (name, rcpt) == ("final.test", "b@final.test")
    assert sorted(stack.verify_dkim(msg.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    assert b"gmail: no such user" in msg.data and b"outlook: mailbox disabled" in msg.data


def test_all_fail_sender_gets_exactly_one_bounce_with_every_reason(stack):
    send(stack, "c@family.test", "t3-allfail")
    (name, rcpt, msg), = settle(stack, "t3-allfail", 1)
    assert (name, rcpt) == ("sender.test", SENDER)
    assert msg.mail_from in ("", "<>")
    report = parse_dsn(msg.data)
    assert report.is_dsn
    assert [r.final_recipient for r in report.failed] == ["c@gmail.test", "c@outlook.test", "c@final.test"]
    assert [r.status for r in report.failed] == ["5.1.1", "5.2.1", "5.2.2"]
    assert b"rmc=" not in msg.data  # the attached headers do not show the return token
    text = msg.data.decode("utf-8", "replace")
    for reason in ("gmail: no such user", "outlook: mailbox disabled", "final: over quota"):
        assert reason in text


def test_fan_out_one_bounces_one_delivered_nothing_duplicated(stack):
    send(stack, "d@family.test", "t4-fanout")
    got = settle(stack, "t4-fanout", 2)
    assert sorted((name, rcpt) for name, rcpt, _ in got) == [
        ("gmail.test", "d2@gmail.test"), ("outlook.test", "d1@outlook.test")]
    for _, _, msg in got:
        assert len(stack.verify_dkim(msg.data)) == 2


def test_delivered_mail_is_not_touched(stack):
    send(stack, "e@family.test", "t5-ok")
    (name, rcpt, msg), = settle(stack, "t5-ok", 1)
    assert (name, rcpt) == ("gmail.test", "e@gmail.test")
    assert b"X-Routemilter-Failed" not in msg.data


def test_forged_expired_and_tampered_tokens_are_refused_and_generate_no_mail(stack):
    codec = TokenCodec(SRSSettings(SRS_DOMAIN, (SRS_SECRET.encode(),)), 21)
    genuine = codec.mint(SENDER, ["backup"])
    old = TokenCodec(SRSSettings(SRS_DOMAIN, (SRS_SECRET.encode(),)), 21, clock=lambda: time.time() - 30 * 86400)
    other = TokenCodec(SRSSettings(SRS_DOMAIN, (b"not-our-secret-0123456789",)), 21)
    bad = {
        "forged": other.mint(SENDER, ["backup"]),
        "expired": old.mint(SENDER, ["backup"]),
        "tampered": genuine.replace("=p0=", "=d0p1="),
        "junk": f"rmb=aaaaaaaaaa=aa=x=p0=sender.test=alice@{SRS_DOMAIN}",
    }
    before = len(stack.arrivals())
    handled = stack.daemon.log_text().count("bounce rcpt=")
    dsn = (b"From: MAILER-DAEMON@evil.test\r\nSubject: fake bounce t6-forged\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n--B\r\n"
           b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; evil.test\r\n\r\n"
           b"Final-Recipient: rfc822; a@gmail.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--B\r\n"
           b"Content-Type: message/rfc822\r\n\r\nFrom: boss@family.test\r\nSubject: pay this t6-forged\r\n\r\n"
           b"wire money\r\n--B--\r\n")
    for kind, address in bad.items():
        result = stack.postfix.send("", [address], dsn)
        assert result.rcpt[address][0] == 550, (kind, result)
        assert not result.accepted, (kind, result)
    stack.postfix.wait_queue_empty(20)
    time.sleep(1)
    assert len(stack.arrivals()) == before
    assert stack.daemon.log_text().count("bounce rcpt=") == handled  # never reached the bounce handler
    assert stack.postfix.log_text().count("milter-reject: RCPT") >= len(bad)


def test_plain_srs_bounce_is_reversed_to_the_original_sender(stack):
    address = stack.srs.forward(SENDER)
    assert address.startswith("SRS0=")
    body = (b"From: MAILER-DAEMON@elsewhere.test\r\nSubject: plain bounce t7-srs\r\n\r\n"
            b"old-style bounce text t7-srs\r\n")
    result = stack.postfix.send("", [address], body)
    assert result.accepted, result
    (name, rcpt, _msg), = settle(stack, "t7-srs", 1)
    assert (name, rcpt) == ("sender.test", SENDER)


def test_bounce_handler_down_postfix_keeps_the_bounce(stack):
    """With the LMTP listener unreachable the bounce waits in Postfix's queue
    (deferred), and is handled once the daemon is back: nothing lost."""
    sock = os.path.join(stack.workdir, "bounce.sock")
    hidden = sock + ".away"
    os.rename(sock, hidden)
    try:
        send(stack, "a@family.test", "t8-retry")
        stack.postfix.wait_log(r"rm_bounce.*status=deferred", timeout=30)
        assert arrivals(stack, "t8-retry") == []
    finally:
        os.rename(hidden, sock)
    stack.postfix.flush()
    (name, rcpt, _msg), = settle(stack, "t8-retry", 1, timeout=90)
    assert (name, rcpt) == ("outlook.test", "a@outlook.test")


def test_sender_ret_hdrs_does_not_stop_the_fallback(stack):
    """A sender asking for RET=HDRS still gets a fallback: the milter sets RET=FULL
    on the forward (the sender's own final bounce carries headers only anyway)."""
    rcpt, tag = "a@family.test", "t9-ret-hdrs"
    result = stack.postfix.send(SENDER, [rcpt], message(rcpt, tag), mail_options=["RET=HDRS"])
    assert result.accepted, result
    (name, got_rcpt, msg), = settle(stack, tag, 1)
    assert (name, got_rcpt) == ("outlook.test", "a@outlook.test")
    assert msg.data.endswith(f"this is {tag}; it must arrive exactly once.\r\n".encode())


def test_message_over_bounce_size_limit_one_bounce_says_why(stack):
    """Over bounce_size_limit Postfix returns only the headers: nothing can be
    forwarded, so the sender gets one bounce with the reason and why no backup was tried."""
    stack.postfix.set_main(bounce_size_limit="200000")
    try:
        rcpt, tag = "a@family.test", "t10-big"
        big = message(rcpt, tag) + (b"x" * 998 + b"\r\n") * 300
        before = len(stack.mx_hosts["sender.test"].messages)
        assert stack.postfix.send(SENDER, [rcpt], big).accepted
        # Headers alone cannot be verified as ours, so the bounce does not attach them (nor
        # the tag in their Subject): it is the one new message the sender's MX receives.
        deadline = time.monotonic() + 60
        while len(stack.mx_hosts["sender.test"].messages) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        stack.postfix.wait_queue_empty(20)
        time.sleep(2)
        new = stack.mx_hosts["sender.test"].messages[before:]
        assert len(new) == 1 and arrivals(stack, tag) == [], (new, stack.daemon.log_text()[-3000:])
        msg = new[0]
        assert msg.rcpt_tos == [SENDER]
        text = msg.data.decode("utf-8", "replace")
        assert "gmail: no such user" in text and "only the headers were returned" in text
        assert len(msg.data) < 50000  # headers, not the 300 KB body
    finally:
        stack.postfix.set_main(bounce_size_limit="10240000")


def test_replayed_token_with_foreign_content_is_not_forwarded(stack):
    """Someone who saw a genuine token (a recipient, a relay) sends a fake DSN with their
    own 'returned message': it is not signed by us, so nothing goes to the backup; the
    sender gets one bounce that says why no backup was tried."""
    codec = TokenCodec(SRSSettings(SRS_DOMAIN, (SRS_SECRET.encode(),)), 21)
    genuine = codec.mint(SENDER, ["backup"])
    dsn = (b"From: MAILER-DAEMON@gmail.test\r\nSubject: fake bounce t11-replay\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n--B\r\n"
           b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; gmail.test\r\n\r\n"
           b"Final-Recipient: rfc822; a@gmail.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
           b"Diagnostic-Code: smtp; 550 5.1.1 no such user t11-replay\r\n\r\n--B\r\n"
           b"Content-Type: message/rfc822\r\n\r\nFrom: boss@family.test\r\nSubject: pay this\r\n\r\n"
           b"wire money t11-replay\r\n--B--\r\n")
    result = stack.postfix.send("", [genuine], dsn)
    assert result.accepted, result
    (name, rcpt, msg), = settle(stack, "t11-replay", 1)
    assert (name, rcpt) == ("sender.test", SENDER)
    assert b"does not carry our valid DKIM signature" in msg.data
    assert b"wire money" not in msg.data


def test_late_bounce_from_the_remote_mta_starts_the_fallback(stack):
    """The destination accepted the message, then bounced it itself (over quota, a
    forwarding rule that failed...): its DSN arrives over SMTP like any mail, with the
    message as it received it, and the backup gets the original once."""
    send(stack, "e@family.test", "t12-late")
    (name, rcpt, delivered), = settle(stack, "t12-late", 1)
    assert (name, rcpt) == ("gmail.test", "e@gmail.test")
    dsn = (b"From: Mail Delivery Subsystem <mailer-daemon@gmail.test>\r\nTo: " + delivered.mail_from.encode()
           + b"\r\nSubject: Delivery Status Notification (Failure)\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/report; boundary=\"000x\"; report-type=delivery-status\r\n\r\n"
           b"--000x\r\nContent-Type: text/plain; charset=\"UTF-8\"\r\n\r\nThe recipient's inbox is full.\r\n"
           b"--000x\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; gmail.test\r\n"
           b"Arrival-Date: Mon, 23 Nov 2026 10:00:01 -0800\r\n\r\n"
           b"Final-Recipient: rfc822; e@gmail.test\r\nAction: failed\r\nStatus: 5.2.2\r\n"
           b"Diagnostic-Code: smtp; 552 5.2.2 The recipient's inbox is out of storage space\r\n"
           b"Last-Attempt-Date: Mon, 23 Nov 2026 10:00:02 -0800\r\n\r\n"
           b"--000x\r\nContent-Type: message/rfc822\r\n\r\n" + delivered.data + b"\r\n--000x--\r\n")
    result = stack.postfix.send("", [delivered.mail_from], dsn)
    assert result.accepted, result
    got = settle(stack, "t12-late", 2)
    (name, rcpt, msg), = [g for g in got if g[0] != "gmail.test"]
    assert (name, rcpt) == ("outlook.test", "e@outlook.test")
    assert sorted(stack.verify_dkim(msg.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    assert b"out of storage space" in msg.data
    assert msg.data.endswith(b"this is t12-late; it must arrive exactly once.\r\n")
