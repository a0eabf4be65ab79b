"""DKIM signing of forwarded mail: dkimpy builds the signature, OpenSSL does the RSA
(dkimcore.py), the body is hashed as it streams in (BodyHash).

The Signer loads its keys once per config load (dkimcore.load_key); the ARC sealer
(arc.py) seals with the Signer's RSA key rather than reading the file again.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import replace
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from . import dkimcore
from .config import DKIMSettings
from .dkimcore import RECOMMENDED_RSA_BITS, RSA, BodyDigest, Key, is_fatal, load_key
from .dkimcore import key_problems as key_problems  # `routemilter check` reads it here

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
#: Fields we add on top of a forward that our signature leaves out: our Authentication-Results
#: and the ARC set (sealed already, judged by ARC). The From rewrite's fields are signed.
ADDED_UNSIGNED = ("authentication-results", "arc-seal", "arc-message-signature", "arc-authentication-results")
_SIGNABLE_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # h= is a ':' list: no ';' or '='


class SigningError(Exception):
    """A key that cannot be used, or a message that cannot be signed."""


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

    def __init__(self) -> None:
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


# ----------------------------------------------------------------- signer


class Signer:
    """DKIM-signs messages for one domain, one signature per configured key."""

    def __init__(self, domain: str, keys: list[Key], warnings: list[str] | None = None):
        if not keys:
            raise SigningError("no DKIM keys configured")
        try:
            self._domain = domain.rstrip(".").encode("ascii")
        except UnicodeEncodeError:
            raise SigningError(f"DKIM domain {domain!r} must be ASCII (use its A-label)") from None
        self.domain = domain  # as configured (dkim.domain)
        self._keys = tuple(keys)
        #: Non-fatal key problems ("warning: ..."), for the daemon to log.
        self.warnings = tuple(warnings or ())

    @classmethod
    def from_settings(cls, settings: DKIMSettings) -> Signer:
        """Load and check every key now (before the daemon drops privileges).

        Raises SigningError naming each unusable key file and why.
        """
        keys: list[Key] = []
        fatal: list[str] = []
        warnings: list[str] = []
        for configured in settings.keys:
            key, problems = load_key(configured.key_file)
            where = f"DKIM key {configured.key_file} (selector {configured.selector})"
            fatal += [f"{where}: {p}" for p in problems if is_fatal(p)]
            warnings += [f"{where}: {p}" for p in problems if not is_fatal(p)]
            if key is not None and not any(is_fatal(p) for p in problems):
                if not configured.selector.isascii():
                    fatal.append(f"{where}: the selector must be ASCII")
                    continue
                keys.append(replace(key, selector=configured.selector, path=configured.key_file))
        if fatal:
            raise SigningError("\n".join(fatal))
        return cls(settings.domain, keys, warnings)

    def rsa_key(self) -> Key | None:
        """The first RSA key (ARC seals with rsa-sha256 only), as loaded; None if there is none."""
        return next((key for key in self._keys if key.algorithm == RSA), None)

    def dns_records(self) -> dict[str, str]:
        """selector -> the DNS TXT value of its public key, to verify our own
        signatures without DNS (bounces.py checks returned messages with it)."""
        records = {}
        for key in self._keys:
            if isinstance(key.private, rsa.RSAPrivateKey):
                public = key.private.public_key().public_bytes(
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
        return dkimcore.BACKEND.name

    @property
    def streams(self) -> bool:
        """Whether sign() takes a BodyHash (the body streamed in, never kept);
        False only if this dkimpy no longer has the names the hook rebinds."""
        return dkimcore.BACKEND.streams

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
            parsed = dkimcore.BACKEND.dkim_class(message)
            if self.streams:  # the body canonicalized and hashed once, for all keys
                if body is None:
                    body = BodyHash()
                    body.update(parsed.body)
                parsed.body = BodyDigest(body.digest())
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

    def _sign_one(self, parsed: Any, include: list[bytes], key: Key, domain: bytes) -> tuple[str, str]:
        try:
            field: bytes = parsed.sign(key.selector.encode("ascii"), domain, key.for_dkimpy(dkimcore.BACKEND),
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
