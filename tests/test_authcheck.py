"""Inbound authentication and reputation policy (authcheck.py, arc.py, ratelimit.py),
driven through `Transaction` with DNS injected (no network, no MTA)."""

from __future__ import annotations

import dataclasses
import os
import re

import authres
import dkim
import pytest

from routemilter.authcheck import DMARC_REJECT, DNS_TEMPFAIL, MULTIPLE_FROM, SPAM, SPF_FAIL, Authenticator, DNSTempError
from routemilter.config import ConfigError, loads
from routemilter.policy import Policy
from routemilter.ratelimit import RateLimiter
from routemilter.state import MemoryStore
from routemilter.transaction import Transaction
from testkit import SRS_SECTION

CLIENT = "192.0.2.10"
OTHER = "198.51.100.66"
CONFIG = "\nserver_name: mx.family.test\n" + SRS_SECTION + """\
dkim:
  domain: family.test
  keys:
    - selector: rsa1
      key: {rsa}
auth:
  authserv_id: mx.family.test
{auth}
domains:
  family.test: {{}}
rules:
  - name: me
    addresses: [me@family.test]
    to: [me@gmail.test]
  - name: shop
    addresses: [shop@family.test]
    to: [me@outlook.test]
"""


class FakeDNS:
    def __init__(self):
        self.records: dict[tuple[str, str], list] = {}
        self.broken: set[str] = set()  # names whose lookups time out

    def txt(self, name, value):
        self.records.setdefault((name.lower(), "TXT"), []).append([value.encode()])

    def __call__(self, name, qtype):
        name = name.lower().rstrip(".")
        if name in self.broken:
            raise DNSTempError(f"{qtype} {name}: LifetimeTimeout")
        return list(self.records.get((name, qtype), []))


@pytest.fixture(scope="module")
def keys(dkim_keys, foreign_key):
    return {"rsa": dkim_keys.rsa, "ours": dkim_keys.rsa_txt, "sender_pem": foreign_key.pem,
            "sender_txt": foreign_key.txt}


@pytest.fixture
def dns(keys):
    f = FakeDNS()
    f.txt("sender.test", "v=spf1 ip4:192.0.2.0/24 -all")
    f.txt("_dmarc.sender.test", "v=DMARC1; p=reject")
    f.txt("s1._domainkey.sender.test", keys["sender_txt"])
    f.txt("bank.test", "v=spf1 ip4:203.0.113.0/24 -all")
    f.txt("_dmarc.bank.test", "v=DMARC1; p=reject; rua=mailto:d@bank.test")
    f.txt("soft.test", "v=spf1 -all")
    f.txt("_dmarc.soft.test", "v=DMARC1; p=none")
    f.txt("rsa1._domainkey.family.test", keys["ours"])
    return f


def make_policy(keys, dns, auth_yaml="", limiter=None) -> Policy:
    auth = "\n".join("  " + line for line in auth_yaml.strip().splitlines())
    config = loads(CONFIG.format(rsa=keys["rsa"], auth=auth))
    policy = Policy.from_config(config)
    authenticator = Authenticator.from_config(config, lookup=dns, signer=policy.signer)  # as Policy does
    if limiter is not None:
        authenticator.limiter = limiter
    return dataclasses.replace(policy, auth=authenticator)


def test_the_key_file_is_read_once_per_load_for_signing_and_sealing(keys, monkeypatch):
    config = loads(CONFIG.format(rsa=keys["rsa"], auth=""))
    path = keys["rsa"]
    opened = []
    real_open = os.open

    def counting_open(file, *args, **kwargs):
        if os.fspath(file) == path:
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    policy = Policy.from_config(config)
    assert policy.signer is not None and policy.auth.sealer is not None
    assert len(opened) == 1


def headers_of(sender_from: str, extra=()) -> list[tuple[str, str]]:
    return [*extra, ("From", sender_from), ("To", "me@family.test"), ("Subject", "hello"),
            ("Date", "Mon, 23 Nov 2026 10:00:00 +0000"), ("Message-ID", "<1@sender.test>")]


BODY = b"Hi,\r\nthis is a test.\r\n"


def signed_headers(keys, headers):
    raw = "".join(f"{n}: {v}\r\n" for n, v in headers).encode() + b"\r\n" + BODY
    sig = dkim.sign(raw, b"s1", b"sender.test", keys["sender_pem"], include_headers=[b"from", b"subject", b"to"])
    name, _, value = sig.decode().partition(":")
    return [(name, value.strip().replace("\r\n", "\n"))] + headers


def run(policy, sender="alice@sender.test", ip=CLIENT, rcpts=("me@family.test",), headers=None, body=BODY):
    tx = Transaction(policy, f"<{sender}>")
    tx.auth.set_client(ip, "mail.client.test", tx.sender)
    replies = [tx.add_recipient(f"<{r}>") for r in rcpts]
    for name, value in headers or headers_of(f"Alice <{sender}>"):
        tx.add_header(name, value.encode())
    tx.add_body(body)
    return tx, replies, (tx.plan() if any(r is None for r in replies) else None)


def final_message(plan, headers, body=BODY) -> bytes:
    """The message as the MTA would deliver it: changes applied, headers prepended."""
    out = list(headers)
    for name, index, value in plan.changes:
        seen = 0
        for i, (n, _v) in enumerate(out):
            if n.lower() == name.lower():
                seen += 1
                if seen == index:
                    out[i] = (n, value) if value else None
                    break
        out = [h for h in out if h is not None]
    out = list(plan.headers) + out
    text = "".join(f"{n}: {v}\r\n".replace("\n\t", "\r\n\t").replace("\r\r", "\r") for n, v in out)
    return text.encode() + b"\r\n" + body


def ar_results(plan) -> dict[str, str]:
    value = dict(plan.headers)["Authentication-Results"]
    parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value.replace("\n\t", " "))
    assert parsed.authserv_id == "mx.family.test"
    return {r.method: r.result for r in parsed.results}


def test_dmarc_reject_spoof_is_refused(keys, dns):
    policy = make_policy(keys, dns)
    _tx, replies, plan = run(policy, sender="ceo@bank.test", ip=OTHER,
                             headers=headers_of("CEO <ceo@bank.test>"))
    assert replies == [None]
    assert plan.reply == DMARC_REJECT and plan.add == [] and plan.headers == []
    assert "dmarc=fail:p=reject" in " ".join(plan.notes)


def test_dmarc_reject_can_be_switched_off_per_rule(keys, dns):
    policy = make_policy(keys, dns, "rules:\n  me: {dmarc_reject: accept}")
    _tx, _r, plan = run(policy, sender="ceo@bank.test", ip=OTHER, headers=headers_of("CEO <ceo@bank.test>"))
    assert plan.reply is None and plan.add == ["me@gmail.test"]
    assert ar_results(plan) == {"spf": "fail", "dkim": "none", "arc": "none", "dmarc": "fail"}


def test_legitimate_message_gets_results_and_a_valid_arc_seal(keys, dns):
    policy = make_policy(keys, dns)
    headers = signed_headers(keys, headers_of("Alice <alice@sender.test>"))
    _tx, _r, plan = run(policy, headers=headers)
    assert plan.reply is None and plan.add == ["me@gmail.test"]
    assert ar_results(plan) == {"spf": "pass", "dkim": "pass", "arc": "none", "dmarc": "pass"}
    names = [n for n, _ in plan.headers]
    assert names[:3] == ["ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"]
    assert "DKIM-Signature" in names
    message = final_message(plan, headers)
    cv, results, reason = dkim.arc_verify(message, dnsfunc=policy.auth.resolver.dkim_txt)
    assert cv == b"pass", (reason, results)
    assert dkim.verify(message, dnsfunc=policy.auth.resolver.dkim_txt)
    aar = dict(plan.headers)["ARC-Authentication-Results"]
    assert aar.startswith("i=1; mx.family.test;") and "dmarc=pass" in aar


def test_forwarding_a_sealed_message_again_extends_the_chain(keys, dns):
    policy = make_policy(keys, dns)
    headers = signed_headers(keys, headers_of("Alice <alice@sender.test>"))
    _tx, _r, plan = run(policy, headers=headers)
    first = final_message(plan, headers)
    # a second hop (another forwarder with the same keys) sees arc=pass and seals i=2
    head, _, body = first.partition(b"\r\n\r\n")
    hop2 = [tuple(f.split(": ", 1)) for f in re.split(r"\r\n(?![ \t])", head.decode())]
    hop2 = [(n, v.replace("\r\n", "\n")) for n, v in hop2 if n not in ("Authentication-Results", "X-Routemilter")]
    _tx, _r, plan2 = run(policy, headers=hop2, body=body)
    assert ar_results(plan2)["arc"] == "pass"
    assert "i=2" in dict(plan2.headers)["ARC-Seal"]
    cv, _results, reason = dkim.arc_verify(final_message(plan2, hop2, body), dnsfunc=policy.auth.resolver.dkim_txt)
    assert cv == b"pass", reason


def test_forged_results_claiming_our_name_are_removed_and_not_sealed(keys, dns):
    policy = make_policy(keys, dns)
    forged = ("Authentication-Results", "mx.family.test; dmarc=pass header.from=bank.test")
    foreign = ("Authentication-Results", "mx.elsewhere.test; spf=pass smtp.mailfrom=x@y.test")
    headers = headers_of("Alice <alice@sender.test>", extra=[foreign, forged])
    _tx, _r, plan = run(policy, headers=headers)
    assert plan.changes == [("Authentication-Results", 2, "")]
    assert "bank.test" not in dict(plan.headers)["ARC-Authentication-Results"]
    cv, _res, reason = dkim.arc_verify(final_message(plan, headers), dnsfunc=policy.auth.resolver.dkim_txt)
    assert cv == b"pass", reason
    # Our DKIM signature covers the message as forwarded, without the removed field
    # (it signed the field once, and our own A-R on top would have taken its place).
    assert "DKIM-Signature" in dict(plan.headers)
    assert dkim.verify(final_message(plan, headers), dnsfunc=policy.auth.resolver.dkim_txt)


def test_dns_outage_tempfails_instead_of_guessing(keys, dns):
    dns.broken.add("_dmarc.bank.test")
    policy = make_policy(keys, dns)
    _tx, _r, plan = run(policy, sender="ceo@bank.test", ip=OTHER, headers=headers_of("CEO <ceo@bank.test>"))
    assert plan.reply == DNS_TEMPFAIL and plan.reply.code == 451 and plan.add == []


def test_dns_outage_with_soft_policy_forwards_with_temperror(keys, dns):
    dns.broken.add("_dmarc.bank.test")
    policy = make_policy(keys, dns, "on_dns_error: accept")
    _tx, _r, plan = run(policy, sender="ceo@bank.test", ip=OTHER, headers=headers_of("CEO <ceo@bank.test>"))
    assert plan.reply is None and plan.add == ["me@gmail.test"]
    assert ar_results(plan)["dmarc"] == "temperror"


def test_dkim_key_timeout_only_matters_when_it_could_change_a_reject(keys, dns):
    dns.broken.add("s1._domainkey.sender.test")
    policy = make_policy(keys, dns)
    headers = signed_headers(keys, headers_of("Alice <alice@sender.test>"))
    _tx, _r, plan = run(policy, headers=headers)  # SPF passes aligned: DMARC passes anyway
    assert plan.reply is None and ar_results(plan)["dkim"] == "temperror" and ar_results(plan)["dmarc"] == "pass"
    _tx, _r, plan = run(policy, ip=OTHER, headers=headers)  # SPF fails: the key decides
    assert plan.reply == DNS_TEMPFAIL


def test_p_none_failure_is_forwarded_with_its_result(keys, dns):
    policy = make_policy(keys, dns)
    _tx, _r, plan = run(policy, sender="x@soft.test", ip=OTHER, headers=headers_of("x@soft.test"))
    assert plan.reply is None and ar_results(plan)["dmarc"] == "fail"


def test_multiple_from_addresses_are_refused(keys, dns):
    policy = make_policy(keys, dns)
    headers = headers_of("Alice <alice@sender.test>", extra=[("From", "ceo@bank.test")])
    _tx, _r, plan = run(policy, headers=headers)
    assert plan.reply == MULTIPLE_FROM


def test_spf_fail_refused_at_rcpt_when_configured(keys, dns):
    policy = make_policy(keys, dns, "domains:\n  family.test: {spf_fail: refuse}")
    _tx, replies, plan = run(policy, ip=OTHER)
    assert replies == [SPF_FAIL] and plan is None
    _tx, replies, plan = run(policy)  # from an allowed address
    assert replies == [None] and plan.reply is None


def test_spf_dns_failure_at_rcpt_tempfails(keys, dns):
    dns.broken.add("sender.test")
    policy = make_policy(keys, dns, "spf_fail: refuse")
    _tx, replies, _plan = run(policy)
    assert replies == [DNS_TEMPFAIL]


def test_spam_verdict_header_refuses_or_discards(keys, dns):
    policy = make_policy(keys, dns, "spam_header: X-Spam-Flag\nrules:\n  shop: {spam_action: discard}")
    spam = headers_of("Alice <alice@sender.test>", extra=[("X-Spam-Flag", "YES")])
    _tx, _r, plan = run(policy, headers=spam)
    assert plan.reply == SPAM
    _tx, _r, plan = run(policy, rcpts=("shop@family.test",), headers=spam)
    assert plan.discard and plan.reply is None
    ham = headers_of("Alice <alice@sender.test>", extra=[("X-Spam-Flag", "NO")])
    _tx, _r, plan = run(policy, headers=ham)
    assert plan.reply is None and not plan.discard


def test_rate_limit_per_destination(keys, dns):
    now = [1000.0]
    limiter = RateLimiter(MemoryStore(clock=lambda: now[0]))
    policy = make_policy(keys, dns, "rate_limit: {messages: 2, seconds: 60}", limiter=limiter)
    for _ in range(2):
        _tx, replies, plan = run(policy)
        assert replies == [None] and plan.add == ["me@gmail.test"]
    _tx, replies, _plan = run(policy)
    assert replies[0].code == 451 and "me@gmail.test" in replies[0].lines[0]
    _tx, replies, _plan = run(policy, rcpts=("shop@family.test",))  # another destination
    assert replies == [None]
    now[0] += 61
    _tx, replies, _plan = run(policy)
    assert replies == [None]


def test_rate_limit_per_sender_and_destination(keys, dns):
    limiter = RateLimiter()
    policy = make_policy(keys, dns, "rate_limit: {messages: 1, seconds: 60, per: sender-destination}",
                         limiter=limiter)
    assert run(policy)[1] == [None]
    assert run(policy)[1][0].code == 451
    assert run(policy, sender="bob@sender.test")[1] == [None]  # the noisy sender does not block others


def test_from_rewrite_for_dmarc_reject_senders(keys, dns):
    policy = make_policy(keys, dns, "from_rewrite: dmarc")
    headers = signed_headers(keys, headers_of("Alice <alice@sender.test>"))
    _tx, _r, plan = run(policy, headers=headers)
    assert plan.changes == [("From", 1, '"Alice via family.test" <no-reply@family.test>')]
    added = dict(plan.headers)
    assert added["Reply-To"] == "alice@sender.test" and added["X-Original-From"] == "Alice <alice@sender.test>"
    message = final_message(plan, headers)
    assert dkim.verify(message, dnsfunc=policy.auth.resolver.dkim_txt)  # our DKIM covers the new From
    cv, _res, reason = dkim.arc_verify(message, dnsfunc=policy.auth.resolver.dkim_txt)
    assert cv == b"pass", reason
    # p=none senders keep their From in dmarc mode; "always" rewrites them too
    _tx, _r, plan = run(policy, sender="x@soft.test", ip=OTHER, headers=headers_of("x@soft.test"))
    assert plan.changes == []
    policy = make_policy(keys, dns, "from_rewrite: always")
    _tx, _r, plan = run(policy, sender="x@soft.test", ip=OTHER, headers=headers_of("x@soft.test"))
    assert plan.changes == [("From", 1, '"x@soft.test via family.test" <no-reply@family.test>')]


def test_no_auth_section_changes_nothing(keys, dns):
    config = loads(CONFIG.replace("auth:\n  authserv_id: mx.family.test\n{auth}\n", "").format(rsa=keys["rsa"]))
    policy = Policy.from_config(config)
    assert policy.auth is None
    tx = Transaction(policy, "<a@sender.test>")
    assert tx.auth is None


@pytest.mark.parametrize("yaml_text, problem", [
    ("on_dns_error: maybe", "auth.on_dns_error must be tempfail or accept"),
    ("dns_server: resolver.example", "auth.dns_server must be an IP address"),
    ("dmarc_reject: bounce", "auth.dmarc_reject must be one of refuse, accept"),
    ("domains:\n  other.test: {spf_fail: refuse}", "auth.domains: other.test is not a managed domain"),
    ("rules:\n  nosuch: {spf_fail: refuse}", "auth.rules: no rule is named 'nosuch'"),
    ("spam_pattern: '(('", "auth.spam_pattern: not a valid RE2 pattern"),
    ("rate_limit: {messages: 0}", "auth.rate_limit.messages must be a whole number"),
    ("colour: blue", "unknown key 'colour' in auth"),
])
def test_auth_config_errors_name_the_line(keys, yaml_text, problem):
    auth = "\n".join("  " + line for line in yaml_text.splitlines())
    with pytest.raises(ConfigError) as info:
        loads(CONFIG.format(rsa=keys["rsa"], auth=auth), "t.yaml")
    assert any(problem in p and re.match(r"t\.yaml:\d+: ", p) for p in info.value.problems), info.value.problems


def test_dns_server_forms(keys):
    for text, expected in (("127.0.0.1:5353", ("127.0.0.1", 5353)), ("127.0.0.1", ("127.0.0.1", 53)),
                           ("'[::1]:5353'", ("::1", 5353)), ("'::1'", ("::1", 53))):
        config = loads(CONFIG.format(rsa=keys["rsa"], auth=f"  dns_server: {text}"))
        assert config.auth.dns_server == expected, text


def test_arc_needs_dkim(keys):
    text = CONFIG.format(rsa=keys["rsa"], auth="")
    text = re.sub(r"dkim:\n  domain: family.test\n  keys:\n    - selector: rsa1\n      key: .*\n", "", text)
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert "auth.arc needs a dkim: section" in str(info.value)
    assert loads(text.replace("auth:\n", "auth:\n  arc: false\n")).auth.arc is False


def test_dns_time_budget_per_message(keys, dns):
    import time as _time
    calls = []

    def slow(name, qtype):
        calls.append(name)
        _time.sleep(0.5)
        return dns(name, qtype)

    policy = make_policy(keys, slow, "dns_timeout: 0.2")  # budget 4 x 0.2 s: 2 lookups of 0.5 s
    headers = signed_headers(keys, headers_of("Alice <alice@sender.test>"))
    _tx, _r, plan = run(policy, ip=OTHER, headers=headers)
    assert plan.reply == DNS_TEMPFAIL  # no time left for the DMARC record: cannot decide
    assert len(calls) == 2, calls


def test_from_rewrite_only_after_a_dmarc_refusal_through_the_bounce_path(keys, dns):
    """from_rewrite: dmarc-bounce: forwarded unchanged; when the destination refuses the
    copy for DMARC, the bounce handler re-sends it to the same destination with the
    From rewritten (once), signed by us so it passes DMARC as the forwarding domain."""
    import email as email_mod
    import email.policy

    from routemilter.bounces import Handler

    text = CONFIG.format(rsa=keys["rsa"], auth="  from_rewrite: dmarc-bounce")
    text = text.replace("dkim:\n", "bounces:\n  socket: unix:/tmp/unused.sock\ndkim:\n", 1)
    config = loads(text)
    policy = dataclasses.replace(Policy.from_config(config), auth=Authenticator.from_config(config, lookup=dns))
    headers = signed_headers(keys, headers_of("Alice <alice@sender.test>"))
    _tx, _r, plan = run(policy, headers=headers)
    assert plan.changes == [] and plan.new_sender.startswith("rmc=")
    sent = final_message(plan, headers)

    def dsn(diagnostic: str, status: str, returned: bytes) -> bytes:
        return (b"From: MAILER-DAEMON@mx.family.test\r\nTo: x@fwd.family.test\r\nMIME-Version: 1.0\r\n"
                b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n"
                b"--B\r\nContent-Type: text/plain\r\n\r\nsorry\r\n\r\n--B\r\n"
                b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.family.test\r\n\r\n"
                b"Final-Recipient: rfc822; me@gmail.test\r\nAction: failed\r\nStatus: " + status.encode() +
                b"\r\nDiagnostic-Code: smtp; " + diagnostic.encode() + b"\r\n\r\n--B\r\n"
                b"Content-Type: message/rfc822\r\n\r\n" + returned + b"\r\n--B--\r\n")

    gmail_says = ("550-5.7.26 Unauthenticated email from sender.test is not accepted due to domain's "
                  "DMARC policy.")
    out = Handler(policy).handle(plan.new_sender, "", dsn(gmail_says, "5.7.26", sent))
    assert [s.kind for s in out.submissions] == ["fallback"] and "dmarc-refused" in " ".join(out.notes)
    resent = out.submissions[0]
    assert resent.rcpt == "me@gmail.test"  # the same destination, not the next in the chain
    msg = email_mod.message_from_bytes(resent.data, policy=email.policy.compat32)
    assert msg["From"] == '"Alice via family.test" <no-reply@family.test>'
    assert msg["Reply-To"] == "alice@sender.test" and msg["X-Original-From"] == "Alice <alice@sender.test>"
    assert msg.get_all("ARC-Seal") is None  # our seal covered the old From: removed
    dnsfunc = policy.auth.resolver.dkim_txt
    signatures = len(msg.get_all("DKIM-Signature"))
    good = [dkim.DKIM(resent.data).verify(idx=i, dnsfunc=dnsfunc) for i in range(signatures)]
    assert good.count(True) == 1  # ours (d=family.test, aligned with the new From); the sender's broke
    # refused for DMARC again: no second rewrite, nothing left in the chain: the sender gets a bounce
    again = Handler(policy).handle(resent.mail_from, "", dsn(gmail_says, "5.7.26", resent.data))
    assert [s.kind for s in again.submissions] == ["final-bounce"]
    # a refusal for another reason is not a reason to rewrite
    other = Handler(policy).handle(plan.new_sender, "", dsn("550 5.1.1 no such user", "5.1.1", sent))
    assert [s.kind for s in other.submissions] == ["final-bounce"]


def test_results_header_stays_parseable_with_hostile_identities(keys, dns):
    policy = make_policy(keys, dns)
    sender = '"odd (local); part"@sender.test'
    _tx, _r, plan = run(policy, sender=sender, headers=headers_of("x (y) <a@b(c).test>"))
    results = ar_results(plan)  # parses
    assert set(results) == {"spf", "dkim", "arc", "dmarc"}
    assert "smtp.mailfrom=sender.test" in dict(plan.headers)["Authentication-Results"]
    assert "ARC-Seal" in dict(plan.headers)


def test_trusted_networks_are_checked_and_sealed_but_not_refused(keys, dns):
    policy = make_policy(keys, dns, "trusted_networks: [198.51.100.0/24]\nspf_fail: refuse\nspam_header: X-Spam-Flag")
    _tx, replies, plan = run(policy, sender="ceo@bank.test", ip=OTHER, headers=headers_of("CEO <ceo@bank.test>"))
    assert replies == [None] and plan.reply is None and plan.add == ["me@gmail.test"]
    assert ar_results(plan)["dmarc"] == "fail" and "ARC-Seal" in dict(plan.headers)
    assert "trusted-client" in plan.notes
    spam = headers_of("CEO <ceo@bank.test>", extra=[("X-Spam-Flag", "YES")])
    _tx, _r, plan = run(policy, sender="ceo@bank.test", ip=OTHER, headers=spam)
    assert plan.reply == SPAM  # the local scanner's verdict holds for every client
    with pytest.raises(ConfigError, match="is not an IP network"):
        loads(CONFIG.format(rsa=keys["rsa"], auth="  trusted_networks: [backup-mx]"))


@pytest.mark.parametrize("body", [b"crlf only\r\nsecond line\r\n", b"bare\nline feeds\r\nmixed\n"])
def test_fast_and_full_parse_give_the_same_verdict(keys, dns, body):
    policy = make_policy(keys, dns)
    hdrs = t_headers = headers_of("Alice <alice@sender.test>")
    raw = "".join(f"{n}: {v}\r\n" for n, v in t_headers).encode() + b"\r\n" + body
    name, _, value = dkim.sign(raw, b"s1", b"sender.test", keys["sender_pem"]).decode().partition(":")
    hdrs = [(name, value.strip().replace("\r\n", "\n"))] + t_headers
    _tx, _r, plan = run(policy, headers=hdrs, body=body)
    assert ar_results(plan)["dkim"] == "pass"
    cv, _res, reason = dkim.arc_verify(final_message(plan, hdrs, body), dnsfunc=policy.auth.resolver.dkim_txt)
    assert cv == b"pass", reason


def test_trusted_arc_sealer_overrides_a_dmarc_reject(keys, dns):
    """A mailing list relays a p=reject sender's message (SPF and DKIM no longer align);
    its valid ARC seal vouches for the original result. Trusted sealer: forwarded."""
    dns.txt("arc._domainkey.lists.test", keys["sender_txt"])  # the list seals with that key
    hdrs = headers_of("CEO <ceo@bank.test>")
    raw = ("Authentication-Results: lists.test; dmarc=pass header.from=bank.test\r\n"
           + "".join(f"{n}: {v}\r\n" for n, v in hdrs)).encode() + b"\r\n" + BODY
    arc_set = dkim.arc_sign(raw, b"arc", b"lists.test", keys["sender_pem"], b"lists.test")
    sealed = [tuple(line.decode().rstrip("\r\n").split(": ", 1)) for line in arc_set]
    sealed = [(n, v.replace("\r\n", "\n")) for n, v in sealed]
    listed = sealed + [("Authentication-Results", "lists.test; dmarc=pass header.from=bank.test")] + hdrs

    policy = make_policy(keys, dns)
    _tx, _r, plan = run(policy, sender="bounces@lists.test", ip=OTHER, headers=listed)
    assert plan.reply == DMARC_REJECT  # not trusted: refused like any p=reject failure

    policy = make_policy(keys, dns, "arc_trusted_sealers: [lists.test]")
    _tx, _r, plan = run(policy, sender="bounces@lists.test", ip=OTHER, headers=listed)
    assert plan.reply is None and plan.add == ["me@gmail.test"]
    assert "dmarc-reject-overridden arc-sealer=lists.test" in plan.notes
    assert ar_results(plan)["arc"] == "pass" and ar_results(plan)["dmarc"] == "fail"
    assert "i=2" in dict(plan.headers)["ARC-Seal"] and "cv=pass" in dict(plan.headers)["ARC-Seal"]
    cv, _res, reason = dkim.arc_verify(final_message(plan, listed), dnsfunc=policy.auth.resolver.dkim_txt)
    assert cv == b"pass", reason


def test_override_errors_point_at_the_override(keys):
    text = CONFIG.format(rsa=keys["rsa"],
                         auth="  rules:\n    nosuch: {spf_fail: refuse}\n  domains:\n    other.test: {}")
    with pytest.raises(ConfigError) as info:
        loads(text, "t.yaml")
    lines = text.splitlines()
    rule_line = next(i for i, line in enumerate(lines, 1) if "nosuch:" in line)
    domain_line = next(i for i, line in enumerate(lines, 1) if "other.test:" in line)
    assert f"t.yaml:{rule_line}: auth.rules: no rule is named 'nosuch'" in info.value.problems
    assert f"t.yaml:{domain_line}: auth.domains: other.test is not a managed domain" in info.value.problems


def test_check_refuses_arc_without_an_rsa_key(tmp_path, dkim_keys):
    import subprocess
    import sys

    key = dkim_keys.ed25519
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"dkim:\n  domain: family.test\n  keys:\n    - selector: e1\n      key: {key}\n"
                   "auth: {}\ndomains:\n  family.test: {}\nrules:\n  - name: me\n    addresses: [me@family.test]\n"
                   "    to: [me@gmail.test]\n")
    run_check = lambda: subprocess.run([sys.executable, "-m", "routemilter", "-c", str(cfg), "check"],  # noqa: E731
                                       capture_output=True, text=True, timeout=60)
    result = run_check()
    assert result.returncode == 1 and "auth.arc: ARC sealing needs an RSA key" in result.stderr
    cfg.write_text(cfg.read_text().replace("auth: {}", "auth: {arc: false}"))
    assert run_check().returncode == 0
