"""ARC sealing (RFC 8617) of forwarded mail, with dkimpy's ARC implementation.

Each forward gets one ARC set: ARC-Authentication-Results (a copy of the
Authentication-Results this server wrote), ARC-Message-Signature and ARC-Seal,
signed for the DKIM domain with its RSA key (ARC is rsa-sha256 only). Receivers
that honour ARC (Gmail, Outlook) can then trust the original SPF/DKIM/DMARC
results although forwarding broke SPF, and a changed From or footer broke DKIM.

dkimpy computes the ARC set; as in signing.py, only the RSA step moves to
OpenSSL (same two rebound globals, on a subclass of `dkim.ARC`; `dkim` itself
is untouched). The chain validation (cv=) comes from the `arc=` result in our
own Authentication-Results, which authcheck.py wrote from `dkim.arc_verify`.
"""

from __future__ import annotations

import dkim

from . import signing
from .config import DKIMSettings
from .signing import SigningError

_RSA = b"rsa-sha256"


def _openssl_arc_class():
    if signing._OpenSSLDKIM is None:
        return None
    sign = signing._with_globals(dkim.ARC.sign, parse_pem_private_key=signing._pass_loaded_key)
    if sign is None:
        return None
    return type("_OpenSSLARC", (dkim.ARC,), {
        "__doc__": "dkim.ARC whose RSA signatures are computed by OpenSSL.",
        "sign": sign,
        "gen_header": signing._OpenSSLDKIM.gen_header,
    })


_OpenSSLARC = _openssl_arc_class()


class ArcSealer:
    def __init__(self, domain: str, selector: str, key, pem: bytes, srv_id: str):
        self.domain = domain.rstrip(".").encode("ascii")
        self.selector = selector.encode("ascii")
        self._key = key if _OpenSSLARC is not None else pem
        self.srv_id = srv_id.encode("ascii")

    @classmethod
    def from_settings(cls, settings: DKIMSettings, srv_id: str) -> ArcSealer:
        """The first RSA key of the dkim: section; SigningError if there is none."""
        for configured in settings.keys:
            key, problems = signing._load_key(configured.key_file)
            if key is not None and key.algorithm == _RSA and not any(signing._is_fatal(p) for p in problems):
                return cls(settings.domain, configured.selector, key.private, key.pem, srv_id)
        raise SigningError("ARC sealing needs an RSA key in dkim.keys (ARC signs with rsa-sha256 only)")

    def seal(self, head: bytes, body: bytes) -> list[tuple[str, str]]:
        """The ARC set for the message `head` + blank line + `body` (the head must carry
        our Authentication-Results), as (name, value) for pymilter's addheader, in the
        order to prepend them."""
        from .authcheck import parsed  # noqa: PLC0415

        arc = parsed(_OpenSSLARC or dkim.ARC, head, body, signature_algorithm=_RSA, linesep=b"\r\n")
        lines = arc.sign(self.selector, self.domain, self._key, self.srv_id,
                         include_headers=arc.default_sign_headers())
        out = []
        for line in lines:
            name, _, value = line.partition(b":")
            value = value.lstrip(b" ").rstrip(b"\r\n").replace(b"\r\n", b"\n")
            out.append((name.decode("ascii"), value.decode("ascii")))
        return out
