"""What an end-to-end test asserts about one forwarded copy.

Shared by test_seeds.py, test_relay_fallback.py, test_daemon_faults.py and
test_postfix_config_cli.py:

* `seed_message()`  a message whose bytes are easy to get wrong on the way
  (8-bit body and header, folded headers, dot lines, trailing blanks, MIME)
* `added_headers()` proves the copy is the original plus prepended headers only
* `OpenDKIM`        an independent DKIM verifier: `opendkim -t` (OpenDKIM's
  own test mode, which runs the real milter code over a file) with the public
  keys from a local `TestPublicKeys` file instead of DNS: no network needed.
* `arrivals_of()`   every (mx, recipient) that received one message, found by
  its Message-ID across every FakeMX
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time

# Header fields a forward may add on top of the original (Postfix: Received;
# routemilter: DKIM-Signature, X-Routemilter; ARC/DMARC work: the others).
ADDED_OK = {"received", "dkim-signature", "x-routemilter", "authentication-results",
            "arc-seal", "arc-message-signature", "arc-authentication-results"}
SRS0 = re.compile(r"^SRS0=[A-Za-z0-9+/]{4,}=[A-Z2-7]{2}=[^=@]+=[^@]+@fwd\.routemilter\.test$")


def seed_message(sender: str, to: str, message_id: str, subject: str = "seed test") -> bytes:
    """CRLF bytes with everything a careless forwarder would change."""
    snowman = "Grüße, naïve café ☃ — ".encode()
    head = (
        f"From: Alice Example <{sender}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: {subject} \u2603 raw UTF-8 in a header\r\n"
    ).encode() + (
        b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        + f"Message-ID: <{message_id}>\r\n".encode()
        + b"X-Folded: first part of a folded header\r\n\tsecond line, tab-indented\r\n  third line\r\n"
        + b"X-No-Space:value-without-space\r\n"
        + b"MIME-Version: 1.0\r\n"
        + b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    )
    body = (
        b"This is a MIME message.\r\n"
        b"--b1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        + snowman * 10 + b"\r\n"
        b".a line starting with a dot\r\n"
        b"..two dots\r\n"
        b"trailing blanks  \t\r\n"
        b"From the start of a line\r\n"
        b"\r\n"
        b"--b1\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n"
        b"<p>Gr=C3=BC=C3=9Fe</p>=\r\n"
        b"\r\n"
        b"--b1--\r\n"
        b"\r\n"
        b"\r\n"
    )
    return head + b"\r\n" + body


def split_headers(block: bytes) -> list[tuple[str, bytes]]:
    """[(lower-case name, raw field bytes incl. continuation lines)] of a header block."""
    fields: list[tuple[str, bytes]] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + b"\r\n" + line)
        else:
            fields.append((line.split(b":", 1)[0].decode("ascii", "replace").strip().lower(), line))
    return fields


def added_headers(received: bytes, original: bytes) -> list[str]:
    """Names of the header fields prepended to `original`; AssertionError when
    the copy is anything but those fields followed by the original's exact bytes."""
    assert received.endswith(original), (
        "headers/body were changed in transit:\n" + _first_difference(received, original))
    prefix = received[: len(received) - len(original)]
    assert prefix == b"" or prefix.endswith(b"\r\n"), f"prefix does not end a line: {prefix[-80:]!r}"
    fields = split_headers(prefix)
    assert b"".join(raw + b"\r\n" for _, raw in fields) == prefix, f"prefix is not a header block: {prefix!r}"
    return [name for name, _ in fields]


def _first_difference(received: bytes, original: bytes) -> str:
    # Align the bodies from the end: show the first line that differs.
    rl, ol = received.split(b"\r\n"), original.split(b"\r\n")
    for i in range(1, min(len(rl), len(ol)) + 1):
        if rl[-i] != ol[-i]:
            return f"line -{i}: got {rl[-i]!r}\n expected {ol[-i]!r}"
    return f"original ({len(original)} bytes) longer than the copy ({len(received)} bytes)"


def arrivals_of(mx_hosts, message_id: str) -> list[tuple[str, str, object]]:
    """(mx name, recipient, Message) for every copy of message_id at any FakeMX."""
    needle = f"Message-ID: <{message_id}>".encode().lower()
    out = []
    for mx in mx_hosts:
        for msg in list(mx.messages):
            if needle in msg.data.lower():
                out.extend((mx.name, rcpt, msg) for rcpt in msg.rcpt_tos)
    return out


def wait_arrivals(mx_hosts, message_id: str, count: int, timeout: float = 30.0):
    """Wait (bounded) until message_id reached `count` recipients in total."""
    deadline = time.monotonic() + timeout
    while True:
        got = arrivals_of(mx_hosts, message_id)
        if len(got) >= count or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def dkim_algorithms(data: bytes) -> dict[str, str]:
    """{selector: a=} of every DKIM-Signature in the message."""
    head = data.split(b"\r\n\r\n", 1)[0]
    out = {}
    for name, raw in split_headers(head):
        if name == "dkim-signature":
            flat = re.sub(rb"\s+", b"", raw.split(b":", 1)[1]).decode()
            tags = dict(t.split("=", 1) for t in flat.split(";") if "=" in t)
            out[tags.get("s", "?")] = tags.get("a", "?")
    return out


class OpenDKIM:
    """Verify with OpenDKIM (the C implementation), not dkimpy.

    `opendkim -t FILE` runs the milter's own code over a message file and, with
    -vvv, prints the Authentication-Results header it would add. The public keys
    come from `TestPublicKeys` (a file of `selector._domainkey.domain TXT-record`
    lines, documented in opendkim.conf(5) as "intended for use only during
    automated testing"), so no DNS or network is involved.
    """

    def __init__(self, workdir: str, keys: dict[str, str], domain: str):
        self.binary = shutil.which("opendkim") or "/usr/sbin/opendkim"
        if not os.path.exists(self.binary):
            raise RuntimeError("opendkim is not installed (Debian package `opendkim`); "
                               "scripts/install-deps.sh installs it")
        self.dir = tempfile.mkdtemp(prefix="odk-", dir=workdir)
        keyfile = os.path.join(self.dir, "keys")
        with open(keyfile, "w") as f:
            for selector, txt in keys.items():
                f.write(f"{selector}._domainkey.{domain} {txt}\n")
        self.conf = os.path.join(self.dir, "opendkim.conf")
        with open(self.conf, "w") as f:
            f.write(f"Mode v\nSyslog no\nTestPublicKeys {keyfile}\nAlwaysAddARHeader yes\n")
        self._n = 0

    def verify(self, data: bytes) -> dict[str, str]:
        """{selector: result} (pass, fail, ...) for every signature OpenDKIM saw."""
        self._n += 1
        path = os.path.join(self.dir, f"msg{self._n}.eml")
        with open(path, "wb") as f:
            f.write(data)
        r = subprocess.run([self.binary, "-x", self.conf, "-vvv", "-t", path],
                           capture_output=True, text=True, timeout=30)
        out = r.stdout + r.stderr
        m = re.search(r"hname='Authentication-Results' hvalue='(.*?)'", out, re.S)
        if r.returncode != 0 or not m:
            raise AssertionError(f"opendkim -t failed ({r.returncode}):\n{out}")
        results = {}
        for res in re.finditer(r"dkim=(\w+)[^;]*?header\.s=([\w.-]+)", m.group(1)):
            results[res.group(2)] = res.group(1)
        return results
