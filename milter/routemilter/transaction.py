"""One message's routing, from MAIL FROM to end of message, without an MTA.

`Transaction` holds one message's state (sender, recipients and their decisions,
what is needed for signing) and turns it into a `Plan`: the complete list of
changes to make at end of message. session.py feeds it from pymilter's callbacks
and applies the Plan; nothing here imports pymilter, so the routing is tested and
benchmarked without one.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import addresses, headers, signpolicy, stamps
from .config import Reply
from .policy import Policy
from .rules import Action, Decision
from .senders import outbound_domain
from .signing import ADDED_UNSIGNED, BodyHash, SigningError
from .srs import SenderRewriter, SRSError
from .tokens import TokenError, binding_of

if TYPE_CHECKING:
    from .authcheck import AuthState  # imported when used: SPF/DMARC libraries only with `auth:`

TRACE_HEADER = stamps.TRACE_HEADER  # the trace field the milter adds (stamps.py reads it back)
LOOP = Reply(554, "5.4.6", ("routemilter: mail routing loop detected",))
BAD_SRS = Reply(550, "5.1.1", ("routemilter: invalid or expired return address",))
NOT_UTF8 = Reply(553, "5.1.3", ("Recipient address rejected: not valid UTF-8",))
# A return address (SRS or bounce token) and other recipients in one message: the
# message would be signed for the routed ones and reach the bounce handler or the
# reversed sender with our signature. Standard clients send these again, separately.
SEPARATELY = Reply(452, "4.5.3",
                   ("routemilter: too many recipients: send mail to this address in a separate transaction",))


def is_utf8(text: str) -> bool:
    """False for text pymilter decoded from invalid UTF-8 (it keeps such bytes as
    lone surrogates, errors='surrogateescape'): libmilter cannot take it back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def header_safe(text: str) -> str:
    """A value for a header field we add: no CR, LF or other controls, which
    would end the field early or start a new one."""
    return re.sub("[\x00-\x1f\x7f]", "?", text)


@dataclass
class Recipient:
    raw: str  # exactly as the MTA sent it
    decision: Decision
    unsrs: str | None = None  # for bounces to our SRS domain: the original sender
    return_address: bool = False  # in the SRS domain (SRS address or bounce token)
    reversed_only: bool = False  # an SRS bounce sent back to `unsrs`, a sender outside our domains

    @property
    def stored(self) -> str:
        """The recipient as the MTA stored it, which is what delrcpt must name: Postfix
        drops a source route (`<@relay:me@family.example>` is kept as
        `me@family.example`), so deleting the raw form would match nothing."""
        bare = self.raw.strip()
        if bare.startswith("<") and bare.endswith(">"):
            bare = bare[1:-1].strip()
        if bare.startswith("@") and ":" in bare:
            return f"<{addresses.strip_envelope(self.raw)}>"
        return self.raw


@dataclass
class Plan:
    """What to do at end of message; empty lists mean nothing to change."""

    reply: Reply | None = None  # refuse or tempfail the whole message
    discard: bool = False
    delete: list[str] = field(default_factory=list)
    add: list[str] = field(default_factory=list)
    new_sender: str | None = None
    sender_params: str | None = None  # ESMTP arguments for chgfrom (RET=FULL with a bounce token)
    headers: list[tuple[str, str]] = field(default_factory=list)
    changes: list[tuple[str, int, str]] = field(default_factory=list)  # chgheader(name, index, value)
    notes: list[str] = field(default_factory=list)  # for the log line


class Transaction:
    """One message, from MAIL FROM to end of message."""

    def __init__(self, policy: Policy, sender: str) -> None:
        self.policy = policy
        self.sender_raw = sender
        self.sender = "" if addresses.is_null_sender(sender) else addresses.strip_envelope(sender)
        self.recipients: list[Recipient] = []
        self.refused: list[tuple[str, Reply]] = []
        self.header_block = bytearray()
        self.body = bytearray()  # kept only for auth: (ARC); DKIM streams it into body_hash
        self.body_hash: BodyHash | None = None  # the DKIM body hash, fed as the body arrives
        self.trace_count = 0
        self.own_trace = False
        self.rules: list[str] = []  # names of the rules that routed this message (for the bounce token)
        self.from_values: list[str] = []  # the From field(s), for the signing decision (signpolicy.py)
        self.started = time.monotonic()
        self.auth: AuthState | None = policy.auth.begin(policy.config) if policy.auth is not None else None
        self.submitted = False  # from our own user: a SASL login or a trusted network (senders.py)
        self.login: str | None = None  # the SASL login ({auth_authen})

    def submitted_by(self, login: str | None) -> None:
        """Our own user's mail: signed for its From: domain, never SRS-rewritten, and
        not judged as inbound mail (auth:), whose SPF would fail for a roaming user."""
        self.submitted, self.login, self.auth = True, login, None

    # -- envelope

    def add_recipient(self, raw: str) -> Reply | None:
        """Record a recipient; return a Reply when it must be refused now."""
        policy = self.policy
        if not is_utf8(raw):
            # Could be neither routed nor deleted at end of message (delrcpt would
            # raise on every retry): refuse it now, permanently.
            self.refused.append((raw, NOT_UTF8))
            return NOT_UTF8
        try:
            address: addresses.Address | None = addresses.parse(raw)
        except addresses.AddressError:
            address = None  # refused by the router below, with the reason
        srs, rewriter = policy.config.srs, policy.srs
        return_address = (srs is not None and rewriter is not None and address is not None
                          and address.domain == srs.domain)
        if self.recipients and self.recipients[0].return_address != return_address:
            self.refused.append((str(address) if address else raw, SEPARATELY))
            return SEPARATELY
        if return_address and rewriter is not None:
            return self._add_srs_recipient(raw, str(address), rewriter)
        # Parsed once: the router takes the parsed address as it is.
        return self._add_routed(raw, policy.router.decide(address if address is not None else raw))

    def _add_routed(self, raw: str, decision: Decision, unsrs: str | None = None) -> Reply | None:
        if decision.action is Action.REFUSE:
            if decision.reply is None:  # rules.py gives every refusal its reply; a 451 if not
                raise ValueError(f"refusal without a reply: {decision.reason}")
            self.refused.append((decision.address, decision.reply))
            return decision.reply
        if self.auth is not None and decision.action is Action.ROUTE:
            refusal = self.auth.check_recipient(decision)  # SPF fail, rate limit
            if refusal is not None:
                self.refused.append((decision.address, refusal))
                return refusal
        self.recipients.append(Recipient(raw, decision, unsrs=unsrs, return_address=unsrs is not None))
        return None

    def _add_srs_recipient(self, raw: str, address: str, rewriter: SenderRewriter) -> Reply | None:
        tokens = self.policy.tokens
        if tokens is not None and tokens.is_token(address):
            # A bounce for one of our forwards (bounces.py): a genuine, current token stays
            # in place and the MTA delivers it to the bounce handler; anything else is refused.
            try:
                tokens.check(address)
            except TokenError:
                self.refused.append((address, BAD_SRS))
                return BAD_SRS
            self.recipients.append(Recipient(raw, Decision(
                Action.PASS, address, "bounce token: delivered to the bounce handler"), return_address=True))
            return None
        try:
            original = rewriter.reverse(address)
        except SRSError:
            self.refused.append((address, BAD_SRS))
            return BAD_SRS
        if original.rpartition("@")[2].lower().rstrip(".") == rewriter.domain:
            self.refused.append((address, BAD_SRS))  # we never wrap our own return addresses
            return BAD_SRS
        decision = self.policy.router.decide(original)
        if decision.action is Action.PASS:
            # The original sender (or, for SRS1, the first forwarder) is elsewhere.
            decision = Decision(Action.ROUTE, address, "SRS return address, reversed to the original sender")
            self.recipients.append(Recipient(raw, decision, unsrs=original, return_address=True, reversed_only=True))
            return None
        # An original sender in a domain we answer for is routed (or refused) by the
        # rules like any recipient: sent out unrouted, it would come straight back.
        return self._add_routed(raw, decision, unsrs=original)

    @property
    def forwards(self) -> bool:
        """Whether any recipient is forwarded (so SRS and DKIM apply)."""
        return any(r.decision.action is Action.ROUTE and not r.reversed_only for r in self.recipients)

    @functools.cached_property
    def needs_content(self) -> bool:
        """Asked from the first header on, when the recipients are final: computed once,
        not again for every header and body chunk."""
        return (self.forwards or self.submitted) and (self.policy.signer is not None or self.auth is not None)

    # -- content

    def add_header(self, name: str, value: bytes) -> None:
        if self.auth is not None:
            self.auth.header(name, value)
        if name.lower() == "from":
            self.from_values.append(value.decode("utf-8", "replace"))
        if name.lower() == TRACE_HEADER.lower():
            self.trace_count += 1
            first = value.decode("utf-8", "replace").split(";", 1)[0].strip().lower()
            if first == self.policy.config.server_name.lower():
                self.own_trace = True
        if self.needs_content:
            # libmilter hands folded values with bare LF; DKIM wants CRLF.
            value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            self.header_block += name.encode("ascii", "replace") + b": " + value + b"\r\n"

    def add_body(self, chunk: bytes) -> None:
        if not self.needs_content:
            return
        signer = self.policy.signer
        if signer is not None and signer.streams:
            if self.body_hash is None:
                self.body_hash = signer.body_hash()
            if self.body_hash is not None:
                self.body_hash.update(chunk)  # DKIM needs no copy of the body
                if self.auth is None:
                    return
        self.body += chunk

    # -- decision

    def plan(self) -> Plan:
        plan = Plan()
        if self.submitted:
            self._outbound(plan)  # our user's mail: signed for its From: domain
            if plan.reply is not None:
                return plan
        if not any(r.decision.action is not Action.PASS for r in self.recipients):
            return plan  # nothing of ours to route
        if self.forwards and (self.own_trace or self.trace_count >= self.policy.config.milter.max_hops):
            plan.reply = LOOP
            plan.notes.append(f"loop trace_headers={self.trace_count} own={'yes' if self.own_trace else 'no'}")
            return plan

        seen: set[str] = set()
        remaining = 0  # recipients that will still receive the message
        rules: list[str] = []
        for rcpt in self.recipients:
            decision = rcpt.decision
            if decision.action is Action.PASS:
                remaining += 1
                seen.add(decision.address)
                continue
            if decision.rule is not None and decision.rule.name not in rules:
                rules.append(decision.rule.name)
            if decision.keep and rcpt.unsrs is None:
                remaining += 1
                seen.add(decision.address)
            else:
                plan.delete.append(rcpt.stored)
            targets = [d.primary.address for d in decision.destinations]
            if rcpt.reversed_only and rcpt.unsrs is not None:
                targets = [rcpt.unsrs]
            elif decision.keep and rcpt.unsrs is not None:
                # The kept copy of a reversed bounce: the reversed address itself, delivered
                # by the MTA as it delivers that kept address (the SRS address would come back here).
                targets.append(rcpt.unsrs)
            for target in targets:
                if target not in seen:
                    seen.add(target)
                    plan.add.append(target)
        remaining += len(plan.add)
        if remaining == 0:
            plan.discard = True
            plan.delete.clear()
            return plan

        if self.forwards and self.auth is not None:
            self.auth.judge(self, plan)  # DMARC/SPF/spam refusal, Authentication-Results, ARC
            if plan.reply is not None or plan.discard:
                plan.delete.clear()
                plan.add.clear()
                return plan
        if self.forwards and self.submitted:  # routed, with the sender kept: SPF holds for our own domain
            trace = f"{self.policy.config.server_name}; rules={','.join(rules)}"
            plan.headers.insert(0, (TRACE_HEADER, header_safe(trace)))
        elif self.forwards:
            self.rules = rules
            unsigned = self.unsigned_reason()
            # Signed first: the bounce token is bound to the signature (bounces.py).
            signatures = self._signatures(plan) if unsigned is None else []
            if unsigned is not None and self.policy.signer is not None:
                plan.notes.append(f"dkim=skipped:{unsigned}")
            plan.new_sender = self._srs_sender(plan, signatures)
            trace = f"{self.policy.config.server_name}; rules={','.join(rules)}"
            srs = self.policy.config.srs
            if (plan.new_sender and srs is not None and self.policy.tokens is not None
                    and self.policy.tokens.is_token(plan.new_sender)):
                # When this copy left, MACed with its return address: the deferral listener's clock.
                trace += "; " + stamps.stamp(srs.secrets, plan.new_sender, time.time())
            plan.headers.append((TRACE_HEADER, header_safe(trace)))
            plan.headers.extend(signatures)
            if self.auth is not None:
                self.auth.commit()  # rate-limit accounting
        return plan

    def _srs_sender(self, plan: Plan, signatures: Sequence[tuple[str, str]] = ()) -> str | None:
        rewriter = self.policy.srs
        if rewriter is None or not self.sender:
            return None
        if not is_utf8(self.sender):
            plan.notes.append("srs=skipped:sender-not-utf8")  # forwarded with the original sender
            return None
        try:
            if self.policy.tokens is not None and self.rules:
                try:  # a bounce token: the bounce can start the address-level fallback
                    # Bound to this message: a returned copy is forwarded only with this signature.
                    binding = binding_of(signatures[0][1]) if signatures else "x"
                    token = self.policy.tokens.mint(addresses.normalize(self.sender), self.rules, binding=binding)
                    # The fallback needs the whole message back in the bounce, whatever
                    # RET the sender asked for (their own bounce carries headers only).
                    plan.sender_params = "RET=FULL"
                    return token
                except TokenError as exc:
                    plan.notes.append(f"token=skipped:{exc}")  # plain SRS below
            return rewriter.forward(addresses.normalize(self.sender))
        except (SRSError, addresses.AddressError) as exc:
            plan.notes.append(f"srs=skipped:{exc}")  # forwarded with the original sender
            return None

    def unsigned_reason(self) -> str | None:
        """Why this forward must not carry our DKIM signature (signpolicy.py), or None."""
        if self.policy.config.dkim is None:
            return None
        verified: set[str] = set()
        rewritten = False
        if self.auth is not None and self.auth.verdict is not None:
            verdict = self.auth.verdict
            verified = {d.domain for d in verdict.dkim if d.result == "pass" and d.domain}
            if verdict.spf.result == "pass" and verdict.spf.mailfrom and verdict.spf.domain:
                verified.add(verdict.spf.domain)
            rewritten = self.auth.rewritten_from
        origin = signpolicy.Origin(tuple(self.from_values), frozenset(verified), rewritten)
        return signpolicy.unsigned_reason(self.policy.config.dkim.domain, origin)

    def _outbound(self, plan: Plan) -> None:
        """Mail of a login or a trusted network: sign it for the managed domain of its
        From: address (a login only for an address it owns), or refuse it."""
        senders = self.policy.senders
        if senders is None:  # submitted_by is called only with `submission:` configured
            return
        domain, refusal, note = outbound_domain(senders, self.policy.config, self.login, self.from_values)
        plan.notes.append(note)
        if refusal is not None:
            plan.reply = refusal
        elif domain is not None:
            plan.headers.extend(self._signatures(plan, domain))

    def _signatures(self, plan: Plan, domain: str | None = None) -> list[tuple[str, str]]:
        """Our DKIM-Signature fields; `domain`: a d= other than dkim.domain (outbound)."""
        if self.policy.signer is None:
            return []
        head = headers.forwarded(self.header_block, plan, skip=ADDED_UNSIGNED)  # with auth:'s From rewrite
        if self.body_hash is not None:
            try:
                return self.policy.signer.sign(head + b"\r\n", body=self.body_hash, domain=domain)
            except SigningError as exc:
                plan.notes.append(f"dkim=failed:{exc}")  # forwarded unsigned, never dropped
                return []
        # One copy of the message at a time (a 50 MiB body must not cost 200 MiB):
        # the header block goes in front of the body in place, the buffer is freed.
        body, self.body = self.body, bytearray()
        body[0:0] = head + b"\r\n"
        message = bytes(body)
        del body
        try:
            return self.policy.signer.sign(message, domain=domain)
        except SigningError as exc:
            plan.notes.append(f"dkim=failed:{exc}")  # forwarded unsigned, never dropped
            return []

    # -- the log line

    def record(self, queue_id: str | None, plan: Plan | None, outcome: str) -> dict[str, str]:
        rcpts = []
        for rcpt in self.recipients:
            d = rcpt.decision
            rule = d.rule.name if d.rule else d.action.value
            if rcpt.reversed_only:
                rcpts.append(f"{d.address}->unsrs:{rcpt.unsrs}")
            elif rcpt.unsrs:
                rcpts.append(f"{rcpt.raw.strip('<>')}->unsrs:{rcpt.unsrs}->{rule}:"
                             + ",".join(x.primary.address for x in d.destinations))
            elif d.action is Action.ROUTE:
                rcpts.append(f"{d.address}->{rule}:" + ",".join(x.primary.address for x in d.destinations)
                             + ("+keep" if d.keep else ""))
            else:
                rcpts.append(f"{d.address}->{rule}")
        for address, reply in self.refused:
            rcpts.append(f"{address}->refused:{reply.code}")
        record = {
            "queue_id": queue_id or "-",
            "from": f"<{self.sender}>",
            "rcpts": " ".join(rcpts) or "-",
            "outcome": outcome,
        }
        if plan is not None:
            if plan.new_sender:
                record["srs"] = plan.new_sender
            signed = [v.split("s=", 1)[1].split(";", 1)[0] for n, v in plan.headers
                      if n == "DKIM-Signature" and "s=" in v]
            if signed:
                record["dkim"] = ",".join(signed)
            if plan.add:
                record["added"] = ",".join(plan.add)
            if plan.notes:
                record["notes"] = " ".join(plan.notes)
        record["ms"] = f"{(time.monotonic() - self.started) * 1000:.1f}"
        return record
