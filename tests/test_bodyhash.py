"""signing.BodyHash (the streamed DKIM body hash) against dkimpy's own canonicalization,
and streamed signing against signing the whole message."""

from __future__ import annotations

import base64
import hashlib
import re

import dkim
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from routemilter.config import DKIMKey, DKIMSettings
from routemilter.signing import BodyHash, Signer

HEAD = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: t\r\n\r\n"


def dkimpy_body_hash(body: bytes) -> bytes:
    """What dkimpy hashes for `body` as the body of a message: parse, canonicalize, SHA-256."""
    _, parsed_body = dkim.rfc822_parse(HEAD + body)
    return hashlib.sha256(Relaxed.canonicalize_body(parsed_body)).digest()


def streamed(body: bytes, cuts: list[int]) -> bytes:
    h = BodyHash()
    start = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        h.update(body[start:cut])
        start = max(start, cut)
    h.update(body[start:])
    return h.digest()


bodies = st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"\r", b"\n", b"\r\n", b"  ", b"\r\n\r\n"]),
                  max_size=60).map(b"".join)


@settings(max_examples=1500, deadline=None)
@given(body=bodies, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_same_as_dkimpy_any_chunking(body, cuts):
    assert streamed(body, cuts) == dkimpy_body_hash(body)


@pytest.mark.parametrize("body", [
    b"", b"\r\n", b"\r\n\r\n\r\n", b"x", b"x \t ", b"x\r\n\r\n", b"\n\n", b"a\r", b"a\r\r\n\r\n",
    b" \r\n", b"\t\r\n\r\nx", b"line  with   spaces \t\r\nnext\r\n\r\n",
    b"The quick brown fox jumps over the lazy dog.\r\n" * 2000,
    b"\r\n" * 70000 + b"end",  # many empty lines, across chunk sizes
    b"no line end at all " * 5000,
])
@pytest.mark.parametrize("chunk", [1, 7, 65535])
def test_same_as_dkimpy_fixed(body, chunk):
    h = BodyHash()
    for i in range(0, len(body), chunk):
        h.update(body[i:i + chunk])
    assert h.digest() == dkimpy_body_hash(body)
    assert h.size == len(body)


@pytest.fixture(scope="module")
def signer(dkim_keys):
    keys = (DKIMKey("rsa", dkim_keys.rsa), DKIMKey("ed", dkim_keys.ed25519))
    s = Signer.from_settings(DKIMSettings("example.test", keys))
    s.txt = {"rsa": dkim_keys.rsa_txt, "ed": dkim_keys.ed25519_txt}
    return s


@pytest.mark.parametrize("body", [b"", b"hello  world \t\r\n\r\n\r\n", b"x" * 100000 + b"\r\n", b"a\nb\n"])
def test_streamed_signature_verifies_and_matches_whole_message(signer, body, monkeypatch):
    assert signer.streams
    import time

    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)  # b= covers t=: one clock for both
    header_block = HEAD
    h = BodyHash()
    for i in range(0, len(body), 65535):
        h.update(body[i:i + 65535])
    streamed_fields = signer.sign(header_block, body=h)
    whole_fields = signer.sign(HEAD + body)
    # Same signatures except the timestamp t= (RSA is deterministic, ed25519 too).
    strip_t = lambda v: re.sub(r"t=\d+;", "t=;", v)  # noqa: E731
    assert [(n, strip_t(v)) for n, v in streamed_fields] == [(n, strip_t(v)) for n, v in whole_fields]
    for name, value in streamed_fields:
        message = f"{name}: {value}".replace("\n", "\r\n").encode() + b"\r\n" + HEAD + body
        d = dkim.DKIM(message)
        assert d.verify(dnsfunc=lambda qname, timeout=5: signer.txt[qname.decode().split(".")[0]].encode())
    bh = base64.b64encode(dkimpy_body_hash(body)).decode()
    assert all(f"bh={bh}" in v.replace("\n\t", "") for _, v in streamed_fields)
