"""What happened to a message, said once: the log line, the metrics and the notices
all come from the same event.

The routing code does not count or notify: the Session publishes the record it
already builds per message (`Transaction.record`), the bounce handler publishes
one event per bounce, the daemon one per reload, the MTA log follower (mtalog.py)
one per delivery line. `publish` writes the key=value log line (always) and hands
the event to whatever the daemon subscribed (metrics.py, notify.py). A sink that
fails is logged and skipped: visibility never delays or fails mail.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Required, TypedDict

if TYPE_CHECKING:
    from .config import Reply
    from .rules import Decision

mail_log = logging.getLogger("routemilter.mail")
log = logging.getLogger("routemilter")

MAX_LOG_VALUE = 16384  # characters of one key=value in the log line; the rest is elided
QUEUE_ID = r"[0-9A-Za-z]{5,20}"


def format_record(record: Mapping[str, object]) -> str:
    """key=value pairs, values quoted when they hold spaces, like Postfix logs."""
    parts = []
    for key, value in record.items():
        # Invalid UTF-8 from the envelope (surrogates) would make the logging call fail.
        value = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
        value = value.replace("\n", " ").replace("\r", " ")
        if len(value) > MAX_LOG_VALUE:
            value = f"{value[:MAX_LOG_VALUE]}...[{len(value) - MAX_LOG_VALUE} more characters]"
        parts.append(f'{key}="{value}"' if " " in value or not value else f"{key}={value}")
    return " ".join(parts)


class Facts(TypedDict, total=False):
    """What the sinks read from an event, by kind; the log line does not carry it all."""

    # message (the Session's record)
    outcome: str
    message_refusal: str | None  # the reason label of a refused or tempfailed message
    refused: list[str]  # the reason label of each refused recipient
    seconds: float
    routed: bool
    token_bounce: bool
    # bounce (the bounce handler)
    notes: list[str]
    submissions: list[tuple[str, str, str]]  # (kind, rcpt, new queue id)
    failures: list[tuple[str, str]]  # (address, reason)
    rules: list[str]  # the original message's rules and domains, for the notifier
    domains: list[str]
    # mta (a delivery line, mtalog.Interpreter)
    type: str  # delivered | deferred | bounced | relay-fallback | to-routemilter
    qid: str
    to: str
    relay: str
    delay: float
    dsn: str
    status: str
    reply: str  # the remote reply; with a fallback, the failed host's
    ts: str
    failed_host: str
    final_reply: str
    delivered_reply: str


@dataclass
class Event:
    """kind: message | bounce | bounce-refused | bounce-tempfail | deferral | notice | reload | mta.
    `record` is what the log line says; `facts` is structured detail for the sinks that the
    line need not carry."""

    kind: str
    record: Mapping[str, object]
    facts: Facts = field(default_factory=Facts)
    prefix: str = ""  # a word before the key=value pairs ("bounce"), as the lines always had
    level: int = logging.INFO
    logged: bool = True  # False: someone else already logs it (the MTA's lines, reloads)


class Bus:
    def __init__(self) -> None:
        self._sinks: list[Callable[[Event], None]] = []
        self._lock = threading.Lock()

    def subscribe(self, sink: Callable[[Event], None]) -> None:
        with self._lock:
            self._sinks = self._sinks + [sink]

    def unsubscribe(self, sink: Callable[[Event], None]) -> None:
        with self._lock:
            self._sinks = [s for s in self._sinks if s is not sink]

    @property
    def has_sinks(self) -> bool:
        return bool(self._sinks)

    def publish(self, event: Event) -> None:
        if event.logged:
            line = format_record(event.record)
            mail_log.log(event.level, f"{event.prefix} {line}" if event.prefix else line)
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:
                log.exception("event sink %r failed on a %s event", sink, event.kind)


bus = Bus()


# ---------------------------------------------------------------- messages


@functools.lru_cache(maxsize=1)
def _known_replies() -> dict[Reply, str]:
    """Reply -> label, built once (the replies are module constants)."""
    from . import rules, session, transaction  # noqa: PLC0415 (they import this module's users)

    known = {rules.UNKNOWN_USER: "unknown_user", rules.BAD_ADDRESS: "bad_address", rules.NOT_SERVED: "unknown_domain",
             transaction.SEPARATELY: "separate_transaction",
             transaction.NOT_UTF8: "bad_address", transaction.BAD_SRS: "bad_token", transaction.LOOP: "loop",
             session.INTERNAL_ERROR: "internal_error", session.RECONNECT: "reconnect"}
    from . import authreplies  # noqa: PLC0415 (no SPF/DMARC libraries: naming the replies loads none)

    known.update({authreplies.DMARC_REJECT: "dmarc", authreplies.MULTIPLE_FROM: "dmarc",
                  authreplies.SPF_FAIL: "spf", authreplies.SPAM: "spam",
                  authreplies.DNS_TEMPFAIL: "dns_temperror"})
    return known


def refusal_reason(reply: Reply) -> str:
    """A short label for why a recipient or message was refused (metrics label)."""
    known = _known_replies()
    if reply in known:
        return known[reply]
    if reply.code == 451 and reply.status == "4.7.1" and "too many messages" in " ".join(reply.lines):
        return "rate_limit"
    return "rule"  # a rule's own refusal text


def _message_refusal(outcome: str) -> str | None:
    """The reason label of a whole-message outcome ("refused:554 5.4.6 ...", "tempfail:...")."""
    if outcome.startswith("tempfail:"):
        return "internal_error"
    if not outcome.startswith("refused:"):
        return None
    text = outcome[len("refused:"):]
    return _known_texts().get(text, "rule")


@functools.lru_cache(maxsize=1)
def _known_texts() -> dict[str, str]:
    return {str(reply): label for reply, label in _known_replies().items()}


class Recent(TypedDict, total=False):
    """What routemilter decided for a message it queued (RecentMessages)."""

    rules: Required[list[str]]
    domains: Required[list[str]]
    targets: Required[dict[str, str]]  # address -> the rule that routed to it
    sender: Required[str]
    kind: Required[str]  # forward | fallback (a copy re-injected to the next address)
    orig_qid: str  # fallback: the message it is a copy of


class RecentMessages:
    """queue id -> what routemilter decided for it, for the last messages: lets the MTA
    log follower tell mail we routed (and by which rule) from anything else, notices
    included, which are never registered here (no notice about a notice)."""

    def __init__(self, size: int = 20_000):
        self._items: OrderedDict[str, Recent] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size
        self.enabled = False  # only the notifier reads it: no memory spent without notify:

    def add(self, queue_id: str, info: Recent) -> None:
        if not self.enabled or not queue_id or queue_id == "-":
            return
        with self._lock:
            self._items[queue_id] = info
            self._items.move_to_end(queue_id)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def get(self, queue_id: str) -> Recent | None:
        with self._lock:
            return self._items.get(queue_id)


recent = RecentMessages()


class _Recipient(Protocol):
    @property
    def decision(self) -> Decision: ...
    @property
    def unsrs(self) -> str | None: ...


class _Transaction(Protocol):
    """What `message` reads of a transaction.Transaction."""

    @property
    def sender(self) -> str: ...
    @property
    def recipients(self) -> Sequence[_Recipient]: ...
    @property
    def refused(self) -> Sequence[tuple[str, Reply]]: ...


def message(record: Mapping[str, object], tx: _Transaction | None = None) -> None:
    """The Session's one record per message (transaction.Transaction.record)."""
    if not bus.has_sinks and not recent.enabled:  # nothing but the log line: no facts to gather
        bus.publish(Event("message", record))
        return
    outcome = str(record.get("outcome", ""))
    facts: Facts = {"outcome": outcome, "message_refusal": _message_refusal(outcome)}
    if tx is not None:
        from .rules import Action  # noqa: PLC0415

        facts["refused"] = [refusal_reason(reply) for _, reply in tx.refused]
        facts["seconds"] = float(str(record.get("ms", 0))) / 1000
        forwards = [r for r in tx.recipients if r.decision.action is Action.ROUTE and r.unsrs is None]
        facts["routed"] = bool(forwards)
        facts["token_bounce"] = any(r.decision.action is Action.PASS and "bounce token" in r.decision.reason
                                    for r in tx.recipients)
        if forwards and outcome == "accept":
            rules = list(dict.fromkeys(r.decision.rule.name for r in forwards if r.decision.rule))
            domains = list(dict.fromkeys(r.decision.address.rsplit("@", 1)[-1].lower() for r in forwards))
            targets: dict[str, str] = {}
            for r in forwards:
                for dest in r.decision.destinations:
                    for target in dest.chain:
                        targets[target.address] = r.decision.rule.name if r.decision.rule else ""
            recent.add(str(record.get("queue_id", "")), {"rules": rules, "domains": domains, "targets": targets,
                                                         "sender": tx.sender, "kind": "forward"})
    bus.publish(Event("message", record, facts))


# ---------------------------------------------------------------- bounces

_RECEIVED = re.compile(r"^Received:.*?\bby\s+(?P<by>\S+).*?\bid\s+(?P<id>" + QUEUE_ID + r")\b", re.I | re.M)
_REPORT_QID = re.compile(r"^X-[A-Za-z0-9-]*-Queue-ID:\s*(" + QUEUE_ID + r")\s*$", re.I | re.M)  # X-Postfix-Queue-ID
_REPORTING = re.compile(r"^Reporting-MTA:\s*dns;\s*(\S+)", re.I | re.M)
_NDN_MSGID = re.compile(r"^Message-ID:\s*<\d{14}\.(" + QUEUE_ID + r")@", re.I | re.M)
_QUEUED_AS = re.compile(r"queued as (" + QUEUE_ID + r")")


def bounce_queue_ids(data: bytes) -> tuple[str, str]:
    """(queue id of the bounce itself, our queue id of the message it reports on), or "-".

    The bounce's own id: the topmost Received header, which our MTA added when it
    queued the bounce ("by HOST ... id X"; for a bounce Postfix made itself, its
    Message-ID <stamp.X@host> too). The original's: the report's X-Postfix-Queue-ID
    when our MTA (that HOST) wrote the report, else the Received header HOST added
    to the returned message when it first received it."""
    text = re.sub(r"\r?\n[ \t]+", " ", data[:1 << 20].decode("utf-8", "replace"))  # unfold, first MiB
    head, _, rest = text.partition("\n\n") if "\r\n\r\n" not in text else text.partition("\r\n\r\n")
    top = _RECEIVED.search(head)
    own = top.group("id") if top else None
    if own is None:
        m = _NDN_MSGID.search(head)
        own = m.group(1) if m else None
    ours = top.group("by").lower() if top else None
    original = None
    reporting = _REPORTING.search(rest)
    report_qid = _REPORT_QID.search(rest)
    if report_qid and (ours is None or reporting is None or reporting.group(1).lower() == ours):
        original = report_qid.group(1)
    elif ours is not None:
        for m in _RECEIVED.finditer(rest):
            if m.group("by").lower() == ours:
                original = m.group("id")
                break
    return own or "-", original or "-"


def queued_as(reply: bytes | str) -> str:
    """The queue id in an MTA's reply to DATA ("250 2.0.0 Ok: queued as X"), or "-"."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    m = _QUEUED_AS.search(text)
    return m.group(1) if m else "-"


class _Submission(Protocol):
    """A message the bounce handler handed back to the MTA (bounces.Submission)."""

    @property
    def kind(self) -> str: ...  # fallback | final-bounce | reverse
    @property
    def mail_from(self) -> str: ...
    @property
    def rcpt(self) -> str: ...


def bounce(rcpt: str, mail_from: str, ids: tuple[str, str], notes: list[str], submissions: Sequence[_Submission],
           queue_ids: list[str], ms: float, failures: list[tuple[str, str]] | None = None) -> None:
    """One bounce handled: fallbacks sent, chains exhausted, final bounces (bounces.py)."""
    sent = ",".join(f"{s.kind}:<{s.mail_from}>-><{s.rcpt}>" for s in submissions) or "-"
    record = {"rcpt": f"<{rcpt}>", "from": f"<{mail_from}>", "bounce_qid": ids[0], "orig_qid": ids[1],
              "notes": " ".join(notes) or "-", "sent": sent,
              "new_qids": ",".join(queue_ids) if queue_ids else "-", "ms": f"{ms:.1f}"}
    for sub, qid in zip(submissions, queue_ids, strict=False):  # no ids if the submitter gave no replies
        if sub.kind == "fallback":  # the copy is ours too: its deferrals and failures are followed
            recent.add(qid, {"rules": [], "domains": [], "targets": {sub.rcpt: ""}, "sender": "",
                             "kind": "fallback", "orig_qid": ids[1]})
    original = recent.get(ids[1])
    facts: Facts = {"notes": notes,
                    "submissions": [(s.kind, s.rcpt, q) for s, q in zip(submissions, queue_ids, strict=False)],
                    "failures": failures or [], "rules": original["rules"] if original else [],
                    "domains": original["domains"] if original else []}
    bus.publish(Event("bounce", record, facts, prefix="bounce"))


def bounce_refused(rcpt: str, reason: str, ids: tuple[str, str] = ("-", "-")) -> None:
    record = {"rcpt": f"<{rcpt}>", "bounce_qid": ids[0], "reason": reason}
    bus.publish(Event("bounce-refused", record, prefix="bounce refused"))


def bounce_tempfail(rcpt: str, ids: tuple[str, str], why: str, notes: list[str] | None = None) -> None:
    record = {"rcpt": f"<{rcpt}>", "bounce_qid": ids[0], "orig_qid": ids[1], "notes": " ".join(notes or []) or "-",
              "error": why}
    bus.publish(Event("bounce-tempfail", record, prefix="bounce tempfail", level=logging.WARNING))


def deferral(fields: Mapping[str, object], level: int = logging.INFO) -> None:
    """One deferred copy handed to the deferral listener (deferrals.py): its key=value
    line, and for a move to the next address, metrics and a notice."""
    if fields.get("decision") == "fallback":
        new = str(fields.get("new_queue_id", "-"))
        recent.add(new, {"rules": [], "domains": [], "targets": {str(fields.get("to", "")).strip("<>"): ""},
                         "sender": "", "kind": "fallback", "orig_qid": str(fields.get("queue_id", "-"))})
    bus.publish(Event("deferral", fields, {}, prefix="deferral", level=level))


# ---------------------------------------------------------------- the daemon


def reload(ok: bool) -> None:
    bus.publish(Event("reload", {"result": "ok" if ok else "refused"}, logged=False))  # daemon.py logs why
