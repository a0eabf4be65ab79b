"""What many tests share: the SRS secret, DKIM key files, config files, a fake milter context.

conftest.py serves these as fixtures; module-level config texts (and bench/, which puts
this folder on sys.path) import the constants and FakeCtx directly.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

SRS_SECRET = "a-test-secret-of-enough-length"
# The SRS block most test configs start from: the forwarding domain of family.test.
SRS_SECTION = f'srs:\n  domain: fwd.family.test\n  secrets: ["{SRS_SECRET}"]\n'
# The smallest routing: one managed domain, one rule. A plain string (not a format template).
ROUTE_ME = """domains:
  family.test: {}
rules:
  - name: me
    addresses: [me@family.test]
    to: [me@gmail.test]
"""


@dataclass(frozen=True)
class DkimKeys:
    """An RSA and an ed25519 private key (0600 files) with their DKIM TXT record values.

    Shared by the whole session: tests copy them before changing modes or owners."""

    rsa: str
    ed25519: str
    rsa_txt: str
    ed25519_txt: str

    def section(self, domain: str = "family.test", rsa: str | None = "rsa", ed25519: str | None = None) -> str:
        """A `dkim:` config block signing for `domain` with the keys given selectors."""
        keys = [(sel, path) for sel, path in ((rsa, self.rsa), (ed25519, self.ed25519)) if sel]
        return f"dkim:\n  domain: {domain}\n  keys:\n" + "".join(
            f"    - selector: {sel}\n      key: {path}\n" for sel, path in keys)


def make_dkim_keys(folder: Path) -> DkimKeys:
    from routemilter.signing import generate_key

    rsa, ed = folder / "rsa.key", folder / "ed25519.key"
    return DkimKeys(str(rsa), str(ed), generate_key("rsa", str(rsa)), generate_key("ed25519", str(ed)))


@dataclass(frozen=True)
class ForeignKey:
    """A remote sender's RSA DKIM key: the PEM to sign with, the TXT record to publish."""

    pem: bytes
    txt: str


def make_foreign_key() -> ForeignKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return ForeignKey(pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())


def copy_key(key: str, path: Path) -> Path:
    """A private 0600 copy of a shared key, for a test that puts a key file where its config expects it."""
    path.touch(0o600, exist_ok=False)
    path.write_bytes(Path(key).read_bytes())
    return path


def write_config(folder: Path, text: str, name: str = "routemilter.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


class FakeCtx:
    """Stands in for pymilter's milterContext: records every request the Session makes."""

    def __init__(self, queue_id: str = "QFAKE1", macros: dict[str, str] | None = None) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.macros = {"i": queue_id} if macros is None else macros
        self.symlists: list[tuple[int, str]] = []
        self.replies: list[tuple[str, ...]] = []  # setreply's arguments, as given: (rcode, xcode, *lines)
        self.priv: object = None

    def setpriv(self, priv: object) -> None:
        self.priv = priv

    def getpriv(self) -> object:
        return self.priv

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setsymlist(self, stage: int, macros: str) -> None:
        self.symlists.append((stage, macros))

    def setreply(self, rcode: str, xcode: str, *lines: str) -> None:
        self.calls.append(("setreply", rcode, xcode, lines))
        self.replies.append((rcode, xcode, *lines))

    def addheader(self, name: str, value: str, idx: int = -1) -> None:
        self.calls.append(("addheader", name, value, idx))

    def chgheader(self, name: str, idx: int, value: str) -> None:
        self.calls.append(("chgheader", name, idx, value))

    def addrcpt(self, rcpt: str, params: str | None = None) -> None:
        self.calls.append(("addrcpt", rcpt))

    def delrcpt(self, rcpt: str) -> None:
        self.calls.append(("delrcpt", rcpt))

    def chgfrom(self, sender: str, params: str | None = None) -> None:
        self.calls.append(("chgfrom", sender))

    @property
    def changes(self) -> int:
        """How many changes to the message were asked for (replies are not changes)."""
        return sum(call[0] != "setreply" for call in self.calls)
