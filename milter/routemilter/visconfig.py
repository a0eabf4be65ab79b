"""The `metrics:`, `notify:` and `mta_log:` sections (visibility: issue 13).

Parsed like the rest of the config (config.py): every problem is reported with
the file and line, all at once. Kept in its own module so config.py only calls
`parse_visibility` and checks the rule names after the rules are built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .addresses import AddressError, parse

if TYPE_CHECKING:
    from .config import Config
    from .config.yamlcheck import Checker

_HOSTPORT = re.compile(r"^\[?([A-Za-z0-9.:-]+?)\]?:(\d{1,5})$")
_DURATION = re.compile(r"^(\d+)\s*(s|m|h|d)?$")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}




@dataclass(frozen=True, slots=True)
class MetricsSettings:
    host: str = "127.0.0.1"  # loopback by default: the endpoint has no authentication
    port: int = 9470


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    url: str
    timeout: float = 5.0
    retries: int = 3  # attempts after the first; bounded, in the digest thread, never in the mail path


@dataclass(frozen=True, slots=True)
class NotifySettings:
    to: str | None = None  # global admin address
    domains: dict[str, str] = field(default_factory=dict)  # managed domain -> address
    rules: dict[str, str] = field(default_factory=dict)  # rule name -> address
    sender: str | None = None  # From: of notices; default postmaster@<dkim domain or server_name>
    defer_after: int = 1800  # seconds a destination may defer before a notice
    interval: int = 900  # digest interval: one notice per destination per interval
    submit: str | None = None  # HOST:PORT of an smtpd without milters; default bounces.reinject
    webhook: WebhookSettings | None = None

    def addresses_for(self, rules: list[str], domains: list[str]) -> list[str]:
        """Who hears about a message: the most specific match, rule before domain before global."""
        found = [self.rules[r] for r in rules if r in self.rules]
        if not found:
            found = [self.domains[d] for d in domains if d in self.domains]
        if not found and self.to:
            found = [self.to]
        return list(dict.fromkeys(found))


@dataclass(frozen=True, slots=True)
class MTALogSettings:
    """Where the daemon follows the MTA's log: a file (Postfix maillog_file) or the journal."""

    file: str | None = None
    journal_unit: str | None = None  # e.g. "postfix@-"


def duration(c: Checker, value: Any, where: str, line: int, default: int, minimum: int = 1) -> int:
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and value >= minimum:
        return value
    m = _DURATION.fullmatch(str(value).strip()) if isinstance(value, str) else None
    if m is None or int(m.group(1)) < minimum:
        c.error(line, f"{where} must be a duration like 90, 30s, 15m, 2h or 1d")
        return default
    return int(m.group(1)) * _UNITS[m.group(2)]


def _address(c: Checker, value: Any, where: str, line: int) -> str | None:
    if not isinstance(value, str):
        c.error(line, f"{where} must be an email address")
        return None
    try:
        return str(parse(value))
    except AddressError as exc:
        c.error(line, f"{where}: {exc}")
        return None


def _hostport(c: Checker, value: Any, where: str, line: int) -> tuple[str, int] | None:
    m = _HOSTPORT.fullmatch(value) if isinstance(value, str) else None
    if m is None or not 0 < int(m.group(2)) < 65536:
        c.error(line, f"{where} must be HOST:PORT, like 127.0.0.1:9470")
        return None
    return m.group(1), int(m.group(2))


def parse_metrics(c: Checker, raw: Any, line: int) -> MetricsSettings | None:
    if raw is None:
        return None
    m = c.mapping(raw, "metrics", line, {"listen"})
    listen = _hostport(c, m.get("listen", "127.0.0.1:9470"), "metrics.listen", c.line_of(m, "listen"))
    return MetricsSettings(*listen) if listen else MetricsSettings()


def parse_mta_log(c: Checker, raw: Any, line: int) -> MTALogSettings | None:
    if raw is None:
        return None
    m = c.mapping(raw, "mta_log", line, {"file", "journal_unit"})
    file, unit = m.get("file"), m.get("journal_unit")
    if (file is None) == (unit is None):
        c.error(line, "mta_log needs exactly one of file: (Postfix's maillog_file) or journal_unit: (e.g. postfix@-)")
        return None
    if file is not None and (not isinstance(file, str) or not file.startswith("/")):
        c.error(c.line_of(m, "file"), "mta_log.file must be an absolute path")
        return None
    if unit is not None and (not isinstance(unit, str) or not re.fullmatch(r"[A-Za-z0-9@._:-]+", unit)):
        c.error(c.line_of(m, "journal_unit"), "mta_log.journal_unit must be a systemd unit name")
        return None
    return MTALogSettings(file, unit)


def parse_notify(c: Checker, raw: Any, line: int, has_reinject: bool) -> NotifySettings | None:
    if raw is None:
        return None
    m = c.mapping(raw, "notify", line, {"to", "domains", "rules", "from", "defer_after", "interval",
                                        "submit", "webhook"})
    d = NotifySettings()
    to = _address(c, m["to"], "notify.to", c.line_of(m, "to")) if "to" in m else None
    maps: dict[str, dict[str, str]] = {}
    for key in ("domains", "rules"):
        maps[key] = {}
        sub = m.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            c.error(c.line_of(m, key), f"notify.{key} must map names to addresses")
            continue
        for name, value in sub.items():
            address = _address(c, value, f"notify.{key}.{name}", c.line_of(sub, name))
            if address:
                maps[key][str(name).lower() if key == "domains" else str(name)] = address
    sender = _address(c, m["from"], "notify.from", c.line_of(m, "from")) if "from" in m else None
    defer_after = duration(c, m.get("defer_after", d.defer_after), "notify.defer_after",
                           c.line_of(m, "defer_after"), d.defer_after, minimum=0)
    interval = duration(c, m.get("interval", d.interval), "notify.interval", c.line_of(m, "interval"), d.interval)
    submit = None
    if "submit" in m:
        hp = _hostport(c, m["submit"], "notify.submit", c.line_of(m, "submit"))
        submit = f"{hp[0]}:{hp[1]}" if hp else None
    elif not has_reinject:
        c.error(line, "notify needs submit: HOST:PORT (an smtpd without milters), or bounces: (its reinject is used)")
    webhook = None
    if "webhook" in m:
        w = c.mapping(m["webhook"], "notify.webhook", c.line_of(m, "webhook"), {"url", "timeout", "retries"})
        url = w.get("url")
        if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+", url):
            c.error(c.line_of(w, "url"), "notify.webhook.url must be an http:// or https:// URL")
        else:
            timeout = w.get("timeout", 5)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0.1 <= timeout <= 60:
                c.error(c.line_of(w, "timeout"), "notify.webhook.timeout must be seconds from 0.1 to 60")
                timeout = 5
            retries = w.get("retries", 3)
            if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
                c.error(c.line_of(w, "retries"), "notify.webhook.retries must be a whole number from 0 to 10")
                retries = 3
            webhook = WebhookSettings(url, float(timeout), retries)
    if not (to or maps["domains"] or maps["rules"] or webhook):
        c.error(line, "notify needs an address (to:, domains:, rules:) or a webhook:")
    return NotifySettings(to, maps["domains"], maps["rules"], sender, defer_after, interval, submit, webhook)


def check_notify_names(c: Checker, notify: NotifySettings | None, config: Config, line: int) -> None:
    """notify.rules and notify.domains must name rules and domains that exist."""
    if notify is None:
        return
    names = {r.name for r in config.all_rules()}
    for name in notify.rules:
        if name not in names:
            c.error(line, f"notify.rules: no rule named {name!r}")
    for domain in notify.domains:
        if domain not in config.domains:
            c.error(line, f"notify.domains: {domain} is not a managed domain")
