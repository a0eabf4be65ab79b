#!/usr/bin/env python3
"""Large messages through the real daemon: memory for a 50 MiB message, time for 1,000 recipients.

Runs `routemilter run` (routing + SRS + DKIM RSA-2048 + ed25519, so the body is
needed) on a unix socket and speaks the milter protocol to it as Postfix does
(tests/mtaclient.py: 64 KiB body chunks). Reports the daemon's RSS before the
message, its peak RSS during it (VmHWM, reset just before) and the increase,
against the target: the increase stays under one message size. Then one
message with 1,000 recipients, each routed by its own rule to its own
destination (1,000 DELRCPT + 1,000 ADDRCPT at end of message).

    .venv/bin/python bench/bigmsg_bench.py [--mib 50] [--recipients 1000]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

sys.path.insert(0, str(HERE))

from mtaclient import MTA, Daemon  # noqa: E402
from results import write_section  # noqa: E402

FAILED: list[str] = []  # targets missed in the last run (bench/run.py reports them)

from routemilter.signing import generate_key  # noqa: E402

CONFIG = """\
server_name: mx.bench.test
milter:
  socket: unix:{socket}
  socket_mode: "0600"
srs:
  domain: fwd.bench.test
  secrets: ["bench-secret-0123456789abcdef"]
dkim:
  domain: mydomain.net
  keys:
    - selector: rsa
      key: {dir}/rsa.key
    - selector: ed
      key: {dir}/ed.key
domains:
  mydomain.net: {{}}
rules:
  - name: family
    addresses: [family@mydomain.net]
    to: [email1@gmail.com, email2@gmail.com]
{more}"""
HEADERS = [("From", "Sender <sender@src.test>"), ("To", "Family <family@mydomain.net>"),
           ("Subject", "big"), ("Message-ID", "<big.1@src.test>"), ("Date", "Mon, 23 Nov 2026 12:00:00 +0000")]


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=50)
    p.add_argument("--recipients", type=int, default=1000)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rmbig-"))
    generate_key("rsa", str(work / "rsa.key"))
    generate_key("ed25519", str(work / "ed.key"))
    more = "".join(f"  - name: u{i}\n    addresses: [u{i}@mydomain.net]\n    to: [u{i}@gmail.com]\n"
                   for i in range(args.recipients))
    config = work / "routemilter.yaml"
    socket = work / "rm.sock"
    config.write_text(CONFIG.format(socket=socket, dir=work, more=more))
    daemon = Daemon(config, socket).start()
    pid = daemon.proc.pid
    out = []
    try:
        # Warm up: one small signed message, so imports and first-use allocations are done.
        mta = MTA(str(socket), timeout=120)
        mta.message("<sender@src.test>", ["<family@mydomain.net>"], HEADERS, b"hello\r\n")
        mta.close()
        line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
        body = line * (args.mib * 2**20 // len(line))
        size_kib = len(body) // 1024
        time.sleep(0.5)
        before = status_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        mta = MTA(str(socket), timeout=300)
        t0 = time.monotonic()
        result = mta.message("<sender@src.test>", ["<family@mydomain.net>"], HEADERS, body)
        elapsed = time.monotonic() - t0
        mta.close()
        peak = status_kib(pid, "VmHWM")
        after = status_kib(pid, "VmRSS")
        signed = [v.replace("\n\t", "").replace(" ", "") for n, v in result.headers if n == "DKIM-Signature"]
        assert result.final == "c" and len(signed) == 2, result
        # The body is already in relaxed canonical form: its hash is the body hash.
        bh = "bh=" + base64.b64encode(hashlib.sha256(body).digest()).decode()
        assert all(bh in v for v in signed), (bh, signed)
        increase = peak - before
        out += [f"{args.mib} MiB message (body {mib(size_kib)} MiB, signed RSA-2048 + ed25519) through the daemon "
                f"in {elapsed:.1f} s (including the Python test client's own encoding):", "",
                "| daemon RSS before | peak during | increase | increase / message size | after |",
                "|---:|---:|---:|---:|---:|",
                f"| {mib(before)} MiB | {mib(peak)} MiB | {mib(increase)} MiB | {increase / size_kib:.2f}x "
                f"| {mib(after)} MiB |", "",
                f"Target: the increase stays under 1x the message size: "
                f"{'met' if increase < size_kib else 'NOT met'}.", ""]
        FAILED[:] = [] if increase < size_kib else [f"{args.mib} MiB message raised the daemon's RSS by "
                                                    f"{increase / size_kib:.2f}x its size (target < 1x)"]

        rcpts = [f"<u{i}@mydomain.net>" for i in range(args.recipients)]
        mta = MTA(str(socket), timeout=300)
        t0 = time.monotonic()
        result = mta.message("<sender@src.test>", rcpts, HEADERS, b"hello\r\n" * 500)
        elapsed = time.monotonic() - t0
        mta.close()
        assert result.final == "c", result
        assert len(result.added) == args.recipients and len(result.deleted) == args.recipients, \
            (len(result.added), len(result.deleted))
        out += [f"{args.recipients}-recipient message (each recipient its own rule and destination): "
                f"{elapsed * 1000:.0f} ms for the whole milter conversation "
                f"({len(result.added)} ADDRCPT + {len(result.deleted)} DELRCPT), "
                f"daemon peak RSS {mib(status_kib(pid, 'VmHWM'))} MiB."]
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(out) + "\n"
    write_section("bigmsg_bench", "Large messages through the daemon", text)
    return text


if __name__ == "__main__":
    sys.stdout.write(main())
