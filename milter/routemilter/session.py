"""The milter session: one object per SMTP connection (pymilter's model).

`Session` is the pymilter glue around the pure `Transaction` (transaction.py): it
negotiates with the MTA, feeds the Transaction from the callbacks, answers
refusals at RCPT, and applies the Transaction's Plan at end of message, all
smfi_* changes in one place (`apply`). Any exception in any callback becomes a
4xx tempfail, so the client keeps the message.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable
from typing import Concatenate, ParamSpec

import Milter

from . import events
from .config import Reply
from .policy import PolicyHolder
from .transaction import Plan, Transaction

# The only changes we ever make; the MTA is told so at negotiation.
ACTIONS = Milter.ADDHDRS | Milter.ADDRCPT | Milter.DELRCPT | Milter.CHGFROM
# Every stage at which the MTA sends macros (libmilter's SMFIM_*).
MACRO_STAGES = (Milter.M_CONNECT, Milter.M_HELO, Milter.M_ENVFROM, Milter.M_ENVRCPT, Milter.M_DATA,
                Milter.M_EOH, Milter.M_EOM)
INTERNAL_ERROR = Reply(451, "4.3.0", ("routemilter: temporary internal error, please try again later",))
RECONNECT = Reply(451, "4.3.0", ("routemilter: configuration changed, please try again",))

mail_log = logging.getLogger("routemilter.mail")

_Args = ParamSpec("_Args")


def guarded(callback: Callable[Concatenate[Session, _Args], int]) -> Callable[Concatenate[Session, _Args], int]:
    """Turn any exception in a callback into a logged 451 tempfail.

    Mail is never lost to a bug: the client keeps the message and retries.
    """

    @functools.wraps(callback)
    def wrapper(self: Session, /, *args: _Args.args, **kwargs: _Args.kwargs) -> int:
        try:
            return callback(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - deliberately everything
            mail_log.exception("queue_id=%s callback=%s error: tempfail", self.queue_id() or "-", callback.__name__)
            self.failed = True
            return self.reply(INTERNAL_ERROR)

    return wrapper


def guarded_noreply(
        callback: Callable[Concatenate[Session, _Args], int]) -> Callable[Concatenate[Session, _Args], int]:
    """Like `guarded`, for callbacks the MTA does not wait on (MAIL FROM, header, body):
    the failure is remembered and answered with a tempfail at the next step that
    gets a reply (RCPT for MAIL FROM, end of message for the others)."""

    @functools.wraps(callback)
    def wrapper(self: Session, /, *args: _Args.args, **kwargs: _Args.kwargs) -> int:
        try:
            return callback(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - deliberately everything
            mail_log.exception("queue_id=%s callback=%s error: tempfail at eom", self.queue_id() or "-",
                               callback.__name__)
            self.failed = True
            return Milter.CONTINUE

    return wrapper


class Session(Milter.Base):
    """pymilter connection object. Created by the daemon's factory."""

    def __init__(self, holder: PolicyHolder) -> None:
        super().__init__()
        self.holder = holder
        self.tx: Transaction | None = None
        self.failed = False
        self.refusal: Reply | None = None  # decided at MAIL FROM, answered at RCPT
        self.client_ip: str | None = None  # from connect/helo, negotiated only with auth:
        self.helo: str | None = None
        self.body_negotiated = True  # False when negotiate() asked the MTA not to send bodies

    def queue_id(self) -> str | None:
        return self._macro("i")

    def _macro(self, name: str) -> str | None:
        try:
            return self.getsymval(name)
        except Exception:  # noqa: BLE001 - no context (tests) or no macro yet
            return None

    def reply(self, reply: Reply) -> int:
        try:
            self.setreply(str(reply.code), reply.status, *reply.lines)
        except Exception:  # noqa: BLE001 - a reply we cannot set still refuses
            pass
        return Milter.TEMPFAIL if reply.code < 500 else Milter.REJECT

    def negotiate(self, opts: list[int]) -> int:
        """What the MTA sends and waits for, once per connection (with Postfix: per SMTP
        session). Done here rather than by Milter.Base.negotiate, whose per-connection
        macro-list loop is of no use to us (see _ask_only_queue_id)."""
        offered_actions, offered_protocol = opts[0], opts[1]
        policy = self.holder.current
        auth = policy.auth is not None
        # The @nocallback/@noreply steps the MTA can skip (protocol_mask is cached per class).
        protocol = offered_protocol & ~self.protocol_mask()
        if auth:  # SPF needs the client's address and HELO name
            protocol &= ~(Milter.P_NOCONNECT | Milter.P_NOHELO)
        if policy.senders is not None:  # submission.trusted_networks needs the client's address
            protocol &= ~Milter.P_NOCONNECT
        if policy.signer is None and not auth:
            # Nothing reads the body (only DKIM and auth: do): the MTA need not send it.
            protocol |= offered_protocol & Milter.P_NOBODY
        actions = ACTIONS | (Milter.CHGHDRS if auth else 0)
        if offered_actions & Milter.SETSYMLIST and self._ask_only_queue_id(policy.senders is not None):
            actions |= Milter.SETSYMLIST
        opts[0] = self._actions = offered_actions & actions
        opts[1] = self._protocol = protocol
        opts[2] = opts[3] = 0
        self.body_negotiated = not protocol & Milter.P_NOBODY
        return Milter.CONTINUE

    def _ask_only_queue_id(self, login: bool = False) -> bool:
        """Only the queue id macro is used (log lines), and with submission: the SASL
        login at MAIL FROM. Asking for them alone at every stage, Postfix sends no other
        macros: less to look up, send and parse on both sides. (An empty list would not
        do: Postfix then sends its defaults. pymilter 1.0.5's Base.setsymlist passes bytes
        where its C side wants str, hence _ctx.)"""
        try:
            for stage in MACRO_STAGES:
                self._ctx.setsymlist(stage, "i {auth_authen}" if login and stage == Milter.M_ENVFROM else "i")
        except Exception:  # noqa: BLE001 - no macro lists: the MTA sends its defaults, also fine
            return False
        return True

    # Callbacks we do not need are switched off at negotiation.
    @Milter.nocallback  # unless auth: is configured (see negotiate)
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        self.client_ip = None
        if isinstance(hostaddr, tuple) and hostaddr and isinstance(hostaddr[0], str):
            try:
                self.client_ip = str(ipaddress.ip_address(hostaddr[0].split("%", 1)[0]))
            except ValueError:
                pass  # not an IP client (unix socket, local submission): no SPF
        return Milter.CONTINUE

    @Milter.nocallback  # unless auth: is configured (see negotiate)
    def hello(self, hostname: str | None) -> int:
        self.helo = hostname if isinstance(hostname, str) else None
        return Milter.CONTINUE

    @Milter.nocallback
    def data(self) -> int:
        return Milter.CONTINUE

    @Milter.nocallback
    def unknown(self, cmd: str) -> int:
        return Milter.CONTINUE

    @Milter.nocallback
    def eoh(self) -> int:
        return Milter.CONTINUE

    # The MTA does not wait for a reply to MAIL FROM (one round trip less per message):
    # a refusal or failure here is answered at each RCPT instead, still before DATA.
    @Milter.noreply
    @guarded_noreply
    def envfrom(self, sender: str, *params: str) -> int:
        if self.tx is not None:  # the previous transaction was aborted (no abort callback: daemon.py)
            self.abort()
        self.failed = False
        self.refusal = None
        self.tx = None
        policy = self.holder.current
        if not self.body_negotiated and (policy.signer is not None or policy.auth is not None):
            # A reload turned on DKIM or auth: after this connection was negotiated
            # without bodies. Never sign an absent body: the client retries, reconnecting.
            self.refusal = RECONNECT
            return Milter.CONTINUE
        self.tx = Transaction(policy, sender)
        if policy.senders is not None:
            login = self._macro("{auth_authen}") or None
            if login is not None or policy.senders.trusted(self.client_ip):
                self.tx.submitted_by(login)
        if self.tx.auth is not None:
            self.tx.auth.set_client(self.client_ip, self.helo, self.tx.sender)
        return Milter.CONTINUE

    @guarded
    def envrcpt(self, recipient: str, *params: str) -> int:
        if self.refusal is not None or self.failed:  # from MAIL FROM, which gets no reply
            return self.reply(self.refusal or INTERNAL_ERROR)
        if self.tx is None:
            raise RuntimeError("RCPT without MAIL FROM")  # logged and tempfailed by @guarded
        refusal = self.tx.add_recipient(recipient)
        if refusal is not None:
            return self.reply(refusal)
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    @guarded_noreply
    def header(self, name: str | bytes, value: bytes) -> int:
        if not self.failed and self.tx is not None:
            self.tx.add_header(name if isinstance(name, str) else name.decode("ascii", "replace"), value)
        return Milter.CONTINUE

    @Milter.noreply
    @guarded_noreply
    def body(self, chunk: bytes) -> int:
        if not self.failed and self.tx is not None:
            self.tx.add_body(chunk)
        return Milter.CONTINUE

    @guarded
    def eom(self) -> int:
        tx, self.tx = self.tx, None
        if tx is None:
            return Milter.CONTINUE
        queue_id = self.queue_id()
        if self.failed:
            self.log_record(tx.record(queue_id, None, "tempfail:earlier-error"), tx)
            return self.reply(INTERNAL_ERROR)
        plan = tx.plan()
        result = self.apply(plan)
        outcome = {Milter.CONTINUE: "accept", Milter.DISCARD: "discard"}.get(result, f"refused:{plan.reply}")
        self.log_record(tx.record(queue_id, plan, outcome), tx)
        return result

    def apply(self, plan: Plan) -> int:
        if plan.reply is not None:
            return self.reply(plan.reply)
        if plan.discard:
            return Milter.DISCARD
        for name, index, value in plan.changes:
            self.chgheader(name, index, value)
        for name, value in reversed(plan.headers):
            self.addheader(name, value, 0)  # prepend: signatures and trace on top
        if plan.new_sender is not None:
            if plan.sender_params:
                self.chgfrom(f"<{plan.new_sender}>", plan.sender_params)
            else:
                self.chgfrom(f"<{plan.new_sender}>")
        for address in plan.add:
            self.addrcpt(f"<{address}>")
        for raw in plan.delete:
            self.delrcpt(raw)
        return Milter.CONTINUE

    def abort(self) -> int:
        if self.tx is not None and (self.tx.recipients or self.tx.refused):
            self.log_record(self.tx.record(self.queue_id(), None, "aborted"), self.tx)
        self.tx = None
        return Milter.CONTINUE

    def close(self) -> int:
        return self.abort()

    @staticmethod
    def log_record(record: dict[str, str], tx: Transaction | None = None) -> None:
        events.message(record, tx)  # the log line, and metrics/notices when configured
