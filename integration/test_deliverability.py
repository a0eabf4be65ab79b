"""Deliverability end to end: real Postfix, the real daemon, FakeMX destinations and
a DNS server on loopback (tests/dnsserver.py; `auth: dns_server:` points the daemon
at it, nothing reaches the internet).

* A spoof of a domain publishing DMARC p=reject is refused at SMTP time (550 after DATA).
* A legitimate, DKIM-signed message is forwarded with Authentication-Results and an
  ARC set that Perl's Mail::DKIM (independent of dkimpy, which sealed it) validates,
  along with our DKIM signature and the sender's original one.
* A DNS outage answers 451 (the client keeps the message); once DNS is back the same
  message goes through: nothing lost, nothing accepted that should have been refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import authres
import dkim
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from dnsserver import DNSServer  # noqa: E402
from fakemx import FakeMX, free_port  # noqa: E402
from stack import SERVER, Stack  # noqa: E402
from testkit import make_foreign_key  # noqa: E402

pytestmark = pytest.mark.integration

RULES = """
auth:
  dns_server: {dns}
  dns_timeout: 2
  rules:
    strict: {{spf_fail: refuse}}
    limited: {{rate_limit: {{messages: 1, seconds: 3600}}}}
domains:
  family.test: {{}}
rules:
  - name: me
    addresses: [me@family.test]
    to: [me@gmail.test]
  - name: strict
    addresses: [strict@family.test]
    to: [strict@gmail.test]
  - name: limited
    addresses: [limited@family.test]
    to: [limited@gmail.test]
"""


def message(from_value: str, subject: str, msgid: str) -> bytes:
    return (f"From: {from_value}\r\nTo: me@family.test\r\nSubject: {subject}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{msgid}>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nHello,\r\nthis is {subject}.\r\n").encode()


@pytest.fixture(scope="module")
def env():
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    workdir = tempfile.mkdtemp(prefix="rmdl-", dir="/var/tmp")
    os.chmod(workdir, 0o755)
    dns = DNSServer().start()
    sender_key = make_foreign_key()
    dns.txt("s1._domainkey.sender.test", sender_key.txt)
    dns.txt("sender.test", "v=spf1 ip4:127.0.0.0/8 ip6:::1 -all")
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject")
    dns.txt("bank.test", "v=spf1 ip4:203.0.113.0/24 -all")
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    gmail = FakeMX("127.0.0.2", free_port("127.0.0.2"), "gmail").start()
    stack = Stack(workdir, RULES.format(dns=dns.address), mx_hosts={"gmail.test": gmail})
    try:
        stack.start()
        for selector, txt in stack.keys.items():  # our own DKIM/ARC keys, for the validators
            dns.txt(f"{selector}._domainkey.{stack.dkim_domain}", txt)
        yield stack, dns, gmail, sender_key.pem
    finally:
        stack.stop()
        gmail.stop()
        dns.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_dmarc_reject_spoof_is_refused_at_smtp_time(env):
    stack, _dns, gmail, _pem = env
    before = len(gmail.messages)
    r = stack.postfix.send("ceo@bank.test", ["me@family.test"],
                           message("CEO <ceo@bank.test>", "wire transfer", "spoof@bank.test"))
    assert r.rcpt["me@family.test"][0] == 250, r
    assert r.data is not None and r.data[0] == 550, r
    assert "5.7.1" in r.data[1] and "p=reject" in r.data[1], r.data
    time.sleep(1)
    assert len(gmail.messages) == before
    assert "dmarc-reject from_domain=bank.test" in stack.daemon.log_text()


def test_legitimate_message_forwarded_with_results_and_arc_that_validate(env):
    stack, dns, gmail, pem = env
    before = len(gmail.messages)
    raw = message("Alice <alice@sender.test>", "legit", "legit@sender.test")
    signature = dkim.sign(raw, b"s1", b"sender.test", pem)
    r = stack.postfix.send("alice@sender.test", ["me@family.test"], signature + raw)
    assert r.accepted, r
    got = gmail.wait_for(before + 1, timeout=30)[-1]
    assert got.rcpt_tos == ["me@gmail.test"] and got.mail_from.startswith("SRS0=")
    data = got.data
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    ar_lines = [f for f in _fields(head) if f.lower().startswith("authentication-results:")]
    assert len(ar_lines) == 1, ar_lines
    parsed = authres.AuthenticationResultsHeader.parse(ar_lines[0].replace("\r\n", ""))
    assert parsed.authserv_id == SERVER
    results = {res.method: res.result for res in parsed.results}
    assert results == {"spf": "pass", "dkim": "pass", "arc": "none", "dmarc": "pass"}, results

    # dkimpy (the sealing library) agrees ...
    dnsfunc = lambda name, timeout=5: _txt(dns, name)  # noqa: E731
    cv, _res, reason = dkim.arc_verify(data, dnsfunc=dnsfunc)
    assert cv == b"pass", reason
    # ... and so does an independent implementation (Perl Mail::DKIM), over real DNS queries
    if subprocess.run(["perl", "-MMail::DKIM::ARC::Verifier", "-e", "1"], capture_output=True).returncode:
        pytest.fail("Perl Mail::DKIM missing: run scripts/install-deps.sh (libmail-dkim-perl)")
    perl = subprocess.run(["perl", os.path.join(HERE, "arcverify.pl"), dns.host, str(dns.port)],
                          input=data, capture_output=True, timeout=60)
    out = perl.stdout.decode()
    print(out)
    assert perl.returncode == 0 and out.startswith("arc=pass"), (out, perl.stderr.decode())
    assert f"dkim=pass d={stack.dkim_domain}" in out and "dkim=pass d=sender.test" in out, out
    # negative control: the same validator fails the seal once the body is changed
    tampered = data.replace(b"this is legit.", b"this is forged.")
    perl = subprocess.run(["perl", os.path.join(HERE, "arcverify.pl"), dns.host, str(dns.port)],
                          input=tampered, capture_output=True, timeout=60)
    assert perl.stdout.decode().startswith("arc=fail"), perl.stdout.decode()


def test_dns_outage_tempfails_and_the_retry_is_delivered(env):
    stack, dns, gmail, pem = env
    before = len(gmail.messages)
    raw = message("Alice <alice@sender.test>", "during an outage", "outage@sender.test")
    data = dkim.sign(raw, b"s1", b"sender.test", pem) + raw
    dns.mode = "drop"
    try:
        t0 = time.monotonic()
        r = stack.postfix.send("alice@sender.test", ["me@family.test"], data)
        took = time.monotonic() - t0
    finally:
        dns.mode = "answer"
    assert r.data is not None and r.data[0] == 451 and "4.4.3" in r.data[1], r
    assert took < 25, took  # bounded by dns_timeout, well inside Postfix's milter timeouts
    time.sleep(1)
    assert len(gmail.messages) == before  # nothing accepted while the verdict was unknown
    r = stack.postfix.send("alice@sender.test", ["me@family.test"], data)  # the client's retry
    assert r.accepted, r
    got = gmail.wait_for(before + 1, timeout=30)[-1]
    assert b"dmarc=pass" in got.data


def _fields(head: str) -> list[str]:
    out: list[str] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and out:
            out[-1] += "\r\n" + line
        else:
            out.append(line)
    return out


def _txt(dns: DNSServer, name: bytes):
    values = dns.records.get((name.decode().rstrip(".").lower(), "TXT"))
    return values[0].encode() if values else None


def test_spf_fail_refused_at_rcpt_where_configured(env):
    stack, _dns, _gmail, _pem = env
    data = message("CEO <ceo@bank.test>", "spf", "spf@bank.test")
    r = stack.postfix.send("ceo@bank.test", ["strict@family.test", "me@family.test"], data)
    code, text = r.rcpt["strict@family.test"]
    assert code == 550 and "5.7.23" in text, r
    assert r.rcpt["me@family.test"][0] == 250  # the other rule does not refuse SPF failures ...
    assert r.data[0] == 550  # ... but DMARC p=reject still refuses the message


def test_rate_limit_defers_a_noisy_destination(env):
    stack, _dns, _gmail, pem = env
    raw = message("Alice <alice@sender.test>", "rate", "rate@sender.test")
    data = dkim.sign(raw, b"s1", b"sender.test", pem) + raw
    first = stack.postfix.send("alice@sender.test", ["limited@family.test"], data)
    assert first.accepted, first
    second = stack.postfix.send("alice@sender.test", ["limited@family.test"], data)
    code, text = second.rcpt["limited@family.test"]
    assert code == 451 and "4.7.1" in text and "limited@gmail.test" in text, second
    assert "rate-limited rcpt=limited@family.test" in stack.daemon.log_text()


def test_several_transactions_in_one_smtp_session(env):
    """Connect and HELO are seen once per connection; every transaction on it is
    checked with that client address (a refused one does not upset the next)."""
    import smtplib

    stack, _dns, gmail, pem = env
    before = len(gmail.messages)
    raw = message("Alice <alice@sender.test>", "second in session", "session@sender.test")
    legit = dkim.sign(raw, b"s1", b"sender.test", pem) + raw
    with smtplib.SMTP("127.0.0.1", stack.postfix.port, timeout=60) as smtp:
        smtp.ehlo("client.routemilter.test")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("ceo@bank.test", ["me@family.test"],
                          message("CEO <ceo@bank.test>", "spoof in session", "s1@bank.test"))
        assert refused.value.smtp_code == 550
        smtp.rset()
        assert smtp.sendmail("alice@sender.test", ["me@family.test"], legit) == {}
    got = gmail.wait_for(before + 1, timeout=30)[-1]
    assert b"spf=pass" in got.data and b"dmarc=pass" in got.data
