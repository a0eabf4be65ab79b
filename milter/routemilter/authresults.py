"""The results of the auth: checks, and the Authentication-Results field (RFC 8601,
written with `authres`) that records them for the receivers downstream."""

from __future__ import annotations

import re
from dataclasses import dataclass

import authres
import authres.arc
import authres.dmarc


@dataclass
class SPFOutcome:
    result: str  # pass fail softfail neutral none permerror temperror
    domain: str  # the identity checked: MAIL FROM domain, or HELO for the null sender
    mailfrom: str | None
    helo: str | None
    reason: str = ""


@dataclass
class DKIMOutcome:
    result: str  # pass fail permerror temperror
    domain: str
    selector: str
    reason: str = ""


@dataclass
class DMARCOutcome:
    result: str  # pass fail none permerror temperror
    from_domain: str | None
    policy: str | None = None  # the disposition that applies: none quarantine reject
    published: str | None = None  # p= as published (for From rewrite decisions)
    reason: str = ""


@dataclass
class Verdict:
    spf: SPFOutcome
    dkim: list[DKIMOutcome]
    arc: str  # pass fail none temperror
    dmarc: DMARCOutcome

    def notes(self) -> str:
        dkim_part = ",".join(f"{d.result}:{d.domain}" for d in self.dkim) or "none"
        return (f"spf={self.spf.result} dkim={dkim_part} arc={self.arc} "
                f"dmarc={self.dmarc.result}" + (f":p={self.dmarc.policy}" if self.dmarc.policy else ""))


def results_header(verdict: Verdict, authserv_id: str, client_ip: str | None) -> str:
    """Our Authentication-Results value (RFC 8601) for `verdict`, folded for addheader."""
    s = verdict.spf
    # Values from the envelope and headers go in only when they are plain tokens:
    # a quoted local part or a parenthesis would make the field unparseable.
    mailfrom = _clean(s.mailfrom) or _clean((s.mailfrom or "").rpartition("@")[2])
    results = [authres.SPFAuthenticationResult(
        result=s.result, smtp_mailfrom=mailfrom,
        smtp_helo=_clean(s.helo) if not s.mailfrom else None,
        result_comment=f"{_clean(s.domain)}: {client_ip or 'unknown'} "
                       f"{'is' if s.result == 'pass' else 'is not'} permitted" if _clean(s.domain) else None)]
    if verdict.dkim:
        for d in verdict.dkim:
            results.append(authres.DKIMAuthenticationResult(
                result=d.result, header_d=_clean(d.domain), header_s=_clean(d.selector)))
    else:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    results.append(authres.arc.ARCAuthenticationResult(result=verdict.arc if verdict.arc in (
        "pass", "fail", "none") else "fail"))
    m = verdict.dmarc
    results.append(authres.dmarc.DMARCAuthenticationResult(
        result=m.result, header_from=_clean(m.from_domain),
        policy_comment=None, result_comment=f"p={m.published}" if m.published else None))
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    value = str(header).split(":", 1)[1].strip()
    # One result per line, folded the libmilter way (bare LF + tab).
    return value.replace("; ", ";\n\t")


_TOKEN = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~@-]{1,254}")


def _clean(value: str | None) -> str | None:
    return value if value and _TOKEN.fullmatch(value) else None


def authserv_id_of(value: str) -> str:
    """The authserv-id an Authentication-Results value starts with, lower case."""
    text = re.sub(r"\([^)]*\)", "", value).strip()
    return re.split(r"[\s;]", text, maxsplit=1)[0].lower() if text else ""
