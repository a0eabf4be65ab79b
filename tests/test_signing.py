"""DKIM signing: keys, signatures dkimpy verifies, and the OpenSSL path matching dkimpy's own."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routemilter import dkimcore
from routemilter.config import DKIMKey, DKIMSettings
from routemilter.signing import (
    Signer,
    SigningError,
    dns_record,
    generate_key,
    key_problems,
    signed_header_names,
)

DOMAIN = "fwd.example"
MESSAGE = (
    b"Received: from mx.orig.example by fwd.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@orig.example>\r\n"
    b"To: me@family.example\r\n"
    b"Subject: Hello,\r\n"
    b"  folded   subject\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@orig.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Unsigned: not in the list\r\n"
    b"\r\n"
    b"Hello,  world \r\n"
    b"caf\xc3\xa9\r\n"
    b"\r\n"
)


@pytest.fixture(scope="module")
def keys(dkim_keys):
    """An RSA and an ed25519 key with their TXT records, and a Signer using both."""
    rsa_path, ed_path = dkim_keys.rsa, dkim_keys.ed25519
    records = {
        f"rsa1._domainkey.{DOMAIN}.": dkim_keys.rsa_txt,
        f"ed1._domainkey.{DOMAIN}.": dkim_keys.ed25519_txt,
    }
    signer = Signer.from_settings(DKIMSettings(DOMAIN, (DKIMKey("rsa1", rsa_path),
                                                        DKIMKey("ed1", ed_path))))
    return {"rsa": rsa_path, "ed25519": ed_path, "records": records, "signer": signer}


def dnsfunc_for(records):
    def dnsfunc(name, timeout=5):
        return records.get(name.decode() if isinstance(name, bytes) else name)
    return dnsfunc


def as_received(headers, message):
    """The message as the MTA emits it after addheader(name, value, 0) for each header."""
    prefix = b"".join((f"{name}: {value}".replace("\n", "\r\n") + "\r\n").encode()
                      for name, value in headers)
    return prefix + message


def tags(value: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in
            (part.partition("=") for part in "".join(value.split()).split(";") if part)}


# ------------------------------------------------------------ signatures verify


def test_each_signature_verifies(keys):
    headers = keys["signer"].sign(MESSAGE)
    assert [name for name, _ in headers] == ["DKIM-Signature", "DKIM-Signature"]
    dnsfunc = dnsfunc_for(keys["records"])
    for header in headers:
        assert dkim.verify(as_received([header], MESSAGE), dnsfunc=dnsfunc)
    both = as_received(headers, MESSAGE)
    assert dkim.DKIM(both).verify(idx=0, dnsfunc=dnsfunc)
    assert dkim.DKIM(both).verify(idx=1, dnsfunc=dnsfunc)


def test_signature_tags(keys):
    rsa_value, ed_value = (value for _, value in keys["signer"].sign(MESSAGE))
    rsa_tags, ed_tags = tags(rsa_value), tags(ed_value)
    assert rsa_tags["a"] == "rsa-sha256" and ed_tags["a"] == "ed25519-sha256"
    assert rsa_tags["c"] == "relaxed/relaxed" and rsa_tags["d"] == DOMAIN
    assert (rsa_tags["s"], ed_tags["s"]) == ("rsa1", "ed1")
    signed = rsa_tags["h"].split(":")
    # Every present field in order except Received (X- fields too: a bounced copy is forwarded
    # with the signed fields only); then the ones a replayer would add, once more than present.
    assert signed == ["from", "to", "subject", "date", "message-id", "mime-version",
                      "content-type", "x-unsigned",
                      "from", "to", "subject", "date", "message-id", "mime-version", "content-type",
                      "cc", "reply-to", "sender", "in-reply-to", "references"]
    assert "received" not in signed and "content-transfer-encoding" not in signed  # absent: may be added


def test_added_reply_to_or_second_subject_breaks_the_signature(keys):
    """Oversigning: a Reply-To (absent when signed) or another Subject added anywhere fails."""
    dnsfunc = dnsfunc_for(keys["records"])
    signed = as_received(keys["signer"].sign(MESSAGE), MESSAGE)
    assert dkim.DKIM(signed).verify(idx=0, dnsfunc=dnsfunc)
    head, sep, body = signed.partition(b"\r\n\r\n")
    for extra in (b"Reply-To: thief@evil.example", b"Subject: pay now", b"Cc: x@evil.example"):
        for tampered in (extra + b"\r\n" + signed, head + b"\r\n" + extra + sep + body):
            assert not dkim.DKIM(tampered).verify(idx=0, dnsfunc=dnsfunc), extra


def test_header_names_h_cannot_carry_are_not_signed():
    names = signed_header_names([(b"From", b"a"), (b"X-A;b=c", b"x"), (b"Received", b"r")])
    assert names[0] == b"from" and b"x-a;b=c" not in names and b"received" not in names


def test_values_are_ready_for_addheader(keys):
    for name, value in keys["signer"].sign(MESSAGE):
        assert name == "DKIM-Signature"
        assert "\r" not in value  # libmilter: LF only, the MTA adds the CR
        assert not value[0].isspace() and not value.endswith("\n")
        lines = value.split("\n")
        assert len(lines) > 1 and all(line.startswith("\t") for line in lines[1:])
        assert all(len(line) < 998 for line in lines)


def test_tampering_breaks_the_signatures(keys):
    headers = keys["signer"].sign(MESSAGE)
    dnsfunc = dnsfunc_for(keys["records"])
    tampered_body = MESSAGE.replace(b"Hello,  world", b"Hello,  w0rld")
    tampered_subject = MESSAGE.replace(b"folded   subject", b"changed subject")
    added_from = b"From: mallory@evil.example\r\n" + MESSAGE  # oversigned From
    for tampered in (tampered_body, tampered_subject, added_from):
        for header in headers:
            assert not dkim.verify(as_received([header], tampered), dnsfunc=dnsfunc)


def test_relaxed_canonicalisation_tolerates_refolding(keys):
    headers = keys["signer"].sign(MESSAGE)
    refolded = MESSAGE.replace(b"Subject: Hello,\r\n  folded   subject", b"Subject: Hello, folded subject")
    for header in headers:
        assert dkim.verify(as_received([header], refolded), dnsfunc=dnsfunc_for(keys["records"]))


def test_bare_lf_message_signs_and_verifies(keys):
    lf_message = MESSAGE.replace(b"\r\n", b"\n")
    headers = keys["signer"].sign(lf_message)
    for header in headers:
        assert dkim.verify(as_received([header], MESSAGE), dnsfunc=dnsfunc_for(keys["records"]))


def test_message_without_from_is_refused(keys):
    with pytest.raises(SigningError, match="From"):
        keys["signer"].sign(b"To: x@y.example\r\nSubject: s\r\n\r\nbody\r\n")


JUNK = [
    b" leading continuation\r\nFrom: a@b.example\r\n\r\nbody\r\n",
    b"From: a@b.example\r\nno colon here\r\n\r\nbody\r\n",
    b"From: a@b.example\r\nX-8bit\xff\xfe: v\r\n\r\nbody\r\n",
    b"From: \xff\xfe\x00 a@b.example\r\nSubject: \x80\x81\r\n\r\n\x00\xff\r\n",
    b"From: a@b.example\nSubject: bare\rCR\n\nbody\n",
    b"From: a@b.example",
    b"",
    b"\r\n\r\n",
]


@pytest.mark.parametrize("message", JUNK)
def test_junk_messages_sign_or_raise_signing_error(keys, message):
    try:
        keys["signer"].sign(message)
    except SigningError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=40), max_size=6), st.binary(max_size=60), st.booleans())
def test_fuzzed_messages_sign_or_raise_signing_error(keys, header_lines, body, with_from):
    lines = ([b"From: a@b.example"] if with_from else []) + header_lines
    message = b"\r\n".join(lines) + b"\r\n\r\n" + body
    try:
        result = keys["signer"].sign(message)
    except SigningError:
        return
    assert all("\r" not in value for _, value in result)


# ------------------------------------------------------------ OpenSSL == dkimpy


def dkimpy_pure_signature(message: bytes, key_path: str, selector: bytes) -> bytes:
    """What plain dkimpy (pure-Python RSA) produces for the same header selection."""
    with open(key_path, "rb") as f:
        pem = f.read()
    reference = dkim.DKIM(message, signature_algorithm=b"rsa-sha256")
    reference.should_not_sign = {b"received", b"return-path"}
    return reference.sign(selector, DOMAIN.encode(), pem, canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=signed_header_names(reference.headers))


@pytest.mark.parametrize("message", [
    MESSAGE,
    MESSAGE.replace(b"\r\n", b"\n"),
    b"From: a@b.example\r\nFrom: second@b.example\r\nTo: x@y\r\n\r\n" + b"x" * 100_000 + b"\r\n",
    b"From: only@headers.example\r\n",
])
def test_openssl_signature_is_byte_identical_to_dkimpy(keys, monkeypatch, message):
    assert keys["signer"].rsa_backend == "openssl"
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)  # same t= for both
    name, value = keys["signer"].sign(message)[0]
    ours = f"{name}: {value}".replace("\n\t", "\r\n ").encode() + b"\r\n"
    reference = dkimpy_pure_signature(message, keys["rsa"], b"rsa1")
    assert tags(value)["b"] == tags(reference.decode())["b"]
    assert ours == reference  # the whole header, not only b=


def test_pure_python_rsa_is_not_used(keys, monkeypatch):
    def forbidden(*args):
        raise AssertionError("dkimpy's pure-Python RSA was called")
    monkeypatch.setattr(dkim.crypto, "rsa_decrypt", forbidden)
    monkeypatch.setattr(dkim.crypto, "parse_pem_private_key", forbidden)
    headers = keys["signer"].sign(MESSAGE)
    assert dkim.verify(as_received(headers[:1], MESSAGE), dnsfunc=dnsfunc_for(keys["records"]))


def test_fallback_to_plain_dkimpy_still_signs(keys, monkeypatch):
    monkeypatch.setattr(dkimcore, "BACKEND", dkimcore.PLAIN)
    assert keys["signer"].rsa_backend == "dkimpy"
    headers = keys["signer"].sign(MESSAGE)
    for header in headers:
        assert dkim.verify(as_received([header], MESSAGE), dnsfunc=dnsfunc_for(keys["records"]))


def test_hook_is_skipped_when_dkimpy_changes():
    def unrelated(x):
        return x
    assert dkimcore.with_globals(unrelated, RSASSA_PKCS1_v1_5_sign=None) is None
    assert dkimcore.with_globals(dkim.DomainSigner.gen_header, RSASSA_PKCS1_v1_5_sign=None)


def test_dkim_module_itself_is_not_modified():
    assert dkim.RSASSA_PKCS1_v1_5_sign is dkim.crypto.RSASSA_PKCS1_v1_5_sign
    assert dkim.parse_pem_private_key is dkim.crypto.parse_pem_private_key
    assert dkim.DKIM.sign.__globals__ is dkim.__dict__


# ------------------------------------------------------------ keys


def write(path, data: bytes, mode=0o600):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return str(path)


def pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_generated_keys_are_private_and_clean(keys):
    for algorithm in ("rsa", "ed25519"):
        assert os.stat(keys[algorithm]).st_mode & 0o777 == 0o600
        assert key_problems(keys[algorithm]) == []


def test_generate_key_refuses_to_overwrite(tmp_path):
    path = write(tmp_path / "existing.key", b"precious")
    with pytest.raises(SigningError, match="already exists"):
        generate_key("ed25519", path)
    with open(path, "rb") as f:
        assert f.read() == b"precious"
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SigningError):
        generate_key("ed25519", str(link))
    assert not (tmp_path / "elsewhere").exists()


def test_generate_key_ignores_a_lax_umask(tmp_path):
    old = os.umask(0)
    try:
        generate_key("ed25519", str(tmp_path / "k"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o600


def test_generate_key_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_key("dsa", str(tmp_path / "a"))
    with pytest.raises(ValueError):
        generate_key("rsa", str(tmp_path / "b"), bits=1024)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_txt_records(keys):
    rsa_txt = keys["records"][f"rsa1._domainkey.{DOMAIN}."]
    ed_txt = keys["records"][f"ed1._domainkey.{DOMAIN}."]
    assert rsa_txt.startswith("v=DKIM1; k=rsa; p=MII")
    assert ed_txt.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(tags(ed_txt)["p"])) == 32


def test_dns_record_splits_at_255():
    txt = "v=DKIM1; k=rsa; p=" + "A" * 600
    line = dns_record("sel", "fwd.example.", txt)
    assert line.startswith("sel._domainkey.fwd.example. IN TXT ( \"") and line.endswith("\" )")
    chunks = re.findall(r'"([^"]*)"', line)
    assert [len(c) for c in chunks] == [255, 255, len(txt) - 510]
    assert "".join(chunks) == txt
    assert dns_record("s", "d.example", "short") == 's._domainkey.d.example. IN TXT ( "short" )'


@pytest.mark.parametrize("mode, words", [(0o644, "group can read it, others can read it"),
                                         (0o640, "group can read it"),
                                         (0o620, "group can write it"),
                                         (0o606, "others can read and write it")])
def test_key_problems_lax_modes(keys, tmp_path, mode, words):
    with open(keys["ed25519"], "rb") as f:
        path = write(tmp_path / "k", f.read(), mode)
    problems = key_problems(path)
    assert len(problems) == 1 and words in problems[0] and f"{mode:04o}" in problems[0]


def test_key_problems_files(tmp_path):
    assert key_problems(str(tmp_path / "missing"))[0].startswith("cannot read")
    assert key_problems(str(tmp_path)) == ["not a regular file"]
    for garbage in (b"", b"hello", os.urandom(200), b"-----BEGIN RSA PRIVATE KEY-----\nxx\n-----END RSA"
                    b" PRIVATE KEY-----\n", base64.b64encode(os.urandom(31))):
        path = str(tmp_path / "g")
        if os.path.exists(path):
            os.unlink(path)
        write(path, garbage)
        assert len(key_problems(path)) == 1, garbage


def test_key_problems_key_types(tmp_path):
    encrypted = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    assert "encrypted" in key_problems(write(tmp_path / "enc", encrypted))[0]
    ec_key = pem(ec.generate_private_key(ec.SECP256R1()))
    assert "unsupported key type" in key_problems(write(tmp_path / "ec", ec_key))[0]
    small = pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    [warning] = key_problems(write(tmp_path / "small", small))
    assert warning.startswith("warning:") and "1024" in warning
    # An ed25519 PKCS#8 PEM (openssl genpkey) is accepted as well as dkimpy's base64 seed.
    assert key_problems(write(tmp_path / "ed.pem", pem(ed25519.Ed25519PrivateKey.generate()))) == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool")
def test_key_problems_rsa_below_1024_bits(tmp_path):
    path = str(tmp_path / "tiny")
    result = subprocess.run(["openssl", "genrsa", "-out", path, "768"], capture_output=True)
    if result.returncode != 0:
        pytest.skip("this openssl refuses 768-bit keys")
    os.chmod(path, 0o600)
    [problem] = key_problems(path)
    assert "768 bits" in problem and not problem.startswith("warning:")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_key_problems_foreign_owner(keys, tmp_path):
    with open(keys["ed25519"], "rb") as f:
        path = write(tmp_path / "k", f.read())
    os.chown(path, 4242, -1)
    [problem] = key_problems(path)
    assert problem.startswith("warning:") and "owned by uid 4242" in problem


def test_from_settings_names_every_bad_file(keys, tmp_path):
    lax = write(tmp_path / "lax", Path(keys["ed25519"]).read_bytes(), 0o644)
    missing = str(tmp_path / "missing")
    settings_ = DKIMSettings(DOMAIN, (DKIMKey("a", keys["rsa"]), DKIMKey("b", lax),
                                      DKIMKey("c", missing)))
    with pytest.raises(SigningError) as info:
        Signer.from_settings(settings_)
    text = str(info.value)
    assert lax in text and "0644" in text and missing in text and "cannot read" in text
    assert keys["rsa"] not in text


def test_from_settings_keeps_warnings(tmp_path):
    small = write(tmp_path / "small", pem(rsa.generate_private_key(public_exponent=65537,
                                                                    key_size=1024)))
    signer = Signer.from_settings(DKIMSettings(DOMAIN, (DKIMKey("s", small),)))
    assert len(signer.warnings) == 1 and small in signer.warnings[0]
    assert len(signer.sign(MESSAGE)) == 1


def test_keys_are_loaded_up_front(keys, tmp_path):
    path = write(tmp_path / "k", Path(keys["ed25519"]).read_bytes())
    signer = Signer.from_settings(DKIMSettings(DOMAIN, (DKIMKey("ed1", path),)))
    os.unlink(path)  # e.g. unreadable after dropping privileges
    [header] = signer.sign(MESSAGE)
    assert dkim.verify(as_received([header], MESSAGE), dnsfunc=dnsfunc_for(keys["records"]))
