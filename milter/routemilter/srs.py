"""Sender Rewriting Scheme (SRS) for forwarded mail, on top of srslib.

srslib provides the address format (SRS0/SRS1, HMAC-SHA1 base64 hash, base-32
day timestamp, as in libsrs2 and the Shevek paper). As shipped (0.1.5) its
verification is forgeable, so `_HardenedSRS` overrides the two checks:

* `check_hash`: srslib truncates the expected hash to the length of the hash
  found in the address, so `SRS0=x=...` passes once in 38 tries (base64 folded
  to one case) and a truncated genuine hash always passes. Here the hash must
  have exactly the configured length and is compared with
  `hmac.compare_digest`. The comparison stays case-insensitive like libsrs2's,
  because MTAs and mailbox providers may lowercase the local part.
* `check_ts`: an explicit age check, `0 <= age <= max_age_days` (the libsrs2
  rule), with a clear error for a malformed timestamp.
* the hashed text: srslib (like libsrs2) runs the fields together (`TT` +
  domain + local part), so characters could move across a field boundary
  without changing the hash: a genuine `SRS0=h=TT=sender.test=alice@fwd`
  became a valid `SRS0=h=TT=se=nder.testalice@fwd`, a return address for
  someone else (found by tests/test_fuzz.py). Here the hash covers the fields
  with their `=` separators (a domain never contains `=`), for SRS0 and SRS1.

`SenderRewriter` adds what srslib leaves to the caller: the null sender,
senders already in our SRS domain, refusing addresses of other domains in
`reverse`, and one exception type (`SRSError`) whose message says why.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable

import srslib

from .config import SRSSettings

_DAY = 86400
_TS_SLOTS = 1024  # the timestamp is the day number modulo 2**10 (two base-32 characters)
_HASH_CHARS = re.compile(r"[A-Za-z0-9+/]+")  # base64 without padding
# A local part srslib can embed unquoted: RFC 5322 atext, dots, and UTF-8 (RFC 6531).
# Quoted local parts, spaces, '@' and controls would make the SRS address invalid.
_EMBEDDABLE_LOCAL = re.compile(r"[^\x00-\x20\x7f\"(),:;<>@\[\\\]]+")
# The original domain becomes one '='-separated field, so it must not contain '='.
_EMBEDDABLE_DOMAIN = re.compile(r"[^\x00-\x20\x7f=@\"\\]+")
# Only the '=' separator: that is what we generate, and what `is_srs` recognises.
_SRS_LOCAL = re.compile(r"SRS[01]=", re.IGNORECASE)


_TS_ALPHABET: str = srslib.SRS._TS_ALPHABET  # base 32, upper case


def day_stamp(now: float) -> str:
    """The SRS timestamp of `now`: the day number modulo 1024, two base-32 characters."""
    day = int(now // _DAY) % _TS_SLOTS
    return _TS_ALPHABET[day >> 5] + _TS_ALPHABET[day & 31]


def stamp_age(stamp: str, now: float) -> int:
    """Days since `stamp` (any case) was made; ValueError if it is no timestamp.
    A stamp "from the future" wraps to an age near 1023 days: expired, as in libsrs2."""
    stamp = stamp.upper()
    if len(stamp) != 2 or any(c not in _TS_ALPHABET for c in stamp):
        raise ValueError("malformed timestamp")
    then = _TS_ALPHABET.index(stamp[0]) << 5 | _TS_ALPHABET.index(stamp[1])
    return (int(now // _DAY) - then) % _TS_SLOTS


class SRSError(Exception):
    """An address that cannot be rewritten or reversed; the message says why."""


class _HardenedSRS(srslib.SRS):  # type: ignore[misc]  # srslib has no type information
    """srslib.SRS with full-length constant-time hash checks and an explicit age check."""

    def __init__(self, secrets: tuple[bytes, ...], max_age_days: int, hash_length: int,
                 clock: Callable[[], float]):
        super().__init__(secrets[0], list(secrets[1:]), validity_days=max_age_days,
                         hash_length=hash_length)
        self._time_fn = clock  # srslib's own clock hook (used by generate_ts)

    def generate_srs0_address(self, orig_host: str, orig_local_part: str, alias_host: str) -> str:
        ts = self.generate_ts()
        h = self.generate_hash(f"{ts}={orig_host}={orig_local_part}", self._secret, self._hash_length)
        return f"SRS0={h}={ts}={orig_host}={orig_local_part}@{alias_host}"

    def generate_srs1_address(self, first_hop_host: str, first_hop_local_part: str, alias_host: str) -> str:
        h = self.generate_hash(f"{first_hop_host}={first_hop_local_part}", self._secret, self._hash_length)
        return f"SRS1={h}={first_hop_host}={first_hop_local_part}@{alias_host}"

    def _hashed_text(self, addr: str) -> str:
        """The fields of `addr` as hashed, separators included (srslib's `s` has none)."""
        local = addr.rsplit("@", 1)[0]
        m = self._SRS1.match(local)  # the order srslib.reverse tries them in
        if m:
            return f"{m.group(2)}={m.group(3)}"
        m = self._SRS0.match(local)
        if m:
            return f"{m.group(2)}={m.group(3)}={m.group(4)}"
        raise srslib.InvalidHashError("not an SRS0 or SRS1 address")

    def check_hash(self, h: str, s: str, addr: str) -> None:
        if len(h) != self._hash_length or not _HASH_CHARS.fullmatch(h):
            raise srslib.InvalidHashError(f"hash must be {self._hash_length} base64 characters")
        s = self._hashed_text(addr)
        found = h.lower().encode("ascii")
        ok = False
        # Every secret is tried (no early exit), so timing does not tell which one matched.
        for secret in [self._secret, *self._prev_secrets]:
            expected = self.generate_hash(s, secret, self._hash_length).lower().encode("ascii")
            ok |= hmac.compare_digest(found, expected)
        if not ok:
            raise srslib.InvalidHashError("hash does not match")

    def check_ts(self, ts: str, addr: str) -> None:
        try:
            age = stamp_age(ts, self._time_fn())
        except ValueError as exc:
            raise srslib.InvalidTimestampError(str(exc)) from None
        if age > self._validity_days:
            raise srslib.InvalidTimestampError(
                f"expired ({age} days old, at most {self._validity_days} allowed)")


class SenderRewriter:
    """Rewrite envelope senders into our SRS domain and reverse them for bounces.

    Addresses are `local@domain` strings in the project's normal form (see
    addresses.py); the null sender is "".
    """

    def __init__(self, settings: SRSSettings, clock: Callable[[], float] = time.time):
        if not settings.secrets or any(not s for s in settings.secrets):
            raise ValueError("SRS needs at least one non-empty secret")
        # 4 is libsrs2's default (38**4 tries to forge); 27 is all of the base64 SHA-1 before '='.
        if not 4 <= settings.hash_length <= 27:
            raise ValueError("SRS hash_length must be from 4 to 27")
        if settings.max_age_days < 0 or settings.max_age_days >= _TS_SLOTS:
            raise ValueError(f"SRS max_age_days must be from 0 to {_TS_SLOTS - 1}")
        self.domain = settings.domain.lower().rstrip(".")
        self._srs = _HardenedSRS(settings.secrets, settings.max_age_days,
                                 settings.hash_length, clock)

    @staticmethod
    def is_srs(address: str) -> bool:
        """True if the local part starts with SRS0= or SRS1= (any case). Syntax only."""
        local, sep, _ = address.rpartition("@")
        return bool(sep) and _SRS_LOCAL.match(local) is not None

    def forward(self, sender: str) -> str:
        """The SRS address to use as envelope sender when forwarding mail from `sender`.

        The null sender stays null (bounces are never rewritten), a sender already
        in our SRS domain is kept, an SRS0/SRS1 address of another forwarder
        becomes SRS1 (bounces then go straight to the first forwarder), anything
        else becomes SRS0. Raises SRSError for a sender that cannot be embedded.
        """
        if sender == "":
            return ""
        local, sep, domain = sender.rpartition("@")
        if not sep or not local or not domain:
            raise SRSError(f"malformed sender {sender!r}: expected local@domain")
        if domain.lower().rstrip(".") == self.domain:
            return sender
        if not _EMBEDDABLE_LOCAL.fullmatch(local):
            raise SRSError(f"cannot rewrite {sender!r}: its local part cannot be embedded "
                           f"unquoted in an SRS address")
        if not _EMBEDDABLE_DOMAIN.fullmatch(domain):
            raise SRSError(f"cannot rewrite {sender!r}: malformed domain")
        try:
            forwarded: str = self._srs.forward(sender, self.domain)
        except srslib.Error as exc:  # not expected after the checks above
            raise SRSError(f"cannot rewrite {sender!r}: {exc}") from None
        return forwarded

    def reverse(self, address: str) -> str:
        """The address a bounce to our SRS `address` must go to.

        SRS0 gives the original sender; SRS1 gives the first forwarder's SRS0
        address. Raises SRSError if the address is not ours, not SRS, malformed,
        carries a wrong hash, or (SRS0) is older than max_age_days.
        """
        local, sep, domain = address.rpartition("@")
        if not sep or not local:
            raise SRSError(f"malformed address {address!r}")
        if domain.lower().rstrip(".") != self.domain:
            raise SRSError(f"not SRS: {address!r} is not in the SRS domain {self.domain}")
        if not _SRS_LOCAL.match(local):
            raise SRSError(f"not SRS: {address!r} does not start with SRS0= or SRS1=")
        if any(c <= " " or c == "\x7f" for c in local):
            # srslib's regexes would stop at a newline and ignore the rest.
            raise SRSError(f"malformed SRS address {address!r}: space or control character")
        try:
            original: str = self._srs.reverse(address)
        except srslib.InvalidHashError as exc:
            raise SRSError(f"bad hash in {address!r}: {exc}") from None
        except srslib.InvalidTimestampError as exc:
            raise SRSError(f"{address!r}: {exc}") from None
        except srslib.Error:
            raise SRSError(f"malformed SRS address {address!r}") from None
        orig_local, _, orig_domain = original.rpartition("@")
        if not orig_local or not orig_domain:
            raise SRSError(f"malformed SRS address {address!r}")
        return original
