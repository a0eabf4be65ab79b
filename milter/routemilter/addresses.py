"""Envelope address parsing and normalisation.

The MTA hands us addresses in several shapes: `<user@example.com>` from smtpd,
`user@example.com` without brackets on the non-SMTP path, `<>` for the null
sender, occasionally an RFC 5321 source route `<@relay:user@example.com>`.
Everything downstream works on one normal form: no brackets, local part and
domain lowercased, the domain without a trailing dot.

Lowercasing the local part is what Postfix's own table lookups do; no mailbox
provider we forward to treats `User@` and `user@` as different mailboxes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_ADDRESS = 320
# C0 and C1 controls, DEL, and the Unicode line/paragraph separators: never part of
# an address, and each could split a log line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SPACE = re.compile(r"\s")  # any Unicode white space, not only ' '
# The everyday shape (ASCII atoms, optional brackets): checked by one regex, with the
# same result as the general path below. Config loads and RCPT both go through here.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE = re.compile(rf"<({_ATOM})>|({_ATOM})")


class AddressError(ValueError):
    """An address that cannot be routed; the message says why."""


@dataclass(frozen=True, slots=True)
class Address:
    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def strip_envelope(raw: str) -> str:
    """Remove angle brackets, surrounding space and a source route."""
    text = raw.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if text.startswith("@") and ":" in text:  # <@a,@b:user@domain>
        text = text.split(":", 1)[1]
    return text


def is_null_sender(raw: str) -> bool:
    return strip_envelope(raw) == ""


def parse(raw: str) -> Address:
    """Parse one envelope address into its normal form or raise AddressError."""
    if not isinstance(raw, str):
        raise AddressError("address is not text")
    simple = _SIMPLE.fullmatch(raw)
    if simple:
        text = (simple.group(1) or simple.group(2)).lower()
        if len(text) > MAX_ADDRESS:
            raise AddressError(f"address longer than {MAX_ADDRESS} characters")
        local, domain = text.rsplit("@", 1)
        _check_domain(domain)
        return Address(local, domain)
    text = strip_envelope(raw)
    if not text:
        raise AddressError("empty address")
    if len(text) > MAX_ADDRESS:
        raise AddressError(f"address longer than {MAX_ADDRESS} characters")
    if _CONTROL.search(text):
        raise AddressError("control character in address")
    if "@" not in text:
        raise AddressError("address has no domain")
    local, domain = text.rsplit("@", 1)
    # Lowercase before the length checks: lowercasing can lengthen a string
    # ('\u0130' becomes two characters), and the normal form must itself parse.
    local = local.lower()
    domain = domain.rstrip(".").lower()
    if not local:
        raise AddressError("empty local part")
    if len(local) > MAX_LOCAL + (2 if local.startswith('"') else 0):  # a quoted one: plus its quotes
        raise AddressError(f"local part longer than {MAX_LOCAL} characters")
    if local.startswith('"') != local.endswith('"') or local == '"':
        raise AddressError("unbalanced quotes in local part")
    if not local.startswith('"') and (_SPACE.search(local) or "@" in local):
        raise AddressError("space or '@' in an unquoted local part")
    _check_domain(domain)
    if len(local) + 1 + len(domain) > MAX_ADDRESS:
        raise AddressError(f"address longer than {MAX_ADDRESS} characters")
    return Address(local, domain)


@lru_cache(maxsize=4096)  # a pure check; the same few domains recur (a big config, every RCPT)
def _check_domain(domain: str) -> None:
    if not domain:
        raise AddressError("empty domain")
    if len(domain) > MAX_DOMAIN:
        raise AddressError(f"domain longer than {MAX_DOMAIN} characters")
    if domain.startswith("[") and domain.endswith("]"):
        return  # address literal: never one of ours, but a valid address
    for label in domain.split("."):
        if not label:
            raise AddressError("empty label in domain")
        if len(label) > 63:
            raise AddressError("domain label longer than 63 characters")
        if label.startswith("-") or label.endswith("-"):
            raise AddressError("domain label starts or ends with '-'")
        for c in label:
            if not (c.isalnum() or c == "-" or ord(c) > 0x7F) or c.isspace():
                raise AddressError(f"invalid character {c!r} in domain")


def normalize(raw: str) -> str:
    """The normal form as a string: `local@domain`."""
    return str(parse(raw))


def parse_domain(raw: str) -> str:
    """A domain name from the config, lowercased and checked."""
    domain = raw.strip().rstrip(".").lower()
    try:
        _check_domain(domain)
    except AddressError as exc:
        raise AddressError(f"{raw!r}: {exc}") from None
    return domain
