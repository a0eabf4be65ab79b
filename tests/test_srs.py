"""SRS rewriting: round trips, rotation, expiry, and forgeries srslib alone would accept."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routemilter.config import SRSSettings
from routemilter.srs import SenderRewriter, SRSError

SECRET = b"first-secret-0123456789"
OLD_SECRET = b"older-secret-9876543210"
DAY = 86400
NOW = 1_700_000_000.0  # a fixed instant; every test sets its own clock


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def rewriter(secrets=(SECRET,), domain="fwd.example", hash_length=8, max_age_days=21, clock=None):
    return SenderRewriter(SRSSettings(domain, tuple(secrets), hash_length, max_age_days),
                          clock=clock or Clock())


def fields(srs_address: str) -> list[str]:
    """SRS0=HASH=TT=domain=local@fwd -> ['SRS0', HASH, TT, domain, local]."""
    local = srs_address.rsplit("@", 1)[0]
    return local.split("=", 4)


def with_hash(srs_address: str, new_hash: str) -> str:
    tag, _, rest = srs_address.split("=", 2)
    return f"{tag}={new_hash}={rest}"


def srs_hash(secret: bytes, data: str, length: int) -> str:
    """The hash as the SRS spec (and libsrs2) computes it, independent of srslib."""
    digest = hmac.new(secret, data.lower().encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()[:length]


# ------------------------------------------------------------ basic behaviour


def test_round_trip_srs0():
    r = rewriter()
    forwarded = r.forward("alice@orig.example")
    tag, h, ts, domain, local = fields(forwarded)
    assert (tag, domain, local) == ("SRS0", "orig.example", "alice")
    assert forwarded.endswith("@fwd.example")
    assert len(h) == 8 and len(ts) == 2
    # The hash is the spec's HMAC-SHA1 over timestamp, domain and local part.
    assert h == srs_hash(SECRET, ts + "=orig.example=alice", 8)  # fields hashed with separators
    assert r.reverse(forwarded) == "alice@orig.example"


def test_null_sender_and_own_domain_are_kept():
    r = rewriter()
    assert r.forward("") == ""
    assert r.forward("postmaster@fwd.example") == "postmaster@fwd.example"
    assert r.forward("postmaster@FWD.example") == "postmaster@FWD.example"


def test_local_part_with_equals_and_plus_round_trips():
    r = rewriter()
    for sender in ("a=b@orig.example", "user+tag@orig.example", "x.y-z@sub.orig.example"):
        assert r.reverse(r.forward(sender)) == sender


def test_reverse_is_case_insensitive():
    r = rewriter()
    forwarded = r.forward("alice@orig.example")
    local, domain = forwarded.rsplit("@", 1)
    for variant in (forwarded.lower(), forwarded.upper(), local.swapcase() + "@" + domain):
        assert r.reverse(variant).lower() == "alice@orig.example"


def test_is_srs():
    r = rewriter()
    assert r.is_srs(r.forward("alice@orig.example"))
    assert SenderRewriter.is_srs("srs0=abcdefgh=AB=orig.example=bob@x.example")
    assert SenderRewriter.is_srs("SrS1=abcdefgh=hop.example==abc=AB=o.example=b@x.example")
    assert not SenderRewriter.is_srs("alice@orig.example")
    assert not SenderRewriter.is_srs("srs0@orig.example")
    assert not SenderRewriter.is_srs("SRS0=abc")  # no domain
    assert not SenderRewriter.is_srs("")


def test_senders_that_cannot_be_embedded_are_refused():
    r = rewriter()
    for sender in ('"john smith"@orig.example', "no-domain", "@orig.example", "a@"):
        with pytest.raises(SRSError):
            r.forward(sender)


def test_settings_are_checked():
    with pytest.raises(ValueError):
        rewriter(secrets=())
    with pytest.raises(ValueError):
        rewriter(hash_length=2)


# ------------------------------------------------------------ rotation and expiry


def test_rotation_old_secret_still_reverses_new_one_signs():
    clock = Clock()
    before = rewriter(secrets=(OLD_SECRET,), clock=clock)
    after = rewriter(secrets=(SECRET, OLD_SECRET), clock=clock)
    old_address = before.forward("alice@orig.example")
    assert after.reverse(old_address) == "alice@orig.example"
    new_address = after.forward("alice@orig.example")
    _, h, ts, _, _ = fields(new_address)
    assert h == srs_hash(SECRET, ts + "=orig.example=alice", 8)  # fields hashed with separators
    assert h != fields(old_address)[1]
    # Once the old secret is dropped, its addresses stop working.
    with pytest.raises(SRSError, match="hash"):
        rewriter(secrets=(SECRET,), clock=clock).reverse(old_address)


def test_expiry():
    clock = Clock()
    r = rewriter(max_age_days=21, clock=clock)
    address = r.forward("alice@orig.example")
    clock.now += 21 * DAY  # 21 days old: still valid
    assert r.reverse(address) == "alice@orig.example"
    clock.now += DAY  # 22 days old
    with pytest.raises(SRSError, match="expired"):
        r.reverse(address)


def test_timestamp_from_the_future_is_refused():
    clock = Clock()
    r = rewriter(clock=clock)
    address = r.forward("alice@orig.example")
    clock.now -= 2 * DAY
    with pytest.raises(SRSError, match="expired"):
        r.reverse(address)


def test_expiry_across_the_1024_day_wrap():
    # The timestamp is the day number modulo 1024; ages are computed across the wrap.
    wrap = (1024 * 20 - 1) * DAY + 3600.0  # last day before day number % 1024 == 0
    clock = Clock(wrap)
    r = rewriter(clock=clock)
    address = r.forward("alice@orig.example")
    clock.now += 2 * DAY
    assert r.reverse(address) == "alice@orig.example"
    clock.now += 1024 * DAY  # same two characters, a full cycle later: old, not fresh
    assert r.reverse(address) == "alice@orig.example"  # indistinguishable, as in libsrs2


# ------------------------------------------------------------ forgery


B64 = string.ascii_letters + string.digits + "+/"


def test_every_one_character_hash_is_refused():
    # srslib 0.1.5 compares only len(hash) characters: one of these passes there.
    r = rewriter()
    genuine = r.forward("alice@orig.example")
    for c in B64:
        with pytest.raises(SRSError, match="hash"):
            r.reverse(with_hash(genuine, c))


def test_truncated_hashes_are_refused():
    # A prefix of the genuine hash passes srslib 0.1.5's check unchanged.
    r = rewriter(hash_length=8)
    genuine = r.forward("alice@orig.example")
    h = fields(genuine)[1]
    for k in range(1, 8):
        with pytest.raises(SRSError, match="hash"):
            r.reverse(with_hash(genuine, h[:k]))
        with pytest.raises(SRSError, match="hash"):
            r.reverse(with_hash(genuine, h[:k].lower()))


def test_overlong_hash_is_refused():
    r = rewriter(hash_length=8)
    genuine = r.forward("alice@orig.example")
    full = srs_hash(SECRET, "=".join(fields(genuine)[2:4]) + "=alice", 20)
    with pytest.raises(SRSError, match="hash"):
        r.reverse(with_hash(genuine, full))


@settings(max_examples=300)
@given(st.text(alphabet=B64, min_size=1, max_size=12))
def test_random_hashes_are_refused(candidate):
    r = rewriter()
    genuine = r.forward("alice@orig.example")
    if candidate.lower() == fields(genuine)[1].lower():
        return  # the genuine hash itself (probability ~0)
    with pytest.raises(SRSError, match="hash"):
        r.reverse(with_hash(genuine, candidate))


def test_hash_from_another_secret_is_refused():
    clock = Clock()
    ours = rewriter(clock=clock)
    theirs = rewriter(secrets=(b"attacker-secret-000000",), clock=clock)
    forged = theirs.forward("victim@orig.example")
    with pytest.raises(SRSError, match="hash"):
        ours.reverse(forged)


def test_tampered_fields_are_refused():
    r = rewriter()
    genuine = r.forward("alice@orig.example")
    tag, h, ts, domain, local = fields(genuine)
    other_ts = "AA" if ts != "AA" else "AB"
    tampered = [
        f"{tag}={h}={ts}={domain}=mallory@fwd.example",  # local part
        f"{tag}={h}={ts}=evil.example={local}@fwd.example",  # original domain
        f"{tag}={h}={other_ts}={domain}={local}@fwd.example",  # timestamp
    ]
    for address in tampered:
        with pytest.raises(SRSError, match="hash"):
            r.reverse(address)


def test_addresses_outside_our_domain_or_not_srs_are_refused():
    r = rewriter()
    genuine = r.forward("alice@orig.example")
    local = genuine.rsplit("@", 1)[0]
    for address in (f"{local}@other.example", "alice@fwd.example", "SRS0@fwd.example",
                    "SRS2=abcdefgh=AB=o.example=a@fwd.example", "no-at-sign"):
        with pytest.raises(SRSError, match=r"not SRS|malformed"):
            r.reverse(address)


def test_malformed_srs_addresses_are_refused():
    r = rewriter()
    genuine = r.forward("alice@orig.example")
    _tag, h, ts, domain, local = fields(genuine)
    for address in (
        f"SRS0={h}@fwd.example",
        f"SRS0={h}={ts}@fwd.example",
        f"SRS0={h}=A={domain}={local}@fwd.example",  # one-character timestamp
        f"SRS0={h}={ts}={domain}={local}\nx@fwd.example",  # srslib's regex stops at \n
        "SRS1=abcdefgh=hop.example@fwd.example",
    ):
        with pytest.raises(SRSError):
            r.reverse(address)


# ------------------------------------------------------------ SRS1


def test_srs0_from_another_forwarder_becomes_srs1():
    clock = Clock()
    first = rewriter(secrets=(b"first-hop-secret-0000",), domain="first.example", clock=clock)
    ours = rewriter(clock=clock)
    srs0 = first.forward("alice@orig.example")
    srs1 = ours.forward(srs0)
    opaque = srs0.rsplit("@", 1)[0][len("SRS0"):]  # "=HASH=TT=orig.example=alice"
    tag, h, rest = srs1.rsplit("@", 1)[0].split("=", 2)
    assert tag == "SRS1" and srs1.endswith("@fwd.example")
    assert rest == "first.example=" + opaque
    assert h == srs_hash(SECRET, "first.example=" + opaque, 8)
    # A bounce to us goes to the first forwarder, which can still reverse it.
    assert ours.reverse(srs1) == srs0
    assert first.reverse(ours.reverse(srs1)) == "alice@orig.example"


def test_srs1_forwarded_again_still_points_at_the_first_hop():
    clock = Clock()
    first = rewriter(secrets=(b"first-hop-secret-0000",), domain="first.example", clock=clock)
    second = rewriter(secrets=(b"second-hop-secret-000",), domain="second.example", clock=clock)
    ours = rewriter(clock=clock)
    srs0 = first.forward("alice@orig.example")
    srs1 = ours.forward(second.forward(srs0))
    assert srs1.startswith("SRS1=") and "=first.example==" in srs1
    assert ours.reverse(srs1) == srs0


def test_forged_srs1_is_refused():
    r = rewriter()
    srs1 = r.forward("SRS0=abcdefgh=AB=orig.example=alice@first.example")
    _tag, h, rest = srs1.rsplit("@", 1)[0].split("=", 2)
    for forged in (
        f"SRS1={h[:3]}={rest}@fwd.example",  # truncated hash
        f"SRS1={h}=evil.example={rest.split('=', 1)[1]}@fwd.example",  # other first hop
        f"SRS1={h}={rest.replace('alice', 'mallory')}@fwd.example",  # other opaque part
    ):
        with pytest.raises(SRSError, match="hash"):
            r.reverse(forged)


def test_srs1_reversal_does_not_check_the_first_hop_timestamp():
    # Per the spec the first hop checks its own timestamp; ours only vouches for the hash.
    clock = Clock()
    r = rewriter(clock=clock)
    srs1 = r.forward("SRS0=abcdefgh=AB=orig.example=alice@first.example")
    assert r.reverse(srs1) == "SRS0=abcdefgh=AB=orig.example=alice@first.example"


# ------------------------------------------------------------ property


_ATEXT = string.ascii_lowercase + string.digits + "!#$%&'*+-/=?^_`{|}~"
# Senders that look like another forwarder's SRS address are covered by the SRS1 tests.
_local_parts = st.text(alphabet=_ATEXT + ".", min_size=1, max_size=64).filter(
    lambda s: not re.match(r"srs[01][-+=]", s))
_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_domains = st.lists(_labels, min_size=1, max_size=4).map(".".join).filter(
    lambda d: d != "fwd.example")


@settings(max_examples=500)
@given(_local_parts, _domains)
def test_reverse_of_forward_is_identity(local, domain):
    r = rewriter()
    sender = f"{local}@{domain}"
    forwarded = r.forward(sender)
    assert forwarded.startswith("SRS0=") and forwarded.endswith("@fwd.example")
    assert r.is_srs(forwarded)
    assert r.reverse(forwarded) == sender


@settings(max_examples=200)
@given(_local_parts, _domains)
def test_reverse_of_forward_survives_lowercasing(local, domain):
    r = rewriter()
    sender = f"{local}@{domain}"
    assert r.reverse(r.forward(sender).lower()) == sender
