"""What a forwarder may sign: the one decision, kept small so it can grow.

A DKIM signature with d=X makes a receiver's DMARC check pass for any From in
X's organizational domain. So routemilter signs a forward (it vouches for
having received and routed it) unless the signature would lend X's alignment
to a From address nobody verified:

* From outside X's organizational domain: signed (no alignment is lent; the
  signature says "X forwarded this");
* From inside it: signed only when we wrote that From (`from_rewrite`), or the
  sender proved it on arrival: DKIM of an aligned domain passed, or SPF passed
  for an aligned MAIL FROM (the identifiers DMARC uses; needs `auth:`).
  Otherwise the forward leaves unsigned and the log line says why.

An outsider on the Internet could otherwise write `From: ceo@family.example`,
send it to any routed alias and get back a copy that passes DMARC for
family.example. Mail of our own users (a SASL login, or a client in
submission.trusted_networks) does not take this path: senders.outbound_domain
signs it with d= its From's managed domain when the login owns that address,
and refuses a From the login does not own; a From alone never earns a signature.
"""

from __future__ import annotations

import email.utils
import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

# Anything that looks like a domain after an '@', anywhere in the field: a
# receiver's parser may find an address where ours finds none (display-name
# tricks, broken brackets), so alignment is judged on every candidate.
_AT_DOMAIN = re.compile(r"@\s*\[?([^\s<>()\[\],;:\"@]+)")


@functools.cache
def public_suffix_list() -> PublicSuffixList:
    """The one parsed Public Suffix List of the process (authcheck's DMARC uses it too)."""
    from publicsuffixlist import PublicSuffixList  # noqa: PLC0415 (parsing the list costs ~0.1 s: once, when used)

    return PublicSuffixList()


def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 3.2): what relaxed alignment compares."""
    domain = domain.lower().rstrip(".")
    return public_suffix_list().privatesuffix(domain) or domain


def aligned(a: str, b: str) -> bool:
    return org_domain(a) == org_domain(b)


def from_domains(from_values: list[str]) -> set[str]:
    """Every domain a receiver might take from the From field(s)."""
    domains = set()
    for value in from_values:
        flat = value.replace("\r", " ").replace("\n", " ")
        for _name, address in email.utils.getaddresses([flat]):
            if "@" in address:
                domains.add(address.rsplit("@", 1)[1].strip().rstrip(".>").lower())
        domains.update(d.rstrip(".").lower() for d in _AT_DOMAIN.findall(flat))
    return {d for d in domains if d}


@dataclass(frozen=True)
class Origin:
    """What we know about who wrote the message."""

    from_values: tuple[str, ...]  # the From field(s) as received
    verified: frozenset[str] = frozenset()  # domains authenticated on arrival (DKIM pass, SPF pass of MAIL FROM)
    from_rewritten: bool = False  # the From is ours (auth: from_rewrite)


def unsigned_reason(dkim_domain: str, origin: Origin) -> str | None:
    """None: sign the forward with d=dkim_domain. Otherwise a short reason for the log."""
    if origin.from_rewritten:
        return None
    mine = [d for d in from_domains(list(origin.from_values)) if aligned(d, dkim_domain)]
    if not mine:
        return None
    if all(any(aligned(d, v) for v in origin.verified) for d in mine):
        return None
    return f"from-aligned-unverified:{mine[0]}"
