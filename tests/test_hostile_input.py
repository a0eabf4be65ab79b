"""Hostile input on the milter wire: the real daemon, driven the way an MTA would.

Each test sends something an attacker (or a broken client passed through by a
lenient MTA) can put in front of routemilter, and checks three things: the
daemon keeps running, the SMTP answer is the right one, and the log says what
happened in one readable line. Postfix filters some of these before the milter
sees them; Sendmail and others filter less, so the milter must not depend on it.
"""

from __future__ import annotations

import socket
import time

import pytest
from miltertest import codec
from miltertest import constants as mc

from mtaclient import MTA, Daemon
from testkit import SRS_SECTION, write_config

CONFIG = """
server_name: mx.family.test
milter:
  socket: unix:{dir}/rm.sock
  socket_mode: "0600"
{srs}{dkim}domains:
  family.test:
    catch_all:
      to: [catch@gmail.test]
rules:
  - name: me
    addresses: [me@family.test]
    to: [me@gmail.test]
"""
HEADERS = [("From", "Alice <alice@sender.test>"), ("To", "me@family.test"), ("Subject", "hostile")]
SENDER = "<alice@sender.test>"
CONTINUE, REPLY = mc.SMFIR_CONTINUE, mc.SMFIR_REPLYCODE


def _encode_str(value: str) -> bytes:
    # What an MTA really sends for invalid UTF-8: the raw bytes (pymilter turns them
    # into lone surrogates with errors='surrogateescape'; we turn them back).
    return f"{value}\0".encode("utf-8", "surrogateescape")


def _encode_buf(value) -> bytes:
    # mtaclient hands the body over as latin-1 text: send those bytes, not UTF-8.
    return value.encode("latin-1") if isinstance(value, str) else bytes(value)


@pytest.fixture(autouse=True)
def raw_bytes_codec(monkeypatch):
    monkeypatch.setattr(codec, "encode_str", _encode_str)
    monkeypatch.setitem(codec.codectypes, "str", (_encode_str, codec.codectypes["str"][1]))
    monkeypatch.setitem(codec.codectypes, "buf", (_encode_buf, codec.codectypes["buf"][1]))


def start_daemon(d, dkim_keys):
    cfg = write_config(d, CONFIG.format(dir=d, srs=SRS_SECTION, dkim=dkim_keys.section(rsa="rsa", ed25519="ed")))
    return Daemon(cfg, d / "rm.sock").start()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, dkim_keys):
    daemon = start_daemon(tmp_path_factory.mktemp("hostile"), dkim_keys)
    yield daemon
    assert daemon.proc.poll() is None, "the daemon died during the hostile-input tests:\n" + daemon.log_text()
    assert daemon.stop() == 0


def send(daemon, sender, rcpts, headers=HEADERS, body="hi\r\n", queue_id="HOSTILE"):
    mta = MTA(str(daemon.socket_path), timeout=120)
    try:
        return mta.message(sender, rcpts, headers, body, queue_id=queue_id)
    finally:
        mta.close()


def log_lines(daemon, marker):
    daemon.wait_log(marker)
    return [line for line in daemon.log_text().splitlines() if marker in line]


def alive(daemon):
    """The daemon still routes a plain message."""
    out = send(daemon, SENDER, ["<me@family.test>"], queue_id="ALIVECHECK")
    assert out.final == CONTINUE and out.added == ["<me@gmail.test>"], daemon.log_text()[-2000:]
    assert daemon.proc.poll() is None


# ------------------------------------------------------------------ addresses


@pytest.mark.parametrize("rcpt, why", [
    ("<family.test>", "no @"),
    ("<me@>", "empty domain"),
    ("<@family.test>", "empty local part"),
    ("<me@family..test>", "empty label"),
    ("<me@-family.test>", "label starts with -"),
    ("<a b@family.test>", "unquoted space"),
    ("<a\x01b@family.test>", "control character"),
    ("<\"unbalanced@family.test>", "unbalanced quote"),
    ("<" + "a" * 65 + "@family.test>", "local part over 64"),
    ("<me@" + "a" * 64 + ".test>", "label over 63"),
    ("<" + "a" * 5000 + "@family.test>", "5000 characters"),
    ("<me@family.test\nX-Injected: yes>", "newline: log and header injection attempt"),
])
def test_malformed_recipient_refused_553(daemon, rcpt, why):
    before = daemon.log_text().count("refused:553")
    out = send(daemon, SENDER, [rcpt])
    cmd, text = out.rcpt_replies[rcpt]
    assert cmd == REPLY and text.startswith("553 5.1.3"), (why, text)
    assert "\n" not in text and "\r" not in text and "X-Injected" not in text
    assert out.final is None  # no accepted recipient: the MTA never gets to DATA
    deadline = time.monotonic() + 10
    while daemon.log_text().count("refused:553") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in daemon.log_text().splitlines() if "refused:553" in line]
    assert len(lines) > before, daemon.log_text()[-2000:]
    assert not any(line.startswith("X-Injected") for line in daemon.log_text().splitlines())
    assert all(len(line) < 20000 for line in lines)


def test_invalid_utf8_recipient_refused_not_tempfailed_forever(daemon):
    # pymilter hands invalid UTF-8 over as lone surrogates; delrcpt() cannot send
    # them back, so routing it used to tempfail at end of message on every retry.
    rcpt = "<x\udcff\udcfe@family.test>"
    out = send(daemon, SENDER, [rcpt, "<me@family.test>"], queue_id="NOTUTF8R")
    cmd, text = out.rcpt_replies[rcpt]
    assert cmd == REPLY and text.startswith("553 5.1.3") and "UTF-8" in text
    assert out.final == CONTINUE and out.added == ["<me@gmail.test>"]  # the good one still goes
    (line,) = log_lines(daemon, "queue_id=NOTUTF8R")
    assert "\\udcff" in line and "refused:553" in line  # escaped, and the line was written
    assert "Logging error" not in daemon.log_text()
    alive(daemon)


def test_invalid_utf8_sender_forwarded_without_srs(daemon):
    out = send(daemon, "<bad\udcff@sender.test>", ["<me@family.test>"], queue_id="NOTUTF8S")
    assert out.final == CONTINUE, out.final_text
    assert out.added == ["<me@gmail.test>"] and out.deleted == ["<me@family.test>"]
    assert out.new_sender is None  # cannot be put into an SRS address: original sender kept
    (line,) = log_lines(daemon, "queue_id=NOTUTF8S")
    assert "srs=skipped:sender-not-utf8" in line and "outcome=accept" in line


def test_smtputf8_addresses_are_routed(daemon):
    out = send(daemon, "<jörg@absender.test>", ["<jöe@family.test>", "<me@family.test>"], queue_id="UTF8OK")
    assert out.rcpt_replies["<jöe@family.test>"][0] == CONTINUE
    assert out.final == CONTINUE
    assert sorted(out.added) == ["<catch@gmail.test>", "<me@gmail.test>"]
    assert out.new_sender.startswith("<SRS0=") and "jörg@fwd.family.test" in out.new_sender
    (line,) = log_lines(daemon, "queue_id=UTF8OK")
    assert "jöe@family.test->catch-all@family.test" in line


def test_quoted_local_parts(daemon):
    out = send(daemon, '<"alice smith"@sender.test>', ['<"me too"@family.test>'], queue_id="QUOTED")
    assert out.final == CONTINUE
    assert out.deleted == ['<"me too"@family.test>'] and out.added == ["<catch@gmail.test>"]
    assert out.new_sender is None  # a quoted local part cannot be embedded in SRS: kept as is
    (line,) = log_lines(daemon, "queue_id=QUOTED")
    assert "srs=skipped" in line


def test_null_sender_is_kept_and_mail_routed(daemon):
    out = send(daemon, "<>", ["<me@family.test>"], queue_id="NULLSENDER")
    assert out.final == CONTINUE and out.added == ["<me@gmail.test>"] and out.new_sender is None
    (line,) = log_lines(daemon, "queue_id=NULLSENDER")
    assert "from=<>" in line


def test_1200_recipients(daemon):
    rcpts = [f"<user{i}@family.test>" for i in range(1200)] + [f"<x{i}@elsewhere.test>" for i in range(50)]
    started = time.monotonic()
    out = send(daemon, SENDER, rcpts, queue_id="MANYRCPTS")
    elapsed = time.monotonic() - started
    assert all(r[0] == CONTINUE for r in out.rcpt_replies.values())
    assert out.final == CONTINUE
    assert out.added == ["<catch@gmail.test>"]  # fanned in to one destination, once
    assert sorted(out.deleted) == sorted(rcpts[:1200])  # foreign recipients untouched
    assert elapsed < 30, f"1250 recipients took {elapsed:.1f}s"
    (line,) = log_lines(daemon, "queue_id=MANYRCPTS")
    assert len(line) < 20000 and "more characters]" in line  # one bounded line, says it was cut


# -------------------------------------------------------------------- headers


@pytest.mark.parametrize("name, value", [
    ("X-Bare-LF", "a\nBcc: victim@elsewhere.test"),
    ("X-Bare-CR", "a\rBcc: victim@elsewhere.test"),
    ("X-CRLF", "a\r\nX-Injected: yes\r\n"),
    ("X-NUL", "before\x00after"),
    ("X-8bit", "\xff\xfe\x80 junk \xc3\x28"),
    ("X-\xff\xfe", "8-bit header name"),
    ("X-Long", "a" * 100 * 1024),  # Postfix's header_size_limit: over libmilter's 64 KiB default packet
])
def test_hostile_header_is_forwarded_and_signed(daemon, name, value):
    qid = f"HDR{abs(hash(name)) % 10**8}"
    out = send(daemon, SENDER, ["<me@family.test>"], headers=HEADERS + [(name, value)], queue_id=qid)
    assert out.final == CONTINUE, (name, out.final_text, daemon.log_text()[-3000:])
    assert out.added == ["<me@gmail.test>"]
    names = [n for n, _ in out.headers]
    assert names.count("DKIM-Signature") == 2, out.headers
    for _added_name, added_value in out.headers:  # what we add never carries a bare CR/LF
        assert "\r" not in added_value and all(part.startswith(("\t", " ")) for part in added_value.split("\n")[1:])
    (line,) = log_lines(daemon, f"queue_id={qid}")
    assert "outcome=accept" in line


def test_1mib_header_packet_does_not_kill_the_daemon(daemon):
    # Over libmilter's packet limit even after raising it: libmilter drops this one
    # connection (the MTA then applies milter_default_action = tempfail); the daemon
    # and every other connection carry on.
    with pytest.raises(OSError):
        send(daemon, SENDER, ["<me@family.test>"], headers=HEADERS + [("X-Huge", "a" * (1 << 20))])
    alive(daemon)


# ----------------------------------------------------------- body, connection


def test_truncated_connection_mid_data(daemon):
    mta = MTA(str(daemon.socket_path))
    c = mta.conn
    c._send(mc.SMFIC_MAIL, args=[SENDER])  # no reply: SMFIP_NR_MAIL
    assert c.send_ar(mc.SMFIC_RCPT, args=["<me@family.test>"])[0] == CONTINUE
    c.send_macro(mc.SMFIC_DATA, i="TRUNCATED")
    c._send(mc.SMFIC_HEADER, name="From", value="alice@sender.test")
    c._send(mc.SMFIC_BODY, buf="half a message, then the client vanish")
    mta.sock.shutdown(socket.SHUT_RDWR)
    mta.sock.close()
    (line,) = log_lines(daemon, "outcome=aborted")[-1:]
    assert "me@family.test" in line
    alive(daemon)


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_50mib_body_signed_with_bounded_memory(tmp_path, capsys, dkim_keys):
    daemon = start_daemon(tmp_path, dkim_keys)
    try:
        before = _hwm_kib(daemon.proc.pid)
        body = ("x" * 998 + "\r\n") * (50 * 1024 * 1024 // 1000)
        started = time.monotonic()
        out = send(daemon, SENDER, ["<me@family.test>"], body=body, queue_id="BIGBODY")
        elapsed = time.monotonic() - started
        peak = _hwm_kib(daemon.proc.pid)
        assert out.final == CONTINUE and [n for n, _ in out.headers].count("DKIM-Signature") == 2
        growth_mib = (peak - before) / 1024
        with capsys.disabled():
            print(f"\n50 MiB body: {elapsed:.1f}s, daemon peak RSS {peak / 1024:.0f} MiB "
                  f"(+{growth_mib:.0f} MiB over idle {before / 1024:.0f} MiB)")
        # The body is buffered for DKIM (dkimpy signs whole messages): about three
        # copies at the peak. Four (as before) would put two such messages over
        # the unit's MemoryMax=512M.
        assert growth_mib < 3.6 * 50, f"peak grew by {growth_mib:.0f} MiB for a 50 MiB body"
        (line,) = log_lines(daemon, "queue_id=BIGBODY")
        assert "dkim=rsa,ed" in line
    finally:
        assert daemon.stop() == 0
