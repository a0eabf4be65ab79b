"""The validated config: immutable objects the rest of the package reads.

Each field's default is written here once; the section builders take it from
the dataclass (see `default`), so a default never says two things.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..authconfig import AuthSettings
    from ..state import StateSettings
    from ..visconfig import MetricsSettings, MTALogSettings, NotifySettings

DEFAULT_PATH = "/etc/routemilter/routemilter.yaml"
DIRECT = "mx"  # the hop that means "the destination domain's own MX hosts"
# Deferral-driven fallback (deferrals.py): how long a destination may keep answering 4xx
# before the next address of its chain takes over. 30 minutes lets greylisting pass (it
# refuses once and accepts a retry after 5 to 30 minutes, and Postfix retries the primary
# at every attempt, so the attempt after this deadline meets an open greylist) while a
# rate-limited primary hands over within the hour. None: never (wait for a bounce).
DEFAULT_FALLBACK_AFTER = 1800
MAX_FALLBACK_AFTER = 30 * 86400


class ConfigError(Exception):
    """A config that must not be used; `problems` holds every reason."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def default(cls: type[Any], name: str) -> Any:
    """The default of dataclass `cls`'s field `name`: the one place it is written."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            break
    raise LookupError(f"{cls.__name__}.{name} has no default")


@dataclass(frozen=True, slots=True)
class Target:
    """One address to deliver to, and the route (relay chain) to use."""

    address: str
    route: str


@dataclass(frozen=True, slots=True)
class Destination:
    """A fan-out branch: the primary target, then its fallbacks in order."""

    chain: tuple[Target, ...]
    # seconds a deferred address waits before the next one takes over; None: never
    fallback_after: int | None = DEFAULT_FALLBACK_AFTER

    @property
    def primary(self) -> Target:
        return self.chain[0]


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code, enhanced status and one or more text lines."""

    code: int
    status: str
    lines: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.code} {self.status} " + " / ".join(self.lines)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    line: int
    addresses: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    destinations: tuple[Destination, ...] = ()
    refuse: Reply | None = None
    discard: bool = False
    keep: bool = False
    source: str = ""  # the alias file it came from; "" for the YAML itself
    senders: tuple[str, ...] = ()  # SASL logins that may send as this rule's addresses (senders.py)


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    line: int
    plus_delimiters: str = "+"
    subdomain_addressing: bool = False
    subdomain_exclude: frozenset[str] = frozenset()
    catch_all: Rule | None = None


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    hops: tuple[str, ...]  # DIRECT or "[host]:port", tried in order


@dataclass(frozen=True, slots=True)
class MilterSettings:
    socket: str = "unix:/run/routemilter/routemilter.sock"
    socket_mode: int = 0o660
    socket_group: str | None = None
    timeout: int = 600
    max_hops: int = 20  # loop guard: our own trace headers on one message


@dataclass(frozen=True, slots=True)
class SRSSettings:
    domain: str
    secrets: tuple[bytes, ...]  # the first signs, all verify (rotation)
    hash_length: int = 8
    max_age_days: int = 21


@dataclass(frozen=True, slots=True)
class BounceSettings:
    """Address-level fallback through bounces (see bounces.py)."""

    # LMTP listener for bounces to the SRS domain; next to the milter socket, where Postfix can reach it
    socket: str = "unix:/var/spool/postfix/routemilter/bounce.sock"
    # SMTP listener (Postfix, no milters) for fallback copies: a unix socket in Postfix's
    # public/ folder (postfix:postdrop 0710), which only the MTA, root and the postdrop group
    # (the daemon's user joins it) can reach; HOST:PORT still works but any local user could relay.
    reinject: str = "unix:/var/spool/postfix/public/rm_reinject"
    max_age_days: int = 21  # how long a bounce token stays valid (default: srs.max_age_days)
    max_size: int = 64 * 1024 * 1024  # largest bounce accepted over LMTP
    # SMTP listener for deferred copies (deferrals.py): the last smtp_fallback_relay hop
    deferral_listen: str = "127.0.0.1:10027"


@dataclass(frozen=True, slots=True)
class SubmissionSettings:
    """Mail from our own users (senders.py): SASL-authenticated or from trusted networks."""

    # socketmap for Postfix's smtpd_sender_login_maps; next to the milter socket, where Postfix can reach it
    socket: str = "unix:/var/spool/postfix/routemilter/senders.sock"
    # networks whose mail is ours without SASL
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class DKIMKey:
    selector: str
    key_file: str


@dataclass(frozen=True, slots=True)
class DKIMSettings:
    domain: str
    keys: tuple[DKIMKey, ...]


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    milter: MilterSettings
    srs: SRSSettings | None
    dkim: DKIMSettings | None
    routes: dict[str, Route]
    default_route: str
    domains: dict[str, Domain]
    rules: tuple[Rule, ...]
    server_name: str = field(default="routemilter")
    auth: AuthSettings | None = None  # inbound SPF/DKIM/DMARC, ARC, reputation policy
    bounces: BounceSettings | None = None  # address-level fallback through bounces (bounces.py)
    metrics: MetricsSettings | None = None  # the Prometheus endpoint
    notify: NotifySettings | None = None  # notices to an admin about failing destinations
    mta_log: MTALogSettings | None = None  # the MTA's log the daemon follows
    fallback_after: int | None = DEFAULT_FALLBACK_AFTER  # the top-level default (deferrals.py)
    submission: SubmissionSettings | None = None  # outbound mail of our own users (senders.py)
    # (path, kind) of every file read: "config", "secrets" (the secrets file, or a config
    # holding secrets inline) and "aliases"; for file_mode_problems()
    files: tuple[tuple[str, str], ...] = ()
    state: StateSettings | None = None  # the store for claims and rate limits (memory or redis)

    def all_rules(self) -> list[Rule]:
        """The rules, then each domain's catch-all: everything that can route."""
        return list(self.rules) + [d.catch_all for d in self.domains.values() if d.catch_all]


def managed_domain(domains: dict[str, Domain], domain: str) -> str | None:
    """The managed domain that owns `domain`: itself, or its parent by subdomain
    addressing (one label, not excluded); None when no managed domain does."""
    if domain in domains:
        return domain
    label, _, parent = domain.partition(".")
    owner = domains.get(parent)
    if owner and owner.subdomain_addressing and label not in owner.subdomain_exclude:
        return parent
    return None


def is_managed(config: Config, domain: str) -> bool:
    """Whether mail to `domain` is ours to route (see managed_domain for which domain owns it)."""
    return managed_domain(config.domains, domain) is not None


def format_duration(seconds: float | None) -> str:
    """20m, 2h, 1d, 35m10s: durations as the config writes them."""
    if seconds is None:
        return "never"
    seconds = int(seconds)
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // subsize
            return f"{seconds // size}{unit}" + (f"{rest}{sub}" if rest else "")
    return f"{seconds}s"
