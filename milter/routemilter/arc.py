"""ARC sealing (RFC 8617) of forwarded mail, with dkimpy's ARC implementation.

Each forward gets one ARC set: ARC-Authentication-Results (a copy of the
Authentication-Results this server wrote), ARC-Message-Signature and ARC-Seal,
signed for the DKIM domain with its RSA key (ARC is rsa-sha256 only). Receivers
that honour ARC (Gmail, Outlook) can then trust the original SPF/DKIM/DMARC
results although forwarding broke SPF, and a changed From or footer broke DKIM.

dkimpy computes the ARC set; as for DKIM, only the RSA step moves to OpenSSL
(dkimcore.BACKEND). The key is the one the Signer loaded, not read again. The
chain validation (cv=) comes from the `arc=` result in our own
Authentication-Results, which authcheck.py wrote from `verify_chain`.
"""

from __future__ import annotations

from collections.abc import Callable

import dkim

from . import dkimcore
from .config import DKIMSettings
from .dkimcore import RSA, Key, parsed
from .dnsresolve import DNSTempError
from .signing import Signer, SigningError


class ArcSealer:
    def __init__(self, domain: str, key: Key, srv_id: str):
        self.domain = domain.rstrip(".").encode("ascii")
        self.selector = key.selector.encode("ascii")
        self._backend = dkimcore.BACKEND
        self._key = key.for_dkimpy(self._backend)
        self.srv_id = srv_id.encode("ascii")

    @classmethod
    def from_signer(cls, signer: Signer, srv_id: str) -> ArcSealer:
        """Seals with the first RSA key the Signer loaded; SigningError if it has none."""
        key = signer.rsa_key()
        if key is None:
            raise SigningError("ARC sealing needs an RSA key in dkim.keys (ARC signs with rsa-sha256 only)")
        return cls(signer.domain, key, srv_id)

    @classmethod
    def from_settings(cls, settings: DKIMSettings, srv_id: str) -> ArcSealer:
        """For `routemilter check` and tools: load the dkim: keys, then as from_signer."""
        return cls.from_signer(Signer.from_settings(settings), srv_id)

    def seal(self, head: bytes, body: bytes) -> list[tuple[str, str]]:
        """The ARC set for the message `head` + blank line + `body` (the head must carry
        our Authentication-Results), as (name, value) for pymilter's addheader, in the
        order to prepend them."""
        arc = parsed(self._backend.arc_class, head, body, signature_algorithm=RSA, linesep=b"\r\n")
        lines: list[bytes] = arc.sign(self.selector, self.domain, self._key, self.srv_id,
                                      include_headers=arc.default_sign_headers())
        out = []
        for line in lines:
            name, _, value = line.partition(b":")
            value = value.lstrip(b" ").rstrip(b"\r\n").replace(b"\r\n", b"\n")
            out.append((name.decode("ascii"), value.decode("ascii")))
        return out


def verify_chain(head: bytes, body: bytes, dnsfunc: Callable[..., bytes | None]) -> tuple[str, str | None]:
    """The incoming ARC chain's validation (cv): pass fail none temperror; and for a
    passing chain the d= of its latest ARC-Seal (for auth.arc_trusted_sealers)."""
    if b"\narc-seal:" not in b"\n" + head.lower():
        return "none", None
    sealer = None
    try:
        cv, results, _reason = parsed(dkim.ARC, head, body).verify(dnsfunc=dnsfunc)
        if cv == b"pass" and results:  # the most recent sealer
            as_domain = results[0].get("as-domain") or b""
            sealer = as_domain.decode("ascii", "replace").lower().rstrip(".")
    except dkim.DKIMException:  # as dkim.arc_verify does
        return "fail", None
    except DNSTempError:
        return "temperror", None
    except Exception:  # noqa: BLE001 - dkimpy on malformed input
        return "fail", None
    return (cv or b"fail").decode("ascii", "replace").lower(), sealer
