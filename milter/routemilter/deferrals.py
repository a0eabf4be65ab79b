"""Deferral-driven fallback: a primary that keeps answering 4xx hands over to the next address.

The article's failure is temporary (`451 4.7.650 ... rate limited due to IP
reputation`), so no bounce comes for days. Postfix's `smtp_fallback_relay` is
used in the same delivery attempt when a destination's hosts answer 4xx or
cannot be reached (5xx still bounces). `postfix-config` gives every address that
has a next address in its chain a transport whose last fallback relay is this
listener, so the listener sees a copy exactly when its destination deferred it:

* younger than the destination's `fallback_after`: answer 451 ("not yet"), and
  Postfix keeps the copy and retries the primary on its own schedule;
* older: re-inject the message to the next address of the chain (new bounce
  token, fresh DKIM signature, an X-Routemilter-Failed line), through the same
  loopback smtpd as bounces.py, and answer 250 only once Postfix has queued it.
  A crash in between leaves the copy in Postfix's queue: nothing is lost.

The message's age comes from the time the milter stamped in the X-Routemilter
trace header (`t=SECONDS.MAC`), with a MAC over the time and the bounce token
(the copy's envelope sender) under the SRS secrets: a sender cannot backdate
it, and a stamp cannot be moved to another copy. Each re-injected copy is
stamped afresh (bounces.Handler.fallback_copy; the stamp: stamps.py), so the
next address gets its own `fallback_after`. Only genuine, current tokens are
accepted as MAIL FROM, and only a recipient of that token's chain as RCPT TO.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from . import addresses, events, headers, sockets
from .bounces import Handler, find_in_chain, previous_failures, rules_of
from .config import format_duration
from .dsn import Failure, crlf, printable, split_message
from .events import format_record
from .reinject import Submission, Submitter, submit
from .stamps import is_our_trace, stamped_time
from .tokens import Token, TokenCodec, TokenError

if TYPE_CHECKING:
    from .config import Rule
    from .policy import Policy, PolicyHolder

log = logging.getLogger("routemilter.mail")

DEFERRAL_STATUS = "4.0.0"  # the MTA does not tell the fallback relay which 4xx the primary gave
_DONE_TTL = 7 * 86400  # remembered re-injections (a 250 lost in transit must not send twice)


# ------------------------------------------------------------ the decision



@dataclass
class Verdict:
    """The reply to the MTA, and what to re-inject before giving it (if anything)."""

    reply: str
    submission: Submission | None = None
    fields: dict[str, str] = field(default_factory=dict)  # for the log line


class Deferrals:
    """Decides about one deferred copy. Pure: no I/O (the server submits and logs)."""

    def __init__(self, policy: Policy, clock: Callable[[], float] = time.time):
        self.policy = policy
        self.config = policy.config
        self.codec: TokenCodec | None = policy.tokens
        self.clock = clock

    def _tokens(self) -> TokenCodec:
        if self.codec is None:  # bounces: removed by a reload since MAIL FROM
            raise TokenError("bounce tokens are not configured (bounces:)")
        return self.codec

    def check_sender(self, mail_from: str) -> str | None:
        """None if `mail_from` is a genuine, current token; else the reply."""
        if self.codec is None:
            return "451 4.3.5 routemilter: deferral-driven fallback is not configured (bounces:)"
        sender = addresses.strip_envelope(mail_from or "")
        if not self.codec.is_token(sender):
            # Our own transport, but a message without a token (its sender could not be
            # embedded): no chain to follow. Postfix keeps retrying the primary, as before.
            return "451 4.7.1 routemilter: no fallback chain for this message (not a routemilter return address)"
        try:
            self.codec.check(sender)
        except TokenError as exc:
            return f"550 5.7.1 routemilter: refused return address: {exc}"
        return None

    def locate(self, mail_from: str, rcpt: str) -> tuple[Token, Rule, int, int] | None:
        """(token, rule, destination index, chain position) of `rcpt`, or None."""
        token = self._tokens().check(addresses.strip_envelope(mail_from))
        address = addresses.normalize(addresses.strip_envelope(rcpt))
        where = find_in_chain(rules_of(self.config, token), token, address)
        return None if where is None else (token, *where)

    def check_recipient(self, mail_from: str, rcpt: str) -> str | None:
        if self.codec is None:  # bounces: removed by a reload since MAIL FROM
            return "451 4.3.5 routemilter: deferral-driven fallback is not configured (bounces:)"
        try:
            where = self.locate(mail_from, rcpt)
        except (TokenError, addresses.AddressError):
            where = None
        if where is None:
            return "550 5.7.1 routemilter: not a destination of this message's fallback chain"
        return None

    def decide(self, mail_from: str, rcpt: str, data: bytes, queue_id: str = "") -> Verdict:
        """What to do with the copy for `rcpt` that its destination deferred."""
        where = self.locate(mail_from, rcpt)
        if where is None:  # check_recipient refused it at RCPT; the config changed since
            raise TokenError(f"{rcpt} is no destination of this message's fallback chain")
        token, rule, index, pos = where
        dest = rule.destinations[index]
        address = dest.chain[pos].address
        content = crlf(bytes(data))
        head, _ = split_message(content)
        fields = {"queue_id": queue_id or _queue_id(head) or "-", "rcpt": f"<{address}>",
                  "fallback_after": format_duration(dest.fallback_after)}
        if pos + 1 >= len(dest.chain) or dest.fallback_after is None:
            fields["decision"] = "keep-retrying"
            return Verdict(f"451 4.4.0 routemilter: {address} is deferring this message; no further address "
                           f"to move on to, the MTA keeps retrying it", fields=fields)
        server = self.config.server_name
        secrets = self.config.srs.secrets if self.config.srs is not None else ()
        sent = None
        for line in headers.lines(head):
            if is_our_trace(line, server):
                sent = stamped_time(secrets, token.address, line.split(b":", 1)[1].decode("utf-8", "replace"))
                break
        if sent is None:
            fields["decision"] = "no-stamp"
            return Verdict("451 4.7.0 routemilter: cannot tell how long this message has been deferred "
                           "(no valid time stamp in its trace header); the MTA keeps retrying it", fields=fields)
        now = self.clock()
        age = max(0.0, now - sent)
        fields["age"] = format_duration(age)
        nxt = dest.chain[pos + 1]
        if age < dest.fallback_after:
            fields["decision"] = "not-yet"
            return Verdict(f"451 4.4.0 routemilter: {address} deferred this message; it moves on to "
                           f"{nxt.address} once deferred for {format_duration(dest.fallback_after)} "
                           f"(now {format_duration(age)})", fields=fields)
        handler = Handler(self.policy, clock=self.clock)
        if self.policy.signer is not None:
            # Only what our signature covered goes on, and only for the message this
            # return address was made for (the token is bound to that signature).
            signed, _ = handler.signed_part(content, token)
            if signed is None:
                fields["decision"] = "not-ours"
                return Verdict("451 4.7.0 routemilter: the deferred copy does not carry our valid DKIM signature "
                               "for this return address; not forwarded, the MTA keeps retrying it", fields=fields)
            content = signed
        since = email.utils.formatdate(sent, localtime=False)
        # Which 4xx the primary gave is only in the MTA's log (smtp_fallback_relay does not pass
        # it on): the queue id says where to look.
        failure = Failure(address, f"deferred (4xx or unreachable at every attempt) since {since}, "
                                   f"for {format_duration(age)}; "
                                   f"fallback_after {format_duration(dest.fallback_after)}; "
                                   f"its reply is in the MTA's log under queue id {fields['queue_id']}",
                          DEFERRAL_STATUS)
        prior = previous_failures(head)
        submission = handler.fallback_copy(content, token, rule, index, pos + 1, prior + [failure])
        fields.update({"decision": "fallback", "to": f"<{nxt.address}>", "from": f"<{token.address}>",
                       "sender": f"<{submission.mail_from}>"})
        return Verdict(f"250 2.0.0 routemilter: moved on from {address} to {nxt.address}", submission, fields)


def _queue_id(head: bytes) -> str:
    """The MTA's queue id of this copy: the `id` of the first (our MTA's) Received field."""
    for line in headers.lines(head):
        if headers.field_name(line) == "received":
            m = re.search(rb"\bid\s+([A-Za-z0-9]+)", line.replace(b"\r\n", b" "))
            return m.group(1).decode("ascii") if m else ""
    return ""


# --------------------------------------------------------------- the server


class _SMTPHandler:
    def __init__(self, server: DeferralServer):
        self.server = server

    async def handle_MAIL(self, smtp: SMTP, session: Session, envelope: Envelope,  # noqa: N802 (aiosmtpd hook)
                          address: str, mail_options: list[str]) -> str:
        refusal = Deferrals(self.server.holder.current).check_sender(address)
        if refusal is not None:
            log.info("deferral refused mail_from=<%s> reply=%s", printable(address, 300), refusal)
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, smtp: SMTP, session: Session, envelope: Envelope,  # noqa: N802 (aiosmtpd hook)
                          address: str, rcpt_options: list[str]) -> str:
        if envelope.rcpt_tos:
            # One destination per delivery (postfix-config sets its recipient limit to 1):
            # SMTP has one reply to DATA, and each destination has its own clock.
            return "452 4.5.3 routemilter: one recipient per message here"
        mail_from = envelope.mail_from or ""
        refusal = Deferrals(self.server.holder.current).check_recipient(mail_from, address)
        if refusal is not None:
            log.info("deferral refused mail_from=<%s> rcpt=<%s>", printable(mail_from, 300), printable(address, 300))
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 (aiosmtpd hook)
        data = bytes(envelope.original_content or b"")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.server.process, envelope.mail_from or "", envelope.rcpt_tos[0],
                                          data)


class DeferralServer:
    """SMTP listener in the daemon, on loopback: the last smtp_fallback_relay of the
    deferral transports (mtaconfig.deferral_master)."""

    def __init__(self, holder: PolicyHolder, listen: str, max_size: int, submitter: Submitter = submit):
        self.holder = holder
        self.listen = listen
        self.max_size = max_size
        self.submitter = submitter
        self.controller: Controller | None = None

    def process(self, mail_from: str, rcpt: str, data: bytes) -> str:
        """Decide, re-inject if it is time, and give the reply for this copy."""
        started = time.monotonic()
        policy = self.holder.current
        try:
            verdict = Deferrals(policy).decide(mail_from, rcpt, data)
        except Exception:
            log.exception("deferral rcpt=<%s> error: tempfail", printable(rcpt, 300))
            return "451 4.3.0 routemilter: temporary error handling this deferred message"
        fields = verdict.fields
        if verdict.submission is None:
            log.debug("deferral %s", format_record(fields))
            return verdict.reply
        store = self.holder.store
        # The same queued copy comes back byte for byte; another message never has its digest.
        done = f"deferral:{hashlib.sha256(data).hexdigest()}:{rcpt.lower()}"
        try:
            if store.window_count(done, _DONE_TTL):
                # Re-injected before, and our 250 was lost: the next address has it already.
                fields["decision"] = "already-moved-on"
                events.deferral(fields)  # the log line, metrics and notices (events.py)
                return verdict.reply
            if policy.config.bounces is None:  # decide() found a token: bounces: is configured
                raise RuntimeError("bounces: is not configured")
            replies = self.submitter(policy.config.bounces.reinject, [verdict.submission])
            store.window_add(done, _DONE_TTL)
        except Exception as exc:  # noqa: BLE001 - Postfix keeps the copy and retries
            log.warning("deferral %s reinject failed: %r: tempfail", format_record(fields), exc)
            return "451 4.4.1 routemilter: cannot re-inject right now, try again later"
        fields["new_queue_id"] = events.queued_as(str((replies or [""])[0]))
        fields["ms"] = f"{(time.monotonic() - started) * 1000:.1f}"
        events.deferral(fields)  # the log line, metrics and notices (events.py)
        return verdict.reply

    def start(self) -> DeferralServer:
        handler = _SMTPHandler(self)
        address = sockets.parse(self.listen)
        # The keywords go to aiosmtpd's SMTP for each connection (server_hostname: its hostname).
        controller = Controller(handler, hostname=address.host, port=address.port, data_size_limit=self.max_size,
                                enable_SMTPUTF8=True, decode_data=False, server_hostname="routemilter-deferrals",
                                ident="routemilter", timeout=300)
        controller.start()
        self.controller = controller
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop(no_assert=True)
            self.controller = None
