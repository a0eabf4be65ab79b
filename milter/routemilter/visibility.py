"""Start and stop what the daemon runs for visibility (issue 13), as configured:
the metrics endpoint, the notifier's digest thread, the MTA log follower. Each
subscribes to the event bus (events.py); none of them is in the mail path."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import events
from .events import Event

if TYPE_CHECKING:
    from .metrics import Metrics
    from .mtalog import Follower, PostfixLine
    from .notify import Notifier
    from .policy import PolicyHolder

log = logging.getLogger("routemilter")


class Visibility:
    def __init__(self, holder: PolicyHolder):
        self.holder = holder
        self.metrics: Metrics | None = None
        self.notifier: Notifier | None = None
        self.follower: Follower | None = None

    def start(self) -> Visibility:
        config = self.holder.current.config
        if config.metrics is not None:
            from .metrics import Metrics  # noqa: PLC0415 (prometheus_client only when used)

            try:
                metrics = Metrics().serve(config.metrics.host, config.metrics.port)
            except OSError as exc:  # mail matters more than metrics: say so loudly and go on
                log.error("metrics: cannot listen on %s:%d: %s; running without metrics",
                          config.metrics.host, config.metrics.port, exc)
            else:
                self.metrics = metrics
                events.bus.subscribe(metrics)
        if config.notify is not None:
            from .notify import Notifier  # noqa: PLC0415

            events.recent.enabled = True
            notifier = self.notifier = Notifier(self.holder).start()
            events.bus.subscribe(notifier)
        if config.mta_log is not None:
            from .mtalog import Follower, Interpreter  # noqa: PLC0415

            interpreter = Interpreter()

            def on_line(parsed: PostfixLine) -> None:
                for fact in interpreter.feed(parsed):
                    events.bus.publish(Event("mta", fact, fact, logged=False))

            self.follower = Follower(config.mta_log, on_line).start()
            log.info("mta_log: following %s", config.mta_log.file or f"the journal of {config.mta_log.journal_unit}")
        return self

    def stop(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self.notifier is not None:
            events.bus.unsubscribe(self.notifier)
            self.notifier.stop()
            self.notifier.flush(force=True)  # what is pending goes out now rather than never
        if self.metrics is not None:
            events.bus.unsubscribe(self.metrics)
            self.metrics.stop()
