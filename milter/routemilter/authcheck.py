"""Inbound authentication (SPF, DKIM, ARC, DMARC) of a message, and the reputation
policy built on it: what to refuse, what to record, whether to rewrite From.

Libraries, not hand-written protocol code:

* SPF: pyspf (`spf.query`), its DNS lookups routed to our resolver (dnsresolve.py).
* DKIM and the incoming ARC chain: dkimpy (`dkim.DKIM.verify`; arc.py for ARC)
  with `dnsfunc=` pointing at our resolver.
* DMARC: the `dmarc` package (record parsing, identifier alignment, disposition),
  the Organizational Domain from `publicsuffixlist` (bundled list, no network).
* Authentication-Results (RFC 8601): `authres`, in authresults.py.

DNS failures are never guessed away: a lookup that times out or SERVFAILs is a
`temperror`, and a message whose refusal depends on such a result gets a 451
(or, with `on_dns_error: accept`, is forwarded with the temperror recorded).

Per transaction, `AuthState` collects what the checks need (client IP and HELO
from the connection, headers as they stream by) and is asked three times:
`check_recipient` at RCPT (SPF refusal, rate limit), `judge` at end of message
before DKIM signing (spam verdict, DMARC refusal, A-R, From rewrite, the ARC set:
its message signature covers neither DKIM-Signature nor A-R, so it need not wait
for them) and `commit` once the forward is final (rate-limit accounting).
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dkim
import dkim.util
import dmarc
import re2

from . import headers, signpolicy
from .arc import ArcSealer, verify_chain
from .authconfig import AuthRules, AuthSettings, RateLimit
from .authreplies import DMARC_REJECT as DMARC_REJECT
from .authreplies import DNS_TEMPFAIL as DNS_TEMPFAIL
from .authreplies import MULTIPLE_FROM as MULTIPLE_FROM
from .authreplies import SPAM as SPAM
from .authreplies import SPF_FAIL as SPF_FAIL
from .authresults import DKIMOutcome, DMARCOutcome, SPFOutcome, Verdict, authserv_id_of, results_header
from .config import Config, Reply, managed_domain
from .dkimcore import parsed
from .dnsresolve import DNSTempError as DNSTempError
from .dnsresolve import Lookup, Resolver, dnspython_lookup
from .fromrewrite import TRACE_FROM, rewritten_from
from .ratelimit import RateLimiter
from .signing import Signer

if TYPE_CHECKING:
    from .rules import Decision
    from .state import Store
    from .transaction import Plan, Transaction

log = logging.getLogger("routemilter.auth")

DNS_BUDGET = 4  # DNS time per message, in dns_timeouts (5 s: at most ~25 s of lookups)
MAX_DKIM_SIGNATURES = 5  # verified per message (each costs DNS lookups)


def org_domain(domain: str) -> str:
    return signpolicy.public_suffix_list().privatesuffix(domain) or domain


class _PSL:
    """What the dmarc package calls for relaxed alignment."""

    @staticmethod
    def get_public_suffix(domain: str) -> str:
        return org_domain(domain)


# ----------------------------------------------------------- the authority


class Authenticator:
    """Built once per Policy (config load): settings, resolver, ARC sealer."""

    def __init__(self, settings: AuthSettings, lookup: Lookup | None = None, sealer: ArcSealer | None = None,
                 limiter: RateLimiter | None = None, from_domain: str | None = None):
        self.settings = settings
        self.resolver = Resolver(lookup or dnspython_lookup(settings.dns_server, settings.dns_timeout))
        self.sealer = sealer
        self.limiter = limiter or RateLimiter()  # the daemon passes one over its state store
        self.from_domain = from_domain  # the forwarding domain, for From rewrite
        self._spam_patterns: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: Config, lookup: Lookup | None = None, store: Store | None = None,
                    signer: Signer | None = None) -> Authenticator:
        """`store`: the daemon's state store (state.py), kept across reloads, so
        the rate-limit windows survive a reload (and, with Redis, a restart).
        `signer`: the Policy's, whose RSA key the ARC sealer uses (keys are read
        once per load); loaded here from dkim: if not given (tests, tools)."""
        assert config.auth is not None
        sealer = None
        if config.auth.arc and config.dkim is not None:
            sealer = ArcSealer.from_signer(signer or Signer.from_settings(config.dkim), config.auth.authserv_id)
        domain = config.dkim.domain if config.dkim else (config.srs.domain if config.srs else None)
        return cls(config.auth, lookup, sealer, limiter=RateLimiter(store), from_domain=domain)

    def begin(self, config: Config | None = None) -> AuthState:
        return AuthState(self, config=config)

    def spam_regex(self, pattern: str) -> Any:
        compiled = self._spam_patterns.get(pattern)
        if compiled is None:
            compiled = self._spam_patterns[pattern] = re2.compile("(?i)" + pattern)
        return compiled


@dataclass
class AuthState:
    """One message's authentication state (lives on the Transaction)."""

    auth: Authenticator
    config: Config | None = None  # the Config the message is judged by (managed domains)
    client_ip: str | None = None
    helo: str | None = None
    sender: str = ""
    policies: list[AuthRules] = field(default_factory=list)
    own_ar: list[int] = field(default_factory=list)  # 1-based indexes of A-R fields claiming our id
    ar_count: int = 0
    from_values: list[str] = field(default_factory=list)
    has_reply_to: bool = False
    header_values: dict[str, list[str]] = field(default_factory=dict)  # spam verdict headers
    spf_outcome: SPFOutcome | None = None
    verdict: Verdict | None = None
    rate_keys: list[tuple[str, RateLimit]] = field(default_factory=list)
    rewritten_from: bool = False
    trusted: bool = False  # client in auth.trusted_networks: results recorded, nothing refused
    arc_sealer: str | None = None  # d= of the latest ARC-Seal of a passing incoming chain

    @property
    def settings(self) -> AuthSettings:
        return self.auth.settings

    def set_client(self, ip: str | None, helo: str | None, sender: str) -> None:
        self.client_ip, self.helo, self.sender = ip, helo, sender
        if ip is not None and self.settings.trusted_networks:
            address = ipaddress.ip_address(ip)
            self.trusted = any(address in net for net in self.settings.trusted_networks)

    # -- RCPT

    def check_recipient(self, decision: Decision) -> Reply | None:
        """A routed recipient: refuse it now for SPF fail or its destination's rate limit."""
        domain = decision.address.rsplit("@", 1)[-1]
        if self.config is not None:
            domain = managed_domain(self.config.domains, domain) or domain
        policy = self.settings.rules_for(domain, decision.rule.name if decision.rule else None)
        if policy.spf_fail == "refuse" and not self.trusted:
            outcome = self.spf()
            if outcome.result == "fail":
                log.info("refused rcpt=%s from=<%s> ip=%s spf=fail: %s", decision.address, self.sender,
                         self.client_ip, outcome.reason)
                return SPF_FAIL
            if outcome.result == "temperror" and self.settings.on_dns_error == "tempfail":
                log.info("tempfail rcpt=%s from=<%s> spf=temperror: %s", decision.address, self.sender, outcome.reason)
                return DNS_TEMPFAIL
        if policy.rate_limit is not None:
            keys = []
            for dest in decision.destinations:
                target = dest.primary.address
                key = target if policy.rate_limit.per == "destination" else f"{self.sender.lower()}>{target}"
                if not self.auth.limiter.allowed(key, policy.rate_limit):
                    log.info("rate-limited rcpt=%s dest=%s from=<%s> limit=%d/%ds per %s", decision.address, target,
                             self.sender, policy.rate_limit.messages, policy.rate_limit.seconds, policy.rate_limit.per)
                    limit = policy.rate_limit
                    return Reply(451, "4.7.1", (f"routemilter: too many messages for {target} right now "
                                                f"(at most {limit.messages} in {limit.seconds} s)"
                                                ", please try again later",))
                keys.append((key, policy.rate_limit))
            self.rate_keys.extend(keys)
        self.policies.append(policy)
        return None

    # -- headers

    def header(self, name: str, value: bytes) -> None:
        lname = name.lower()
        text = value.decode("utf-8", "replace")
        if lname == "authentication-results":
            self.ar_count += 1
            if authserv_id_of(text) == self.settings.authserv_id.lower():
                self.own_ar.append(self.ar_count)
        elif lname == "from":
            self.from_values.append(text)
        elif lname == "reply-to":
            self.has_reply_to = True
        self.header_values.setdefault(lname, []).append(text)

    # -- checks

    def spf(self) -> SPFOutcome:
        if self.spf_outcome is None:
            self.spf_outcome = self._check_spf()
        return self.spf_outcome

    def _check_spf(self) -> SPFOutcome:
        sender = self.sender
        identity = sender.rsplit("@", 1)[-1].lower() if sender else (self.helo or "").lower()
        base = SPFOutcome("none", identity, sender or None, self.helo)
        if not self.client_ip or not identity:
            base.reason = "no client address" if not self.client_ip else "no identity"
            return base
        try:
            query = self.auth.resolver.spf_query(i=self.client_ip, s=sender, h=self.helo or "",
                                                 timeout=self.settings.dns_timeout,
                                                 querytime=self.settings.dns_timeout * 4)
            result, _code, explanation = query.check()
        except Exception as exc:  # noqa: BLE001 - pyspf raises assorted errors on odd input
            return SPFOutcome("permerror", identity, sender or None, self.helo, f"{type(exc).__name__}: {exc}")
        return SPFOutcome(result, identity, sender or None, self.helo, str(explanation))

    def _check_dkim(self, message: tuple[bytes, bytes]) -> list[DKIMOutcome]:
        outcomes = []
        try:
            # One parse for every signature (verify() does not change the parsed message).
            verifier = parsed(dkim.DKIM, *message, timeout=max(1, int(self.settings.dns_timeout)))
            signatures = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
        except Exception:  # noqa: BLE001 - unparseable message: nothing verifies
            return []
        for index, sig_value in enumerate(signatures[:MAX_DKIM_SIGNATURES]):
            try:
                tags = dkim.util.parse_tag_value(sig_value)
            except Exception:  # noqa: BLE001
                tags = {}
            domain = tags.get(b"d", b"").decode("ascii", "replace").strip()
            selector = tags.get(b"s", b"").decode("ascii", "replace").strip()
            try:
                ok = verifier.verify(idx=index, dnsfunc=self.auth.resolver.dkim_txt)
                outcomes.append(DKIMOutcome("pass" if ok else "fail", domain, selector))
            except DNSTempError as exc:
                outcomes.append(DKIMOutcome("temperror", domain, selector, str(exc)))
            except Exception as exc:  # noqa: BLE001 - dkimpy on malformed input
                outcomes.append(DKIMOutcome("permerror", domain, selector, repr(exc)))
        return outcomes

    def _check_dmarc(self, spf_outcome: SPFOutcome, dkims: list[DKIMOutcome]) -> DMARCOutcome:
        domains = set()
        for value in self.from_values:
            for _name, address in email.utils.getaddresses([value]):
                if "@" in address:
                    domains.add(address.rsplit("@", 1)[1].strip().rstrip(".>").lower())
        if len(self.from_values) != 1 or len(domains) != 1:
            reason = "no From address" if not domains else "more than one From address"
            return DMARCOutcome("permerror", None, reason=reason)
        from_domain = domains.pop()
        try:
            record, found_at_org = self._dmarc_record(from_domain)
        except DNSTempError as exc:
            return DMARCOutcome("temperror", from_domain, reason=str(exc))
        if record is None:
            return DMARCOutcome("none", from_domain)
        checker = dmarc.DMARC(publicsuffix=_PSL())
        try:
            policy = checker.parse_record(record, domain=from_domain,
                                          org_domain=org_domain(from_domain) if found_at_org else None)
        except dmarc.Error as exc:
            return DMARCOutcome("permerror", from_domain, reason=f"bad DMARC record: {exc}")
        results = dmarc.AuthResults(dkim=[])
        if spf_outcome.result in ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"):
            results.spf = dmarc.SPF(spf_outcome.domain or "invalid", dmarc.SPFResult(spf_outcome.result))
        for d in dkims:
            if d.domain:
                results.dkim.append(dmarc.DKIM(d.domain, dmarc.DKIMResult(d.result)))
        outcome = checker.get_result(policy, auth_results=results)
        published = policy.p.value
        disposition = outcome.disposition.value
        if outcome.result is dmarc.DMARCResult.PASS:
            return DMARCOutcome("pass", from_domain, "none", published)
        if disposition == "reject" and policy.pct < 100:
            disposition = "quarantine"  # pct sampling: never refuse on a coin toss
        unsure = spf_outcome.result == "temperror" or any(d.result == "temperror" for d in dkims)
        return DMARCOutcome("temperror" if unsure else "fail", from_domain, disposition, published)

    def _dmarc_record(self, domain: str) -> tuple[str | None, bool]:
        candidates = [(domain, False)]
        org = org_domain(domain)
        if org != domain:
            candidates.append((org, True))
        for name, at_org in candidates:
            records = [r for r in self.auth.resolver.txt(f"_dmarc.{name}") if r.strip().startswith("v=DMARC1")]
            if len(records) == 1:
                return records[0], at_org
            if len(records) > 1:
                return None, at_org  # RFC 7489 6.6.3: several records = no record
        return None, False

    # -- EOM: judge, before signing

    def judge(self, tx: Transaction, plan: Plan) -> None:
        """Evaluate and decide; sets plan.reply / plan.discard or adds headers to plan."""
        settings = self.settings
        message = (bytes(tx.header_block), bytes(tx.body))
        with self.auth.resolver.budget(settings.dns_timeout * DNS_BUDGET):
            spf_outcome = self.spf()
            dkims = self._check_dkim(message)
            arc_result, self.arc_sealer = verify_chain(*message, dnsfunc=self.auth.resolver.dkim_txt)
            dmarc_outcome = self._check_dmarc(spf_outcome, dkims)
        del message  # a big message is not held twice while sealing
        self.verdict = verdict = Verdict(spf_outcome, dkims, arc_result, dmarc_outcome)
        plan.notes.append(verdict.notes())
        policies = self.policies or [settings.default]
        soft = settings.on_dns_error == "accept"
        self._spam(policies, plan)
        if self.trusted:
            plan.notes.append("trusted-client")
        elif plan.reply is None and not plan.discard:
            self._decide(policies, verdict, soft, plan)
        if plan.reply is not None or plan.discard:
            return

        plan.headers.append(("Authentication-Results", results_header(verdict, settings.authserv_id, self.client_ip)))
        # Forged A-R fields that claim to be ours are removed (RFC 8601 section 5).
        for index in reversed(self.own_ar):
            plan.changes.append(("Authentication-Results", index, ""))
        if any(self._wants_rewrite(p, dmarc_outcome) for p in policies):
            self._rewrite_from(plan)
        self._seal(tx, plan)

    def _spam(self, policies: list[AuthRules], plan: Plan) -> None:
        """The verdict of a spam scanner that ran before us (its header), for every client."""
        for policy in policies:
            if policy.spam_header and policy.spam_action != "accept":
                values = self.header_values.get(policy.spam_header.lower(), [])
                if any(self.auth.spam_regex(policy.spam_pattern).search(v) for v in values):
                    plan.notes.append(f"spam={policy.spam_header}:{policy.spam_action}")
                    if policy.spam_action == "discard":
                        plan.discard = True
                    else:
                        plan.reply = SPAM
                    return

    def _decide(self, policies: list[AuthRules], verdict: Verdict, soft: bool, plan: Plan) -> None:
        """Refusals: DMARC p=reject, and DNS failures that hide the answer."""
        settings = self.settings
        dmarc_outcome, spf_outcome, arc_result = verdict.dmarc, verdict.spf, verdict.arc
        if any(p.dmarc_reject == "refuse" for p in policies):
            if dmarc_outcome.result == "fail" and dmarc_outcome.policy == "reject" and self._trusted_arc():
                plan.notes.append(f"dmarc-reject-overridden arc-sealer={self.arc_sealer}")
            elif dmarc_outcome.result == "fail" and dmarc_outcome.policy == "reject":
                plan.reply = DMARC_REJECT
                plan.notes.append(f"dmarc-reject from_domain={dmarc_outcome.from_domain}")
                return
            if dmarc_outcome.result == "permerror" and dmarc_outcome.reason == "more than one From address":
                plan.reply = MULTIPLE_FROM
                return
            if dmarc_outcome.result == "temperror" and not soft and self._could_reject(dmarc_outcome):
                plan.reply = DNS_TEMPFAIL
                plan.notes.append(f"dns-tempfail: {dmarc_outcome.reason or 'spf/dkim temperror'}")
                return
        if any(p.spf_fail == "refuse" for p in policies) and spf_outcome.result == "temperror" and not soft:
            plan.reply = DNS_TEMPFAIL
            return
        if arc_result == "temperror" and not soft and settings.arc:
            plan.reply = DNS_TEMPFAIL  # the seal's cv= would be a guess
            plan.notes.append("dns-tempfail: arc")
            return

    def _trusted_arc(self) -> bool:
        """RFC 7489 local policy override (trusted forwarder): a valid ARC chain whose
        latest seal comes from a configured sealer (or a subdomain of one)."""
        sealer = self.arc_sealer
        if not sealer or self.verdict is None:
            return False
        return self.verdict.arc == "pass" and any(
            sealer == d or sealer.endswith("." + d) for d in self.settings.arc_trusted_sealers)

    @staticmethod
    def _could_reject(outcome: DMARCOutcome) -> bool:
        """A temperror that might hide a p=reject failure (unknown record, or a reject policy)."""
        return outcome.policy in (None, "reject")

    # -- From rewrite (DMARC-safe forwarding)

    def _wants_rewrite(self, policy: AuthRules, outcome: DMARCOutcome) -> bool:
        if policy.from_rewrite == "always":
            return outcome.from_domain is not None
        if policy.from_rewrite == "dmarc":
            return outcome.published in ("reject", "quarantine")
        return False

    def _rewrite_from(self, plan: Plan) -> None:
        if self.auth.from_domain is None or len(self.from_values) != 1:
            return
        original = self.from_values[0].strip()
        rewritten = rewritten_from(original, self.auth.from_domain)
        if rewritten is None:
            return
        new_from, address = rewritten
        plan.changes.append(("From", 1, new_from))
        if not self.has_reply_to:
            plan.headers.append(("Reply-To", address))
        plan.headers.append((TRACE_FROM, original))
        self.rewritten_from = True
        plan.notes.append(f"from-rewritten={address}")

    # -- ARC: sealed over the message as forwarded (our A-R, From rewrite);
    # the AMS signs neither DKIM-Signature nor A-R, so DKIM may be added after.

    def _seal(self, tx: Transaction, plan: Plan) -> None:
        if self.auth.sealer is None:
            return
        head = headers.forwarded(tx.header_block, plan)  # as the plan so far leaves it
        try:
            arc_set = self.auth.sealer.seal(head, bytes(tx.body))
        except Exception as exc:  # noqa: BLE001 - forwarded unsealed, never dropped
            plan.notes.append(f"arc=failed:{exc}")
            return
        if arc_set:
            plan.headers[0:0] = arc_set
            plan.notes.append("arc=sealed")

    # -- EOM: after signing

    def commit(self) -> None:
        """The forward is final: count it against the rate limits."""
        for key, limit in self.rate_keys:
            self.auth.limiter.count(key, limit)
