"""Notices to an admin when a forward fails: a digest per destination per interval.

An event sink (events.py): it hears about bounce-driven fallbacks and exhausted
chains from the bounce handler, and about long deferrals and relay fallbacks from
the MTA log follower (mtalog.py). Each problem is queued under (admin address,
destination); the first one starts the interval, and at its end one short notice
lists them all, with the remote replies and the `routemilter trace` command to
run. A failing mailbox provider thus costs the admin one mail per interval.

The digest queue lives in the daemon's memory, not in the state store
(state.py): the store offers one-time claims and counters, not lists, and a
notice is advice, so losing a pending digest on restart loses no mail. The store
is used for what must hold across hosts and restarts: each (problem, queue id,
destination) is claimed once, so a message that stays deferred for days is
reported once, and two MX hosts sharing a store do not both report it.

No loops: notices are sent with the null sender (they cannot bounce), through
the re-injection smtpd that has no milter (they are never routed or counted as
mail), and only mail the milter routed is reported (events.recent), so a notice
that fails is never the subject of another notice. The webhook gets the same JSON,
posted from a thread of its own with bounded retries: mail never waits for it.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

from . import events
from .events import Event

if TYPE_CHECKING:
    from .policy import PolicyHolder
    from .reinject import Submitter
    from .visconfig import NotifySettings, WebhookSettings

log = logging.getLogger("routemilter")
NOTICE_HEADER = "X-Routemilter-Notice"
MAX_ITEMS = 50  # problems listed in one notice; the rest are counted
CLAIM_TTL = 8 * 86400  # longer than Postfix's queue lifetime: one report per problem and message


class Problem(TypedDict):
    """One problem in the webhook's JSON (and the notice's text)."""

    kind: str
    destination: str
    queue_id: str
    reply: str
    time: str  # RFC 5322 date
    detail: str
    trace: str  # the command that tells the whole story


class Payload(TypedDict):
    """The webhook's JSON: one digest."""

    server: str
    destination: str
    to: str  # the admin address, or "-" (webhook only)
    problems: list[Problem]
    more: int  # problems left out of the list (MAX_ITEMS)


@dataclass
class Item:
    kind: str  # deferred | relay-fallback | bounce-fallback | deferral-fallback | chain-exhausted
    destination: str
    queue_id: str
    reply: str
    when: float
    detail: str = ""  # e.g. "sent instead to b@outlook.test (queue id X)"

    def as_dict(self) -> Problem:
        return {"kind": self.kind, "destination": self.destination, "queue_id": self.queue_id,
                "reply": self.reply, "time": email.utils.formatdate(self.when, usegmt=True),
                "detail": self.detail, "trace": f"routemilter trace {self.queue_id}"}


@dataclass
class Digest:
    to: str
    destination: str
    started: float
    items: list[Item] = field(default_factory=list)
    dropped: int = 0
    attempts: int = 0


class Notifier:
    def __init__(self, holder: PolicyHolder, clock: Callable[[], float] = time.time,
                 submitter: Submitter | None = None):
        from .reinject import submit  # noqa: PLC0415

        self.holder = holder
        self.clock = clock
        self.submitter: Submitter = submitter or submit
        self._pending: dict[tuple[str, str], Digest] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the sink

    def __call__(self, event: Event) -> None:
        settings: NotifySettings | None = self.holder.current.config.notify
        if settings is None:
            return
        for item, rules, domains in self._items(event, settings):
            if not self.holder.store.claim(f"notify:{item.kind}:{item.queue_id}:{item.destination}", CLAIM_TTL):
                continue  # already reported (a message deferred again, or another MX host)
            for to in settings.addresses_for(rules, domains) or ["-"]:  # "-": webhook only
                self._queue(to, item)

    def _items(self, event: Event, settings: NotifySettings) -> Iterator[tuple[Item, list[str], list[str]]]:
        now = self.clock()
        if event.kind == "bounce":
            facts = event.facts
            reasons = dict(facts.get("failures", []))
            sent = {rcpt: qid for kind, rcpt, qid in facts.get("submissions", []) if kind == "fallback"}
            qid = str(event.record.get("orig_qid", "-"))
            for note in facts.get("notes", []):
                address, _, what = note.partition(":")
                if what.startswith("fallback->"):
                    nxt = what[len("fallback->"):]
                    yield (Item("bounce-fallback", address, qid, reasons.get(address, ""), now,
                                f"sent instead to {nxt} (queue id {sent.get(nxt, '-')})"),
                           facts.get("rules", []), facts.get("domains", []))
                elif what in ("chain-exhausted", "not-in-chain") or what.startswith("cannot-forward"):
                    yield (Item("chain-exhausted", address, qid, reasons.get(address, ""), now,
                                "every address of this destination failed; the sender got one bounce"),
                           facts.get("rules", []), facts.get("domains", []))
        elif event.kind == "mta":
            fact = event.facts
            info = events.recent.get(fact.get("qid", ""))
            if info is None:
                return  # not mail we routed (a notice, a bounce, local mail): never reported
            rules, domains = info["rules"], info["domains"]
            if info["kind"] == "fallback":  # a copy we re-injected: reported under the original's rules
                original = events.recent.get(info.get("orig_qid", ""))
                rules, domains = (original["rules"], original["domains"]) if original else ([], [])
            if fact.get("type") == "deferred" and fact.get("delay", 0) >= settings.defer_after:
                yield (Item("deferred", fact["to"], fact["qid"], fact.get("reply", ""), now,
                            f"deferred for {int(fact['delay'])} s so far; Postfix keeps retrying"),
                       rules, domains)
            elif fact.get("type") == "relay-fallback":
                yield (Item("relay-fallback", fact["to"], fact["qid"], fact.get("reply", ""), now,
                            f"{fact.get('failed_host', '')} refused it; delivered through the fallback relay "
                            f"{fact.get('relay', '')}"),
                       rules, domains)
        elif event.kind == "deferral" and event.record.get("decision") == "fallback":
            # the deferral listener (deferrals.py) moved a deferred copy on to the next address
            r = {key: str(value) for key, value in event.record.items()}
            qid = r.get("queue_id", "-")
            found = events.recent.get(qid)
            if found is not None and found["kind"] == "fallback":
                found = events.recent.get(found.get("orig_qid", "")) or found
            yield (Item("deferral-fallback", r.get("rcpt", "?").strip("<>"), qid, event.facts.get("reply", ""),
                        now, f"deferred for {r.get('age', '?')} (fallback_after {r.get('fallback_after', '?')}): "
                             f"sent instead to {r.get('to', '?').strip('<>')} (queue id {r.get('new_queue_id', '-')})"),
                   found["rules"] if found else [], found["domains"] if found else [])

    def _queue(self, to: str, item: Item) -> None:
        with self._lock:
            digest = self._pending.get((to, item.destination))
            if digest is None:
                digest = self._pending[(to, item.destination)] = Digest(to, item.destination, self.clock())
            if len(digest.items) < MAX_ITEMS:
                digest.items.append(item)
            else:
                digest.dropped += 1

    # -- the digest thread

    def start(self) -> Notifier:
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(1):
            try:
                self.flush()
            except Exception:
                log.exception("notify: flush failed")

    def flush(self, force: bool = False) -> int:
        """Send every digest whose interval is over; returns how many were sent."""
        settings: NotifySettings | None = self.holder.current.config.notify
        if settings is None:
            return 0
        now = self.clock()
        with self._lock:
            due = [d for d in self._pending.values() if force or now - d.started >= settings.interval]
            for d in due:
                del self._pending[(d.to, d.destination)]
        sent = 0
        for digest in due:
            payload = self.payload(digest)
            if settings.webhook is not None:
                self._post_webhook(settings.webhook, payload)
            if digest.to != "-":
                if self._mail(settings, digest, payload):
                    sent += 1
                elif digest.attempts < 3:  # the submission listener is down: try again next interval
                    digest.attempts += 1
                    digest.started = now
                    with self._lock:
                        self._pending.setdefault((digest.to, digest.destination), digest)
        return sent

    def payload(self, digest: Digest) -> Payload:
        config = self.holder.current.config
        return {"server": config.server_name, "destination": digest.destination, "to": digest.to,
                "problems": [i.as_dict() for i in digest.items], "more": digest.dropped}

    # -- mail

    def message(self, digest: Digest, settings: NotifySettings) -> bytes:
        config = self.holder.current.config
        domain = config.dkim.domain if config.dkim else config.server_name
        sender = settings.sender or f"postmaster@{domain}"
        kinds = {"deferred": "deferred too long", "relay-fallback": "fallback relay used",
                 "bounce-fallback": "fallback address used", "deferral-fallback": "fallback address used after "
                 "deferral", "chain-exhausted": "every fallback failed"}
        count = len(digest.items) + digest.dropped
        first = time.strftime("%H:%M", time.gmtime(digest.items[0].when)) if digest.items else ""
        lines = [f"routemilter on {config.server_name} had {count} delivery problem(s) with {digest.destination}",
                 f"since {first} UTC:", ""]
        for item in digest.items:
            lines.append(f"* {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(item.when))} UTC "
                         f"{kinds.get(item.kind, item.kind)}, queue id {item.queue_id}")
            if item.reply:
                lines.append(f"    remote reply: {item.reply}")
            if item.detail:
                lines.append(f"    {item.detail}")
            lines.append(f"    the whole story: routemilter trace {item.queue_id}")
            lines.append("")
        if digest.dropped:
            lines += [f"... and {digest.dropped} more (see the logs).", ""]
        lines += ["Mail is still being handled by the fallback chain where one is configured.",
                  "This is an automatic notice, at most one per destination every "
                  f"{settings.interval} s; replies are not read."]
        subject = f"[routemilter] {digest.destination}: {count} delivery problem(s)"
        headers = (f"From: routemilter <{sender}>\r\nTo: <{digest.to}>\r\nSubject: {subject}\r\n"
                   f"Date: {email.utils.formatdate(self.clock(), usegmt=True)}\r\n"
                   f"Message-ID: <notice.{os.urandom(8).hex()}@{config.server_name}>\r\n"
                   f"Auto-Submitted: auto-generated\r\n{NOTICE_HEADER}: digest\r\n"
                   f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   f"Content-Transfer-Encoding: 8bit\r\n")
        body = "\r\n".join(lines) + "\r\n"
        message = (headers + "\r\n" + body).encode("utf-8")
        signer = self.holder.current.signer
        if signer is not None:  # signed like every forward, so the admin's provider trusts it
            try:
                sigs = signer.sign(message)
                message = b"".join(f"{n}: {v}".replace("\n", "\r\n").encode("ascii") + b"\r\n"
                                   for n, v in sigs) + message
            except Exception as exc:  # noqa: BLE001 - sent unsigned rather than not at all
                log.warning("notify: DKIM signing failed: %s", exc)
        return message

    def _mail(self, settings: NotifySettings, digest: Digest, payload: Payload) -> bool:
        from .reinject import Submission  # noqa: PLC0415

        config = self.holder.current.config
        hostport = settings.submit or (config.bounces.reinject if config.bounces is not None else None)
        record: dict[str, object] = {"to": f"<{digest.to}>", "destination": digest.destination,
                                     "problems": len(digest.items),
                                     "queue_ids": ",".join(dict.fromkeys(i.queue_id for i in digest.items))}
        try:
            if hostport is None:  # config.py refuses notify: without submit: or bounces:
                raise ValueError("no submit: address and no bounces.reinject to send notices through")
            message = self.message(digest, settings)
            replies = self.submitter(hostport, [Submission("", digest.to, message, "notice")]) or ["-"]
            qids = [events.queued_as(r) for r in replies]
        except Exception as exc:  # noqa: BLE001 - the next interval tries again
            events.bus.publish(Event("notice", {**record, "channel": "mail", "result": "failed",
                                                "error": repr(exc)}, prefix="notice", level=logging.WARNING))
            return False
        events.bus.publish(Event("notice", {**record, "channel": "mail", "result": "sent", "qid": qids[0]},
                                 prefix="notice"))
        return True

    # -- webhook

    def _post_webhook(self, webhook: WebhookSettings, payload: Payload) -> threading.Thread:
        thread = threading.Thread(target=post_json, args=(webhook, payload), name="notify-webhook", daemon=True)
        thread.start()
        return thread


def post_json(webhook: WebhookSettings, payload: Payload, sleep: Callable[[float], None] = time.sleep) -> bool:
    """POST the JSON; retry `webhook.retries` times with 1, 2, 4 ... s pauses. Never raises."""
    data = json.dumps(payload).encode("utf-8")
    for attempt in range(webhook.retries + 1):
        request = urllib.request.Request(webhook.url, data=data, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "routemilter-notify"})
        try:
            with urllib.request.urlopen(request, timeout=webhook.timeout) as response:
                if 200 <= response.status < 300:
                    events.bus.publish(Event("notice", {"channel": "webhook", "result": "sent",
                                                        "destination": payload.get("destination", "")},
                                             prefix="notice"))
                    return True
        except Exception as exc:  # noqa: BLE001 - HTTP errors, timeouts, refused connections
            why = repr(exc)
        else:
            why = f"HTTP {response.status}"
        if attempt < webhook.retries:
            sleep(min(2 ** attempt, 30))
    events.bus.publish(Event("notice", {"channel": "webhook", "result": "failed",
                                        "destination": payload.get("destination", ""), "error": why},
                             prefix="notice", level=logging.WARNING))
    return False
