"""DKIM signing of forwarded mail: dkimpy builds the signature, OpenSSL does the RSA.

dkimpy does everything DKIM-specific (header selection, relaxed canonicalisation,
body hash, the tag list, folding). Its RSA step, though, is pure Python: about
7 ms per RSA-2048 signature, under the GIL, so it stalls every libmilter thread.
`_OpenSSLDKIM` is `dkim.DKIM` with that one step replaced by OpenSSL (through
the `cryptography` package), without forking or patching dkimpy:

* dkimpy's own `DKIM.sign` and `DomainSigner.gen_header` functions are reused
  unchanged (same code objects) on a subclass, each with ONE global name
  rebound for that subclass only: `parse_pem_private_key` (so an already-loaded
  key object passes through instead of dkimpy re-parsing the PEM in Python on
  every message) and `RSASSA_PKCS1_v1_5_sign` (so the digest dkimpy computed is
  signed by OpenSSL). Anything else (a PEM, an ed25519 key) takes dkimpy's own
  path. The `dkim` module itself is not modified, so other users of dkimpy in
  the process (ARC, verification) are unaffected.
* RSASSA-PKCS1-v1_5 is deterministic, so the OpenSSL signature is byte-for-byte
  the one dkimpy would compute (tests check this against dkimpy's pure path).
* The clones resolve their other global names in a copy of dkim's namespace
  taken at import; nothing they use is meant to change after that.
* If a future dkimpy no longer uses those names, the rebinding is skipped and
  signing falls back to plain dkimpy (correct, just slower); `Signer.rsa_backend`
  says which one is in use so the daemon can log it.

Key files follow OpenDKIM's and dkimpy's formats: RSA as PEM (PKCS#1 or PKCS#8,
unencrypted), ed25519 as dkimpy's base64 32-byte seed (a PKCS#8 PEM ed25519 key
from `openssl genpkey` is accepted too).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
import types
from collections.abc import Callable
from dataclasses import dataclass, replace

import dkim
import dkim.crypto
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from .config import DKIMSettings

#: Never signed: trace fields that relays add or change in transit (RFC 6376 section 5.4).
#: Every other field present when we sign is signed (each instance): a bounced copy is
#: forwarded to a fallback address with exactly the fields our signature covered
#: (bounces.py), so what we do not sign is dropped there.
UNSIGNED_HEADERS = ("return-path", "received", "comments", "keywords", "bcc", "resent-bcc")
#: Signed once more than they occur, so an instance cannot be added later without breaking
#: the signature (RFC 6376 section 8.15: what a replayer would add to change the meaning).
OVERSIGNED_HEADERS = (
    "from", "to", "cc", "subject", "reply-to", "date", "message-id", "sender",
    "in-reply-to", "references", "mime-version", "content-type", "content-transfer-encoding",
)
#: Of those, oversigned even when absent: fields no MTA adds on the way (Postfix may add
#: a missing Date, Message-ID or To to some local mail, which would then break our signature).
OVERSIGNED_WHEN_ABSENT = ("cc", "subject", "reply-to", "sender", "in-reply-to", "references")
_SIGNABLE_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # h= is a ':' list: no ';' or '='
MIN_RSA_BITS = 1024  # RFC 8301: verifiers MUST NOT accept less
RECOMMENDED_RSA_BITS = 2048  # RFC 8301: signers SHOULD use at least this
_MAX_KEY_FILE = 64 * 1024
_RSA = b"rsa-sha256"
_ED25519 = b"ed25519-sha256"


class SigningError(Exception):
    """A key that cannot be used, or a message that cannot be signed."""


# ------------------------------------------------------- OpenSSL for dkimpy


def _pass_loaded_key(privkey):
    """dkimpy's parse_pem_private_key, letting a loaded OpenSSL key through."""
    if isinstance(privkey, rsa.RSAPrivateKey):
        return privkey
    return dkim.crypto.parse_pem_private_key(privkey)


_PREHASHED = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


def _rsa_sign(digest, private_key) -> bytes:
    """dkimpy's RSASSA_PKCS1_v1_5_sign, done by OpenSSL for an OpenSSL key.

    `digest` is dkimpy's hash object over exactly the data dkimpy signs; only
    the final PKCS#1 v1.5 operation on its digest moves to OpenSSL.
    """
    if isinstance(private_key, rsa.RSAPrivateKey):
        algorithm = _PREHASHED[digest.name.lower()]()
        return private_key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))
    return dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, private_key)


def _with_globals(function: Callable, **names) -> Callable | None:
    """A copy of `function` whose global `names` resolve to other objects.

    None if `function` does not use all of those names (dkimpy changed).
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


# ------------------------------------------------- body hash, computed once


_LINE_END = re.compile(b"\r?\n")
_TRAILING_WSP = re.compile(b"[\t ]+\r\n")
# The whitespace runs relaxed canonicalization changes: any with a tab, any longer than
# one space. dkimpy's [\t ]+ -> " " also rewrites every single space into itself, which
# is most of its cost on ordinary text; the result is the same.
_WSP_RUN = re.compile(b"\t[\t ]*| [\t ]+")
_CRLF = b"\r\n"


def _trailing_crlfs(data: bytes) -> int:
    """How many CR LF pairs `data` ends with (dkimpy's strip_trailing_lines counts them so)."""
    lo, hi = 0, (len(data) - len(data.rstrip(_CRLF))) // 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if data.endswith(_CRLF * mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


class BodyHash:
    """SHA-256 of a message body under DKIM relaxed body canonicalization, fed in chunks.

    The same bytes as dkimpy's `Relaxed.canonicalize_body` over the body as dkimpy's
    parser returns it (lines split on CR LF or bare LF, rejoined with CR LF), hashed as
    they arrive: the milter keeps no copy of the body, and the body is canonicalized
    once for all keys (rsa-sha256 and ed25519-sha256 both hash it with SHA-256).
    Only the unfinished last line and a count of trailing empty lines are held back.
    """

    def __init__(self):
        self._sha = hashlib.sha256()
        self._carry: list[bytes] = []  # the current line, not yet ended
        self._pending = 0  # empty lines seen at the end: hashed only if more text follows
        self._hashed = False
        self._digest: bytes | None = None
        self.size = 0  # body bytes fed

    def update(self, chunk: bytes) -> None:
        if self._digest is not None:
            raise ValueError("BodyHash.update after digest()")
        self.size += len(chunk)
        end = chunk.rfind(b"\n") + 1
        if not end:
            if chunk:
                self._carry.append(chunk)
            return
        if self._carry:
            self._carry.append(chunk[:end])
            block = b"".join(self._carry)
        else:
            block = chunk[:end] if end < len(chunk) else chunk
        self._carry = [chunk[end:]] if end < len(chunk) else []
        self._lines(block)

    def _lines(self, block: bytes) -> None:
        """Complete lines (`block` ends with LF)."""
        if block.count(b"\n") != block.count(_CRLF):
            block = _LINE_END.sub(_CRLF, block)
        if b" \r\n" in block or b"\t\r\n" in block:
            block = _TRAILING_WSP.sub(_CRLF, block)
        if b"\t" in block or b"  " in block:
            block = _WSP_RUN.sub(b" ", block)
        pairs = _trailing_crlfs(block)
        end = len(block) - 2 * pairs
        if end == 0:
            self._pending += pairs
            return
        if self._pending:
            self._sha.update(_CRLF * self._pending)
        self._sha.update(memoryview(block)[:end])
        self._hashed = True
        self._pending = pairs

    def digest(self) -> bytes:
        """The SHA-256 digest of the canonical body; the hash takes no more input after this."""
        if self._digest is None:
            rest = b"".join(self._carry)
            self._carry = []
            if rest:  # a last line without line end: dkimpy compresses it and adds CR LF
                if b"\t" in rest or b"  " in rest:
                    rest = _WSP_RUN.sub(b" ", rest)
                self._sha.update(_CRLF * self._pending + rest + _CRLF)
            elif self._hashed and self._pending:
                self._sha.update(_CRLF)  # trailing empty lines: none of them count
            self._digest = self._sha.digest()
        return self._digest


class _BodyDigest:
    """Stands in for the body in dkimpy's sign(): the relaxed/SHA-256 body hash, already done."""

    __slots__ = ("digest",)

    def __init__(self, digest: bytes):
        self.digest = digest


class _Policy:
    """dkimpy's canonicalization policy, letting an already hashed body through."""

    def __init__(self, policy):
        self._policy = policy

    @classmethod
    def from_c_value(cls, c):
        return cls(dkim.canonicalization.CanonicalizationPolicy.from_c_value(c))

    def canonicalize_body(self, body):
        if isinstance(body, _BodyDigest):
            if self._policy.body_algorithm is not dkim.canonicalization.Relaxed:
                raise ValueError("a precomputed body hash is for relaxed body canonicalization only")
            return body
        return self._policy.canonicalize_body(body)

    def __getattr__(self, name):
        return getattr(self._policy, name)


class _Hash:
    """A hashlib object that, given a _BodyDigest, takes its digest as the result."""

    def __init__(self, factory):
        self._hash = factory()
        self.name = self._hash.name
        self._fixed: bytes | None = None

    def update(self, data):
        if isinstance(data, _BodyDigest):
            if self.name != "sha256":
                raise ValueError(f"a precomputed body hash is SHA-256, not {self.name}")
            self._fixed = data.digest
        else:
            self._hash.update(data)

    def digest(self) -> bytes:
        return self._fixed if self._fixed is not None else self._hash.digest()

    def hexdigest(self) -> str:
        return self.digest().hex()


_HASHES = {name: (lambda factory=factory: _Hash(factory)) for name, factory in dkim.crypto.HASH_ALGORITHMS.items()}


def _openssl_dkim_class() -> type[dkim.DKIM] | None:
    # sign(): keys already loaded pass through; a body hashed by BodyHash passes through.
    sign = _with_globals(dkim.DKIM.sign, parse_pem_private_key=_pass_loaded_key,
                         CanonicalizationPolicy=_Policy, HASH_ALGORITHMS=_HASHES)
    precomputed_body = sign is not None
    if sign is None:
        sign = _with_globals(dkim.DKIM.sign, parse_pem_private_key=_pass_loaded_key)
    gen_header = _with_globals(dkim.DomainSigner.gen_header, RSASSA_PKCS1_v1_5_sign=_rsa_sign)
    if sign is None or gen_header is None:
        return None
    return type("_OpenSSLDKIM", (dkim.DKIM,), {
        "__doc__": "dkim.DKIM whose RSA signatures are computed by OpenSSL.",
        "sign": sign,
        "gen_header": gen_header,
        "precomputed_body": precomputed_body,
    })


_OpenSSLDKIM = _openssl_dkim_class()


# ------------------------------------------------------------------- keys


@dataclass(frozen=True)
class _Key:
    selector: str
    path: str
    algorithm: bytes  # _RSA or _ED25519
    private: object  # an OpenSSL RSA key, or the base64 ed25519 seed dkimpy takes
    pem: bytes | None = None  # RSA only: PKCS#1 PEM, for dkimpy's own path


def _describe_mode(mode: int) -> str | None:
    parts = []
    for who, shift in (("group", 3), ("others", 0)):
        verbs = [verb for verb, bit in (("read", 0o4), ("write", 0o2)) if mode >> shift & bit]
        if verbs:
            parts.append(f"{who} can {' and '.join(verbs)} it")
    if not parts:
        return None
    return f"mode {stat.S_IMODE(mode):04o}: {', '.join(parts)} (chmod 600)"


def _parse_key(data: bytes) -> tuple[_Key | None, list[str]]:
    """Key material from file contents (selector and path are filled in later)."""
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
            return _Key("", "", _RSA, key, pem), problems
        if isinstance(key, ed25519.Ed25519PrivateKey):
            seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
            return _Key("", "", _ED25519, base64.b64encode(seed)), []
        return None, [f"unsupported key type {type(key).__name__}: DKIM signs with RSA or ed25519"]
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) == 32:
        return _Key("", "", _ED25519, base64.b64encode(seed)), []
    return None, ["neither a PEM private key (RSA or ed25519) nor a base64 ed25519 seed"]


def _load_key(path: str) -> tuple[_Key | None, list[str]]:
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
    key, key_problems = _parse_key(data)
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
    return _load_key(path)[1]


def _is_fatal(problem: str) -> bool:
    return not problem.startswith("warning:")


# ----------------------------------------------------------------- signer


class Signer:
    """DKIM-signs messages for one domain, one signature per configured key."""

    def __init__(self, domain: str, keys: list[_Key], warnings: list[str] | None = None):
        if not keys:
            raise SigningError("no DKIM keys configured")
        try:
            self._domain = domain.rstrip(".").encode("ascii")
        except UnicodeEncodeError:
            raise SigningError(f"DKIM domain {domain!r} must be ASCII (use its A-label)") from None
        self._keys = tuple(keys)
        #: Non-fatal key problems ("warning: ..."), for the daemon to log.
        self.warnings = tuple(warnings or ())

    @classmethod
    def from_settings(cls, settings: DKIMSettings) -> Signer:
        """Load and check every key now (before the daemon drops privileges).

        Raises SigningError naming each unusable key file and why.
        """
        keys, fatal, warnings = [], [], []
        for configured in settings.keys:
            key, problems = _load_key(configured.key_file)
            where = f"DKIM key {configured.key_file} (selector {configured.selector})"
            fatal += [f"{where}: {p}" for p in problems if _is_fatal(p)]
            warnings += [f"{where}: {p}" for p in problems if not _is_fatal(p)]
            if key is not None and not any(_is_fatal(p) for p in problems):
                if not configured.selector.isascii():
                    fatal.append(f"{where}: the selector must be ASCII")
                    continue
                keys.append(replace(key, selector=configured.selector, path=configured.key_file))
        if fatal:
            raise SigningError("\n".join(fatal))
        return cls(settings.domain, keys, warnings)

    def dns_records(self) -> dict[str, str]:
        """selector -> the DNS TXT value of its public key, to verify our own
        signatures without DNS (bounces.py checks returned messages with it)."""
        records = {}
        for key in self._keys:
            if key.algorithm == _RSA:
                private = key.private if isinstance(key.private, rsa.RSAPrivateKey) else \
                    serialization.load_pem_private_key(key.pem, password=None)
                public = private.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
                kind = "rsa"
            else:
                seed = base64.b64decode(key.private)
                public = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                kind = "ed25519"
            records[key.selector] = f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode('ascii')}"
        return records

    @property
    def rsa_backend(self) -> str:
        """Who computes RSA signatures: "openssl", or "dkimpy" (pure Python, slow) if
        this dkimpy version no longer has the names the OpenSSL hook rebinds."""
        return "openssl" if _OpenSSLDKIM is not None else "dkimpy"

    @property
    def streams(self) -> bool:
        """Whether sign() takes a BodyHash (the body streamed in, never kept);
        False only if this dkimpy no longer has the names the hook rebinds."""
        return _OpenSSLDKIM is not None and _OpenSSLDKIM.precomputed_body

    def body_hash(self) -> BodyHash | None:
        """A BodyHash to feed the body into as it arrives, for sign(); None if not `streams`."""
        return BodyHash() if self.streams else None

    def sign(self, message: bytes, body: BodyHash | None = None, domain: str | None = None) -> list[tuple[str, str]]:
        """The DKIM-Signature header fields to add to `message`, as (name, value).

        `message` is the whole message, headers and body (CRLF or LF line ends);
        or, with `body` (a BodyHash fed the body; only when `streams`), the header
        block alone, ending with its empty line.
        Values are ready for pymilter's `addheader(name, value)`: no "name:"
        prefix, no leading space, folded with "\\n\\t". The libmilter API wants
        folds as a bare LF followed by whitespace, never CR LF: the MTA adds the
        CR itself (Postfix stores header lines LF-terminated and would keep a CR
        as part of the text), and it adds the space after the colon. Prepend
        them (`addheader(name, value, 0)`) as RFC 6376 section 5.6 suggests.
        `domain` signs for another domain than the configured one (d=) with the same
        keys: outbound mail of a managed domain (senders.py), whose DNS publishes them too.
        Raises SigningError if the message cannot be signed (no From, junk).
        """
        try:  # a managed domain may be written in Unicode: d= takes its A-label
            d = self._domain if domain is None else domain.rstrip(".").encode("idna")
        except UnicodeError:
            raise SigningError(f"DKIM domain {domain!r} has no A-label (IDNA)") from None
        try:
            # Parsed once; dkimpy's sign() reads but does not change the parsed message.
            parsed = (_OpenSSLDKIM or dkim.DKIM)(message)
            if self.streams:  # the body canonicalized and hashed once, for all keys
                if body is None:
                    body = BodyHash()
                    body.update(parsed.body)
                parsed.body = _BodyDigest(body.digest())
            elif body is not None:
                raise SigningError("this dkimpy cannot take a streamed body hash (see Signer.streams)")
        except dkim.DKIMException as exc:
            raise SigningError(f"cannot parse the message for DKIM: {exc}") from None
        except (ValueError, TypeError, IndexError, UnicodeError) as exc:
            # dkimpy's parser trips over some malformed headers (e.g. a leading
            # continuation line raises IndexError); such a message is not signed.
            raise SigningError(f"cannot parse the message for DKIM: {exc!r}") from None
        include = signed_header_names(parsed.headers)
        if b"from" not in include:
            raise SigningError("message has no From header field")
        parsed.should_not_sign = {h.encode() for h in UNSIGNED_HEADERS}
        return [self._sign_one(parsed, include, key, d) for key in self._keys]

    def _sign_one(self, parsed: dkim.DKIM, include: list[bytes], key: _Key, domain: bytes) -> tuple[str, str]:
        private = key.pem if (key.algorithm == _RSA and _OpenSSLDKIM is None) else key.private
        try:
            field = parsed.sign(key.selector.encode("ascii"), domain, private,
                                signature_algorithm=key.algorithm,
                                canonicalize=(b"relaxed", b"relaxed"), include_headers=include)
        except dkim.DKIMException as exc:
            raise SigningError(f"cannot sign with {key.path}: {exc}") from None
        except (ValueError, TypeError, IndexError, UnicodeError) as exc:
            raise SigningError(f"cannot sign with {key.path}: {exc!r}") from None
        name, _, value = field.partition(b":")
        value = value.lstrip(b" ").rstrip(b"\r\n").replace(b"\r\n ", b"\n\t")
        return name.decode("ascii"), value.decode("ascii")


def signed_header_names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The h= list for a message with these header fields: each present field once per
    instance (except UNSIGNED_HEADERS and names h= cannot carry), then the oversigned ones."""
    present = [name.lower() for name, _ in headers]
    include = [name for name in present
               if name.decode("ascii", "replace") not in UNSIGNED_HEADERS and _SIGNABLE_NAME.fullmatch(name)]
    include += [h.encode() for h in OVERSIGNED_HEADERS if h.encode() in present]
    include += [h.encode() for h in OVERSIGNED_WHEN_ABSENT if h.encode() not in present]
    return include


# ----------------------------------------------------------- key generation


def generate_key(algorithm: str, key_path: str, bits: int = 2048) -> str:
    """Create a private key file (mode 0600, never overwriting) and return its DNS TXT value.

    RSA keys are written as PKCS#1 PEM, ed25519 keys as dkimpy's base64 seed.
    The TXT value is `v=DKIM1; k=rsa; p=...` (or k=ed25519); see dns_record().
    """
    if algorithm == "rsa":
        if not RECOMMENDED_RSA_BITS <= bits <= 4096:
            raise ValueError(f"RSA keys must have {RECOMMENDED_RSA_BITS} to 4096 bits")
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        data = rsa_key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())
        public = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    elif algorithm == "ed25519":
        ed_key = ed25519.Ed25519PrivateKey.generate()
        seed = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        data = base64.b64encode(seed) + b"\n"
        public = ed_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw)
    else:
        raise ValueError(f"unknown key algorithm {algorithm!r} (rsa or ed25519)")
    _write_private_file(key_path, data)
    return f"v=DKIM1; k={algorithm}; p={base64.b64encode(public).decode('ascii')}"


def _write_private_file(path: str, data: bytes) -> None:
    # O_EXCL: never overwrite (nor follow a planted symlink); the mode is set at
    # creation, so the key is never readable by others, not even briefly.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise SigningError(f"{path}: already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise SigningError(f"{path}: cannot create: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise SigningError(f"{path}: cannot write: {exc.strerror or exc}") from None
    os.close(fd)


def dns_record(selector: str, domain: str, txt: str) -> str:
    """A zone-file line publishing `txt` for `selector`, in strings of at most 255 characters."""
    chunks = [txt[i:i + 255] for i in range(0, len(txt), 255)] or [""]
    quoted = " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT ( {quoted} )"
