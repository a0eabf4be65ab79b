"""DNS for the auth: checks: dnspython lookups, adapted to what pyspf and dkimpy call.

DNS failures are never guessed away: a lookup that times out or SERVFAILs raises
`DNSTempError` (the checks record a `temperror`); NXDOMAIN and "no data" are answers.
Each message gets a time budget for all its lookups (`Resolver.budget`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dns.exception
import dns.resolver
import spf

from .dkimcore import with_globals


class DNSTempError(Exception):
    """A lookup that could not be answered (timeout, SERVFAIL, no server): try again later."""


#: An answer of a Lookup: A/AAAA/PTR as text, MX as (preference, host), TXT as a list of byte strings.
Answer = str | tuple[int, str] | list[bytes]
#: lookup(name, qtype) -> answers; [] for NXDOMAIN or no data; DNSTempError otherwise.
Lookup = Callable[[str, str], list[Any]]


def dnspython_lookup(server: tuple[str, int] | None, timeout: float) -> Lookup:
    """A Lookup over dnspython: the configured server, or the system's resolv.conf."""
    resolver = dns.resolver.Resolver(configure=server is None)
    if server is not None:
        resolver.nameservers = [server[0]]
        resolver.port = server[1]
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = None

    def lookup(name: str, qtype: str) -> list[Any]:
        try:
            answer = resolver.resolve(name, qtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.DNSException, OSError) as exc:  # Timeout, NoNameservers (SERVFAIL), ...
            raise DNSTempError(f"{qtype} {name}: {type(exc).__name__}") from None
        out: list[Answer] = []
        for rdata in answer:
            if qtype in ("A", "AAAA"):
                out.append(rdata.address)
            elif qtype == "MX":
                out.append((rdata.preference, rdata.exchange.to_text(omit_final_dot=True)))
            elif qtype == "PTR":
                out.append(rdata.target.to_text(omit_final_dot=True))
            elif qtype in ("TXT", "SPF"):
                out.append(list(rdata.strings))
        return out

    return lookup


class Resolver:
    """Adapts one Lookup to what pyspf and dkimpy call, within a per-message time budget."""

    def __init__(self, lookup: Lookup):
        self._lookup = lookup
        self._local = threading.local()  # one libmilter thread per connection
        # pyspf's query with its module-global DNSLookup rebound for this subclass only
        self.spf_query: type[Any] = type("_SPFQuery", (spf.query,), {
            "dns": with_globals(spf.query.dns, DNSLookup=self._spf_lookup) or spf.query.dns})

    @contextlib.contextmanager
    def budget(self, seconds: float) -> Iterator[None]:
        """Lookups started after `seconds` fail as temperror: a message with many
        signatures or a slow DNS cannot hold the MTA past its milter timeouts."""
        self._local.deadline = time.monotonic() + seconds
        try:
            yield
        finally:
            self._local.deadline = None

    def lookup(self, name: str, qtype: str) -> list[Any]:
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise DNSTempError(f"{qtype} {name}: DNS time budget for this message used up")
        return self._lookup(name, qtype)

    def txt(self, name: str) -> list[str]:
        return [b"".join(parts).decode("utf-8", "replace") for parts in self.lookup(name, "TXT")]

    def dkim_txt(self, name: bytes, timeout: int = 5) -> bytes | None:
        """dkimpy's dnsfunc: the TXT value, None if there is none; DNSTempError on failure."""
        records = self.lookup(name.decode("ascii", "replace").rstrip("."), "TXT")
        return b"".join(records[0]) if records else None

    def _spf_lookup(self, name: str, qtype: str, strict: bool = True,
                    timeout: float = 30) -> list[tuple[tuple[str, str], Any]]:
        try:
            return [((name, qtype), value) for value in self.lookup(name, qtype)]
        except DNSTempError as exc:
            raise spf.TempError(f"DNS {exc}") from None
