"""Prometheus metrics (prometheus_client), derived from events only (events.py).

Nothing in the routing code counts: this sink reads the same events the log
lines are written from, so a counter and a log line can never disagree. The
endpoint is off unless `metrics:` is configured, and binds 127.0.0.1 by default
(no authentication: put a proxy in front to expose it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from .events import Event
from .mtalog import reply_code

log = logging.getLogger("routemilter")

REASONS = ("unknown_user", "unknown_domain", "bad_address", "bad_token", "loop", "rule", "spf", "dmarc", "spam",
           "rate_limit", "dns_temperror", "internal_error", "reconnect", "separate_transaction")
# Per-message milter time: libmilter callbacks from MAIL FROM to end of message (DKIM signing dominates).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        p = "routemilter_"
        self.messages = Counter(p + "messages", "Messages the milter finished, by outcome", ["outcome"], registry=r)
        self.routed = Counter(p + "messages_routed", "Messages forwarded to at least one destination", registry=r)
        self.discarded = Counter(p + "messages_discarded", "Messages discarded by a rule", registry=r)
        self.refused = Counter(p + "refused", "Recipients or messages refused, by reason", ["reason"], registry=r)
        self.fallbacks = Counter(p + "fallbacks", "Fallbacks taken, by kind (relay, deferral, bounce)", ["kind"],
                                 registry=r)
        self.exhausted = Counter(p + "chains_exhausted", "Destinations whose whole fallback chain failed",
                                 registry=r)
        self.bounces = Counter(p + "bounces", "Bounces to our return addresses, by result", ["result"], registry=r)
        self.tokens_refused = Counter(p + "tokens_refused", "Forged, tampered or expired return addresses refused",
                                      registry=r)
        self.rate_limited = Counter(p + "rate_limit_hits", "Recipients refused by a rate limit", registry=r)
        self.dns_temperrors = Counter(p + "dns_temperrors", "Messages tempfailed for a DNS error while checking",
                                      registry=r)
        self.reloads = Counter(p + "reloads", "Config reloads, by result", ["result"], registry=r)
        self.deferrals = Counter(p + "mta_deferrals", "Remote 4xx replies seen in the MTA log, by destination "
                                 "domain and reply code", ["domain", "code"], registry=r)
        self.notices = Counter(p + "notices", "Notices sent to admins, by channel and result", ["channel", "result"],
                               registry=r)
        self.latency = Histogram(p + "milter_message_seconds", "Milter time per message (MAIL FROM to end of "
                                 "message)", buckets=BUCKETS, registry=r)
        for outcome in ("accept", "discard", "refused", "tempfail", "aborted"):
            self.messages.labels(outcome)
        for reason in REASONS:
            self.refused.labels(reason)
        for kind in ("relay", "deferral", "bounce"):
            self.fallbacks.labels(kind)
        for result in ("handled", "refused", "tempfail"):
            self.bounces.labels(result)
        for result in ("ok", "refused"):
            self.reloads.labels(result)
        self.server: WSGIServer | None = None
        self._handlers: dict[str, Callable[[Event], None]] = {
            "message": self._on_message, "bounce": self._on_bounce, "bounce-refused": self._on_bounce_refused,
            "bounce-tempfail": self._on_bounce_tempfail, "deferral": self._on_deferral, "reload": self._on_reload,
            "notice": self._on_notice, "mta": self._on_mta}

    def serve(self, host: str, port: int) -> Metrics:
        self.server, _thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics: http://%s:%d/metrics", host, port)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __call__(self, event: Event) -> None:
        handler = self._handlers.get(event.kind)
        if handler is not None:
            handler(event)

    def _on_message(self, event: Event) -> None:
        facts = event.facts
        outcome = facts.get("outcome", "")
        kind = outcome.split(":", 1)[0] if outcome else "accept"
        known = kind in ("accept", "discard", "refused", "tempfail", "aborted")
        self.messages.labels(kind if known else "refused").inc()
        if "seconds" in facts and kind in ("accept", "discard", "refused"):
            self.latency.observe(facts["seconds"])
        if kind == "accept" and facts.get("routed"):
            self.routed.inc()
        elif kind == "discard":
            self.discarded.inc()
        reasons = list(facts.get("refused", []))
        refusal = facts.get("message_refusal")
        if refusal:
            reasons.append(refusal)
        for reason in reasons:
            self.refused.labels(reason).inc()
            if reason == "rate_limit":
                self.rate_limited.inc()
            elif reason == "dns_temperror":
                self.dns_temperrors.inc()
            elif reason == "bad_token":
                self.tokens_refused.inc()

    def _on_bounce(self, event: Event) -> None:
        self.bounces.labels("handled").inc()
        for note in event.facts.get("notes", []):
            if ":fallback->" in note:
                self.fallbacks.labels("bounce").inc()
            elif note.endswith((":chain-exhausted", ":not-in-chain")) or ":cannot-forward:" in note:
                self.exhausted.inc()

    def _on_bounce_refused(self, event: Event) -> None:
        self.bounces.labels("refused").inc()
        self.tokens_refused.inc()

    def _on_bounce_tempfail(self, event: Event) -> None:
        self.bounces.labels("tempfail").inc()

    def _on_deferral(self, event: Event) -> None:
        if event.record.get("decision") == "fallback":
            self.fallbacks.labels("deferral").inc()

    def _on_reload(self, event: Event) -> None:
        self.reloads.labels(event.record.get("result", "ok")).inc()

    def _on_notice(self, event: Event) -> None:
        self.notices.labels(event.record.get("channel", "mail"), event.record.get("result", "sent")).inc()

    def _on_mta(self, event: Event) -> None:
        facts = event.facts
        remote_failed = facts.get("type") == "deferred" or (
            facts.get("type") in ("relay-fallback", "to-routemilter") and facts.get("failed_host"))
        reply = facts.get("reply")
        if remote_failed and reply:
            domain = facts.get("to", "").rpartition("@")[2].lower() or "unknown"
            self.deferrals.labels(domain, reply_code(reply)).inc()
        if facts.get("type") == "relay-fallback":
            self.fallbacks.labels("relay").inc()
