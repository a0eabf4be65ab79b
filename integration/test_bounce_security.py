"""Issue 12, items 3, 4 (bounce part), 5 (token part) and 7 (re-injection listener),
through a real Postfix configured by `routemilter postfix-config`.

The attacker here is a destination that receives our forwards (evil.test): it
holds genuine bounce tokens (the envelope senders of what it received) and our
signed copies, and sends crafted DSNs to those tokens over SMTP, as anyone can.
Each test fails on the code before the fix (checked by reverting it).
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fakemx import start_hosts  # noqa: E402
from itconfig import bounces, fallback_rule, family, fanout_rule, reinject_unix  # noqa: E402
from routemilter.config import load  # noqa: E402
from routemilter.dsn import parse_dsn  # noqa: E402
from stack import Stack  # noqa: E402

pytestmark = pytest.mark.integration

ALICE = "alice@sender.test"


def rules(workdir: str) -> str:
    return bounces(workdir, reinject_unix(workdir)) + family(
        fallback_rule("shared", "z@family.test", "z@evil.test", "z@outlook.test"),
        fanout_rule("no-fallback", "y@family.test", "y@evil.test"),
        fanout_rule("me", "me@family.test", "me@gmail.test"))


@pytest.fixture(scope="module")
def stack():
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    workdir = tempfile.mkdtemp(prefix="rmbs-", dir="/var/tmp")
    os.chmod(workdir, 0o755)
    hosts = start_hosts(["evil.test", "outlook.test", "gmail.test", "sender.test"], 40)
    s = Stack(workdir, rules(workdir), mx_hosts=hosts,
              postfix_kwargs={"public_dir": f"{workdir}/public"})
    try:
        s.start()
        yield s
    finally:
        s.stop()
        for mx in hosts.values():
            mx.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def message(sender: str, to: str, tag: str, body: str = "") -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {tag}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{tag}@sender.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
            f"{body or 'hello'} {tag}\r\n").encode()


def tagged(stack, tag: str, mx: str | None = None) -> list:
    return [m for name, host in stack.mx_hosts.items() if mx in (None, name)
            for m in host.messages if tag.encode() in m.data]


def wait_for(stack, predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.2)
    stack.postfix.wait_queue_empty(30)
    time.sleep(2)  # anything extra would show up now
    stack.postfix.wait_queue_empty(30)


def forward_to_evil(stack, sender: str, rcpt: str, tag: str, body: str = ""):
    """Send through the stack; the copy evil.test received (token, data)."""
    assert stack.postfix.send(sender, [rcpt], message(sender, rcpt, tag, body)).accepted
    wait_for(stack, lambda: tagged(stack, tag, "evil.test"))
    (copy,) = tagged(stack, tag, "evil.test")
    assert copy.mail_from.startswith("rmc=")
    return copy


def dsn(failed: str, returned: bytes, diagnostic: str | None = None) -> bytes:
    diagnostic = diagnostic or f"550 5.1.1 <{failed}> no such user"
    return (b"From: Mail Delivery Subsystem <mailer-daemon@evil.test>\r\nSubject: Delivery Status Notification\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n"
            b"\r\n--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
            b"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; evil.test\r\n\r\n"
            + f"Final-Recipient: rfc822; {failed}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
              f"Diagnostic-Code: smtp; {diagnostic}\r\n".encode()
            + b"\r\n--B\r\nContent-Type: message/rfc822\r\n\r\n" + returned + b"\r\n--B--\r\n")


def bounce_to(stack, token: str, data: bytes) -> None:
    result = stack.postfix.send("", [token], data)
    assert result.accepted, result


def bounces_for(stack, tag_or_text: bytes) -> list:
    return [m for m in stack.mx_hosts["sender.test"].messages if tag_or_text in m.data]


# ------------------------------------------------- 3: a token is bound to its message


def test_token_of_one_forward_with_our_signed_copy_of_another_is_not_forwarded(stack):
    a = forward_to_evil(stack, ALICE, "z@family.test", "s1-a")
    b = forward_to_evil(stack, "mallory@evil.test", "z@family.test", "s1-b", body="wire money now")
    assert len(stack.verify_dkim(b.data)) == 2  # b is genuinely ours
    bounce_to(stack, a.mail_from, dsn("z@evil.test", b.data))
    wait_for(stack, lambda: bounces_for(stack, b"another message"))
    assert tagged(stack, "s1-b", "outlook.test") == [], "b was forwarded to a's fallback"
    (bounce,) = bounces_for(stack, b"another message")
    assert bounce.rcpt_tos == [ALICE] and b"wire money" not in bounce.data


def test_a_reply_to_added_to_our_copy_is_not_forwarded(stack):
    c = forward_to_evil(stack, ALICE, "z@family.test", "s2-replyto")
    before = len(stack.mx_hosts["sender.test"].messages)
    bounce_to(stack, c.mail_from, dsn("z@evil.test", b"Reply-To: <thief@evil.test>\r\n" + c.data))
    wait_for(stack, lambda: len(stack.mx_hosts["sender.test"].messages) > before)
    assert tagged(stack, "s2-replyto", "outlook.test") == []  # our oversigned Reply-To broke
    (bounce,) = stack.mx_hosts["sender.test"].messages[before:]
    assert bounce.rcpt_tos == [ALICE] and b"does not carry our valid DKIM signature" in bounce.data
    assert b"thief" not in bounce.data


def test_fields_added_outside_our_signature_are_dropped_from_the_fallback_copy(stack):
    d = forward_to_evil(stack, ALICE, "z@family.test", "s3-added")
    returned = b"X-Evil: call +1 555 0100 now\r\nReceived: from evil.test\r\n" + d.data
    bounce_to(stack, d.mail_from, dsn("z@evil.test", returned))
    wait_for(stack, lambda: tagged(stack, "s3-added", "outlook.test"))
    (copy,) = tagged(stack, "s3-added", "outlook.test")
    assert b"X-Evil" not in copy.data and b"from evil.test" not in copy.data
    assert sorted(stack.verify_dkim(copy.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    assert copy.mail_from.startswith("rmc=") and b"Subject: s3-added" in copy.data


# ------------------------------------- 4: one action per token and destination; our text


def test_a_replayed_dsn_is_accepted_and_does_nothing(stack):
    e = forward_to_evil(stack, ALICE, "z@family.test", "s4-replay")
    data = dsn("z@evil.test", e.data)
    bounce_to(stack, e.mail_from, data)
    wait_for(stack, lambda: tagged(stack, "s4-replay", "outlook.test"))
    assert len(tagged(stack, "s4-replay", "outlook.test")) == 1
    handled = stack.daemon.log_text().count("bounce rcpt=")
    for _ in range(3):
        bounce_to(stack, e.mail_from, data)
    wait_for(stack, lambda: stack.daemon.log_text().count("bounce rcpt=") >= handled + 3)
    assert len(tagged(stack, "s4-replay", "outlook.test")) == 1  # not four
    assert stack.daemon.log_text().count("z@evil.test:replay-ignored") == 3
    # Postfix delivered each replay (250): nothing retries, nothing bounces back
    assert bounces_for(stack, b"s4-replay") == []


def test_final_bounce_quotes_the_remote_reply_only_as_report_data(stack):
    f = forward_to_evil(stack, ALICE, "y@family.test", "s5-text")
    phish = "550 5.1.1 URGENT your mailbox is suspended, log in at http://phish.example/s5 to restore it"
    bounce_to(stack, f.mail_from, dsn("y@evil.test", f.data, diagnostic=phish))
    wait_for(stack, lambda: bounces_for(stack, b"phish.example"))
    (bounce,) = bounces_for(stack, b"phish.example")
    assert bounce.rcpt_tos == [ALICE]
    assert sorted(stack.verify_dkim(bounce.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    msg = email.message_from_bytes(bounce.data, policy=email.policy.compat32)
    human, report = msg.get_payload()[:2]
    assert "phish.example" not in human.get_payload() and "status 5.1.1" in human.get_payload()
    assert report.get_content_type() == "message/delivery-status" and "phish.example" in report.as_string()
    assert parse_dsn(bounce.data).failed[0].final_recipient == "y@evil.test"


def test_a_message_to_an_alias_and_a_token_reaches_the_token_sender_without_our_signature(stack):
    """The milter signs a message for its routed recipient; the same message also went to
    a token, whose handler reverses it to the token's sender: not under our name. (The
    milter now defers such a token recipient to a transaction of its own, issue 12.4 in
    session.py; the handler drops our signatures from a reversal as well.)"""
    h = forward_to_evil(stack, ALICE, "z@family.test", "s7-mixed-token")
    text = message("mallory@evil.test", "me@family.test", "s7-mixed", body="invoice attached, pay today")
    result = stack.postfix.send("mallory@evil.test", ["me@family.test", h.mail_from], text)
    assert result.accepted, result
    if result.rcpt[h.mail_from][0] // 100 == 4:  # the milter defers a token mixed with forwards:
        assert stack.postfix.send("mallory@evil.test", [h.mail_from], text).accepted  # the retry
    wait_for(stack, lambda: tagged(stack, "s7-mixed", "sender.test") and tagged(stack, "s7-mixed", "gmail.test"))
    (forwarded,) = tagged(stack, "s7-mixed", "gmail.test")
    assert len(stack.verify_dkim(forwarded.data)) == 2  # the forward itself is ours to sign
    (reversed_,) = tagged(stack, "s7-mixed", "sender.test")
    assert reversed_.rcpt_tos == [ALICE]
    assert stack.verify_dkim(reversed_.data) == [] and b"d=routemilter.test" not in reversed_.data


# -------------------------------------------- 5: a reversal goes through the rules


def test_a_reply_to_the_token_of_a_managed_sender_is_routed(stack):
    g = forward_to_evil(stack, "me@family.test", "z@family.test", "s6-reverse")
    reply = b"From: <z@evil.test>\r\nSubject: Re: s6-reverse\r\n\r\nthanks s6-reverse\r\n"
    assert stack.postfix.send("z@evil.test", [g.mail_from], reply).accepted
    wait_for(stack, lambda: tagged(stack, "thanks s6-reverse"))
    got = [(name, m.rcpt_tos) for name, host in stack.mx_hosts.items() for m in host.messages
           if b"thanks s6-reverse" in m.data]
    assert got == [("gmail.test", ["me@gmail.test"])], (got, stack.postfix.log_tail(40))
    (copy,) = tagged(stack, "thanks s6-reverse", "gmail.test")
    assert stack.srs.reverse(copy.mail_from) == "z@evil.test"  # SRS, as a forward would have


# ------------------------------------- 7: only the MTA and the daemon reach the re-injection


def _connect_as_nobody(target) -> subprocess.CompletedProcess:
    code = ("import socket, sys\n"
            "t = sys.argv[1]\n"
            "s = socket.socket(socket.AF_UNIX) if t.startswith('/') else socket.socket()\n"
            "s.settimeout(10)\n"
            "s.connect(t if t.startswith('/') else (t.rsplit(':', 1)[0].strip('[]'), int(t.rsplit(':', 1)[1])))\n"
            "print(s.recv(200).decode(errors='replace'))\n")
    return subprocess.run(["/usr/bin/python3", "-c", code, target], user="nobody", group="nogroup",
                          capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")
def test_a_local_user_cannot_reach_the_reinjection_listener(stack):
    reinject = load(stack.config_path).bounces.reinject
    target = reinject[len("unix:"):] if reinject.startswith("unix:") else reinject
    attempt = _connect_as_nobody(target)
    assert attempt.returncode != 0 and "220" not in attempt.stdout, (
        f"a local user reached the re-injection smtpd ({reinject}), which relays without the milter: "
        f"{attempt.stdout}")
    assert "Permission denied" in attempt.stderr or "Connection refused" in attempt.stderr, attempt.stderr
    # ...while the daemon (root here; in production its user in group postdrop) does
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(target)
    assert s.recv(200).startswith(b"220")
    s.close()
