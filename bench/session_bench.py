#!/usr/bin/env python3
"""The milter's Python cost per message, without an MTA or sockets.

Drives `session.Session` exactly as the daemon's libmilter callbacks do
(negotiate_callback, envfrom_bytes, envrcpt_bytes, header_bytes, body, eom,
close_callback) with a fake milterContext, for the bench's message (7 header
fields, 4 KiB body, one recipient fanned out to two), and reports the median
CPU microseconds per message in each configuration. Only the callbacks the
negotiation leaves on are called, as libmilter would. The mail log goes to
a file, as in the daemon.

    .venv/bin/python bench/session_bench.py [--messages 3000] [--reps 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import Milter

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # testkit: the tests' fake milter context

from results import write_section
from routemilter.daemon import setup_logging
from routemilter.policy import Policy, PolicyHolder
from routemilter.session import Session
from testkit import FakeCtx, make_dkim_keys

YAML = """\
server_name: mx.bench.test
milter:
  socket: unix:{dir}/rm.sock
srs:
  domain: fwd.bench.test
  secrets: ["bench-secret-0123456789abcdef"]
{dkim}domains:
  mydomain.net: {{}}
rules:
  - name: family
    addresses: [family@mydomain.net]
    to: [email1@gmail.com, email2@gmail.com]
"""
HEADERS = [
    (b"From", b"Sender <sender@src.test>"), (b"To", b"Family <family@mydomain.net>"),
    (b"Subject", b"benchmark message"), (b"Date", b"Mon, 23 Nov 2026 12:00:00 +0000"),
    (b"Message-ID", b"<bench.1@src.test>"), (b"MIME-Version", b"1.0"),
    (b"Content-Type", b"text/plain; charset=us-ascii"),
]
BODY = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n" * 55


def one_message(holder_factory) -> int:
    ctx = FakeCtx("4ABCDEF")
    opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
    Milter.negotiate_callback(ctx, opts)  # creates the Session, as libmilter does
    protocol = opts[1]
    m = ctx.getpriv()
    m.envfrom_bytes(b"<sender@src.test>")
    m.envrcpt_bytes(b"<family@mydomain.net>")
    if not protocol & Milter.P_NOHDRS:
        for name, value in HEADERS:
            m.header_bytes(name.decode(), value)
    if not protocol & Milter.P_NOEOH:
        m.eoh()
    if not protocol & Milter.P_NOBODY:
        m.body(BODY)
    rc = m.eom()
    assert rc == Milter.CONTINUE, rc
    Milter.close_callback(ctx)
    return ctx.changes


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1500)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rmsess-"))
    keys = make_dkim_keys(work)
    configs = {
        "routing + SRS": "",
        "+ DKIM RSA-2048": keys.section("mydomain.net"),
        "+ DKIM RSA-2048 + ed25519": keys.section("mydomain.net", ed25519="ed"),
    }
    holders = {}
    for name, dkim in configs.items():
        path = work / f"{len(holders)}.yaml"
        path.write_text(YAML.format(dir=work, dkim=dkim))
        holders[name] = PolicyHolder(Policy.load(str(path)))
    with open(work / "mail.log", "w") as log:
        setup_logging("INFO")
        handler = logging.getLogger().handlers[0]
        previous = handler.setStream(log)
        results = {name: [] for name in configs}
        for _ in range(args.reps):
            for name, holder in holders.items():  # interleaved
                Milter.factory = lambda holder=holder: Session(holder)
                one_message(None)
                t0 = time.process_time()
                for _ in range(args.messages):
                    one_message(None)
                results[name].append((time.process_time() - t0) / args.messages * 1e6)
        handler.setStream(previous)  # the next benchmark in this process logs to stderr again
    lines = [f"Session callbacks, CPU per message (median of {args.reps} x {args.messages}, one thread, "
             f"no MTA; the mail log written to a file):", "",
             "| setup | µs per message |", "|---|---:|"]
    for name, values in results.items():
        lines.append(f"| {name} | {statistics.median(values):.0f} |")
    for f in work.iterdir():
        f.unlink()
    os.rmdir(work)
    text = "\n".join(lines) + "\n"
    write_section("session_bench", "Milter callbacks in-process (Python cost per message)", text)
    return text


if __name__ == "__main__":
    sys.stdout.write(main())
