"""The From rewrite: a forward shown "via" the forwarding domain, from its address.

Used by authcheck.py (`from_rewrite: always` or when the sender's DMARC policy would
fail the forward) and by the bounce handler (`from_rewrite: dmarc-bounce`: a destination
refused our copy for DMARC reasons, so the fallback copy is rewritten)."""

from __future__ import annotations

import email.utils
import re
from typing import TYPE_CHECKING

from . import headers

if TYPE_CHECKING:
    from .config import Config

TRACE_FROM = "X-Original-From"


def rewritten_from(original: str, forwarding_domain: str) -> tuple[str, str] | None:
    """(new From value, original address): the original name (or address) shown
    "via" the forwarding domain, from an address of the forwarding domain."""
    name, address = email.utils.parseaddr(original.replace("\r\n", "").replace("\n", ""))
    if "@" not in address:
        return None
    shown = f"{name or address} via {forwarding_domain}"
    shown = re.sub(r"[\x00-\x1f\"\\]", "", shown)[:200]
    return f"\"{shown}\" <no-reply@{forwarding_domain}>", address


_DMARC_REFUSAL = re.compile(r"\bdmarc\b|\b5\.7\.26\b|\b5\.7\.509\b", re.IGNORECASE)


def bounce_rewrite_wanted(config: Config, rule_name: str, status: str, reason: str, returned: bytes) -> bool:
    """For bounces.py: a destination refused our copy for DMARC reasons, the rule asks
    for `from_rewrite: dmarc-bounce`, and this copy was not already rewritten."""
    auth = config.auth
    if auth is None or config.dkim is None:
        return False
    domain = rule_name.split("@", 1)[1] if rule_name.startswith("catch-all@") else None
    if auth.rules_for(domain, rule_name).from_rewrite != "dmarc-bounce":
        return False
    if not _DMARC_REFUSAL.search(f"{status} {reason}"):
        return False
    head = returned.split(b"\r\n\r\n", 1)[0]
    return re.search(rb"(?im)^" + TRACE_FROM.encode() + rb"\s*:", head) is None


def rewrite_returned(returned: bytes, forwarding_domain: str) -> bytes | None:
    """The returned copy with From rewritten (Reply-To and X-Original-From added) and
    our ARC set removed (its message signature covers the old From); None if it has
    not exactly one From address. bounces.py re-signs it with DKIM."""
    head, _sep, body = returned.partition(b"\r\n\r\n")
    fields = headers.fields(head + b"\r\n")
    names = [f.split(b":", 1)[0].strip().lower() for f in fields]
    froms = [f for f, n in zip(fields, names, strict=True) if n == b"from"]
    if len(froms) != 1:
        return None
    original = froms[0].split(b":", 1)[1].strip().decode("utf-8", "replace")
    rewritten = rewritten_from(original, forwarding_domain)
    if rewritten is None:
        return None
    new_from, address = rewritten
    instances = [int(m.group(1)) for f, n in zip(fields, names, strict=True) if n in _ARC_NAMES
                 for m in [re.search(rb"(?:^|[\s;])i\s*=\s*(\d+)", f.split(b":", 1)[1])] if m]
    last = max(instances, default=None)
    out = [f"{TRACE_FROM}: {original}\r\n".encode()]
    if b"reply-to" not in names:
        out.append(f"Reply-To: {address}\r\n".encode())
    for f, n in zip(fields, names, strict=True):
        if n in _ARC_NAMES and last is not None:
            m = re.search(rb"(?:^|[\s;])i\s*=\s*(\d+)", f.split(b":", 1)[1])
            if m and int(m.group(1)) == last:
                continue
        out.append(f"From: {new_from}\r\n".encode() if n == b"from" else f)
    return b"".join(out)[:-2] + b"\r\n\r\n" + body


_ARC_NAMES = {b"arc-seal", b"arc-message-signature", b"arc-authentication-results"}
