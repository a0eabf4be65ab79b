"""The time stamp in our X-Routemilter trace header: when a copy was sent, for `fallback_after`.

`t=SECONDS.MAC`, with a MAC over the time and the bounce token (the copy's
envelope sender) under the SRS secrets: a sender cannot backdate it, and a
stamp cannot be moved to another copy. The milter stamps every forward
(transaction.py), the bounce planner every fallback copy (bounces.py), and the
deferral listener reads the stamp to tell how long a copy has been deferred
(deferrals.py). Small on purpose: the milter imports it for every message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re

from . import headers

TRACE_HEADER = "X-Routemilter"  # the trace field the milter adds (transaction.py) and we read back
_MAC_LEN = 10
_STAMP = re.compile(rf"(?:^|;)\s*t=(\d{{9,11}})\.([a-z2-7]{{{_MAC_LEN}}})\s*(?=;|$)", re.IGNORECASE)


def _mac(secret: bytes, when: int, token: str) -> str:
    digest = hmac.new(secret, f"{when}={token.lower()}".encode("utf-8", "surrogateescape"),
                      hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:_MAC_LEN]


def stamp(secrets: tuple[bytes, ...], token: str, now: float) -> str:
    """`t=SECONDS.MAC` for the trace header of a copy sent with return address `token`."""
    when = math.ceil(now)  # rounded up: a copy never moves on before fallback_after
    return f"t={when}.{_mac(secrets[0], when, token)}"


def stamped_time(secrets: tuple[bytes, ...], token: str, value: str) -> int | None:
    """The time in a trace header value if its MAC matches `token`, else None."""
    m = _STAMP.search(value)
    if m is None:
        return None
    when, found = int(m.group(1)), m.group(2).lower().encode("ascii")
    ok = False
    for secret in secrets:  # no early exit: timing does not say which secret
        ok |= hmac.compare_digest(found, _mac(secret, when, token).encode("ascii"))
    return when if ok else None


def is_our_trace(line: bytes, server: str) -> bool:
    """Whether a header line (no final CRLF) is the trace header of `server` (our server_name)."""
    if headers.field_name(line) != TRACE_HEADER.lower():
        return False
    value = line.split(b":", 1)[1].decode("utf-8", "replace")
    return value.split(";", 1)[0].strip().lower() == server.lower()


def restamp(lines: list[bytes], server: str, secrets: tuple[bytes, ...], token: str, now: float) -> list[bytes]:
    """Header lines with our trace header stamped for a new copy (return address `token`):
    the clock of the next address starts when its copy is sent. Adds the header if missing."""
    new = stamp(secrets, token, now).encode("ascii")
    out, done = [], False
    for line in lines:
        if not done and is_our_trace(line, server):
            name, _, value = line.partition(b":")
            value = re.sub(rb"\s*;\s*t=[^;]*", b"", value).rstrip()
            line = name + b":" + value + b"; " + new
            done = True
        out.append(line)
    if not done:
        out.insert(0, f"{TRACE_HEADER}: {server}; ".encode("ascii") + new)
    return out
