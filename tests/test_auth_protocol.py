"""auth: on the wire: the real daemon, a loopback DNS server, an MTA-side client.

Checks what negotiation asks for with auth: configured (connect and HELO, for
SPF; header changes, to remove forged Authentication-Results), a DMARC p=reject
spoof refused at end of DATA, a DNS outage answered 451, and a legitimate
message forwarded with Authentication-Results and an ARC set that Perl's
Mail::DKIM (an implementation independent of dkimpy) validates.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dkim
import pytest
from miltertest import constants as mc

from dnsserver import DNSServer
from mtaclient import MTA, Daemon
from testkit import ROUTE_ME, SRS_SECTION, write_config

ARCVERIFY = Path(__file__).resolve().parent.parent / "integration" / "arcverify.pl"
CONFIG = """
server_name: mx.family.test
milter:
  socket: unix:{socket}
  socket_mode: "0600"
{srs}dkim:
  domain: family.test
  keys:
    - selector: rsa1
      key: {rsa}
auth:
  dns_server: {dns}
  dns_timeout: 1
"""
BODY = "Hi,\r\nthis is a test.\r\n"


def have_perl_arc() -> bool:
    return shutil.which("perl") is not None and subprocess.run(
        ["perl", "-MMail::DKIM::ARC::Verifier", "-MNet::DNS::Resolver", "-e", "1"],
        capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory, dkim_keys, foreign_key):
    d = tmp_path_factory.mktemp("auth")
    dns = DNSServer().start()
    dns.txt("rsa1._domainkey.family.test", dkim_keys.rsa_txt)
    dns.txt("s1._domainkey.sender.test", foreign_key.txt)
    dns.txt("sender.test", "v=spf1 ip4:127.0.0.0/8 -all")
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject")
    dns.txt("bank.test", "v=spf1 ip4:203.0.113.0/24 -all")
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    sock = d / "rm.sock"
    cfg = write_config(d, CONFIG.format(socket=sock, srs=SRS_SECTION, rsa=dkim_keys.rsa, dns=dns.address) + ROUTE_ME)
    daemon = Daemon(cfg, sock).start()
    yield daemon, dns, foreign_key.pem
    assert daemon.stop() == 0
    dns.stop()


@pytest.fixture
def mta(setup):
    client = MTA(str(setup[0].socket_path))
    yield client
    client.close()


def headers(from_value: str) -> list[tuple[str, str]]:
    return [("From", from_value), ("To", "me@family.test"), ("Subject", "hello"),
            ("Date", "Mon, 23 Nov 2026 10:00:00 +0000"), ("Message-ID", "<1@sender.test>")]


def sign(pem: bytes, hdrs) -> list[tuple[str, str]]:
    raw = "".join(f"{n}: {v}\r\n" for n, v in hdrs).encode() + b"\r\n" + BODY.encode()
    name, _, value = dkim.sign(raw, b"s1", b"sender.test", pem).decode().partition(":")
    return [(name, value.strip().replace("\r\n", "\n"))] + hdrs


def delivered(outcome, hdrs) -> bytes:
    lines = [f"{n}: {v}".replace("\n", "\r\n") for n, v in outcome.headers + hdrs]
    return ("\r\n".join(lines) + "\r\n\r\n" + BODY).encode()


def test_negotiates_connect_helo_and_header_changes(mta):
    assert not mta.protocol & mc.SMFIP_NOCONNECT and not mta.protocol & mc.SMFIP_NOHELO
    assert mta.actions & mc.SMFIF_CHGHDRS
    assert not mta.actions & mc.SMFIF_CHGBODY


def test_dmarc_reject_spoof_is_refused_at_end_of_data(setup, mta):
    daemon, _dns, _pem = setup
    out = mta.message("<ceo@bank.test>", ["<me@family.test>"], headers("CEO <ceo@bank.test>"), BODY)
    assert out.rcpt_replies["<me@family.test>"][0] == mc.SMFIR_CONTINUE
    assert out.final == mc.SMFIR_REPLYCODE and out.final_text.startswith("550 5.7.1 "), out.final_text
    assert "p=reject" in out.final_text and out.added == [] and out.headers == []
    daemon.wait_log("dmarc-reject from_domain=bank.test")


def test_legitimate_message_is_forwarded_with_results_and_arc(setup, mta):
    _daemon, dns, pem = setup
    hdrs = sign(pem, headers("Alice <alice@sender.test>"))
    out = mta.message("<alice@sender.test>", ["<me@family.test>"], hdrs, BODY)
    assert out.final == mc.SMFIR_CONTINUE and out.added == ["<me@gmail.test>"], out
    added = dict(out.headers)
    ar = added["Authentication-Results"]
    assert ar.startswith("mx.family.test;")
    for result in ("spf=pass", "dkim=pass", "dmarc=pass", "arc=none"):
        assert result in ar, ar
    assert "cv=none" in added["ARC-Seal"]
    message = delivered(out, hdrs)
    cv, _results, reason = dkim.arc_verify(message, dnsfunc=lambda n, timeout=5: _txt(dns, n))
    assert cv == b"pass", reason
    if not have_perl_arc():
        pytest.skip("Perl Mail::DKIM (libmail-dkim-perl) missing: independent ARC check skipped")
    perl = subprocess.run(["perl", str(ARCVERIFY), dns.host, str(dns.port)], input=message,
                          capture_output=True, timeout=60)
    text = perl.stdout.decode()
    assert perl.returncode == 0 and text.startswith("arc=pass"), (text, perl.stderr.decode())
    assert "dkim=pass d=family.test" in text and "dkim=pass d=sender.test" in text, text


def test_dns_outage_tempfails_and_nothing_is_forwarded(setup, mta):
    _daemon, dns, _pem = setup
    dns.mode = "drop"
    try:
        out = mta.message("<ceo@bank.test>", ["<me@family.test>"], headers("CEO <ceo@bank.test>"), BODY)
    finally:
        dns.mode = "answer"
    assert out.final == mc.SMFIR_REPLYCODE and out.final_text.startswith("451 4.4.3 "), out.final_text
    assert out.added == [] and out.headers == []


def _txt(dns: DNSServer, name: bytes):
    values = dns.records.get((name.decode().rstrip(".").lower(), "TXT"))
    return values[0].encode() if values else None


def test_several_messages_on_one_connection(setup, mta):
    _daemon, _dns, pem = setup
    spoof = mta.message("<ceo@bank.test>", ["<me@family.test>"], headers("CEO <ceo@bank.test>"), BODY)
    assert spoof.final_text.startswith("550 5.7.1 ")
    hdrs = sign(pem, headers("Alice <alice@sender.test>"))
    out = mta.message("<alice@sender.test>", ["<me@family.test>"], hdrs, BODY)
    assert out.final == mc.SMFIR_CONTINUE and "spf=pass" in dict(out.headers)["Authentication-Results"]
