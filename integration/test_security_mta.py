"""Issue #12 through a real Postfix: the holes found by attacking a deployment.

One Postfix (configured from `routemilter postfix-config`, as stack.Stack does),
the real daemon, and fake remote hosts: gmail.test (the destinations),
`leak` for family.test itself and `elsewhere` as relayhost, so a copy that is
relayed unrouted is caught instead of vanishing. Each test fails on the code
before the fix (checked by reverting it; see docs/security.md):

1. names below our domains (deeper subdomains, below an excluded subdomain or
   the SRS domain) are refused at RCPT, not relayed unrouted;
2. a source-routed recipient is deleted as Postfix stored it: the recipients
   after the milter are exactly the destinations;
4. an outsider's `From: ceo@family.test` gets no d=family.test signature; a
   return address mixed with a routed alias gets 452 4.5.3;
5. a bounce to a genuine SRS0 address of a sender in our domain is routed;
6. a 3,000-character body line and a 5,000-character Subject arrive unchanged,
   DKIM-valid for dkimpy and OpenDKIM, and survive the bounce-driven fallback.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from checks import OpenDKIM, added_headers  # noqa: E402
from fakemx import FakeMX, free_port, start_hosts  # noqa: E402
from routemilter.config import SRSSettings  # noqa: E402
from routemilter.tokens import TokenCodec  # noqa: E402
from stack import SRS_DOMAIN, SRS_SECRET, Stack  # noqa: E402

pytestmark = pytest.mark.integration

SENDER = "alice@sender.test"
RULES = """
bounces:
  socket: unix:{workdir}/bounce.sock
  reinject: 127.0.0.1:{reinject_port}
domains:
  family.test:
    subdomain_addressing: true
    subdomain_exclude: [imx]
rules:
  - name: me
    addresses: [me@family.test]
    to: [me@gmail.test]
  - name: chain
    addresses: [chain@family.test]
    to:
      - address: chain@outlook.test
        fallback: [chain@gmail.test]
"""


@pytest.fixture(scope="module")
def stack():
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    workdir = tempfile.mkdtemp(prefix="rmsec-", dir="/var/tmp")
    os.chmod(workdir, 0o755)
    hosts = start_hosts(["gmail.test", "outlook.test", "family.test"], 60)
    hosts["outlook.test"].set_reply("chain@outlook.test", "550 5.1.1 <{rcpt}> outlook: no such user")
    elsewhere = FakeMX("127.0.0.63", free_port("127.0.0.63"), "elsewhere").start()
    rules = RULES.format(workdir=workdir, reinject_port=free_port())
    s = Stack(workdir, rules, dkim_domain="family.test", mx_hosts=hosts,
              postfix_kwargs={"relayhost": f"[{elsewhere.host}]:{elsewhere.port}"})
    s.elsewhere = elsewhere
    try:
        s.start()
        yield s
    finally:
        s.stop()
        for mx in [*hosts.values(), elsewhere]:
            mx.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def message(tag: str, sender: str = SENDER, subject: str | None = None, body: bytes | None = None) -> bytes:
    return (f"From: Someone <{sender}>\r\nTo: <me@family.test>\r\nSubject: {subject or tag}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@sender.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode() + (
        body if body is not None else f"This is {tag}.\r\n".encode())


def copies(stack, tag: str) -> list[tuple[str, str, object]]:
    """(host, recipient, message) of every copy carrying the tag, at any fake host."""
    out = []
    for mx in [*stack.mx_hosts.values(), stack.elsewhere]:
        for msg in list(mx.messages):
            if f"<{tag}@sender.test>".encode() in msg.data:
                out.extend((mx.name, rcpt, msg) for rcpt in msg.rcpt_tos)
    return out


def settle(stack, tag: str, expected: int, timeout: float = 60) -> list:
    """Wait for `expected` copies and an empty queue, then a little longer for extras."""
    deadline = time.monotonic() + timeout
    while len(copies(stack, tag)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    stack.postfix.wait_queue_empty(max(5, deadline - time.monotonic()))
    time.sleep(2)  # a copy relayed unrouted or duplicated would show up now
    stack.postfix.wait_queue_empty(20)
    return copies(stack, tag)


def smtp_raw(stack, mail_from: str, rcpts: list[str], data: bytes) -> tuple[dict, tuple]:
    """One transaction with recipients sent verbatim (smtplib would drop a source route)."""
    s = smtplib.SMTP("127.0.0.1", stack.postfix.port, timeout=60)
    try:
        s.ehlo("client.sender.test")
        assert s.mail(mail_from)[0] == 250
        replies = {r: s.docmd("RCPT", f"TO:{r}") for r in rcpts}
        reply = (0, b"")
        if any(code == 250 for code, _ in replies.values()):
            reply = s.data(data)
        s.quit()
    finally:
        s.close()
    return replies, reply


def delivered_to(stack, queue_id: str) -> set[str]:
    """Every recipient Postfix delivered (or tried) for this queue id: its recipient list."""
    return {d["to"] for d in stack.postfix.deliveries() if d["qid"] == queue_id}


# --- 1. deeper subdomains -------------------------------------------------------------

@pytest.mark.parametrize("rcpt", ["x@a.kid.family.test", "x@other.example.family.test",
                                  "x@a.imx.family.test", f"x@a.{SRS_DOMAIN}"])
def test_names_below_our_domains_are_refused_at_rcpt(stack, rcpt):
    # The client is in mynetworks here, so Postfix itself would relay anything: the
    # milter must refuse. (Postfix's own layer, relay_domains, is checked for outside
    # clients in test_postfix_config_cli.py.)
    tag = "deep-" + rcpt.split("@")[1].replace(".", "-")
    r = stack.postfix.send(SENDER, [rcpt], message(tag))
    code, text = r.rcpt[rcpt]
    assert code == 550 and "5.1.2" in text, (rcpt, code, text)
    assert not r.accepted and settle(stack, tag, 0, timeout=5) == []


def test_excluded_subdomain_itself_is_not_relayed_for_outsiders(stack):
    # imx.family.test is hosted elsewhere: routemilter leaves it to Postfix, whose
    # relay_domains (from postfix-config) lists it as !imx.family.test.
    pf = stack.postfix
    pf.set_main(mynetworks="127.0.0.1/32")
    try:
        time.sleep(2)  # reload: new smtpd processes
        client = smtplib.SMTP(timeout=30, source_address=("127.0.0.70", 0))
        client.connect("127.0.0.1", pf.port)
        client.ehlo("outside.test")
        assert client.mail(SENDER)[0] == 250
        replies = {r: client.rcpt(r) for r in ("x@imx.family.test", "x@a.kid.family.test", "me@family.test")}
        client.quit()
    finally:
        pf.set_main(mynetworks="127.0.0.0/8")
        time.sleep(2)
    assert replies["x@imx.family.test"][0] in (454, 554) and b"Relay access denied" in replies["x@imx.family.test"][1]
    assert replies["x@a.kid.family.test"][0] in (454, 554), replies  # relay_domains: one label deep only
    assert replies["me@family.test"][0] == 250, replies


# --- 2. source-routed recipient -------------------------------------------------------

def test_source_routed_recipient_reaches_only_its_destinations(stack):
    replies, data_reply = smtp_raw(stack, SENDER, ["<@ext.test:me@family.test>"], message("srcroute"))
    assert replies["<@ext.test:me@family.test>"][0] == 250 and data_reply[0] == 250, (replies, data_reply)
    queue_id = data_reply[1].decode().rsplit(" ", 1)[-1]
    got = settle(stack, "srcroute", 1)
    # Before the fix the original recipient stayed in the queue file and went out too
    # (to the leak host for family.test), with our return address and signature.
    assert [(h, r) for h, r, _ in got] == [("gmail.test", "me@gmail.test")], got
    assert delivered_to(stack, queue_id) == {"me@gmail.test"}, stack.postfix.log_tail(30)


# --- 4. signing: what a forwarder signs -----------------------------------------------

def test_outsiders_from_in_our_domain_gets_no_aligned_signature(stack):
    r = stack.postfix.send("ceo@family.test", ["me@family.test"], message("spoof", sender="ceo@family.test"))
    assert r.accepted, r
    [(host, rcpt, msg)] = settle(stack, "spoof", 1)
    assert (host, rcpt) == ("gmail.test", "me@gmail.test")  # still forwarded
    assert b"DKIM-Signature:" not in msg.data and stack.verify_dkim(msg.data) == []
    assert "dkim=skipped:from-aligned-unverified:family.test" in stack.daemon.log_text()
    # An ordinary forward is still signed.
    r = stack.postfix.send(SENDER, ["me@family.test"], message("ordinary"))
    [(_, _, msg)] = settle(stack, "ordinary", 1)
    assert sorted(stack.verify_dkim(msg.data)) == ["family.test/ed", "family.test/rsa"]


@pytest.mark.parametrize("kind", ["srs0", "token"])
def test_return_address_mixed_with_a_routed_alias_is_sent_separately(stack, kind):
    if kind == "srs0":
        address = stack.srs.forward("bob@sender.test")
    else:
        tokens = TokenCodec(SRSSettings(SRS_DOMAIN, (SRS_SECRET.encode(),)), 21)
        address = tokens.mint("bob@sender.test", ["me"])
    tag = f"mixed-{kind}"
    r = stack.postfix.send(SENDER, ["me@family.test", address], message(tag))
    assert r.rcpt["me@family.test"][0] == 250
    code, text = r.rcpt[address]
    assert code == 452 and "4.5.3" in text, (code, text)
    got = settle(stack, tag, 1)
    # Before the fix bob@sender.test also got the message (reversed, or sent back by the
    # bounce handler as "not a DSN"), carrying our signature.
    assert [(h, rc) for h, rc, _ in got] == [("gmail.test", "me@gmail.test")], got


# --- 5. reversals go through the rules -------------------------------------------------

def test_bounce_to_srs0_of_our_own_sender_is_routed(stack):
    r = stack.postfix.send("", [stack.srs.forward("me@family.test")], message("srs-managed"))
    assert r.accepted, r
    got = settle(stack, "srs-managed", 1)
    # Before the fix: addrcpt me@family.test, unrouted, relayed to family.test's MX.
    assert [(h, rc) for h, rc, _ in got] == [("gmail.test", "me@gmail.test")], got
    unknown = stack.srs.forward("nobody@family.test")
    r = stack.postfix.send("", [unknown], message("srs-unknown"))
    assert r.rcpt[unknown][0] == 550 and "5.1.1" in r.rcpt[unknown][1], r.rcpt
    assert settle(stack, "srs-unknown", 0, timeout=5) == []


# --- 6. long lines ---------------------------------------------------------------------

LONG_SUBJECT = "long subject " + "s" * 4987  # 5,000 characters
LONG_BODY = b"<html><body>" + b"x" * 2981 + b"</body>\r\n" + b"short line\r\n" + b"y" * 1200 + b"\r\n"


def _check_long_copy(stack, msg, original: bytes) -> None:
    assert added_headers(msg.data, original)  # the original's bytes, unfolded
    assert sorted(stack.verify_dkim(msg.data)) == ["family.test/ed", "family.test/rsa"]
    opendkim = OpenDKIM(stack.workdir, stack.keys, "family.test")
    assert opendkim.verify(msg.data) == {"rsa": "pass", "ed": "pass"}


def test_long_lines_leave_unchanged_and_dkim_valid(stack):
    assert len(LONG_SUBJECT) == 5000 and max(len(x) for x in LONG_BODY.split(b"\r\n")) == 3000
    original = message("longlines", subject=LONG_SUBJECT, body=LONG_BODY)
    r = stack.postfix.send(SENDER, ["me@family.test"], original)
    assert r.accepted, r
    [(host, _, msg)] = settle(stack, "longlines", 1)
    assert host == "gmail.test"
    _check_long_copy(stack, msg, original)


def test_long_lines_survive_the_bounce_driven_fallback(stack):
    # The primary refuses: Postfix returns the message over LMTP to routemilter, which
    # forwards it only if our signature on the returned copy still verifies.
    original = message("longfallback", subject=LONG_SUBJECT, body=LONG_BODY)
    r = stack.postfix.send(SENDER, ["chain@family.test"], original)
    assert r.accepted, r
    got = settle(stack, "longfallback", 1, timeout=90)
    assert [(h, rc) for h, rc, _ in got] == [("gmail.test", "chain@gmail.test")], (
        got, stack.daemon.log_text()[-3000:])
    msg = got[0][2]
    assert b"X-Routemilter-Failed: chain@outlook.test" in msg.data
    assert msg.data.endswith(original.split(b"\r\n\r\n", 1)[1])
    assert sorted(stack.verify_dkim(msg.data)) == ["family.test/ed", "family.test/rsa"]
    assert OpenDKIM(stack.workdir, stack.keys, "family.test").verify(msg.data) == {"rsa": "pass", "ed": "pass"}
