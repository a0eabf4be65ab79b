"""Bounce tokens: the envelope sender of every forward, checked when a bounce comes back.

    rmc=HASH=TT=BIND=RULES=POS=orig.domain=orig-local@srs.domain

* HASH: HMAC-SHA256 (the SRS secrets; the first signs, all verify) over the
  rest, base32, 10 characters (50 bits), compared with hmac.compare_digest.
  Case-insensitive, like SRS, because relays may lowercase local parts.
* TT: day number modulo 1024 (two base-32 characters, as SRS); tokens older
  than `bounces.max_age_days` are refused.
* BIND: ties the token to the one message it was minted for: 8 base32
  characters of SHA-256 over the `b=` value of our first DKIM signature on
  that forward (`x`: the forward was not signed). A returned copy is
  forwarded only if one of our signatures on it verifies AND has that `b=`:
  the token of forward A with our signed copy of forward B is refused. The
  `b=` value signs the body hash and every header field we signed, so the
  binding pins headers and body at once; Message-ID alone could be copied.
  Tokens of the older format (`rmb=`, no BIND) are still accepted until
  they expire (`max_age_days`), without this check.
* RULES: short ids of the rules that routed the message (one envelope sender
  per message, so a fan-out copy cannot name its destination: the DSN's
  Final-Recipient does). POS: `p0` for the first fan-out, `dIpJ` for a
  fallback copy, which goes to one destination and names its exact place.

The milter checks a token at RCPT on every message, so this module stays small:
no DSN, DKIM or SMTP code (bounces.py plans what a bounce does, bounceserver.py
receives it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .srs import day_stamp, stamp_age

if TYPE_CHECKING:
    from .config import SRSSettings

TOKEN_PREFIX = "rmc="
LEGACY_PREFIX = "rmb="  # tokens minted before BIND; accepted until they expire
_TS_SLOTS = 1024  # day stamps are SRS's (srs.day_stamp), in lower case here; no token lives longer
_HASH_LEN = 10
_RULE_ID_LEN = 5
_MAX_RULES = 4  # more rules in one message: the token says "any rule" ('x')
_POS = re.compile(r"p0|d(\d{1,3})p(\d{1,3})")
_RULES = re.compile(r"x|[a-z2-7]{5}(\.[a-z2-7]{5}){0,3}")
_BIND_LEN = 8
_BIND = re.compile(r"x|[a-z2-7]{8}")


class TokenError(Exception):
    """A bounce token that is malformed, forged, tampered with or expired."""


@dataclass(frozen=True)
class Token:
    rules: tuple[str, ...] | None  # rule ids; None: any rule
    dest: int | None  # None: a fan-out copy (the failed recipient says which destination)
    pos: int
    sender: str  # the original envelope sender
    address: str = ""
    binding: str | None = None  # BIND ("x": unsigned forward); None: legacy token without one


def binding_of(signature: str | bytes) -> str:
    """BIND for a DKIM-Signature value (or its b= tag value): a digest of b= (whitespace removed)."""
    text = signature.decode("ascii", "replace") if isinstance(signature, bytes) else signature
    match = re.search(r"(?:^|;)\s*b\s*=([^;]*)", text)
    value = match.group(1) if match else text
    digest = hashlib.sha256(re.sub(r"\s+", "", value).encode("ascii", "replace")).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:_BIND_LEN]


def rule_id(name: str) -> str:
    """A short, stable id for a rule name (not secret: the HMAC protects it)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:_RULE_ID_LEN]


class TokenCodec:
    """Mint and check bounce tokens. Thread-safe (immutable)."""

    def __init__(self, srs: SRSSettings, max_age_days: int, clock: Callable[[], float] = time.time):
        if not srs.secrets or any(len(s) < 1 for s in srs.secrets):
            raise ValueError("bounce tokens need at least one non-empty SRS secret")
        if not 0 < max_age_days < _TS_SLOTS:
            raise ValueError("max_age_days out of range")
        self.domain = srs.domain.lower().rstrip(".")
        self._secrets = tuple(srs.secrets)
        self._max_age = max_age_days
        self._clock = clock

    @staticmethod
    def is_token(address: str) -> bool:
        return address.lower().startswith((TOKEN_PREFIX, LEGACY_PREFIX))

    def _hash(self, secret: bytes, text: str) -> str:
        mac = hmac.new(secret, text.lower().encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        return base64.b32encode(mac).decode("ascii").lower()[:_HASH_LEN]

    def mint(self, sender: str, rule_names: Iterable[str], dest: int | None = None, pos: int = 0,
             binding: str = "x") -> str:
        """The return address for a forward of `sender`'s message routed by `rule_names`;
        `binding`: binding_of() our first signature on it ("x": not signed)."""
        if not _BIND.fullmatch(binding):
            raise TokenError(f"bad binding {binding!r}")
        local, sep, domain = sender.rpartition("@")
        if not sep or not local or not domain or "=" in domain:
            raise TokenError(f"cannot embed sender {sender!r}")
        if domain.lower().rstrip(".") == self.domain:
            raise TokenError("sender is already in the SRS domain")  # kept as it is (plain SRS)
        if any(c <= " " or c in '"<>@\\,;:()[]' or c == "\x7f" for c in local):
            raise TokenError(f"cannot embed sender {sender!r}: its local part needs quoting")
        ids = sorted({rule_id(n) for n in rule_names})
        rules = ".".join(ids) if 0 < len(ids) <= _MAX_RULES else "x"
        where = "p0" if dest is None else f"d{dest}p{pos}"
        ts = day_stamp(self._clock()).lower()
        body = f"{ts}={binding}={rules}={where}={domain}={local}"
        # The prefix is hashed too: a legacy token cannot be re-read as a current one.
        return f"{TOKEN_PREFIX}{self._hash(self._secrets[0], TOKEN_PREFIX + body)}={body}@{self.domain}"

    def check(self, address: str) -> Token:
        """The Token in `address`; raises TokenError if it is not genuine and current."""
        local, sep, domain = address.rpartition("@")
        if not sep or domain.lower().rstrip(".") != self.domain:
            raise TokenError("not in the SRS domain")
        if not self.is_token(local):
            raise TokenError("not a bounce token")
        if any(c <= " " or c == "\x7f" for c in local):
            raise TokenError("space or control character in token")
        legacy = local.lower().startswith(LEGACY_PREFIX)
        fields = 6 if legacy else 7
        parts = local[len(TOKEN_PREFIX):].split("=", fields - 1)
        if len(parts) != fields:
            raise TokenError("malformed token")
        binding = None
        if legacy:
            found, ts, rules, where, odomain, olocal = parts
        else:
            found, ts, binding, rules, where, odomain, olocal = parts
        if len(found) != _HASH_LEN or not found.isascii():
            raise TokenError("malformed token hash")
        body = "=".join(parts[1:]) if legacy else TOKEN_PREFIX + "=".join(parts[1:])
        ok = False
        for secret in self._secrets:  # no early exit: timing does not say which secret
            ok |= hmac.compare_digest(found.lower().encode("ascii"), self._hash(secret, body).encode("ascii"))
        if not ok:
            raise TokenError("token hash does not match (forged or tampered)")
        try:
            age = stamp_age(ts, self._clock())
        except ValueError:
            raise TokenError("malformed token timestamp") from None
        if age > self._max_age:
            raise TokenError(f"token expired ({age} days old, at most {self._max_age})")
        rules = rules.lower()
        m = _POS.fullmatch(where.lower())
        if binding is not None:
            binding = binding.lower()
        if (not _RULES.fullmatch(rules) or m is None or not odomain or not olocal
                or (binding is not None and not _BIND.fullmatch(binding))):
            raise TokenError("malformed token fields")
        dest = None if m.group(1) is None else int(m.group(1))
        pos = 0 if m.group(2) is None else int(m.group(2))
        ids = None if rules == "x" else tuple(rules.split("."))
        return Token(ids, dest, pos, f"{olocal}@{odomain.lower()}", address, binding)
