"""Address-level fallback through bounces: tokens, DSN parsing, the handler's decisions."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re
import smtplib
import socket

import dkim
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routemilter.bounces import FAILED_HEADER, Handler
from routemilter.bounceserver import BounceServer
from routemilter.config import SRSSettings, loads
from routemilter.dsn import parse_dsn
from routemilter.policy import Policy, PolicyHolder
from routemilter.reinject import Submission
from routemilter.tokens import TokenCodec, TokenError, rule_id
from routemilter.transaction import Transaction

SECRET = b"bounce-secret-0123456789"
OLD = b"older-secret-9876543210"
DAY = 86400
NOW = 1_700_000_000.0
SRS = SRSSettings("fwd.example", (SECRET,))


class Clock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


def codec(secrets=(SECRET,), clock=None, max_age=21):
    return TokenCodec(SRSSettings("fwd.example", tuple(secrets)), max_age, clock or Clock())


# ------------------------------------------------------------------ tokens


def test_token_round_trip():
    c = codec()
    address = c.mint("Alice.B@Sender.Example", ["me", "parents"])
    assert address.endswith("@fwd.example") and address.startswith("rmc=")
    token = c.check(address)
    assert token.sender == "Alice.B@sender.example"
    assert set(token.rules) == {rule_id("me"), rule_id("parents")}
    assert token.dest is None and token.pos == 0
    token = c.check(c.mint("a@b.example", ["me"], dest=2, pos=1))
    assert (token.rules, token.dest, token.pos) == ((rule_id("me"),), 2, 1)


def test_token_is_case_insensitive_and_secrets_rotate():
    old = codec((OLD,))
    new = codec((SECRET, OLD))
    address = old.mint("a@b.example", ["me"])
    assert new.check(address.upper().replace("@FWD.EXAMPLE", "@fwd.example")).sender.lower() == "a@b.example"
    with pytest.raises(TokenError):
        codec((SECRET,)).check(address)


@pytest.mark.parametrize("change", [
    lambda a: a.replace("rmc=", "rmc=x", 1),  # hash altered
    lambda a: a.replace("=d0p1=", "=d0p2="),  # position tampered
    lambda a: a.replace("=b.example=", "=evil.example="),  # sender domain tampered
    lambda a: a.replace("=alice@", "=mallory@"),  # sender local part tampered
    lambda a: a.replace("@fwd.example", "@other.example"),  # not our domain
    lambda a: a.split("=", 1)[0] + "=",  # truncated
    lambda a: a.replace("rmc=", "rmc=\n", 1),
])
def test_forged_or_tampered_tokens_are_refused(change):
    c = codec()
    address = c.mint("alice@b.example", ["me"], dest=0, pos=1)
    with pytest.raises(TokenError):
        c.check(change(address))


def test_expired_tokens_are_refused():
    clock = Clock()
    c = codec(clock=clock, max_age=21)
    address = c.mint("a@b.example", ["me"])
    clock.now += 21 * DAY
    assert c.check(address)
    clock.now += DAY
    with pytest.raises(TokenError, match="expired"):
        c.check(address)


@given(st.text(max_size=120))
@settings(max_examples=300, deadline=None)
def test_random_addresses_are_never_accepted(local):
    c = codec()
    for address in (f"{local}@fwd.example", f"rmc={local}@fwd.example", f"rmb={local}@fwd.example"):
        with pytest.raises(TokenError):
            c.check(address)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=10, max_size=10))
@settings(max_examples=300, deadline=None)
def test_guessed_hashes_are_refused(guess):
    c = codec()
    genuine = c.mint("a@b.example", ["me"])
    forged = "rmc=" + guess + genuine[len("rmc=") + 10:]
    if forged != genuine:
        with pytest.raises(TokenError):
            c.check(forged)


# ------------------------------------------------------------------ DSNs


def postfix_dsn(failures, returned: bytes | None, headers_only=False, boundary="B1") -> bytes:
    """A DSN laid out as Postfix's bounce daemon writes it."""
    rcpt_blocks = "".join(
        f"\r\nFinal-Recipient: rfc822; {addr}\r\nOriginal-Recipient: rfc822;{addr}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\nRemote-MTA: dns; mx.example\r\n"
        f"Diagnostic-Code: smtp; {diag}\r\n" for addr, action, status, diag in failures)
    out = (f"From: MAILER-DAEMON@mta.example (Mail Delivery System)\r\nSubject: Undelivered Mail\r\n"
           f"To: whoever@fwd.example\r\nMIME-Version: 1.0\r\n"
           f"Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
           f"This is a MIME-encapsulated message.\r\n\r\n--{boundary}\r\n"
           f"Content-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
           f"I'm sorry to have to inform you...\r\n\r\n--{boundary}\r\n"
           f"Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
           f"Reporting-MTA: dns; mta.example\r\nX-Postfix-Queue-ID: ABC\r\n"
           f"Arrival-Date: Mon, 23 Nov 2026 10:00:00 +0000 (UTC)\r\n"
           f"{rcpt_blocks}\r\n--{boundary}\r\n").encode()
    if returned is not None:
        kind = "text/rfc822-headers" if headers_only else "message/rfc822"
        part = returned.split(b"\r\n\r\n", 1)[0] + b"\r\n" if headers_only else returned
        out += (f"Content-Description: Undelivered Message\r\nContent-Type: {kind}\r\n\r\n").encode()
        out += part + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out


def test_parse_postfix_dsn():
    original = b"From: a@b.example\r\nSubject: hi\r\n\r\nbody line\r\n"
    report = parse_dsn(postfix_dsn([("me@gmail.test", "failed", "5.1.1", "550 5.1.1 <me@gmail.test> User unknown"),
                                    ("x@y.test", "delayed", "4.4.1", "connect timeout")], original))
    assert report.is_dsn and report.reporting_mta == "mta.example"
    assert [(r.final_recipient, r.action, r.status) for r in report.recipients] == [
        ("me@gmail.test", "failed", "5.1.1"), ("x@y.test", "delayed", "4.4.1")]
    assert report.failed[0].diagnostic == "550 5.1.1 <me@gmail.test> User unknown"
    assert report.returned == original


def test_parse_lf_only_and_headers_only():
    original = b"From: a@b.example\r\nSubject: hi\r\n\r\nbody\r\n"
    data = postfix_dsn([("me@gmail.test", "failed", "5.1.1", "550 no")], original, headers_only=True)
    report = parse_dsn(data.replace(b"\r\n", b"\n"))
    assert report.is_dsn and report.returned is None
    assert report.returned_headers.startswith(b"From: a@b.example\r\nSubject: hi")


@given(st.binary(max_size=3000))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_dsn_parser_never_crashes_on_junk(data):
    report = parse_dsn(data)
    assert isinstance(report.recipients, list)


_dsn_bits = st.sampled_from([
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"B1\"\r\n",
    b"Content-Type: multipart/mixed; boundary=B1\r\n", b"Content-Type: message/delivery-status\r\n",
    b"Content-Type: message/rfc822\r\n", b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Type: text/rfc822-headers\r\n", b"--B1\r\n", b"--B1--\r\n", b"\r\n", b"\n",
    b"Final-Recipient: rfc822; a@b\r\n", b"Action: failed\r\n", b"Status: 5.1.1\r\n",
    b"Final-Recipient: \r\n", b"Diagnostic-Code: smtp; 550\r\n", b" continued\r\n", b"\xff\xfe\x00",
    b"Content-Type: multipart/report; boundary=\"\"\r\n", b"=?utf-8?b?invalid?=\r\n",
])


@given(st.lists(_dsn_bits, max_size=40))
@settings(max_examples=500, deadline=None)
def test_dsn_parser_never_crashes_on_dsn_shaped_junk(bits):
    parse_dsn(b"".join(bits))


# ------------------------------------------------------------------ handler

CONFIG = """
server_name: mx.family.test
srs:
  domain: fwd.example
  secrets: ["{secret}"]
bounces:
  socket: unix:/tmp/unused.sock
dkim:
  domain: family.test
  keys:
    - selector: rsa
      key: {rsa}
    - selector: ed
      key: {ed}
domains:
  family.test: {{}}
rules:
  - name: me
    addresses: [me@family.test]
    to:
      - address: me@gmail.test
        fallback: [me@outlook.test, me@final.test]
  - name: parents
    addresses: [parents@family.test]
    to:
      - address: mum@gmail.test
        fallback: [mum@outlook.test]
      - dad@outlook.test
"""


RECORDS: dict[str, str] = {}


@pytest.fixture(scope="module")
def policy(dkim_keys):
    # the DNS records as published: verify like a receiver would
    RECORDS.update({"rsa": dkim_keys.rsa_txt, "ed": dkim_keys.ed25519_txt})
    return Policy.from_config(loads(CONFIG.format(secret=SECRET.decode(), rsa=dkim_keys.rsa, ed=dkim_keys.ed25519)))


def dnsfunc_for(policy):
    def dnsfunc(name, timeout=5):
        selector = name.decode().split("._domainkey.")[0]
        txt = RECORDS.get(selector)
        return txt.encode() if txt else None
    return dnsfunc


def verified(policy, data: bytes) -> list[str]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    good = []
    for i in range(len(msg.get_all("DKIM-Signature") or [])):
        d = dkim.DKIM(data)
        if d.verify(idx=i, dnsfunc=dnsfunc_for(policy)):
            good.append(d.selector.decode())
    return good


def forward(policy, rcpt: str, sender="alice@sender.example") -> tuple[str, bytes]:
    """What the milter would send out: (envelope sender, signed message)."""
    tx = Transaction(policy, f"<{sender}>")
    assert tx.add_recipient(f"<{rcpt}>") is None
    headers = [("From", f"Alice <{sender}>"), ("To", rcpt), ("Subject", "fallback test"),
               ("Message-ID", "<m1@sender.example>")]
    for name, value in headers:
        tx.add_header(name, value.encode())
    body = b"Hello,\r\nthis must arrive exactly once.\r\n"
    tx.add_body(body)
    plan = tx.plan()
    assert plan.new_sender and plan.new_sender.startswith("rmc=")
    assert plan.sender_params == "RET=FULL"  # the bounce must bring the whole message back
    lines = [f"{n}: {v}".replace("\n", "\r\n") for n, v in reversed(list(reversed(plan.headers)))]
    head = "\r\n".join(lines + [f"{n}: {v}" for n, v in headers])
    return plan.new_sender, head.encode() + b"\r\n\r\n" + body


def fail(address, text=None):
    return (address, "failed", "5.1.1", text or f"550 5.1.1 <{address}> User unknown")


def test_milter_sets_a_token_and_checks_it_at_rcpt(policy):
    token, message = forward(policy, "me@family.test")
    assert policy.tokens.check(token).sender == "alice@sender.example"
    assert sorted(verified(policy, message)) == ["ed", "rsa"]
    tx = Transaction(policy, "<>")
    assert tx.add_recipient(f"<{token}>") is None  # genuine: stays for the bounce handler
    forged = token.replace("rmc=", "rmc=a", 1)[:-len("@fwd.example")] + "@fwd.example"
    assert tx.add_recipient(f"<{forged}>").code == 550
    plan = tx.plan()
    assert not plan.add and not plan.delete and plan.new_sender is None


def test_primary_fails_backup_gets_the_original_once(policy):
    token, message = forward(policy, "me@family.test")
    out = Handler(policy).handle(token, "", postfix_dsn([fail("me@gmail.test")], message))
    assert [s.kind for s in out.submissions] == ["fallback"]
    sub = out.submissions[0]
    assert sub.rcpt == "me@outlook.test"
    t = policy.tokens.check(sub.mail_from)
    assert (t.dest, t.pos, t.sender) == (0, 1, "alice@sender.example")
    assert sorted(verified(policy, sub.data)) == ["ed", "rsa"]
    msg = email.message_from_bytes(sub.data, policy=email.policy.compat32)
    assert msg["Subject"] == "fallback test" and len(msg.get_all("DKIM-Signature")) == 2
    assert "User unknown" in msg[FAILED_HEADER]
    assert msg.get_payload() == "Hello,\r\nthis must arrive exactly once.\r\n"


def test_whole_chain_then_one_bounce_with_every_reason(policy):
    token, message = forward(policy, "me@family.test")
    h = Handler(policy)
    first = h.handle(token, "", postfix_dsn([fail("me@gmail.test", "550 gmail says no")], message)).submissions[0]
    second = h.handle(first.mail_from, "", postfix_dsn([fail("me@outlook.test", "550 outlook says no")],
                                                       first.data)).submissions
    assert [(s.kind, s.rcpt) for s in second] == [("fallback", "me@final.test")]
    assert policy.tokens.check(second[0].mail_from).pos == 2
    last = h.handle(second[0].mail_from, "", postfix_dsn([fail("me@final.test", "552 final is full")],
                                                         second[0].data)).submissions
    assert [(s.kind, s.rcpt, s.mail_from) for s in last] == [("final-bounce", "alice@sender.example", "")]
    bounce = last[0].data.decode()
    for reason in ("gmail says no", "outlook says no", "final is full"):
        assert reason in bounce
    report = parse_dsn(last[0].data)
    assert report.is_dsn and [r.final_recipient for r in report.failed] == [
        "me@gmail.test", "me@outlook.test", "me@final.test"]
    assert [r.status for r in report.failed] == ["5.1.1", "5.1.1", "5.1.1"]  # carried along the chain


def test_fan_out_only_the_failed_destination_walks_its_chain(policy):
    token, message = forward(policy, "parents@family.test")
    out = Handler(policy).handle(token, "", postfix_dsn([fail("mum@gmail.test")], message))
    assert [(s.kind, s.rcpt) for s in out.submissions] == [("fallback", "mum@outlook.test")]
    # dad@outlook.test has no fallback: its failure alone is the final bounce
    out = Handler(policy).handle(token, "", postfix_dsn([fail("dad@outlook.test")], message))
    assert [(s.kind, s.rcpt) for s in out.submissions] == [("final-bounce", "alice@sender.example")]
    both = Handler(policy).handle(token, "", postfix_dsn([fail("mum@gmail.test"), fail("dad@outlook.test")],
                                                         message))
    assert sorted((s.kind, s.rcpt) for s in both.submissions) == [
        ("fallback", "mum@outlook.test"), ("final-bounce", "alice@sender.example")]


def test_headers_only_or_changed_content_is_not_forwarded(policy):
    token, message = forward(policy, "me@family.test")
    out = Handler(policy).handle(token, "", postfix_dsn([fail("me@gmail.test")], message, headers_only=True))
    assert [s.kind for s in out.submissions] == ["final-bounce"]
    assert b"only the headers were returned" in out.submissions[0].data
    tampered = message.replace(b"exactly once", b"click this link")
    out = Handler(policy).handle(token, "", postfix_dsn([fail("me@gmail.test")], tampered))
    assert [s.kind for s in out.submissions] == ["final-bounce"]
    assert b"DKIM" in out.submissions[0].data and b"click this link" not in out.submissions[0].data


def test_non_dsn_is_reversed_and_delay_reports_are_swallowed(policy):
    token, message = forward(policy, "me@family.test")
    reply = b"From: me@gmail.test\r\nSubject: Re: hi\r\n\r\nthanks\r\n"
    out = Handler(policy).handle(token, "me@gmail.test", reply)
    assert [(s.kind, s.rcpt, s.mail_from) for s in out.submissions] == [
        ("reverse", "alice@sender.example", "me@gmail.test")]
    delayed = postfix_dsn([("me@gmail.test", "delayed", "4.4.1", "timeout")], message)
    assert Handler(policy).handle(token, "", delayed).submissions == []


def test_forged_token_in_handler(policy):
    with pytest.raises(TokenError):
        Handler(policy).handle("rmb=aaaaaaaaaa=aa=x=p0=b.example=a@fwd.example", "", b"x")


# --------------------------------------------------------- the LMTP server


def lmtp(path, rcpts, data, mail_from=""):
    s = smtplib.LMTP(path, timeout=10)
    try:
        s.ehlo("test")  # smtplib.LMTP sends LHLO
        s.mail(mail_from)
        codes = {r: s.rcpt(r)[0] for r in rcpts}
        ok = [r for r, c in codes.items() if c == 250]
        if not ok:
            return codes, None
        s.putcmd("data")
        code, _ = s.getreply()
        assert code == 354
        q = smtplib.quotedata(data.decode("latin-1")).encode("latin-1")
        s.send(q + b"\r\n.\r\n")
        replies = [s.getreply() for _ in ok]
        return codes, replies
    finally:
        s.close()


def test_lmtp_server_refuses_forgeries_and_tempfails_when_reinjection_fails(policy, tmp_path):
    sock = str(tmp_path / "b.sock")
    sent: list[Submission] = []
    broken = {"on": True}

    def submitter(hostport, subs):
        if broken["on"]:
            raise ConnectionRefusedError("no re-injection listener")
        sent.extend(subs)

    settings_ = dataclasses.replace(policy.config.bounces, socket=f"unix:{sock}")
    server = BounceServer(PolicyHolder(policy), settings_, submitter=submitter).start()
    try:
        token, message = forward(policy, "me@family.test")
        dsn = postfix_dsn([fail("me@gmail.test")], message)
        codes, replies = lmtp(sock, ["rmb=zzzzzzzzzz=aa=x=p0=b.example=a@fwd.example"], dsn)
        assert list(codes.values()) == [550] and replies is None
        codes, replies = lmtp(sock, [token], dsn)
        assert replies[0][0] == 451 and sent == []  # the MTA keeps the bounce
        broken["on"] = False
        codes, replies = lmtp(sock, [token], dsn)
        assert replies[0][0] == 250
        assert [(s.kind, s.rcpt) for s in sent] == [("fallback", "me@outlook.test")]
    finally:
        server.stop()


def test_final_bounce_is_signed_and_a_managed_sender_is_routed(policy):
    token, message = forward(policy, "parents@family.test", sender="me@family.test")
    out = Handler(policy).handle(token, "", postfix_dsn([fail("dad@outlook.test")], message))
    # me@family.test is ours: its bounce goes where me@ is routed (the re-injection has no milter)
    assert [(s.kind, s.rcpt, s.mail_from) for s in out.submissions] == [("final-bounce", "me@gmail.test", "")]
    assert sorted(verified(policy, out.submissions[0].data)) == ["ed", "rsa"]


def test_original_recipient_names_the_destination_when_final_differs(policy):
    token, message = forward(policy, "me@family.test")
    dsn = postfix_dsn([fail("someone-else@elsewhere.test")], message).replace(
        b"Original-Recipient: rfc822;someone-else@elsewhere.test", b"Original-Recipient: rfc822;me@gmail.test")
    out = Handler(policy).handle(token, "", dsn)
    assert [(s.kind, s.rcpt) for s in out.submissions] == [("fallback", "me@outlook.test")]


def test_cli_token(policy, tmp_path, capsys):
    from routemilter.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(secret=SECRET.decode(), rsa=tmp_path / "rsa.key", ed=tmp_path / "ed.key"))
    token, _ = forward(policy, "me@family.test")
    assert main(["-c", str(cfg), "token", f"<{token}>"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "alice@sender.example" in out and "rules: me" in out
    assert f"b= digest {policy.tokens.check(token).binding}" in out
    assert main(["-c", str(cfg), "token", token.replace("rmc=", "rmc=q", 1)]) == 1
    assert "refused" in capsys.readouterr().out


def test_token_embeds_awkward_senders_and_keeps_our_own_addresses():
    c = codec()
    for sender in ("a=b@x.example", "SRS0=abcd=AB=orig.example=bob@other-forwarder.example", "o'neil+tag@x.example"):
        assert c.check(c.mint(sender, ["me"])).sender.lower() == sender.lower()
    for sender in ("x@fwd.example", c.mint("a@b.example", ["me"]), 'a"b@x.example', "a b@x.example"):
        with pytest.raises(TokenError):
            c.mint(sender, ["me"])


def test_sender_already_in_the_srs_domain_is_kept(policy):
    token, _ = forward(policy, "me@family.test")
    tx = Transaction(policy, f"<{token}>")
    assert tx.add_recipient("<me@family.test>") is None
    tx.add_header("From", b"x@y.example")
    plan = tx.plan()
    assert plan.new_sender == token and plan.sender_params is None


def test_lmtp_server_on_inet(policy):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    sent: list[Submission] = []
    settings_ = dataclasses.replace(policy.config.bounces, socket=f"inet:{number}@127.0.0.1")
    server = BounceServer(PolicyHolder(policy), settings_, submitter=lambda hp, subs: sent.extend(subs)).start()
    try:
        token, message = forward(policy, "me@family.test")
        s = smtplib.LMTP("127.0.0.1", number, timeout=10)
        try:
            s.ehlo("test")
            s.mail("")
            assert s.rcpt(token)[0] == 250
            code, _ = s.data(postfix_dsn([fail("me@gmail.test")], message))
            assert code == 250
        finally:
            s.close()
        assert [(x.kind, x.rcpt) for x in sent] == [("fallback", "me@outlook.test")]
    finally:
        server.stop()


# ------------------------------------------------------ config and postfix-config

MINIMAL = """
{srs}
bounces:
  {bounces}
domains:
  family.test: {{}}
rules:
  - name: me
    addresses: [me@family.test]
    to:
      - address: me@gmail.test
        fallback: [me@outlook.test]
"""


@pytest.mark.parametrize("srs, bounces, problem", [
    ("", "max_age_days: 3", "bounces needs srs"),
    ("srs: {domain: fwd.example, secrets: [0123456789abcdef0]}", "socket: /relative", "bounces.socket must be"),
    ("srs: {domain: fwd.example, secrets: [0123456789abcdef0]}", "reinject: nowhere", "bounces.reinject must be"),
    ("srs: {domain: fwd.example, secrets: [0123456789abcdef0]}", "reinject: unix:/var/spool/postfix/private/x",
     "bounces.reinject must be"),  # private/ is Postfix's alone: the daemon could not connect
    ("srs: {domain: fwd.example, secrets: [0123456789abcdef0]}", "max_age_days: 0", "max_age_days must be"),
    ("srs: {domain: fwd.example, secrets: [0123456789abcdef0]}", "colour: blue", "unknown key 'colour'"),
])
def test_bounces_config_is_checked(srs, bounces, problem):
    from routemilter.config import ConfigError

    with pytest.raises(ConfigError) as err:
        loads(MINIMAL.format(srs=srs, bounces=bounces))
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_postfix_config_for_bounces():
    from routemilter.mtaconfig import postfix_config

    config = loads(MINIMAL.format(srs="srs: {domain: fwd.example, secrets: [0123456789abcdef0]}",
                                  bounces="reinject: 127.0.0.1:10099"))
    assert config.bounces.max_age_days == 21 and config.bounces.socket.endswith("/bounce.sock")
    out = re.sub(r"(?m)^(\S+) +", r"\1 ", postfix_config(config))  # transport map columns: one space
    for line in ("bounce_size_limit = 10240000", "rm_bounce_destination_recipient_limit = 1",
                 "rm_bounce unix - - n - - lmtp", "127.0.0.1:10099 inet n - n - - smtpd",
                 "receive_override_options=no_milters", "internal_mail_filter_classes = bounce",
                 "fwd.example rm_bounce:unix:/var/spool/postfix/routemilter/bounce.sock"):
        assert line in out, line
    assert "rm_bounce" not in postfix_config(loads(MINIMAL.replace("bounces:\n  {bounces}\n", "").format(
        srs="srs: {domain: fwd.example, secrets: [0123456789abcdef0]}")))


def test_lmtp_null_sender_is_empty_and_replies_go_back_to_the_sender(policy, tmp_path):
    sock = str(tmp_path / "n.sock")
    sent: list[Submission] = []
    settings_ = dataclasses.replace(policy.config.bounces, socket=f"unix:{sock}")
    server = BounceServer(PolicyHolder(policy), settings_, submitter=lambda hp, subs: sent.extend(subs)).start()
    try:
        token, _ = forward(policy, "me@family.test")
        _codes, replies = lmtp(sock, [token], b"From: me@gmail.test\r\nSubject: out of office\r\n\r\naway\r\n")
        assert replies[0][0] == 250
        assert [(s.kind, s.mail_from, s.rcpt) for s in sent] == [("reverse", "", "alice@sender.example")]
    finally:
        server.stop()


# ------------------------------------------ issue 12: tokens bound to their message


def test_token_carries_the_binding_of_our_signature_and_legacy_tokens_still_check():
    from routemilter.tokens import LEGACY_PREFIX, binding_of

    c = codec()
    bound = c.mint("a@b.example", ["me"], binding=binding_of("v=1; a=rsa-sha256; b=AbC\n\tdEf;"))
    assert c.check(bound).binding == binding_of("b=AbCdEf") and len(c.check(bound).binding) == 8
    assert c.check(c.mint("a@b.example", ["me"])).binding == "x"  # an unsigned forward
    with pytest.raises(TokenError):  # the binding is covered by the HMAC
        c.check(bound.replace("=" + c.check(bound).binding + "=", "=" + binding_of("b=other") + "=", 1))
    # A token minted by the previous release (no binding field) keeps working until it expires.
    import base64
    import hashlib
    import hmac

    from routemilter.srs import day_stamp

    body = f"{day_stamp(NOW).lower()}={rule_id('me')}=p0=b.example=a"
    mac = hmac.new(SECRET, body.encode(), hashlib.sha256).digest()
    legacy = f"{LEGACY_PREFIX}{base64.b32encode(mac).decode().lower()[:10]}={body}@fwd.example"
    c2 = codec(clock=Clock(NOW))
    token = c2.check(legacy)
    assert token.binding is None and token.sender == "a@b.example"
    # ...but cannot be re-read as a current token (the prefix is hashed in the new format)
    with pytest.raises(TokenError):
        c2.check("rmc=" + legacy[len(LEGACY_PREFIX):])


def test_token_of_one_forward_with_our_signed_copy_of_another_is_not_forwarded(policy):
    """Issue 12.3: token A + our genuinely signed copy of B: B is not sent to A's fallback."""
    token_a, _ = forward(policy, "me@family.test")
    _, message_b = forward(policy, "parents@family.test", sender="mallory@evil.example")
    out = Handler(policy).handle(token_a, "", postfix_dsn([fail("me@gmail.test")], message_b))
    assert [s.kind for s in out.submissions] == ["final-bounce"]
    assert b"of another message" in out.submissions[0].data
    assert b"mallory" not in out.submissions[0].data  # B's headers are not attached either


def test_only_what_our_signature_covered_is_forwarded(policy):
    """Fields added after we signed (by the destination, or by whoever returns the copy) are
    dropped; one a replayer would use to change the meaning (Reply-To) breaks the signature."""
    token, message = forward(policy, "me@family.test")
    added = (b"Received: from evil\r\nX-Evil: click here\r\nList-Unsubscribe: <http://evil>\r\n" + message)
    out = Handler(policy).handle(token, "", postfix_dsn([fail("me@gmail.test")], added))
    (sub,) = out.submissions
    assert sub.kind == "fallback" and sorted(verified(policy, sub.data)) == ["ed", "rsa"]
    assert b"X-Evil" not in sub.data and b"evil" not in sub.data.lower()
    assert b"Subject: fallback test" in sub.data and b"Message-ID: <m1@sender.example>" in sub.data
    assert policy.tokens.check(sub.mail_from).binding not in (None, "x")
    head, _, body = message.partition(b"\r\n\r\n")
    for extra in (b"Reply-To: thief@evil.example", b"Subject: urgent: pay now"):
        for tampered in (extra + b"\r\n" + message, head + b"\r\n" + extra + b"\r\n\r\n" + body):
            out = Handler(policy).handle(token, "", postfix_dsn([fail("me@gmail.test")], tampered))
            assert [s.kind for s in out.submissions] == ["final-bounce"], extra
            assert b"thief" not in out.submissions[0].data and b"pay now" not in out.submissions[0].data


def test_the_fallback_copy_is_bound_to_its_own_new_signature(policy):
    token, message = forward(policy, "me@family.test")
    first = Handler(policy).handle(token, "", postfix_dsn([fail("me@gmail.test")], message)).submissions[0]
    # the first copy again, under the second copy's token: refused
    _second_token, _ = forward(policy, "me@family.test")
    out = Handler(policy).handle(first.mail_from, "", postfix_dsn([fail("me@outlook.test")], message))
    assert [s.kind for s in out.submissions] == ["final-bounce"]
    out = Handler(policy).handle(first.mail_from, "", postfix_dsn([fail("me@outlook.test")], first.data))
    assert [(s.kind, s.rcpt) for s in out.submissions] == [("fallback", "me@final.test")]


# ------------------------------------------ issue 12: one action per token and destination


def test_a_replayed_bounce_does_nothing_the_second_time(policy):
    from routemilter.state import MemoryStore

    store = MemoryStore()
    token, message = forward(policy, "parents@family.test")
    dsn = postfix_dsn([fail("mum@gmail.test")], message)
    first = Handler(policy, store=store).handle(token, "", dsn)
    assert [(s.kind, s.rcpt) for s in first.submissions] == [("fallback", "mum@outlook.test")]
    again = Handler(policy, store=store).handle(token, "", dsn)
    assert again.submissions == [] and "mum@gmail.test:replay-ignored" in again.notes
    # the other destination of the same message still gets its one action
    other = Handler(policy, store=store).handle(token, "", postfix_dsn([fail("dad@outlook.test")], message))
    assert [(s.kind, s.rcpt) for s in other.submissions] == [("final-bounce", "alice@sender.example")]
    assert Handler(policy, store=store).handle(token, "", postfix_dsn([fail("dad@outlook.test")], message)
                                               ).submissions == []
    reply = b"From: x@gmail.test\r\nSubject: away\r\n\r\nI am on holiday\r\n"
    assert len(Handler(policy, store=store).handle(token, "x@gmail.test", reply).submissions) == 1
    assert Handler(policy, store=store).handle(token, "x@gmail.test", reply).submissions == []


def test_lmtp_replay_answers_250_does_nothing_and_a_failed_action_is_retried(policy, tmp_path):
    sock = str(tmp_path / "r.sock")
    sent: list[Submission] = []
    broken = {"on": True}

    def submitter(hostport, subs):
        if broken["on"]:
            raise ConnectionRefusedError("no re-injection listener")
        sent.extend(subs)

    settings_ = dataclasses.replace(policy.config.bounces, socket=f"unix:{sock}")
    server = BounceServer(PolicyHolder(policy), settings_, submitter=submitter).start()
    try:
        token, message = forward(policy, "me@family.test")
        dsn = postfix_dsn([fail("me@gmail.test")], message)
        assert lmtp(sock, [token], dsn)[1][0][0] == 451  # the claim is released: the retry acts
        broken["on"] = False
        assert lmtp(sock, [token], dsn)[1][0][0] == 250
        assert lmtp(sock, [token], dsn)[1][0][0] == 250  # the replay: accepted, nothing sent
        assert [(s.kind, s.rcpt) for s in sent] == [("fallback", "me@outlook.test")]
    finally:
        server.stop()


# ------------------------------------------ issue 12: our signature only on our text


def test_final_bounce_human_text_is_ours_remote_replies_only_in_the_report(policy):
    token, message = forward(policy, "parents@family.test")
    evil = "550 5.1.1 URGENT: your account is suspended, log in at http://evil.example/login"
    out = Handler(policy).handle(token, "", postfix_dsn([fail("dad@outlook.test", evil)], message))
    data = out.submissions[0].data
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    human, status, headers = msg.get_payload()
    assert "evil.example" not in human.get_payload() and "status 5.1.1" in human.get_payload()
    assert "evil.example" in status.as_string() and "Diagnostic-Code: smtp; " + evil in status.as_string()
    assert "Subject: fallback test" in headers.as_string()  # verified headers, covered by our signature
    # headers of a copy we cannot verify are not attached
    out = Handler(policy).handle(token, "", postfix_dsn([fail("dad@outlook.test")], message, headers_only=True))
    assert b"fallback test" not in out.submissions[0].data
    assert len(email.message_from_bytes(out.submissions[0].data).get_payload()) == 2


# ------------------------------------------ issue 12: reversals go through the rules


def test_a_reply_to_a_token_of_a_managed_sender_is_routed(policy):
    token, _ = forward(policy, "parents@family.test", sender="me@family.test")
    reply = b"From: x@gmail.test\r\nSubject: Re: hi\r\n\r\nthanks\r\n"
    out = Handler(policy).handle(token, "x@gmail.test", reply)
    (sub,) = out.submissions
    assert (sub.kind, sub.rcpt) == ("reverse", "me@gmail.test")  # where me@family.test is routed
    assert policy.srs.reverse(sub.mail_from) == "x@gmail.test"  # SRS, like a forward


def test_postfix_config_reinjects_through_a_unix_socket_in_public_by_default():
    from routemilter.mtaconfig import postfix_config, sendmail_config

    config = loads(MINIMAL.format(srs="srs: {domain: fwd.example, secrets: [0123456789abcdef0]}",
                                  bounces="max_age_days: 3"))
    assert config.bounces.reinject == "unix:/var/spool/postfix/public/rm_reinject"
    out = postfix_config(config)
    assert "rm_reinject unix n - n - - smtpd" in out.splitlines()  # private column n: public/
    assert "inet n - n - - smtpd" not in out and "postdrop" in out
    assert "  -o smtpd_relay_restrictions=permit_mynetworks,reject" in out.splitlines()
    # Sendmail cannot serve a unix listener: it says so instead of printing a broken DAEMON_OPTIONS
    assert "rm-reinject" not in sendmail_config(config) and "WARNING" in sendmail_config(config)
    inet = loads(MINIMAL.format(srs="srs: {domain: fwd.example, secrets: [0123456789abcdef0]}",
                                bounces="reinject: 127.0.0.1:10099"))
    assert "WARNING: any local user" in postfix_config(inet)


def test_a_message_to_an_alias_and_a_token_is_reversed_without_our_signature(policy):
    """Issue 12.4: RCPT TO a routed alias plus a token: the milter signs for the forward;
    the copy that reaches the bounce handler is reversed without our signature."""
    token, _ = forward(policy, "me@family.test")
    _, signed = forward(policy, "parents@family.test", sender="mallory@evil.example")
    assert sorted(verified(policy, signed)) == ["ed", "rsa"]
    with_other = b"DKIM-Signature: v=1; a=rsa-sha256; d=evil.example; s=x; h=from; bh=eA==; b=eA==\r\n" + signed
    out = Handler(policy).handle(token, "mallory@evil.example", with_other)
    (sub,) = out.submissions
    assert sub.kind == "reverse" and sub.rcpt == "alice@sender.example"
    assert verified(policy, sub.data) == [] and b"d=family.test" not in sub.data
    assert b"d=evil.example" in sub.data and sub.data.endswith(b"this must arrive exactly once.\r\n")


def test_lmtp_a_store_failing_on_release_still_answers_451(policy, tmp_path):
    """Re-injection fails and the store fails too when the claim is given back: the MTA
    must still get a 4xx (it keeps the bounce), never a 5xx or a dropped session."""
    from routemilter.state import MemoryStore, StoreError

    class FailingRelease(MemoryStore):
        def release(self, key):
            raise StoreError("store went away")

    def submitter(hostport, subs):
        raise ConnectionRefusedError("no re-injection listener")

    sock = str(tmp_path / "f.sock")
    settings_ = dataclasses.replace(policy.config.bounces, socket=f"unix:{sock}")
    server = BounceServer(PolicyHolder(policy, FailingRelease()), settings_, submitter=submitter).start()
    try:
        token, message = forward(policy, "me@family.test")
        assert lmtp(sock, [token], postfix_dsn([fail("me@gmail.test")], message))[1][0][0] == 451
    finally:
        server.stop()
