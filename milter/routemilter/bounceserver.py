"""The LMTP listener in the daemon for bounces to the SRS domain (the transport).

Postfix delivers each bounce to a token address here (the `rm_bounce` transport
of postfix-config). The token is checked at RCPT; at DATA the bounce planner
(bounces.py) says what to send, reinject.py hands it to the MTA, and only then
is the answer 250. Any failure answers 451: Postfix keeps the bounce and retries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from . import events, sockets
from .bounces import Handler
from .dsn import normal_address, parse_dsn, printable
from .reinject import Submitter, submit
from .tokens import TokenError

if TYPE_CHECKING:
    from .config import BounceSettings
    from .policy import PolicyHolder

log = logging.getLogger("routemilter.mail")


class _LMTPHandler:
    def __init__(self, server: BounceServer):
        self.server = server

    async def handle_RCPT(self, smtp: SMTP, session: Session, envelope: Envelope,  # noqa: N802 (aiosmtpd hook)
                          address: str, rcpt_options: list[str]) -> str:
        policy = self.server.holder.current
        if policy.tokens is None:
            return "550 5.1.1 routemilter: bounce handling is not configured"
        try:
            policy.tokens.check(address)
        except TokenError as exc:
            events.bounce_refused(printable(address, 300), str(exc))
            return "550 5.1.1 routemilter: invalid or expired return address"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 (aiosmtpd hook)
        data = bytes(envelope.original_content or b"")
        mail_from = envelope.mail_from or ""
        if mail_from.strip() in ("<>", ""):
            mail_from = ""  # aiosmtpd keeps the null sender as "<>"
        loop = asyncio.get_running_loop()
        replies = []
        for rcpt in envelope.rcpt_tos:
            replies.append(await loop.run_in_executor(
                None, self.server.process, rcpt, mail_from, data))
        return "\r\n".join(replies)


class _LongLineLMTP(LMTP):
    """postfix-config sets lmtp_line_length_limit = 0, so returned messages keep their
    long lines (DKIM needs them unchanged): accept lines up to the size limit, not
    aiosmtpd's RFC 5321 default of 1,001 (it reads with that limit from __init__ on)."""

    def __init__(self, handler: _LMTPHandler, *, line_length_limit: int, **kwargs: Any):
        self.line_length_limit = line_length_limit
        super().__init__(handler, **kwargs)


class _InetController(Controller):
    def factory(self) -> LMTP:
        return _LongLineLMTP(self.handler, **self.SMTP_kwargs)


class _UnixController(UnixSocketController):
    def factory(self) -> LMTP:
        return _LongLineLMTP(self.handler, **self.SMTP_kwargs)


class BounceServer:
    """LMTP listener in the daemon for bounces to the SRS domain."""

    def __init__(self, holder: PolicyHolder, settings: BounceSettings, mode: int = 0o660, group: str | None = None,
                 submitter: Submitter = submit):
        self.holder = holder
        self.settings = settings
        self.mode = mode
        self.group = group
        self.submitter = submitter
        self.controller: Controller | UnixSocketController | None = None

    def process(self, rcpt: str, mail_from: str, data: bytes) -> str:
        """Handle one bounce for one token; the LMTP reply for that recipient."""
        started = time.monotonic()
        policy = self.holder.current
        ids = events.bounce_queue_ids(data)  # (this bounce, the message it reports on): joins the logs
        store = self.holder.store
        try:
            handler = Handler(policy, store=store)
            outcome = handler.handle(rcpt, mail_from, data)
        except TokenError as exc:
            events.bounce_refused(printable(rcpt, 300), str(exc), ids)
            return "550 5.1.1 routemilter: invalid or expired return address"
        except Exception:
            log.exception("bounce rcpt=<%s> bounce_qid=%s error: tempfail", printable(rcpt, 300), ids[0])
            events.bounce_tempfail(printable(rcpt, 300), ids, "handler error")
            return "451 4.3.0 routemilter: temporary error handling this bounce"
        try:
            replies = self.submitter(handler.settings.reinject, outcome.submissions) or []
        except Exception as exc:  # noqa: BLE001 - the MTA keeps the bounce and retries
            for key in outcome.claims:  # not done: the retry must be able to act
                try:
                    store.release(key)
                except Exception as release_exc:  # noqa: BLE001 - still 451: never a 5xx from here
                    log.error("bounce rcpt=<%s> bounce_qid=%s claim %s could not be released (%r): "
                              "the MTA's retry of this bounce will be taken for a replay",
                              printable(rcpt, 300), ids[0], key, release_exc)
            events.bounce_tempfail(printable(rcpt, 300), ids, f"reinject failed: {exc!r}", outcome.notes)
            return "451 4.4.1 routemilter: cannot re-inject right now, try again later"
        events.bounce(printable(rcpt, 300), printable(mail_from, 300), ids, outcome.notes, outcome.submissions,
                      [events.queued_as(r) for r in replies], (time.monotonic() - started) * 1000,
                      [(normal_address(r.final_recipient), printable(r.reason)) for r in parse_dsn(data).failed])
        return "250 2.0.0 routemilter: bounce handled"

    def start(self) -> BounceServer:
        handler = _LMTPHandler(self)
        limit = self.settings.max_size
        address = sockets.parse(self.settings.socket)
        lmtp: dict[str, Any] = {
            "data_size_limit": limit, "enable_SMTPUTF8": True, "decode_data": False,
            "server_hostname": "routemilter-bounces", "ident": "routemilter", "timeout": 300,
            "line_length_limit": max(limit, 1001),
        }
        controller: Controller | UnixSocketController
        if address.unix:
            sockets.prepare(address.path)
            controller = _UnixController(handler, unix_socket=address.path, **lmtp)
        else:
            controller = _InetController(handler, hostname=address.host or "127.0.0.1", port=address.port, **lmtp)
        with sockets.umask_for(self.mode):  # the mode is set at bind, not by name after
            controller.start()
        self.controller = controller
        if address.unix:
            try:
                sockets.finish(address.path, self.mode, self.group)
            except Exception:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop(no_assert=True)
            address = sockets.parse(self.settings.socket)
            if address.unix:
                try:
                    os.unlink(address.path)
                except OSError:  # gone, or no right any more after dropping privileges
                    pass
            self.controller = None
