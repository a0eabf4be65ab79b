"""Deferral-driven fallback: fallback_after in the config, the Postfix side, the
listener's decisions and its SMTP behaviour (deferrals.py). End to end through a
real Postfix: integration/test_deferral_fallback.py."""

from __future__ import annotations

import re
import smtplib
import socket
import time
from types import SimpleNamespace

import pytest

from routemilter.bounces import FAILED_HEADER
from routemilter.config import DEFAULT_FALLBACK_AFTER, ConfigError, format_duration, loads
from routemilter.deferrals import Deferrals, DeferralServer
from routemilter.mtaconfig import postfix_config, transport_entries
from routemilter.policy import Policy, PolicyHolder
from routemilter.stamps import restamp, stamp, stamped_time
from routemilter.transaction import Transaction

SECRET = "deferral-secret-0123456789"
NOW = float(int(time.time()))

BASE = """
server_name: mx.family.test
srs:
  domain: fwd.example
  secrets: ["{secret}"]
bounces:
  socket: unix:/tmp/unused.sock
  reinject: 127.0.0.1:10026
{dkim}
{extra}
domains:
  family.test: {{}}
rules:
  - name: me
    addresses: [me@family.test]
    to:
      - address: me@gmail.test
        fallback_after: 20m
        fallback: [me@outlook.test, me@final.test]
  - name: parents
    addresses: [parents@family.test]
    to:
      - address: mum@gmail.test
        fallback: [mum@outlook.test]
      - dad@outlook.test
  - name: quick
    addresses: [quick@family.test]
    to:
      - address: q@gmail.test
        fallback_after: 0
        fallback: [q@outlook.test]
"""


def config_text(extra="", dkim=""):
    return BASE.format(secret=SECRET, extra=extra, dkim=dkim)


# ------------------------------------------------------------------ config


def test_fallback_after_global_default_and_per_destination():
    config = loads(config_text())
    me, parents, quick = config.rules
    assert me.destinations[0].fallback_after == 20 * 60
    assert parents.destinations[0].fallback_after == DEFAULT_FALLBACK_AFTER == 30 * 60
    assert quick.destinations[0].fallback_after == 0
    config = loads(config_text("fallback_after: 2h"))
    assert config.fallback_after == 7200
    assert [r.destinations[0].fallback_after for r in config.rules] == [1200, 7200, 0]
    config = loads(config_text("fallback_after: never"))
    assert config.rules[1].destinations[0].fallback_after is None
    for text, seconds in (("0", 0), ("90s", 90), ("20m", 1200), ("2h", 7200), ("1d", 86400), ("45", 45)):
        assert loads(config_text(f"fallback_after: {text}")).fallback_after == seconds


@pytest.mark.parametrize("value, problem", [
    ("soon", "fallback_after must be a duration like 0, 90s, 20m, 2h or 1d, or never; found 'soon'"),
    ("-5m", "fallback_after must be a duration"),
    ("1.5h", "fallback_after must be a duration"),
    ("true", "fallback_after must be a duration"),
    ("60d", "fallback_after is longer than 30 days"),
])
def test_bad_fallback_after_names_file_and_line(value, problem):
    text = config_text(f"fallback_after: {value}")
    line = text.splitlines().index(f"fallback_after: {value}") + 1
    with pytest.raises(ConfigError) as err:
        loads(text, "rm.yaml")
    assert any(p.startswith(f"rm.yaml:{line}: ") and problem in p for p in err.value.problems), err.value.problems


def test_per_destination_errors_are_all_reported_with_lines():
    text = config_text().replace("fallback_after: 20m", "fallback_after: later") + """
  - name: lonely
    addresses: [lonely@family.test]
    to:
      - address: l@gmail.test
        fallback_after: 5m
"""
    lines = text.splitlines()
    with pytest.raises(ConfigError) as err:
        loads(text, "rm.yaml")
    assert err.value.problems == [
        f"rm.yaml:{lines.index('        fallback_after: later') + 1}: rule me: fallback_after must be a duration "
        f"like 0, 90s, 20m, 2h or 1d, or never; found 'later'",
        f"rm.yaml:{lines.index('        fallback_after: 5m') + 1}: rule lonely: fallback_after without fallback: "
        f"there is no next address",
    ]


@pytest.mark.parametrize("listen", ["0.0.0.0:10027", "192.0.2.1:25", "localhost:10027", "127.0.0.1", "[::2]:1"])
def test_deferral_listener_must_be_loopback(listen):
    text = config_text().replace("  reinject: 127.0.0.1:10026",
                                 f"  reinject: 127.0.0.1:10026\n  deferral_listen: \"{listen}\"")
    with pytest.raises(ConfigError, match="deferral_listen must be a loopback HOST:PORT"):
        loads(text)


def test_postfix_side_one_deferral_transport_per_route_for_non_last_addresses():
    config = loads(config_text())
    entries = dict(transport_entries(config))
    # every address that has a next address in its chain; not the last ones, not plain destinations
    assert {a: t for a, t in entries.items() if t.startswith("rmd_")} == {
        "me@gmail.test": "rmd_mx:", "me@outlook.test": "rmd_mx:", "mum@gmail.test": "rmd_mx:",
        "q@gmail.test": "rmd_mx:"}
    assert "me@final.test" not in entries and "dad@outlook.test" not in entries
    out = postfix_config(config)
    assert ("rmd_mx unix - - n - - smtp\n  -o syslog_name=postfix/rmd_mx\n"
            "  -o smtp_fallback_relay=[127.0.0.1]:10027\n") in out
    assert "rmd_mx_destination_recipient_limit = 1" in out
    # never: no transport for it; without bounces: none at all
    never = loads(config_text("fallback_after: never").replace("fallback_after: 20m", "fallback_after: never")
                  .replace("fallback_after: 0", "fallback_after: never"))
    assert not any(t.startswith("rmd_") for _, t in transport_entries(never))
    bounces = "bounces:\n  socket: unix:/tmp/unused.sock\n  reinject: 127.0.0.1:10026\n"
    without = loads(config_text().replace(bounces, ""))
    assert "rmd_" not in postfix_config(without)


def test_relay_route_keeps_its_relays_before_the_listener():
    text = config_text("routes:\n  via: [mx, \"[relay.example]:587\"]").replace(
        "      - address: q@gmail.test\n", "      - address: q@gmail.test\n        route: via\n")
    out = postfix_config(loads(text))
    assert "rmd_via unix - - n - - smtp\n  -o syslog_name=postfix/rmd_via\n" \
           "  -o smtp_fallback_relay=[relay.example]:587,[127.0.0.1]:10027\n" in out
    assert re.search(r"(?m)^q@gmail\.test +rmd_via:$", out), out


def test_explain_shows_fallback_after(tmp_path, capsys):
    from routemilter.cli import main

    path = tmp_path / "rm.yaml"
    path.touch(mode=0o600)  # it holds SRS secrets: others must not read it
    path.write_text(config_text())
    assert main(["-c", str(path), "explain", "me@family.test", "parents@family.test"]) == 0
    out = capsys.readouterr().out
    assert "destination 1: me@gmail.test  (route mx: mx; deferred for 20m: next address)" in out
    assert "then fallback 1: me@outlook.test  (route mx: mx; deferred for 20m: next address)" in out
    assert "then fallback 2: me@final.test  (route mx: mx)" in out
    assert "destination 1: mum@gmail.test  (route mx: mx; deferred for 30m: next address)" in out
    assert main(["-c", str(path), "explain", "--json", "me@family.test"]) == 0
    assert '"fallback_after": "20m"' in capsys.readouterr().out


# ------------------------------------------------------------- the stamp


def test_stamp_rounds_up_so_a_copy_never_moves_on_early():
    secrets = (SECRET.encode(),)
    value = stamp(secrets, "rmc=a@fwd.example", 1_800_000_000.2)
    assert stamped_time(secrets, "rmc=a@fwd.example", value) == 1_800_000_001


def test_stamp_is_bound_to_time_and_token():
    secrets = (SECRET.encode(),)
    value = "mx.family.test; rules=me; " + stamp(secrets, "rmb=a@fwd.example", NOW)
    assert stamped_time(secrets, "rmb=a@fwd.example", value) == int(NOW)
    assert stamped_time(secrets, "RMB=A@FWD.EXAMPLE", value) == int(NOW)  # tokens are case-insensitive
    assert stamped_time(secrets, "rmb=b@fwd.example", value) is None  # moved to another copy
    backdated = value.replace(f"t={int(NOW)}", f"t={int(NOW) - 86400}")
    assert stamped_time(secrets, "rmb=a@fwd.example", backdated) is None
    assert stamped_time((b"another-secret-0123456789",), "rmb=a@fwd.example", value) is None
    assert stamped_time((b"new-secret-0123456789abc", secrets[0]), "rmb=a@fwd.example", value) == int(NOW)


def test_restamp_replaces_only_our_trace_header():
    secrets = (SECRET.encode(),)
    lines = [b"X-Routemilter: other.host; rules=x; t=1.aaaaaaaaaa", b"X-Routemilter: mx.family.test; rules=me; "
             + stamp(secrets, "rmb=old@fwd.example", NOW).encode(), b"Subject: s"]
    out = restamp(lines, "mx.family.test", secrets, "rmb=new@fwd.example", NOW + 60)
    assert out[0] == lines[0] and out[2] == lines[2]
    assert stamped_time(secrets, "rmb=new@fwd.example", out[1].decode()) == int(NOW) + 60
    assert out[1].startswith(b"X-Routemilter: mx.family.test; rules=me; t=")
    added = restamp([b"Subject: s"], "mx.family.test", secrets, "rmb=new@fwd.example", NOW)
    assert len(added) == 2 and stamped_time(secrets, "rmb=new@fwd.example", added[0].decode()) == int(NOW)


def test_format_duration():
    assert [format_duration(s) for s in (0, 45, 90, 1200, 2110, 7200, 9000, 86400, 90000, None)] == [
        "0s", "45s", "1m30s", "20m", "35m10s", "2h", "2h30m", "1d", "1d1h", "never"]


# ------------------------------------------------------------ decisions


class Clock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def policy(dkim_keys):
    dkim = dkim_keys.section(rsa="rsa").rstrip("\n")
    return Policy.from_config(loads(config_text(dkim=dkim)))


def forward(policy, rcpt: str, monkeypatch, when=NOW) -> tuple[str, bytes]:
    """What the milter sends out for `rcpt`: (envelope sender, message), stamped at `when`."""
    import routemilter.transaction as transaction  # its clock only: dkimpy refuses signatures from the future

    monkeypatch.setattr(transaction, "time", SimpleNamespace(time=lambda: when, monotonic=time.monotonic))
    tx = Transaction(policy, "<alice@sender.example>")
    assert tx.add_recipient(f"<{rcpt}>") is None
    headers = [("From", "Alice <alice@sender.example>"), ("To", rcpt), ("Subject", "deferral test"),
               ("Message-ID", "<m1@sender.example>")]
    for name, value in headers:
        tx.add_header(name, value.encode())
    body = b"Hello,\r\nthis must arrive exactly once.\r\n"
    tx.add_body(body)
    plan = tx.plan()
    monkeypatch.undo()
    lines = [f"{n}: {v}".replace("\n", "\r\n") for n, v in plan.headers]
    received = ["Received: from client.example (client.example [192.0.2.9])\r\n\tby mx.family.test (Postfix) "
                "with ESMTP id 4AbCdEf123\r\n\tfor <x@family.test>; Fri, 27 Nov 2026 10:00:00 +0000"]
    head = "\r\n".join(lines + received + [f"{n}: {v}" for n, v in headers])
    return plan.new_sender, head.encode() + b"\r\n\r\n" + body


def test_milter_stamps_the_trace_header_with_the_token(policy, monkeypatch):
    sender, data = forward(policy, "me@family.test", monkeypatch)
    trace = re.search(rb"X-Routemilter: ([^\r\n]*)", data).group(1).decode()
    assert trace.startswith("mx.family.test; rules=me; t=")
    assert stamped_time(policy.config.srs.secrets, sender, trace) == int(NOW)


def test_not_yet_then_next_address_once_past_fallback_after(policy, monkeypatch):
    sender, data = forward(policy, "me@family.test", monkeypatch)
    clock = Clock(NOW + 19 * 60)
    d = Deferrals(policy, clock)
    assert d.check_sender(sender) is None and d.check_recipient(sender, "<me@gmail.test>") is None
    verdict = d.decide(sender, "me@gmail.test", data)
    assert verdict.submission is None and verdict.reply.startswith("451 4.4.0 ")
    assert "moves on to me@outlook.test once deferred for 20m (now 19m)" in verdict.reply
    assert verdict.fields["decision"] == "not-yet" and verdict.fields["queue_id"] == "4AbCdEf123"
    clock.now = NOW + 20 * 60
    verdict = d.decide(sender, "me@gmail.test", data)
    assert verdict.reply.startswith("250 ")
    sub = verdict.submission
    assert sub.rcpt == "me@outlook.test" and sub.kind == "fallback"
    token = policy.tokens.check(sub.mail_from)
    assert (token.dest, token.pos, token.sender) == (0, 1, "alice@sender.example")
    failed = re.search(rb"X-Routemilter-Failed: me@gmail\.test; 4\.0\.0; deferred [^\r\n]+", sub.data).group(0)
    assert b"for 20m; fallback_after 20m" in failed
    # the copy's own clock starts now: the next address gets its own fallback_after
    trace = re.search(rb"X-Routemilter: ([^\r\n]*)", sub.data).group(1).decode()
    assert stamped_time(policy.config.srs.secrets, sub.mail_from, trace) == int(clock.now)
    assert sub.data.endswith(b"\r\n\r\nHello,\r\nthis must arrive exactly once.\r\n")
    # and that copy, deferred in turn, moves on to the third address with both reasons
    later = Deferrals(policy, Clock(clock.now + 20 * 60)).decide(sub.mail_from, "me@outlook.test", sub.data)
    assert later.submission.rcpt == "me@final.test"
    assert later.submission.data.count(FAILED_HEADER.encode() + b": me@") == 2


def test_last_address_and_never_keep_retrying(policy, monkeypatch):
    sender, data = forward(policy, "me@family.test", monkeypatch)
    sub = Deferrals(policy, Clock(NOW + 3600)).decide(sender, "me@gmail.test", data).submission
    sub2 = Deferrals(policy, Clock(NOW + 7200)).decide(sub.mail_from, "me@outlook.test", sub.data).submission
    assert sub2.rcpt == "me@final.test"
    last = Deferrals(policy, Clock(NOW + 99999)).decide(sub2.mail_from, "me@final.test", sub2.data)
    assert last.submission is None and last.reply.startswith("451 ") and "no further address" in last.reply


def test_listener_refuses_what_is_not_a_current_chain(policy, monkeypatch):
    sender, data = forward(policy, "me@family.test", monkeypatch)
    d = Deferrals(policy, Clock(NOW + 3600))
    assert d.check_sender("SRS0=abcd=TT=sender.example=alice@fwd.example").startswith("451 4.7.1 ")
    assert d.check_sender("<>").startswith("451 ")
    forged = "rmb=aaaaaaaaaa" + sender[len("rmb=") + 10:]
    assert d.check_sender(forged).startswith("550 5.7.1 ")
    assert d.check_recipient(sender, "mum@gmail.test").startswith("550 5.7.1 ")  # another rule's address
    assert d.check_recipient(sender, "someone@elsewhere.example").startswith("550 5.7.1 ")
    # a forged or moved stamp: no decision on age, the MTA keeps retrying
    other, _ = forward(policy, "quick@family.test", monkeypatch)
    moved = data.replace(sender.encode(), other.encode()) if sender.encode() in data else data
    verdict = d.decide(other, "q@gmail.test", moved)
    assert verdict.submission is None and "no valid time stamp" in verdict.reply
    backdated = re.sub(rb"t=(\d+)\.", lambda m: b"t=" + str(int(m.group(1)) - 86400).encode() + b".", data)
    verdict = Deferrals(policy, Clock(NOW)).decide(sender, "me@gmail.test", backdated)
    assert verdict.submission is None and "no valid time stamp" in verdict.reply


def test_changed_content_is_not_forwarded(policy, monkeypatch):
    sender, data = forward(policy, "quick@family.test", monkeypatch)
    verdict = Deferrals(policy, Clock(NOW)).decide(sender, "q@gmail.test", data.replace(b"exactly once", b"twice"))
    assert verdict.submission is None and "does not carry our valid DKIM signature" in verdict.reply
    assert Deferrals(policy, Clock(NOW)).decide(sender, "q@gmail.test", data).submission is not None


# ---------------------------------------------------------------- server


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_reinjects_once_and_answers_250_only_after(policy, monkeypatch):
    sender, data = forward(policy, "quick@family.test", monkeypatch)
    sent = []
    fail = {"now": True}

    def submitter(hostport, submissions):
        if fail["now"]:
            raise ConnectionRefusedError("reinject listener down")
        sent.extend(submissions)
        return ["2.0.0 Ok: queued as 4NewId999"]

    holder = PolicyHolder(policy)
    port = free_port()
    server = DeferralServer(holder, f"127.0.0.1:{port}", 10 * 1024 * 1024, submitter=submitter).start()
    try:
        def deliver(rcpts=("q@gmail.test",)):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("postfix.test")
                code, _ = smtp.mail(sender)
                assert code == 250
                codes = [smtp.rcpt(r)[0] for r in rcpts]
                if codes[0] != 250:
                    return codes, None
                return codes, smtp.data(data)

        _, (code, reply) = deliver()
        assert code == 451 and b"cannot re-inject" in reply and sent == []  # nothing lost: Postfix keeps it
        fail["now"] = False
        codes, (code, reply) = deliver(("q@gmail.test", "me@gmail.test"))
        assert codes == [250, 452] and code == 250 and len(sent) == 1 and sent[0].rcpt == "q@outlook.test"
        # Postfix did not get our 250 (timeout) and delivers again: no second copy
        _, (code, reply) = deliver()
        assert code == 250 and len(sent) == 1
        codes, _ = deliver(("mum@gmail.test",))
        assert codes == [550]
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("postfix.test")
            assert smtp.mail("rmb=aaaaaaaaaa=aa=x=p0=sender.example=alice@fwd.example")[0] == 550
    finally:
        server.stop()


def test_server_logs_one_line_per_fallback_with_both_queue_ids(policy, monkeypatch, caplog):
    sender, data = forward(policy, "quick@family.test", monkeypatch)
    holder = PolicyHolder(policy)
    server = DeferralServer(holder, "127.0.0.1:1", 1 << 20, submitter=lambda h, s: ["2.0.0 Ok: queued as 4NewId999"])
    with caplog.at_level("INFO", logger="routemilter.mail"):
        assert server.process(sender, "q@gmail.test", data).startswith("250 ")
    line, = [r.getMessage() for r in caplog.records if r.name == "routemilter.mail"]
    assert line.startswith("deferral queue_id=4AbCdEf123 rcpt=<q@gmail.test> fallback_after=0s ")
    assert "decision=fallback to=<q@outlook.test>" in line and "new_queue_id=4NewId999" in line


def test_sendmail_config_says_what_sendmail_cannot_do():
    from routemilter.mtaconfig import sendmail_config

    out = sendmail_config(loads(config_text()))
    assert "dnl fallback_after (deferral-driven fallback) works with Postfix only." in out
    assert all(line.startswith("dnl ") for line in out.splitlines() if "confTO_QUEUERETURN" in line)
    never = config_text().replace("fallback_after: 20m", "fallback_after: never").replace(
        "fallback_after: 0", "fallback_after: never")
    assert "fallback_after" not in sendmail_config(loads("fallback_after: never\n" + never))


def test_daemon_starts_the_listener_only_when_a_chain_needs_it(tmp_path):
    from routemilter.daemon import Daemon

    path = tmp_path / "rm.yaml"
    path.touch(mode=0o600)  # it holds SRS secrets: others must not read it
    port = free_port()
    path.write_text(config_text().replace("  reinject: 127.0.0.1:10026",
                                          f"  reinject: 127.0.0.1:10026\n  deferral_listen: 127.0.0.1:{port}"))
    daemon = Daemon(str(path))
    server = daemon.start_deferrals()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            assert smtp.ehlo()[0] == 250
    finally:
        server.stop()
    path.write_text("fallback_after: never\n" + config_text().replace("fallback_after: 20m", "fallback_after: never")
                    .replace("fallback_after: 0", "fallback_after: never"))
    assert Daemon(str(path)).start_deferrals() is None


def test_listener_port_taken_the_milter_still_starts(tmp_path, caplog):
    from routemilter.daemon import Daemon

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "rm.yaml"
        path.touch(mode=0o600)  # it holds SRS secrets: others must not read it
        path.write_text(config_text().replace("  reinject: 127.0.0.1:10026",
                                              f"  reinject: 127.0.0.1:10026\n  deferral_listen: 127.0.0.1:{port}"))
        with caplog.at_level("ERROR", logger="routemilter"):
            assert Daemon(str(path)).start_deferrals() is None
    assert f"deferrals: cannot listen on 127.0.0.1:{port}" in caplog.text
