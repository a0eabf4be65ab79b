"""Who may send as what (senders:), the sender login socketmap, and the outbound
signing decision (issue #18). End to end through Postfix: integration/test_sendas.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import dkim
import Milter
import pytest

from routemilter import cli
from routemilter.config import ConfigError, loads
from routemilter.mtaconfig import postfix_config
from routemilter.policy import Policy, PolicyHolder
from routemilter.rules import Router
from routemilter.senders import Senders, SocketmapServer, answer, netstring, outbound_domain
from routemilter.session import Session
from routemilter.transaction import Transaction
from testkit import SRS_SECTION, FakeCtx

CONFIG = "server_name: mx.family.test\n" + SRS_SECTION + """\
submission:
  socket: unix:{sock}
  trusted_networks: [192.0.2.0/24, "2001:db8::/32"]
domains:
  family.test:
    subdomain_addressing: true
    catch_all:
      to: catchall@gmail.test
      senders: [admin]
  kid.test: {{}}
rules:
  - name: alice
    addresses: [alice@family.test, al@kid.test]
    to: alice@gmail.test
    senders: [alice, Alice2]
  - name: bob
    addresses: [bob@family.test]
    to: bob@gmail.test
    senders: bob
  - name: shop
    patterns: ['shop-.*@family\\.test']
    to: alice@gmail.test
    senders: [alice]
  - name: noreply
    addresses: [noreply@kid.test]
    refuse: this address receives no mail
    senders: [app]
  - name: carol
    addresses: [carol@kid.test]
    to: carol@gmail.test
"""


def config(sock="/tmp/unused-senders.sock", extra=""):
    return loads(CONFIG.format(sock=sock) + extra, "/etc/routemilter/routemilter.yaml")


@pytest.fixture
def senders():
    cfg = config()
    return Senders(cfg, Router(cfg))


# ------------------------------------------------------------------ config


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text, "f.yaml")
    return info.value.problems


def test_senders_parsed_as_list_or_string():
    cfg = config()
    rules = {r.name: r for r in cfg.rules}
    assert rules["alice"].senders == ("alice", "Alice2")
    assert rules["bob"].senders == ("bob",)
    assert rules["carol"].senders == ()
    assert cfg.domains["family.test"].catch_all.senders == ("admin",)
    assert [str(n) for n in cfg.submission.trusted_networks] == ["192.0.2.0/24", "2001:db8::/32"]


def test_bad_logins_networks_and_keys_all_reported_with_lines():
    text = """\
submission:
  socket: tcp:1234
  trusted_networks: [192.0.2.1/24, not-a-net]
  port: 587
domains:
  family.test: {}
rules:
  - name: a
    addresses: [a@family.test]
    to: a@gmail.test
    senders: ["has space", "x,y", ""]
"""
    found = problems(text)
    assert "f.yaml:2: submission.socket must be unix:/absolute/path or inet:PORT@HOST" in found
    assert any(p.startswith("f.yaml:3: submission.trusted_networks: '192.0.2.1/24' is not a network") for p in found)
    assert any(p.startswith("f.yaml:3: submission.trusted_networks: 'not-a-net'") for p in found)
    assert any(p.startswith("f.yaml:4: unknown key 'port' in submission") for p in found)
    for bad in ("has space", "x,y", ""):
        assert f"f.yaml:11: rule a: sender login {bad!r} must be 1 to 255 characters without spaces, " \
               f"commas or control characters" in found
    assert len(found) == 7, found


def test_senders_without_submission_section_is_an_error():
    text = """\
domains:
  family.test:
    catch_all:
      to: c@gmail.test
      senders: [admin]
rules:
  - name: a
    addresses: [a@family.test]
    to: a@gmail.test
    senders: [alice]
"""
    assert problems(text) == [
        "f.yaml:7: rule a: senders needs a submission: section (the sender login map is served from there)",
        "f.yaml:3: rule catch-all@family.test: senders needs a submission: section "
        "(the sender login map is served from there)",
    ]


# ------------------------------------------------------- who may send as what


@pytest.mark.parametrize("login, address, allowed, why", [
    ("alice", "alice@family.test", True, "exact address alice@family.test"),
    ("alice", "Alice+Shop@Family.Test", True, "plus-addressing"),
    ("alice", "x@alice.family.test", True, "subdomain addressing"),
    ("alice", "al@kid.test", True, "exact address al@kid.test"),
    ("ALICE", "alice@family.test", True, ""),  # Postfix compares logins case-insensitively
    ("alice2", "alice@family.test", True, ""),
    ("alice", "shop-news@family.test", True, "pattern"),
    ("alice", "bob@family.test", False, "rule bob (line "),
    ("bob", "bob+x@family.test", True, "plus-addressing"),
    ("alice", "anyone@family.test", False, "catch-all of family.test"),
    ("admin", "anyone@family.test", True, "catch-all of family.test"),
    ("admin", "bob@family.test", False, "rule bob"),  # the catch-all owns only what it receives
    ("app", "noreply@kid.test", True, "rule noreply"),  # refuses inbound mail, may still send
    ("carol", "carol@kid.test", False, "the rule lists no senders"),
    ("alice", "nobody@kid.test", False, "no rule matches and kid.test has no catch-all"),
    ("alice", "alice@gmail.test", False, "gmail.test is not a managed domain"),
    ("alice", "not an address", False, "malformed"),
])
def test_may_send(senders, login, address, allowed, why):
    ok, reason = senders.may_send(login, address)
    assert ok is allowed, reason
    assert why in reason
    assert reason.startswith(f"{login} {'may' if allowed else 'may not'} send as ")


def test_trusted_networks(senders):
    assert senders.trusted("192.0.2.77")
    assert senders.trusted("2001:db8::5")
    assert not senders.trusted("127.0.0.1")
    assert not senders.trusted(None)
    assert not senders.trusted("not-an-ip")


# ------------------------------------------------------------- the socketmap


@pytest.mark.parametrize("request_, reply", [
    (b"senders alice@family.test", b"OK alice,Alice2"),
    (b"senders alice+x@family.test", b"OK alice,Alice2"),
    (b"senders whoever@family.test", b"OK admin"),
    (b"senders carol@kid.test", b"NOTFOUND "),
    (b"senders @family.test", b"NOTFOUND "),  # Postfix's fallback keys
    (b"senders alice", b"NOTFOUND "),
    (b"senders x@gmail.test", b"NOTFOUND "),
    (b"senders \xff@family.test", b"NOTFOUND "),
])
def test_socketmap_answers(senders, request_, reply):
    assert answer(senders, request_) == reply


def test_socketmap_without_submission_is_temporary():
    assert answer(None, b"senders a@b.test").startswith(b"TEMP ")


def recv_netstring(stream) -> bytes:
    size = b""
    while (ch := stream.read(1)) != b":":
        assert ch.isdigit(), (size, ch)
        size += ch
    data = stream.read(int(size))
    assert stream.read(1) == b","
    return data


def test_socketmap_server_round_trip_and_bad_input(tmp_path):
    path = tmp_path / "senders.sock"
    cfg = config(str(path))
    holder = PolicyHolder(Policy.from_config(cfg))
    server = SocketmapServer(holder, cfg.submission, mode=0o660).start()
    try:
        assert path.stat().st_mode & 0o777 == 0o660
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(path))
            stream = s.makefile("rb")
            # Postfix keeps the connection for many lookups
            s.sendall(netstring(b"senders alice@family.test") + netstring(b"senders nobody@kid.test"))
            assert recv_netstring(stream) == b"OK alice,Alice2"
            assert recv_netstring(stream) == b"NOTFOUND "
            # a reload is seen by the next request on the same connection
            renamed = CONFIG.format(sock=path).replace("senders: bob", "senders: robert")
            holder.replace(Policy.from_config(loads(renamed)))
            s.sendall(netstring(b"senders bob@family.test"))
            assert recv_netstring(stream) == b"OK robert"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(b"99999999:senders x,")  # a length no request has: the connection is closed
            assert s.recv(100) == b""
    finally:
        server.stop()
    assert not path.exists()


# ----------------------------------------------------- the signing decision


@pytest.mark.parametrize("login, from_values, domain, refused, note", [
    ("alice", ["Alice <alice@family.test>"], "family.test", False, "outbound=sign:family.test"),
    ("alice", ["alice+x@alice.family.test"], "family.test", False, "outbound=sign:family.test"),
    ("alice", ["<al@kid.test>"], "kid.test", False, "outbound=sign:kid.test"),
    ("alice", ["Bob <bob@family.test>"], None, True, "outbound=refused:from-not-owned"),
    ("alice", ["someone@gmail.test"], None, False, "outbound=unsigned:from-not-managed"),
    ("alice", [], None, False, "outbound=unsigned:no-single-from"),
    ("alice", ["a@family.test, alice@family.test"], None, False, "outbound=unsigned:no-single-from"),
    ("alice", ["alice@family.test", "alice@family.test"], None, False, "outbound=unsigned:no-single-from"),
    (None, ["Bob <bob@family.test>"], "family.test", False, "outbound=sign:family.test"),  # trusted network
])
def test_outbound_domain(senders, login, from_values, domain, refused, note):
    got_domain, reply, got_note = outbound_domain(senders, senders.config, login, from_values)
    assert (got_domain, reply is not None, got_note) == (domain, refused, note)
    if reply is not None:
        assert (reply.code, reply.status) == (553, "5.7.1")
        assert reply.lines == (f"<bob@family.test>: From: address rejected: not owned by user {login}",)


@pytest.fixture
def signing_policy(dkim_keys):
    txt = {"rsa": dkim_keys.rsa_txt, "ed": dkim_keys.ed25519_txt}
    extra = dkim_keys.section(domain="fwd.family.test", rsa="rsa", ed25519="ed")
    return Policy.from_config(config(extra=extra)), txt


def run_tx(policy, rcpts, from_header, login=None, submitted=False):
    tx = Transaction(policy, "<alice@family.test>")
    if submitted:
        tx.submitted_by(login)
    for r in rcpts:
        assert tx.add_recipient(r) is None
    head = [("From", from_header.encode()), ("To", b"<x@example.test>"), ("Subject", b"hi")]
    for name, value in head:
        tx.add_header(name, value)
    tx.add_body(b"hello\r\n")
    message = b"".join(n.encode() + b": " + v + b"\r\n" for n, v in head) + b"\r\nhello\r\n"
    return tx.plan(), message


def verify(plan, message, txt) -> list[str]:
    signed = b"".join(f"{n}: {v}".replace("\n", "\r\n").encode() + b"\r\n"
                      for n, v in plan.headers if n == "DKIM-Signature") + message
    good = []
    for i in range(len([n for n, _ in plan.headers if n == "DKIM-Signature"])):
        d = dkim.DKIM(signed)
        if d.verify(idx=i, dnsfunc=lambda name, timeout=5: txt[name.decode().split(".")[0]].encode()):
            good.append(f"{d.domain.decode()}/{d.selector.decode()}")
    return good


def test_login_mail_is_signed_for_the_from_domain_and_keeps_its_sender(signing_policy):
    policy, txt = signing_policy
    plan, message = run_tx(policy, ["<friend@example.test>"], "Alice <al@kid.test>", "alice", True)
    assert plan.reply is None and plan.new_sender is None and not plan.add and not plan.delete
    assert verify(plan, message, txt) == ["kid.test/rsa", "kid.test/ed"]
    assert "outbound=sign:kid.test" in plan.notes


def test_login_mail_to_a_managed_address_is_routed_without_srs(signing_policy):
    policy, txt = signing_policy
    plan, message = run_tx(policy, ["<bob@family.test>", "<friend@example.test>"], "alice@family.test", "alice", True)
    assert plan.add == ["bob@gmail.test"] and plan.delete == ["<bob@family.test>"]
    assert plan.new_sender is None  # our own user's address: SPF holds without SRS
    assert verify(plan, message, txt) == ["family.test/rsa", "family.test/ed"]
    assert [n for n, _ in plan.headers] == ["X-Routemilter", "DKIM-Signature", "DKIM-Signature"]


def test_login_with_someone_elses_from_is_refused(signing_policy):
    policy, _ = signing_policy
    plan, _ = run_tx(policy, ["<friend@example.test>"], "bob@family.test", "alice", True)
    assert plan.reply.code == 553 and not plan.headers and not plan.add


def test_unauthenticated_managed_from_is_never_signed_for_it(signing_policy):
    policy, txt = signing_policy
    plan, message = run_tx(policy, ["<friend@example.test>"], "alice@family.test")
    assert plan.headers == [] and plan.reply is None  # not ours to route, not ours to sign
    plan, message = run_tx(policy, ["<bob@family.test>"], "alice@family.test")
    assert plan.new_sender.startswith("SRS0=")  # an inbound forward, as before
    assert all(not s.startswith("family.test/") for s in verify(plan, message, txt))


# --------------------------------------------------------- pymilter session


def session_for(policy, macros):
    session = Session(PolicyHolder(policy))
    ctx = FakeCtx(macros=macros)
    session._setctx(ctx)
    opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
    assert session.negotiate(opts) == Milter.CONTINUE
    return session, ctx, opts


def test_negotiation_asks_for_the_login_and_the_client_address():
    _session, ctx, opts = session_for(Policy.from_config(config()), {})
    assert (Milter.M_ENVFROM, "i {auth_authen}") in ctx.symlists
    assert not opts[1] & Milter.P_NOCONNECT  # trusted_networks needs the client address
    without = loads(CONFIG.format(sock="/tmp/x").split("submission:")[0] + "domains:\n  family.test: {}\n")
    _session, ctx, opts = session_for(Policy.from_config(without), {})
    assert (Milter.M_ENVFROM, "i") in ctx.symlists and opts[1] & Milter.P_NOCONNECT


@pytest.mark.parametrize("macros, client, submitted, login", [
    ({"{auth_authen}": "alice"}, "198.51.100.7", True, "alice"),
    ({}, "192.0.2.9", True, None),
    ({}, "198.51.100.7", False, None),
    ({"{auth_authen}": ""}, "198.51.100.7", False, None),
])
def test_session_marks_our_users_mail(macros, client, submitted, login):
    session, _, _ = session_for(Policy.from_config(config()), macros)
    session.connect("client", 4, (client, 1234))
    assert session.envfrom("<alice@family.test>") == Milter.NOREPLY  # SMFIP_NR_MAIL negotiated
    assert (session.tx.submitted, session.tx.login) == (submitted, login)


# ----------------------------------------------------------------- the CLI


def write(tmp_path) -> Path:
    path = tmp_path / "routemilter.yaml"
    path.write_text(CONFIG.format(sock="/var/spool/postfix/routemilter/senders.sock"))
    return path


def line_of(text: str) -> int:
    return CONFIG.splitlines().index(text) + 1


def test_explain_sender(tmp_path, capsys):
    path = write(tmp_path)
    alice, bob, catch_all = line_of("  - name: alice"), line_of("  - name: bob"), line_of("    catch_all:")
    assert cli.main(["-c", str(path), "explain", "--sender", "alice", "alice+x@family.test", "bob@family.test"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("alice MAY send as alice+x@family.test\n  owners: alice, Alice2\n"
                          f"  why:    rule alice (line {alice}): exact address alice@family.test (plus-addressing")
    assert f"alice MAY NOT send as bob@family.test\n  owners: bob\n  why:    rule bob (line {bob})" in out
    assert cli.main(["-c", str(path), "explain", "--json", "--sender", "admin", "x@family.test"]) == 0
    [answer_] = json.loads(capsys.readouterr().out)
    assert answer_ == {"login": "admin", "address": "x@family.test", "allowed": True, "owners": ["admin"],
                       "reason": f"rule catch-all@family.test (line {catch_all}): catch-all of family.test; "
                                 "the rule lists admin"}


def test_postfix_config_serves_the_login_map_and_the_submission_service(tmp_path):
    text = postfix_config(config("/var/spool/postfix/routemilter/senders.sock"))
    assert "\nsmtpd_sender_login_maps = socketmap:unix:routemilter/senders.sock:senders\n" in text
    assert "\nsubmission inet n - n - - smtpd\n" in text
    for option in ("smtpd_tls_security_level=encrypt", "smtpd_tls_auth_only=yes", "smtpd_sasl_type=dovecot",
                   "smtpd_sasl_path=private/auth", "smtpd_delay_reject=no",
                   "smtpd_sender_restrictions=reject_sender_login_mismatch,permit_sasl_authenticated,reject",
                   "smtpd_relay_restrictions=permit_sasl_authenticated,reject"):
        assert f"\n  -o {option}\n" in text
    plain = loads("domains:\n  family.test: {}\n")
    assert "submission" not in postfix_config(plain) and "sender_login" not in postfix_config(plain)


def test_outbound_d_is_the_a_label_of_a_unicode_domain(signing_policy):
    from routemilter.signing import SigningError

    policy, _ = signing_policy
    [rsa, ed] = policy.signer.sign(b"From: a@b.test\r\n\r\nbody\r\n", domain="b\u00fccher.test")
    assert "d=xn--bcher-kva.test;" in rsa[1] and "d=xn--bcher-kva.test;" in ed[1]
    with pytest.raises(SigningError, match="no A-label"):
        policy.signer.sign(b"From: a@b.test\r\n\r\nbody\r\n", domain="a..b")


def test_our_users_mail_and_the_forwarders_decision_agree(dkim_keys):
    """dkim.domain is the managed domain (one-domain server): a forward whose From is
    ours but unverified is not signed (signpolicy.py); the same message from a login that
    owns the From, or from a trusted network, is signed for it; a From alone never is."""
    txt = {"rsa": dkim_keys.rsa_txt}
    extra = dkim_keys.section(domain="family.test", rsa="rsa")
    policy = Policy.from_config(config(extra=extra))
    plan, message = run_tx(policy, ["<bob@family.test>"], "alice@family.test")
    assert verify(plan, message, txt) == [] and "dkim=skipped:from-aligned-unverified:family.test" in plan.notes
    for login in ("alice", None):
        plan, message = run_tx(policy, ["<bob@family.test>"], "alice@family.test", login, True)
        assert verify(plan, message, txt) == ["family.test/rsa"], (login, plan.notes)
