"""Address-level fallback through bounces: primary fails, backup gets it. The planner.

The seeds' workers do `forward(primary).catch(() => forward(backup))`. A real
MTA cannot answer that question during the SMTP transaction: it queues, retries
and, when a destination refuses for good, sends a bounce (DSN, RFC 3464) to the
envelope sender. So the envelope sender of every forward is a *bounce token*
in the SRS domain (tokens.py), and the bounce is the signal to try the next address.

Flow (Postfix): the bounce is queued by Postfix like any mail (the milter
refuses forged or expired tokens at RCPT), then delivered over LMTP to the
routemilter daemon (bounceserver.py). The `Handler` here reads the DSN (dsn.py),
and for each failed recipient either re-injects the returned original message
to the next address of that destination's chain (new token, DKIM-signed,
through a loopback smtpd without milters: reinject.py), or, when the chain is
exhausted, sends the original sender one bounce listing every destination tried
and why it failed. The server answers 250 only after Postfix has queued what was
re-injected; any failure answers 451 and Postfix keeps the bounce and retries.
No database: the state is the token and the returned message, so several MX
hosts can share the work. The deferral listener (deferrals.py) moves a copy on
with the same `find_in_chain`, `signed_part` and `fallback_copy`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dkim

from . import addresses, headers
from .dsn import (
    Failure,
    Report,
    crlf,
    final_report,
    normal_address,
    parse_dsn,
    printable,
    split_message,
    status_code,
)
from .fromrewrite import bounce_rewrite_wanted, rewrite_returned
from .reinject import Submission
from .rules import Action
from .stamps import TRACE_HEADER, stamp
from .tokens import Token, TokenCodec, binding_of, rule_id

if TYPE_CHECKING:
    from .config import BounceSettings, Config, Rule
    from .policy import Policy
    from .state import Store

log = logging.getLogger("routemilter.mail")

FAILED_HEADER = "X-Routemilter-Failed"
DROP_ON_REINJECT = frozenset({"return-path", "delivered-to", "x-original-to"})  # the last hop's transit fields
_MAX_REASONS = 50  # failure headers carried on a copy; more is a loop or an attack


@dataclass
class Outcome:
    submissions: list[Submission] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)  # one-time claims taken (released if the action fails)


def rules_of(config: Config, token: Token) -> list[Rule]:
    """The rules of the current config that a token names (all of them for "any rule")."""
    every = config.all_rules()
    if token.rules is None:
        return every
    return [r for r in every if rule_id(r.name) in token.rules]


def find_in_chain(rules: list[Rule], token: Token, failed: str) -> tuple[Rule, int, int] | None:
    """(rule, destination index, chain position) of the address `failed` (normal form)
    that a copy sent with `token` went to; None if it is no address of theirs."""
    for rule in rules:
        for index, dest in enumerate(rule.destinations):
            if token.dest is not None and index != token.dest:
                continue
            for pos, target in enumerate(dest.chain):
                if target.address == failed and ((token.dest is None and pos == 0) or
                                                 (token.dest is not None and pos == token.pos)):
                    return rule, index, pos
    if token.dest is not None:  # the config changed: find the address anywhere in the chain
        for rule in rules:
            if token.dest < len(rule.destinations):
                for pos, target in enumerate(rule.destinations[token.dest].chain):
                    if target.address == failed:
                        return rule, token.dest, pos
    return None


def previous_failures(message_head: bytes) -> list[Failure]:
    """Failures recorded on a fallback copy by earlier steps of its chain."""
    out = []
    for line in headers.lines(message_head):
        if headers.field_name(line) == FAILED_HEADER.lower():
            value = line.split(b":", 1)[1].decode("utf-8", "replace")
            value = re.sub(r"\r\n[ \t]+", " ", value).strip()
            address, _, rest = value.partition(";")
            status, sep, reason = rest.partition(";")
            if sep and re.fullmatch(r"\s*[245]\.\d{1,3}\.\d{1,3}\s*", status):
                out.append(Failure(address.strip(), reason.strip(), status.strip()))
            else:
                out.append(Failure(address.strip(), rest.strip()))
    return out[:_MAX_REASONS]


class Handler:
    """Turns one bounce to a token address into submissions. No I/O but the
    one-time claims (`store`, state.py), when given one."""

    def __init__(self, policy: Policy, clock: Callable[[], float] = time.time, store: Store | None = None):
        if policy.tokens is None or policy.config.srs is None or policy.config.bounces is None:
            raise ValueError("bounce handling is not configured (bounces: and srs:)")
        self.policy = policy
        self.config: Config = policy.config
        self.settings: BounceSettings = policy.config.bounces
        self.codec: TokenCodec = policy.tokens
        self.secrets = policy.config.srs.secrets
        self.clock = clock
        self.store = store

    # -- entry point

    def handle(self, rcpt: str, mail_from: str, data: bytes) -> Outcome:
        token = self.codec.check(rcpt)  # TokenError: the caller refuses
        report = parse_dsn(data)
        outcome = Outcome()
        if not report.is_dsn:
            # Not a delivery report (a reply, an auto-responder, an old-style bounce):
            # the standard SRS behaviour, back to the original sender, once per token.
            if self._claim(outcome, token, "reverse"):
                self._reverse(token, mail_from, data, outcome)
            return outcome
        failed = report.failed
        if not failed:
            outcome.notes.append("dsn-without-failure:swallowed(" +
                                 ",".join(sorted({r.action or "?" for r in report.recipients})) + ")")
            return outcome
        rules = rules_of(self.config, token)
        content, why_not = self._content(report, token)
        # Failures recorded by earlier steps: only from a copy we verified (our own text).
        prior = previous_failures(split_message(content)[0]) if content is not None else []
        exhausted: list[Failure] = []
        seen = set()
        dkim_settings = self.config.dkim
        for status in failed:
            address = normal_address(status.final_recipient or status.original_recipient)
            if address in seen:
                continue
            seen.add(address)
            if not self._claim(outcome, token, address):
                continue  # this destination's bounce was acted on already: a replay
            failure = Failure(address, printable(status.reason), status.status)
            where = find_in_chain(rules, token, address)
            if where is None and status.original_recipient:
                # The destination forwarded it on and the next hop failed: the DSN may
                # still name the address we sent to as the original recipient.
                where = find_in_chain(rules, token, normal_address(status.original_recipient))
            if where is None:
                outcome.notes.append(f"{address}:not-in-chain")
                exhausted.append(failure)
                continue
            rule, index, pos = where
            dest = rule.destinations[index]
            if content is not None and dkim_settings is not None and bounce_rewrite_wanted(
                    self.config, rule.name, status.status, status.reason, content):
                # Refused for DMARC: the same destination once more, From rewritten (fromrewrite.py).
                rewritten = rewrite_returned(content, dkim_settings.domain)
                if rewritten is not None:
                    outcome.submissions.append(self.fallback_copy(rewritten, token, rule, index, pos,
                                                                  prior + [failure]))
                    outcome.notes.append(f"{address}:dmarc-refused:from-rewritten")
                    continue
            if pos + 1 >= len(dest.chain):
                outcome.notes.append(f"{address}:chain-exhausted")
                exhausted.append(failure)
                continue
            if content is None:
                outcome.notes.append(f"{address}:cannot-forward:{why_not}")
                failure.reason += f" [no fallback tried: {why_not}]"
                exhausted.append(failure)
                continue
            nxt = dest.chain[pos + 1]
            outcome.submissions.append(self.fallback_copy(content, token, rule, index, pos + 1, prior + [failure]))
            outcome.notes.append(f"{address}:fallback->{nxt.address}")
        if exhausted:
            bounce = self._final_bounce(token, prior + exhausted, content)
            for rcpt in self._bounce_recipients(token.sender, outcome):
                outcome.submissions.append(Submission("", rcpt, bounce, "final-bounce"))
                outcome.notes.append(f"final-bounce->{rcpt}")
        return outcome

    def _claim(self, outcome: Outcome, token: Token, what: str) -> bool:
        """One bounce-driven action per token and destination (`what`): the first bounce
        acts, a replay of it does nothing (answered 250, noted in the log line). The claim
        lasts as long as the token is valid; BounceServer releases it if the action fails."""
        if self.store is None:
            return True
        key = "bounce:" + hashlib.sha256(f"{token.address.lower()}\0{what.lower()}".encode(
            "utf-8", "surrogateescape")).hexdigest()[:40]
        if self.store.claim(key, (self.settings.max_age_days + 1) * 86400):
            outcome.claims.append(key)
            return True
        outcome.notes.append(f"{what}:replay-ignored")
        return False

    def _reverse(self, token: Token, mail_from: str, data: bytes, outcome: Outcome) -> None:
        """A reply to a token goes to the original sender; one in a managed domain is routed
        like any recipient (the re-injection listener has no milter)."""
        rcpts = self._bounce_recipients(token.sender, outcome)
        sender = mail_from
        if rcpts != [token.sender] and mail_from and self.policy.srs is not None:
            try:  # forwarded like the milter forwards: SRS, so SPF holds at the destination
                sender = self.policy.srs.forward(addresses.normalize(mail_from))
            except Exception as exc:  # noqa: BLE001 - SRSError, AddressError: kept as it is
                outcome.notes.append(f"srs=skipped:{exc}")
        outcome.notes.append("not-a-dsn:reversed")
        content = self._without_our_signatures(crlf(data))
        for rcpt in rcpts:
            outcome.submissions.append(Submission(sender, rcpt, content, "reverse"))
            if rcpt != token.sender:
                outcome.notes.append(f"reverse:routed->{rcpt}")

    def _without_our_signatures(self, message: bytes) -> bytes:
        """A reversed message minus our own DKIM signatures: sent to a routed alias and to a
        token in one transaction, it was signed by the milter for the forward; reversed to
        the token's sender it must not carry our name over someone else's text."""
        if self.config.dkim is None:
            return message
        own = re.escape(self.config.dkim.domain.lower().rstrip(".").encode())
        head, body = split_message(message)
        kept = [line for line in headers.lines(head)
                if not (headers.field_name(line) == "dkim-signature" and re.search(
                    rb"(?:^|;)\s*d\s*=\s*" + own + rb"\s*(?:;|$)",
                    re.sub(rb"\s+", b"", line.split(b":", 1)[1]).lower().replace(b";", b"; ")))]
        if len(kept) == len(headers.lines(head)):
            return message
        return b"\r\n".join(kept) + b"\r\n\r\n" + body

    def _bounce_recipients(self, sender: str, outcome: Outcome) -> list[str]:
        """Where the sender's bounce goes. The re-injection listener has no milter, so a
        sender in one of our managed domains is routed here (to its primaries)."""
        decision = self.policy.router.decide(sender)
        if decision.action is Action.PASS:
            return [sender]
        if decision.action is Action.ROUTE:
            targets = [d.primary.address for d in decision.destinations]
            return list(dict.fromkeys(targets + ([sender] if decision.keep else [])))
        outcome.notes.append(f"final-bounce-dropped:sender-{decision.action.value}")
        return []

    # -- the returned message

    def _content(self, report: Report, token: Token | None = None) -> tuple[bytes | None, str]:
        """The returned message reduced to what our signature covered, or None and why not."""
        if report.returned is None:
            if report.returned_headers is not None:
                return None, "only the headers were returned (RET=HDRS or bounce_size_limit)"
            return None, "the message was not returned"
        head, body = split_message(report.returned)
        if not head:
            return None, "the returned message has no header"
        if self.policy.signer is None:  # nothing to verify with (documented): transit fields dropped
            kept = [line for line in headers.lines(head) if headers.field_name(line) not in DROP_ON_REINJECT]
            return b"\r\n".join(kept) + b"\r\n\r\n" + body, ""
        signed, other = self.signed_part(report.returned, token)
        if signed is not None:
            return signed, ""
        if other:
            return None, ("the returned message carries our signature, but of another message "
                          "than this return address was made for")
        return None, "the returned message does not carry our valid DKIM signature (changed or truncated)"

    def signed_part(self, message: bytes, token: Token | None) -> tuple[bytes | None, bool]:
        """What of a returned or deferred copy (CRLF) we may send on, checked against our key.

        (the message with only the header fields our verified signature covers, False);
        or (None, True) when our valid signature is there but its b= is not the token's
        BIND (another message), (None, False) when there is none or DKIM is not configured.
        A legacy token (no BIND) takes any valid signature of ours."""
        signer, settings = self.policy.signer, self.config.dkim
        if signer is None or settings is None:
            return None, False
        records = signer.dns_records()
        domain = settings.domain.lower().rstrip(".")

        def dnsfunc(name: str | bytes, timeout: float = 5) -> bytes | None:
            name = name.decode("ascii", "replace") if isinstance(name, bytes) else name
            selector, _, rest = name.rstrip(".").partition("._domainkey.")
            if rest.lower() != domain:
                return None
            txt = records.get(selector)
            return txt.encode("ascii") if txt else None

        try:
            parsed_fields, _ = dkim.rfc822_parse(message)
        except Exception:  # noqa: BLE001 - dkimpy cannot read it: it cannot verify either
            return None, False
        count = sum(1 for name, _ in parsed_fields if name.lower() == b"dkim-signature")
        other = False
        for index in range(min(count, 10)):
            try:
                d = dkim.DKIM(message)
                if not (d.verify(idx=index, dnsfunc=dnsfunc) and d.domain and d.domain.decode().lower() == domain):
                    continue
                b_value = d.signature_fields.get(b"b", b"")
                signed = list(d.include_headers)
            except Exception:  # noqa: BLE001 - dkimpy raises many kinds on junk
                continue
            if token is not None and token.binding is not None and binding_of(b"b=" + b_value) != token.binding:
                other = True
                continue
            return _covered(parsed_fields, signed) + b"\r\n" + split_message(message)[1], False
        return None, other

    def fallback_copy(self, content: bytes, token: Token, rule: Rule, index: int, pos: int,
                      failures: list[Failure]) -> Submission:
        """The copy for chain position `pos` of destination `index` of `rule`: `content`
        (what our signature covered, from signed_part), our failure notes and trace on
        top, signed afresh, with a new token bound to that signature."""
        head, body = split_message(content)
        server = self.config.server_name.lower()
        kept = []
        for line in headers.lines(head):
            name = headers.field_name(line)
            if name in DROP_ON_REINJECT or name == FAILED_HEADER.lower():
                continue
            if name == TRACE_HEADER.lower() and line.split(b":", 1)[1].strip().lower().startswith(server.encode()):
                continue  # ours from an earlier step: one fresh trace below
            kept.append(line)
        failed = [f"{FAILED_HEADER}: {printable(f.address, 200)}; {status_code(f.status)}; "
                  f"{printable(f.reason)}".encode() for f in failures[-_MAX_REASONS:]]
        message = b"\r\n".join(failed + kept) + b"\r\n\r\n" + body
        binding = "x"
        if self.policy.signer is not None:
            try:
                signatures = self.policy.signer.sign(message)
            except Exception as exc:  # noqa: BLE001 - forwarded unsigned, never dropped
                log.warning("bounce fallback: DKIM signing failed: %s", exc)
                signatures = []
            if signatures:
                binding = binding_of(signatures[0][1])
            sig_lines = [f"{n}: {v.replace(chr(10), chr(13) + chr(10))}".encode("ascii") for n, v in signatures]
            message = b"\r\n".join(sig_lines) + (b"\r\n" if sig_lines else b"") + message
        target = rule.destinations[index].chain[pos]
        sender = self.codec.mint(token.sender, [rule.name], dest=index, pos=pos, binding=binding)
        # Our trace on top, outside the signature (the token is bound to it): the stamp
        # starts the next address's fallback_after clock now (deferrals.py).
        trace = (f"{TRACE_HEADER}: {printable(self.config.server_name, 200)}; rules={printable(rule.name, 200)}; "
                 + stamp(self.secrets, sender, self.clock())).encode("utf-8")
        message = trace + b"\r\n" + message
        return Submission(sender, target.address, message, "fallback")

    def _final_bounce(self, token: Token, failures: list[Failure], content: bytes | None = None) -> bytes:
        """The DSN to the original sender (dsn.final_report), signed like our forwards so the
        sender's provider can trust it. Its attached headers are those our signature covered
        on the returned copy (`content`), else none (anyone could have written them)."""
        attached = None
        if content is not None:
            attached = [line for line in headers.lines(split_message(content)[0])
                        if headers.field_name(line) != FAILED_HEADER.lower()
                        and headers.field_name(line) not in DROP_ON_REINJECT]
        message = final_report(self.config.server_name, self.codec.domain, token.sender, failures, self.clock(),
                               attached)
        if self.policy.signer is not None:
            try:  # signed like our forwards, so the sender's provider can trust it
                sigs = self.policy.signer.sign(message)
                message = b"".join(f"{n}: {v}".replace("\n", "\r\n").encode("ascii") + b"\r\n"
                                   for n, v in sigs) + message
            except Exception as exc:  # noqa: BLE001 - sent unsigned, never dropped
                log.warning("final bounce: DKIM signing failed: %s", exc)
        return message


def _covered(parsed_fields: list[tuple[bytes, bytes]], signed: list[bytes]) -> bytes:
    """The header fields (dkimpy's parse, in order) a signature with h=`signed` covers,
    chosen from the bottom up as verifiers do (RFC 6376 section 5.4.2, dkim.select_parsed_fields)."""
    chosen = set()
    last: dict[bytes, int] = {}
    for name in signed:
        i = last.get(name, len(parsed_fields))
        while i > 0:
            i -= 1
            if parsed_fields[i][0].lower() == name:
                chosen.add(i)
                break
        last[name] = i
    return b"".join(parsed_fields[i][0] + b":" + parsed_fields[i][1] for i in sorted(chosen))
