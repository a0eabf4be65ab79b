"""The dkimpy glue shared by DKIM signing, ARC sealing and verification: the OpenSSL
RSA hook, private keys, and parsing a message the fast way.

dkimpy does everything DKIM-specific (header selection, relaxed canonicalisation,
body hash, the tag list, folding). Its RSA step, though, is pure Python: about
7 ms per RSA-2048 signature, under the GIL, so it stalls every libmilter thread.
`BACKEND.dkim_class` is `dkim.DKIM` with that one step replaced by OpenSSL (through
the `cryptography` package), without forking or patching dkimpy:

* dkimpy's own `DKIM.sign` and `DomainSigner.gen_header` functions are reused
  unchanged (same code objects) on a subclass, each with ONE global name
  rebound for that subclass only: `parse_pem_private_key` (so an already-loaded
  key object passes through instead of dkimpy re-parsing the PEM in Python on
  every message) and `RSASSA_PKCS1_v1_5_sign` (so the digest dkimpy computed is
  signed by OpenSSL). Anything else (a PEM, an ed25519 key) takes dkimpy's own
  path. The `dkim` module itself is not modified, so other users of dkimpy in
  the process (verification) are unaffected. `BACKEND.arc_class` does the same for
  `dkim.ARC` (ARC sealing, RFC 8617).
* `DKIM.sign` also gets `CanonicalizationPolicy` and `HASH_ALGORITHMS` rebound,
  so a body already hashed as it streamed in (`BodyDigest`, signing.BodyHash)
  passes through instead of being kept and canonicalised again.
* RSASSA-PKCS1-v1_5 is deterministic, so the OpenSSL signature is byte-for-byte
  the one dkimpy would compute (tests check this against dkimpy's pure path).
* The clones resolve their other global names in a copy of dkim's namespace
  taken at import; nothing they use is meant to change after that.
* If a future dkimpy no longer uses those names, the rebinding is skipped and
  signing falls back to plain dkimpy (correct, just slower); `BACKEND.name`
  says which one is in use so the daemon can log it.

Key files follow OpenDKIM's and dkimpy's formats: RSA as PEM (PKCS#1 or PKCS#8,
unencrypted), ed25519 as dkimpy's base64 32-byte seed (a PKCS#8 PEM ed25519 key
from `openssl genpkey` is accepted too). A key is read once per config load: the
Signer loads it, the ARC sealer takes the Signer's.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import dkim
import dkim.canonicalization
import dkim.crypto
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

RSA = b"rsa-sha256"
ED25519 = b"ed25519-sha256"
MIN_RSA_BITS = 1024  # RFC 8301: verifiers MUST NOT accept less
RECOMMENDED_RSA_BITS = 2048  # RFC 8301: signers SHOULD use at least this
_MAX_KEY_FILE = 64 * 1024


# ------------------------------------------------------- OpenSSL for dkimpy


def _pass_loaded_key(privkey: Any) -> Any:
    """dkimpy's parse_pem_private_key, letting a loaded OpenSSL key through."""
    if isinstance(privkey, rsa.RSAPrivateKey):
        return privkey
    return dkim.crypto.parse_pem_private_key(privkey)


_PREHASHED: dict[str, type[hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


class _Digest(Protocol):
    name: str

    def digest(self) -> bytes: ...


def _rsa_sign(digest: _Digest, private_key: Any) -> bytes:
    """dkimpy's RSASSA_PKCS1_v1_5_sign, done by OpenSSL for an OpenSSL key.

    `digest` is dkimpy's hash object over exactly the data dkimpy signs; only
    the final PKCS#1 v1.5 operation on its digest moves to OpenSSL.
    """
    if isinstance(private_key, rsa.RSAPrivateKey):
        algorithm = _PREHASHED[digest.name.lower()]()
        return private_key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))
    signature: bytes = dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, private_key)
    return signature


def with_globals(function: Callable[..., Any], **names: object) -> Callable[..., Any] | None:
    """A copy of `function` whose global `names` resolve to other objects.

    None if `function` does not use all of those names (the library changed).
    """
    if not set(names) <= set(function.__code__.co_names):
        return None
    namespace = dict(function.__globals__)
    namespace.update(names)
    clone = types.FunctionType(function.__code__, namespace, function.__name__,
                               function.__defaults__, function.__closure__)
    clone.__kwdefaults__ = function.__kwdefaults__
    clone.__qualname__ = function.__qualname__
    clone.__doc__ = function.__doc__
    return clone


class BodyDigest:
    """Stands in for the body in dkimpy's sign(): the relaxed/SHA-256 body hash, already done."""

    __slots__ = ("digest",)

    def __init__(self, digest: bytes):
        self.digest = digest


class _PrehashedCanonicalization:
    """dkimpy's canonicalization policy, letting an already hashed body through."""

    def __init__(self, policy: Any):
        self._policy = policy

    @classmethod
    def from_c_value(cls, c: bytes) -> _PrehashedCanonicalization:
        return cls(dkim.canonicalization.CanonicalizationPolicy.from_c_value(c))

    def canonicalize_body(self, body: Any) -> Any:
        if isinstance(body, BodyDigest):
            if self._policy.body_algorithm is not dkim.canonicalization.Relaxed:
                raise ValueError("a precomputed body hash is for relaxed body canonicalization only")
            return body
        return self._policy.canonicalize_body(body)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)


class _Hash:
    """A hashlib object that, given a BodyDigest, takes its digest as the result."""

    def __init__(self, factory: Callable[[], Any]):
        self._hash = factory()
        self.name: str = self._hash.name
        self._fixed: bytes | None = None

    def update(self, data: Any) -> None:
        if isinstance(data, BodyDigest):
            if self.name != "sha256":
                raise ValueError(f"a precomputed body hash is SHA-256, not {self.name}")
            self._fixed = data.digest
        else:
            self._hash.update(data)

    def digest(self) -> bytes:
        if self._fixed is not None:
            return self._fixed
        value: bytes = self._hash.digest()
        return value

    def hexdigest(self) -> str:
        return self.digest().hex()


def _hash_factory(factory: Callable[[], Any]) -> Callable[[], _Hash]:
    return lambda: _Hash(factory)


_HASHES = {name: _hash_factory(factory) for name, factory in dkim.crypto.HASH_ALGORITHMS.items()}


def _openssl_dkim_class() -> type[Any] | None:
    # sign(): keys already loaded pass through; a body hashed by BodyHash passes through.
    sign = with_globals(dkim.DKIM.sign, parse_pem_private_key=_pass_loaded_key,
                        CanonicalizationPolicy=_PrehashedCanonicalization, HASH_ALGORITHMS=_HASHES)
    precomputed_body = sign is not None
    if sign is None:
        sign = with_globals(dkim.DKIM.sign, parse_pem_private_key=_pass_loaded_key)
    gen_header = with_globals(dkim.DomainSigner.gen_header, RSASSA_PKCS1_v1_5_sign=_rsa_sign)
    if sign is None or gen_header is None:
        return None
    return type("_OpenSSLDKIM", (dkim.DKIM,), {
        "__doc__": "dkim.DKIM whose RSA signatures are computed by OpenSSL.",
        "sign": sign,
        "gen_header": gen_header,
        "precomputed_body": precomputed_body,
    })


_OpenSSLDKIM = _openssl_dkim_class()


def _openssl_arc_class() -> type[Any] | None:
    if _OpenSSLDKIM is None:
        return None
    sign = with_globals(dkim.ARC.sign, parse_pem_private_key=_pass_loaded_key)
    if sign is None:
        return None
    return type("_OpenSSLARC", (dkim.ARC,), {
        "__doc__": "dkim.ARC whose RSA signatures are computed by OpenSSL.",
        "sign": sign,
        "gen_header": _OpenSSLDKIM.gen_header,
    })


_OpenSSLARC = _openssl_arc_class()


@dataclass(frozen=True)
class Backend:
    """The dkimpy classes to sign and seal with."""

    name: str  # who computes RSA signatures: "openssl", or "dkimpy" (pure Python, slow)
    dkim_class: type[Any]
    arc_class: type[Any]
    streams: bool  # dkim_class.sign takes a BodyDigest for the body (the body streamed, never kept)


#: dkimpy's own classes: what BACKEND is if this dkimpy no longer has the hooked names.
PLAIN = Backend("dkimpy", dkim.DKIM, dkim.ARC, False)
BACKEND = PLAIN if _OpenSSLDKIM is None else Backend(
    "openssl", _OpenSSLDKIM, _OpenSSLARC or dkim.ARC, bool(_OpenSSLDKIM.precomputed_body))


def parsed(cls: type[Any], head: bytes, body: bytes, **kw: Any) -> Any:
    """A dkimpy DKIM/ARC object over `head` (CRLF header block) and `body`.

    dkimpy splits a whole message into a list of lines to find the header end; for
    a body that already has CRLF line ends (as libmilter delivers it) only the
    header is parsed that way and the body is set as is (same result, 20 MiB in
    milliseconds instead of a second per parse)."""
    if body.count(b"\n") == body.count(b"\r\n"):
        obj = cls(head + b"\r\n", **kw)
        obj.body = body
        return obj
    return cls(head + b"\r\n" + body, **kw)


# ------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Key:
    """A private key as loaded from its file (selector and path filled in by the Signer)."""

    selector: str
    path: str
    algorithm: bytes  # RSA or ED25519
    private: rsa.RSAPrivateKey | bytes  # an OpenSSL RSA key, or the base64 ed25519 seed dkimpy takes
    pem: bytes | None = None  # RSA only: PKCS#1 PEM, for dkimpy's own path

    def for_dkimpy(self, backend: Backend) -> rsa.RSAPrivateKey | bytes:
        """What `backend`'s sign() takes: the loaded key with the OpenSSL hook, else the PEM."""
        if self.algorithm == RSA and backend.name != "openssl" and self.pem is not None:
            return self.pem
        return self.private


def _describe_mode(mode: int) -> str | None:
    parts = []
    for who, shift in (("group", 3), ("others", 0)):
        verbs = [verb for verb, bit in (("read", 0o4), ("write", 0o2)) if mode >> shift & bit]
        if verbs:
            parts.append(f"{who} can {' and '.join(verbs)} it")
    if not parts:
        return None
    return f"mode {stat.S_IMODE(mode):04o}: {', '.join(parts)} (chmod 600)"


def parse_key(data: bytes) -> tuple[Key | None, list[str]]:
    """Key material from file contents (selector and path are left empty)."""
    if b"-----BEGIN" in data:
        if b"ENCRYPTED" in data:
            return None, ["encrypted private keys are not supported (protect it with mode 0600)"]
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            return None, [f"not a parseable PEM private key ({exc})"]
        if isinstance(key, rsa.RSAPrivateKey):
            bits = key.key_size
            if bits < MIN_RSA_BITS:
                return None, [f"RSA key of {bits} bits: at least {MIN_RSA_BITS} needed, "
                              f"{RECOMMENDED_RSA_BITS} recommended"]
            problems = []
            if bits < RECOMMENDED_RSA_BITS:
                problems.append(f"warning: RSA key of {bits} bits; "
                                f"{RECOMMENDED_RSA_BITS} bits are recommended (RFC 8301)")
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
            return Key("", "", RSA, key, pem), problems
        if isinstance(key, ed25519.Ed25519PrivateKey):
            seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
            return Key("", "", ED25519, base64.b64encode(seed)), []
        return None, [f"unsupported key type {type(key).__name__}: DKIM signs with RSA or ed25519"]
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) == 32:
        return Key("", "", ED25519, base64.b64encode(seed)), []
    return None, ["neither a PEM private key (RSA or ed25519) nor a base64 ed25519 seed"]


def load_key(path: str) -> tuple[Key | None, list[str]]:
    """The key in the file at `path`, and what is wrong with it (see key_problems)."""
    try:
        # One open file for the checks and the read: the file cannot change in between.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        return None, [f"cannot read: {exc.strerror or exc}"]
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None, ["not a regular file"]
    with open(fd, "rb") as file:
        problems = []
        # Like OpenDKIM: a key others can read is compromised, one they can write is theirs.
        mode_problem = _describe_mode(info.st_mode)
        if mode_problem:
            problems.append(mode_problem)
        if info.st_uid not in (0, os.geteuid()):
            # Only a warning: `check` run as root legitimately sees a key owned by the daemon's user.
            problems.append(f"warning: owned by uid {info.st_uid}, neither root nor uid "
                            f"{os.geteuid()} (us): that user can replace the key")
        try:
            data = file.read(_MAX_KEY_FILE + 1)
        except OSError as exc:
            return None, problems + [f"cannot read: {exc.strerror or exc}"]
    if len(data) > _MAX_KEY_FILE:
        return None, problems + ["too large to be a private key"]
    key, key_problems = parse_key(data)
    return key, problems + key_problems


def key_problems(path: str) -> list[str]:
    """What is wrong with the private key file at `path`; [] if nothing.

    Entries starting with "warning:" are advice (an RSA key of 1024 to 2047
    bits; a file owned by neither root nor the current user) and do not stop
    the key from being used; every other entry does: missing or unreadable
    file, not a regular file, readable or writable by group or others (as
    OpenDKIM refuses them), encrypted, not an RSA or ed25519 key, RSA shorter
    than 1024 bits.
    """
    return load_key(path)[1]


def is_fatal(problem: str) -> bool:
    """Whether a key_problems entry stops the key from being used."""
    return not problem.startswith("warning:")
