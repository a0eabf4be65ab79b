"""The harness itself: real Postfix (container or host mode) to fake MX hosts.

Run: ROUTEMILTER_IT_MODE=host|container pytest -m integration integration/
This file doubles as the test milter: `python test_harness.py milter SOCKET ADDR...`.
"""
import os
import re
import subprocess
import sys
import time

import pytest

from fakemx import RATE_LIMITED

pytestmark = pytest.mark.integration

MESSAGE_HEAD = (b"From: Alice <alice@src.test>\r\n"
                b"To: Bob <bob@gmail.test>\r\n"
                b"Subject: harness check\r\n"
                b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
                b"Message-ID: <harness-1@src.test>\r\n"
                b"MIME-Version: 1.0\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n"
                b"\r\n")


def message(body_lines=3):
    """Headers Postfix would otherwise add are present, so only Received: differs.
    The body has 8-bit text, leading dots, trailing blanks and long lines."""
    line = "Grüße, naïve café ☃ — ".encode() * 20                      # ~560 bytes
    body = b"".join(b"%d %s\r\n.leading dot\r\n..two dots\r\ntrailing  \t\r\n" % (i, line)
                    for i in range(body_lines))
    return MESSAGE_HEAD + body + b"From the end\r\n.\r\n"        # a lone "." line


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """(leading Received: header block, rest)."""
    m = re.match(rb"(?:Received:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)+", data)
    return (m.group(0), data[m.end():]) if m else (b"", data)


def test_relay_byte_identical(make_mx, make_postfix):
    mx = make_mx("gmail")
    pf = make_postfix(routes={"gmail.test": mx})
    data = message(body_lines=2000)                                 # ~1.2 MB
    r = pf.send("alice@src.test", ["bob@gmail.test"], data)
    assert r.accepted, r
    [got] = mx.wait_for(1, timeout=30)
    received, rest = split_received(got.data)
    assert received.count(b"Received:") == 1
    assert rest == data
    assert got.rcpt_tos == ["bob@gmail.test"] and got.mail_from == "alice@src.test"
    assert "BODY=8BITMIME" in got.mail_options
    pf.wait_queue_empty(10)
    assert r.queue_id in pf.queue_ids_from_log()


def test_rate_limited_goes_to_fallback_relay_once(make_mx, make_postfix):
    direct = make_mx("gmail")                                       # 127.0.0.2
    direct.set_reply("*", RATE_LIMITED)
    make_mx("spare")                                                # 127.0.0.3 unused
    relay = make_mx("relay")                                        # 127.0.0.4
    assert relay.host == "127.0.0.4"
    pf = make_postfix(
        maps={"transport": f"gmail.test rm_fb:[{direct.host}]:{direct.port}\n"},
        master_extra=(f"rm_fb unix - - n - - smtp\n"
                      f"  -o smtp_fallback_relay=[{relay.host}]:{relay.port}\n"))
    r = pf.send("alice@src.test", ["bob@gmail.test"], message())
    assert r.accepted, r
    relay.wait_for(1, timeout=20)
    pf.wait_queue_empty(15)          # gone from the queue: no later retry can happen
    assert [m.rcpt_tos for m in relay.messages] == [["bob@gmail.test"]]
    assert direct.messages == []
    assert direct.rcpt_log and direct.rcpt_log[0][1] == RATE_LIMITED
    [d] = [d for d in pf.deliveries() if d["status"] == "sent"]
    assert d["relay"].startswith("127.0.0.4[")


@pytest.fixture
def fanout_milter(it_workdir):
    """Start this file as a milter that replaces every recipient with `adds`."""
    procs = []

    def start(*adds):
        sock = os.path.join(it_workdir, "milter", "fanout.sock")
        os.makedirs(os.path.dirname(sock), mode=0o755, exist_ok=True)
        p = subprocess.Popen([sys.executable, __file__, "milter", sock, *adds])
        procs.append(p)
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert p.poll() is None, "milter exited"
            assert time.monotonic() < deadline, "milter socket did not appear"
            time.sleep(0.05)
        return sock

    yield start
    for p in procs:
        p.kill()                     # pymilter ignores SIGTERM with live connections
        p.wait(timeout=10)


def test_milter_fans_out(make_mx, make_postfix, fanout_milter):
    gmail, outlook, family = make_mx("gmail"), make_mx("outlook"), make_mx("family")
    sock = fanout_milter("<anna@gmail.test>", "<ben@outlook.test>")
    pf = make_postfix(milter_socket=sock, routes={
        "gmail.test": gmail, "outlook.test": outlook, "family.test": family})
    data = message()
    r = pf.send("alice@src.test", ["kids@family.test"], data)
    assert r.accepted, r
    gmail.wait_for(1, timeout=20)
    outlook.wait_for(1, timeout=20)
    pf.wait_queue_empty(15)
    assert [m.rcpt_tos for m in gmail.messages] == [["anna@gmail.test"]]
    assert [m.rcpt_tos for m in outlook.messages] == [["ben@outlook.test"]]
    assert family.messages == [] and family.rcpt_log == []
    assert split_received(gmail.messages[0].data)[1] == data


def test_milter_down_tempfails(it_workdir, make_mx, make_postfix):
    mx = make_mx("gmail")
    absent = os.path.join(it_workdir, "milter", "absent.sock")
    os.makedirs(os.path.dirname(absent), mode=0o755, exist_ok=True)
    pf = make_postfix(milter_socket=absent, routes={"gmail.test": mx})
    r = pf.send("alice@src.test", ["bob@gmail.test"], message())
    assert not r.accepted, r
    failure = r.first_failure()
    assert failure and 400 <= failure[1] < 500, r
    pf.wait_queue_empty(5)
    time.sleep(1)
    assert mx.messages == [] and mx.rcpt_log == []


def test_fault_modes_defer_then_deliver(make_mx, make_postfix):
    """reset and hang make Postfix defer; fast retries deliver once the MX heals."""
    mx = make_mx("gmail", hang_seconds=10)
    mx.set_mode("reset")
    pf = make_postfix(routes={"gmail.test": mx})
    r = pf.send("alice@src.test", ["bob@gmail.test"], message())
    assert r.accepted, r
    pf.wait_log(r"status=deferred \(lost connection .* initial server greeting", timeout=15)
    mx.set_mode("hang")
    pf.wait_log(r"status=deferred \(conversation .* timed out while receiving the "
                r"initial server greeting", timeout=20)          # smtp_helo_timeout 5s
    mx.set_mode("normal")
    mx.wait_for(1, timeout=20)
    pf.wait_queue_empty(10)
    assert len(mx.messages) == 1


def test_smtputf8_address_reaches_mx(make_mx, make_postfix):
    mx = make_mx("gmail")
    pf = make_postfix(routes={"gmail.test": mx})
    r = pf.send("älice@src.test", ["bøb@gmail.test"], message())
    assert r.accepted, r
    [got] = mx.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["bøb@gmail.test"] and got.mail_from == "älice@src.test"
    assert "SMTPUTF8" in got.mail_options


def run_milter(sock, adds):
    import Milter

    class FanOut(Milter.Base):
        def __init__(self):
            self.rcpts = []

        def envrcpt(self, to, *params):
            self.rcpts.append(to)
            return Milter.CONTINUE

        def eom(self):
            for r in self.rcpts:
                self.delrcpt(r)
            for a in adds:
                self.addrcpt(a)
            return Milter.ACCEPT

    os.umask(0)                       # socket must be writable by the postfix user
    Milter.factory = FanOut
    Milter.set_flags(Milter.ADDRCPT | Milter.DELRCPT)
    Milter.runmilter("fanout", "unix:" + sock, timeout=60)


if __name__ == "__main__" and sys.argv[1:2] == ["milter"]:
    run_milter(sys.argv[2], sys.argv[3:])
