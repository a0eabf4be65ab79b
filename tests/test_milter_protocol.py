"""The daemon on the wire: `routemilter run` driven by an MTA-side client.

Every action the milter takes is asserted as the MTA receives it (addrcpt,
delrcpt, chgfrom, inserted headers, replies), and the DKIM signatures are
verified with dkimpy against the published keys.
"""

from __future__ import annotations

import signal
import socket
import struct
import time
from pathlib import Path

import dkim
import pytest
from miltertest import constants as mc

from mtaclient import MTA, Daemon
from routemilter.config import SRSSettings
from routemilter.srs import SenderRewriter
from testkit import SRS_SECRET, write_config

SECRET = SRS_SECRET
CONFIG = """
server_name: mx.family.test
milter:
  socket: unix:{socket}
  socket_mode: "0600"
srs:
  domain: fwd.family.test
  secrets: ["{secret}"]
dkim:
  domain: family.test
  keys:
    - selector: rsa1
      key: {rsa}
    - selector: ed1
      key: {ed}
domains:
  family.test:
    subdomain_addressing: true
rules:
  - name: me
    addresses: [me@family.test]
    to:
      - address: me@gmail.test
        fallback: [me@outlook.test]
  - name: parents
    addresses: [parents@family.test]
    to: [mum@gmail.test, me@gmail.test]
  - name: old
    addresses: [old@family.test]
    refuse:
      code: 550
      status: 5.1.6
      text: |
        This address has moved.
        Please write to me@family.test instead.
  - name: void
    addresses: [void@family.test]
    discard: true
  - name: shops
    patterns: ['shop-.*@family\\.test']
    to: [me@outlook.test]
"""

MESSAGE_HEADERS = [
    ("From", "Alice <alice@sender.test>"),
    ("To", "me@family.test"),
    ("Subject", "Hello\n\tfolded subject"),
    ("Date", "Mon, 23 Nov 2026 10:00:00 +0000"),
    ("Message-ID", "<1@sender.test>"),
]
BODY = "Hi,\r\nthis is a test.\r\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, dkim_keys):
    d = tmp_path_factory.mktemp("milter")
    txt = {"rsa1": dkim_keys.rsa_txt, "ed1": dkim_keys.ed25519_txt}
    sock = d / "rm.sock"
    cfg = write_config(d, CONFIG.format(socket=sock, secret=SECRET, rsa=dkim_keys.rsa, ed=dkim_keys.ed25519))
    daemon = Daemon(cfg, sock).start()
    yield daemon, txt, cfg
    assert daemon.stop() == 0


@pytest.fixture
def mta(setup):
    client = MTA(str(setup[0].socket_path))
    yield client
    client.close()


def dns_for(txt):
    def lookup(name, timeout=5):
        selector = name.decode().split("._domainkey.")[0]
        return ("v=DKIM1; " + txt[selector].split("v=DKIM1; ", 1)[-1]).encode() if selector in txt else None
    return lookup


def delivered(outcome, headers=MESSAGE_HEADERS, body=BODY) -> bytes:
    """The message as the destination will see it: our headers on top."""
    lines = [f"{n}: {v}".replace("\n", "\r\n") for n, v in outcome.headers]
    lines += [f"{n}: {v}".replace("\n", "\r\n") for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def test_negotiates_only_what_it_needs(mta):
    # Callbacks switched off and no-reply bits: the MTA does not wait needlessly. These are
    # the bits libmilter really sent back (pymilter's own negotiate() can fall back to
    # "everything" silently): MAIL FROM, headers and body without a reply ...
    for bit in (mc.SMFIP_NOCONNECT, mc.SMFIP_NOHELO, mc.SMFIP_NODATA, mc.SMFIP_NOEOH, mc.SMFIP_NOUNKNOWN,
                mc.SMFIP_NR_MAIL, mc.SMFIP_NR_HDR, mc.SMFIP_NR_BODY):
        assert mta.protocol & bit, hex(bit)
    # ... but MAIL, RCPT (answered: refusals), headers and body (DKIM) are sent.
    assert not mta.protocol & (mc.SMFIP_NOMAIL | mc.SMFIP_NORCPT | mc.SMFIP_NOHDRS | mc.SMFIP_NOBODY)
    assert not mta.protocol & mc.SMFIP_NR_RCPT
    for action in (mc.SMFIF_ADDHDRS, mc.SMFIF_ADDRCPT, mc.SMFIF_DELRCPT, mc.SMFIF_CHGFROM):
        assert mta.actions & action
    assert not mta.actions & mc.SMFIF_CHGBODY  # never touches the body


def test_asks_only_for_the_queue_id_macro(setup):
    # The OPTNEG reply lists, per stage, the macros the MTA is to send (smfi_setsymlist):
    # "i" everywhere, so Postfix sends none of its default macros.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(setup[0].socket_path))
        sock.sendall(struct.pack(">IcIII", 13, b"O", 6, mc.SMFI_V6_ACTS, mc.SMFI_V6_PROT))
        (length,) = struct.unpack(">I", recv_exactly(sock, 4))
        reply = recv_exactly(sock, length)
    assert reply[:1] == b"O"
    _version, actions, _protocol = struct.unpack(">III", reply[1:13])
    assert actions & mc.SMFIF_SETSYMLIST
    lists, rest = {}, reply[13:]
    while rest:
        (stage,), (names, _, rest) = struct.unpack(">I", rest[:4]), rest[4:].partition(b"\0")
        lists[stage] = names
    assert lists == {stage: b"i" for stage in range(7)}  # SMFIM_CONNECT .. SMFIM_EOH


def test_transaction_aborted_by_rset_is_logged(setup, mta):
    # The daemon registers no abort callback (daemon.py): the open transaction is logged
    # as aborted at the next MAIL FROM, and that next message is routed normally.
    daemon = setup[0]
    mta.conn._send(mc.SMFIC_MAIL, args=["<rset@sender.test>"])
    assert mta.conn.send_ar(mc.SMFIC_RCPT, args=["<me@family.test>"])[0] == mc.SMFIR_CONTINUE
    mta.conn._send(mc.SMFIC_ABORT)
    out = mta.message("<after-rset@sender.test>", ["<parents@family.test>"], MESSAGE_HEADERS, BODY)
    assert out.final == mc.SMFIR_CONTINUE and sorted(out.added) == ["<me@gmail.test>", "<mum@gmail.test>"]
    daemon.wait_log("from=<after-rset@sender.test>")
    (line,) = [ln for ln in daemon.log_text().splitlines() if "from=<rset@sender.test>" in ln]
    assert "outcome=aborted" in line and "me@family.test" in line


def recv_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def test_routes_rewrites_sender_and_signs(setup, mta):
    _, txt, _ = setup
    out = mta.message("<alice@sender.test>", ["<me@family.test>"], MESSAGE_HEADERS, BODY)
    assert out.rcpt_replies["<me@family.test>"][0] == mc.SMFIR_CONTINUE
    assert out.final == mc.SMFIR_CONTINUE
    assert out.deleted == ["<me@family.test>"]
    assert out.added == ["<me@gmail.test>"]
    assert out.new_sender.startswith("<SRS0=") and out.new_sender.endswith("@fwd.family.test>")
    rewriter = SenderRewriter(SRSSettings("fwd.family.test", (SECRET.encode(),)))
    assert rewriter.reverse(out.new_sender.strip("<>")) == "alice@sender.test"
    names = [n for n, _ in out.headers]
    assert names.count("DKIM-Signature") == 2 and "X-Routemilter" in names
    message = delivered(out)
    sigs = [v for n, v in out.headers if n == "DKIM-Signature"]
    assert any("a=rsa-sha256" in s for s in sigs) and any("a=ed25519-sha256" in s for s in sigs)
    # dkim.verify checks the first signature; check each by putting it first.
    for sig in sigs:
        one = f"DKIM-Signature: {sig}".replace("\n", "\r\n").encode() + b"\r\n"
        rest = delivered(type(out)(headers=[h for h in out.headers if h[0] != "DKIM-Signature"]))
        assert dkim.verify(one + rest, dnsfunc=dns_for(txt)), sig
    tampered = message.replace(b"this is a test", b"this is a TEST")
    assert not dkim.verify(tampered, dnsfunc=dns_for(txt))


def test_fan_out_without_duplicates(mta):
    # parents -> mum + me@gmail; me -> me@gmail: me@gmail must be added once.
    out = mta.message("<alice@sender.test>", ["<parents@family.test>", "<me@family.test>"], MESSAGE_HEADERS, BODY)
    assert sorted(out.deleted) == ["<me@family.test>", "<parents@family.test>"]
    assert sorted(out.added) == ["<me@gmail.test>", "<mum@gmail.test>"]


def test_plus_and_subdomain_addressing_route(mta):
    out = mta.message("<alice@sender.test>", ["<ME+shop@Family.Test>", "<anything@me.family.test>"],
                      MESSAGE_HEADERS, BODY)
    assert sorted(out.deleted) == ["<ME+shop@Family.Test>", "<anything@me.family.test>"]
    assert out.added == ["<me@gmail.test>"]


def test_unknown_recipient_refused_at_rcpt(mta):
    out = mta.message("<alice@sender.test>", ["<nobody@family.test>"], MESSAGE_HEADERS, BODY)
    cmd, text = out.rcpt_replies["<nobody@family.test>"]
    assert cmd == mc.SMFIR_REPLYCODE and text.startswith("550 5.1.1")
    assert out.final is None  # nothing accepted: no DATA


def test_rule_refusal_multiline_text(mta):
    out = mta.message("<alice@sender.test>", ["<old@family.test>", "<me@family.test>"], MESSAGE_HEADERS, BODY)
    cmd, text = out.rcpt_replies["<old@family.test>"]
    assert cmd == mc.SMFIR_REPLYCODE
    assert text.startswith("550-5.1.6 This address has moved.\r\n550 5.1.6 Please write to")
    assert out.added == ["<me@gmail.test>"]  # the other recipient still goes through


def test_other_domains_untouched(mta):
    out = mta.message("<alice@sender.test>", ["<bob@elsewhere.test>"], MESSAGE_HEADERS, BODY)
    assert out.final == mc.SMFIR_CONTINUE
    assert (out.added, out.deleted, out.new_sender, out.headers) == ([], [], None, [])


def test_mixed_recipients_keep_the_foreign_one(mta):
    out = mta.message("<alice@sender.test>", ["<bob@elsewhere.test>", "<shop-1@family.test>"], MESSAGE_HEADERS, BODY)
    assert out.deleted == ["<shop-1@family.test>"] and out.added == ["<me@outlook.test>"]


def test_discard_only_recipient_discards(mta):
    out = mta.message("<alice@sender.test>", ["<void@family.test>"], MESSAGE_HEADERS, BODY)
    assert out.final == mc.SMFIR_DISCARD


def test_discard_beside_routed_deletes_only_it(mta):
    out = mta.message("<alice@sender.test>", ["<void@family.test>", "<me@family.test>"], MESSAGE_HEADERS, BODY)
    assert out.final == mc.SMFIR_CONTINUE
    assert sorted(out.deleted) == ["<me@family.test>", "<void@family.test>"]
    assert out.added == ["<me@gmail.test>"]


def test_own_trace_header_is_a_loop(mta):
    headers = [("X-Routemilter", "mx.family.test; rules=me")] + MESSAGE_HEADERS
    out = mta.message("<alice@sender.test>", ["<me@family.test>"], headers, BODY)
    assert out.final == mc.SMFIR_REPLYCODE and out.final_text.startswith("554 5.4.6")
    assert out.added == [] and out.deleted == []


def test_null_sender_is_not_rewritten(mta):
    out = mta.message("<>", ["<me@family.test>"], MESSAGE_HEADERS, BODY)
    assert out.new_sender is None and out.added == ["<me@gmail.test>"]


def test_bounce_to_srs_address_goes_back_to_sender(mta):
    first = mta.message("<alice@sender.test>", ["<me@family.test>"], MESSAGE_HEADERS, BODY)
    srs_address = first.new_sender
    bounce = mta.message("<>", [srs_address], [("From", "MAILER-DAEMON@gmail.test"), ("Subject", "failure")],
                         "bounce\r\n")
    assert bounce.deleted == [srs_address] and bounce.added == ["<alice@sender.test>"]
    assert bounce.new_sender is None  # bounces keep their null sender


def test_forged_srs_address_refused(mta):
    forged = "<SRS0=AAAAAAAA=AB=sender.test=alice@fwd.family.test>"
    out = mta.message("<>", [forged], MESSAGE_HEADERS, BODY)
    cmd, text = out.rcpt_replies[forged]
    assert cmd == mc.SMFIR_REPLYCODE and text.startswith("550 5.1.1")


def test_logs_one_line_per_message_with_queue_id(setup, mta):
    daemon = setup[0]
    mta.message("<alice@sender.test>", ["<me@family.test>"], MESSAGE_HEADERS, BODY, queue_id="QLOG123")
    daemon.wait_log("queue_id=QLOG123")
    lines = [line for line in daemon.log_text().splitlines() if "queue_id=QLOG123" in line]
    assert len(lines) == 1
    assert "from=<alice@sender.test>" in lines[0] and "me@family.test->me:me@gmail.test" in lines[0]
    assert "outcome=accept" in lines[0] and "dkim=rsa1,ed1" in lines[0]


def test_reload_applies_good_config_and_keeps_old_on_bad(setup):
    daemon, _, cfg = setup
    original = cfg.read_text()
    try:
        cfg.write_text(original.replace("to: [me@outlook.test]", "to: [other@outlook.test]"))
        daemon.signal(signal.SIGUSR1)
        daemon.wait_log("reloaded")
        client = MTA(str(daemon.socket_path))
        assert client.message("<a@sender.test>", ["<shop-2@family.test>"], MESSAGE_HEADERS, BODY).added == [
            "<other@outlook.test>"]
        client.close()
        cfg.write_text(original.replace("domains:", "domains: [broken"))
        daemon.signal(signal.SIGUSR1)
        daemon.wait_log("reload refused")
        client = MTA(str(daemon.socket_path))
        assert client.message("<a@sender.test>", ["<shop-3@family.test>"], MESSAGE_HEADERS, BODY).added == [
            "<other@outlook.test>"]
        client.close()
    finally:
        cfg.write_text(original)
        daemon.signal(signal.SIGUSR1)
        time.sleep(0.5)


def test_sigterm_stops_promptly_with_an_open_connection(tmp_path, setup):
    _, _, cfg = setup
    sock = tmp_path / "other.sock"
    cfg2 = tmp_path / "routemilter.yaml"
    cfg2.write_text(cfg.read_text().replace(str(setup[0].socket_path), str(sock)))
    daemon = Daemon(cfg2, sock).start()
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.connect(str(sock))  # an MTA connection that never says anything
    try:
        started = time.monotonic()
        assert daemon.stop(timeout=15) == 0
        assert time.monotonic() - started < 10
        assert not sock.exists()
    finally:
        held.close()


def test_inet_socket_works_too(tmp_path, setup):
    _, _, cfg = setup
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    cfg2 = tmp_path / "routemilter.yaml"
    cfg2.write_text(cfg.read_text().replace(f"unix:{setup[0].socket_path}", f"inet:{port}@127.0.0.1"))
    daemon = Daemon(cfg2, Path(f"inet:{port}")).start()
    try:
        client = MTA(("127.0.0.1", port))
        out = client.message("<alice@sender.test>", ["<me@family.test>"], MESSAGE_HEADERS, BODY)
        client.close()
        assert out.added == ["<me@gmail.test>"] and out.deleted == ["<me@family.test>"]
    finally:
        assert daemon.stop() == 0
