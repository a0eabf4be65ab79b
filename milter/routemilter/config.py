"""Load and validate routemilter.yaml into immutable objects.

Every error names the file, the line and the reason, and all errors are
collected before failing, so `routemilter check` lists everything wrong at
once. Nothing here touches the network or the MTA; key files are only
checked for existence and permissions (see signing.py for loading them).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re2
import yaml

from .addresses import AddressError, parse, parse_domain

DEFAULT_PATH = "/etc/routemilter/routemilter.yaml"
DIRECT = "mx"  # the hop that means "the destination domain's own MX hosts"
_HOP = re.compile(r"^\[[A-Za-z0-9.:-]+\](:\d{1,5})?$|^[A-Za-z0-9.-]+(:\d{1,5})?$")
_ROUTE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_DURATION = re.compile(r"^(\d{1,7})([smhd]?)$")
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


# ---------------------------------------------------------------- the model


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
    max_age_days: int = 21  # how long a bounce token stays valid
    max_size: int = 64 * 1024 * 1024  # largest bounce accepted over LMTP
    # SMTP listener for deferred copies (deferrals.py): the last smtp_fallback_relay hop
    deferral_listen: str = "127.0.0.1:10027"


@dataclass(frozen=True, slots=True)
class SubmissionSettings:
    """Mail from our own users (senders.py): SASL-authenticated or from trusted networks."""

    # socketmap for Postfix's smtpd_sender_login_maps; next to the milter socket, where Postfix can reach it
    socket: str = "unix:/var/spool/postfix/routemilter/senders.sock"
    trusted_networks: tuple = ()  # ipaddress networks whose mail is ours without SASL


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
    auth: Any = None  # authconfig.AuthSettings: inbound SPF/DKIM/DMARC, ARC, reputation policy
    bounces: BounceSettings | None = None  # address-level fallback through bounces (bounces.py)
    metrics: Any = None  # visconfig.MetricsSettings: the Prometheus endpoint
    notify: Any = None  # visconfig.NotifySettings: notices to an admin about failing destinations
    mta_log: Any = None  # visconfig.MTALogSettings: the MTA's log the daemon follows
    fallback_after: int | None = DEFAULT_FALLBACK_AFTER  # the top-level default (deferrals.py)
    submission: SubmissionSettings | None = None  # outbound mail of our own users (senders.py)
    # (path, kind) of every file read: "config", "secrets" (the secrets file, or a config
    # holding secrets inline) and "aliases"; for file_mode_problems()
    files: tuple[tuple[str, str], ...] = ()
    state: Any = None  # state.StateSettings: the store for claims and rate limits (memory or redis)

    def all_rules(self) -> list[Rule]:
        """The rules, then each domain's catch-all: everything that can route."""
        return list(self.rules) + [d.catch_all for d in self.domains.values() if d.catch_all]


# ------------------------------------------------- YAML with line numbers


class _Node:
    """Mixin recording where a YAML mapping or sequence started."""

    line: int
    key_lines: dict


class _Map(dict, _Node):
    pass


class _Seq(list, _Node):
    pass


_LIBYAML = hasattr(yaml, "CSafeLoader")


class _Loader(yaml.CSafeLoader if _LIBYAML else yaml.SafeLoader):
    """libyaml's parser when PyYAML has it (several times faster on big alias
    tables), the pure-Python one otherwise; the same nodes and marks either way."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    result = _Map()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.MarkedYAMLError(problem="unhashable key", problem_mark=key_node.start_mark)
        if key in result:
            raise yaml.MarkedYAMLError(
                problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    result = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.key_lines = {i: child.start_mark.line + 1 for i, child in enumerate(node.value)}
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


# ------------------------------------------------------------- validation


class _Checker:
    """Walks the parsed YAML, collecting problems as 'file:line: reason'."""

    def __init__(self, path: str):
        self.path = path
        self.problems: list[str] = []
        self.read_secrets = True
        self.srs_domain_line = 1
        self.files: list[tuple[str, str]] = []  # files read besides the config, for Config.files
        self.inline_secrets = False

    def error(self, line: int, reason: str, path: str | None = None) -> None:
        self.problems.append(f"{path or self.path}:{line}: {reason}")

    @staticmethod
    def line_of(container: Any, key: Any = None) -> int:
        if isinstance(container, _Node):
            if key is not None and key in container.key_lines:
                return container.key_lines[key]
            return container.line
        return 0

    def mapping(self, value: Any, where: str, line: int, allowed: set[str]) -> _Map:
        if value is None:
            empty = _Map()
            empty.line, empty.key_lines = line, {}
            return empty
        if not isinstance(value, dict):
            self.error(line, f"{where} must be a mapping")
            empty = _Map()
            empty.line, empty.key_lines = line, {}
            return empty
        for key in value:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.error(self.line_of(value, key), f"unknown key {key!r} in {where} (known: {hint})")
        return value

    def string_list(self, value: Any, where: str, line: int) -> list[tuple[str, int]]:
        """A string or a list of strings, each with its own line."""
        if value is None:
            return []
        if isinstance(value, str):
            return [(value, line)]
        if isinstance(value, list):
            out = []
            for i, item in enumerate(value):
                item_line = self.line_of(value, i)
                if isinstance(item, str):
                    out.append((item, item_line))
                else:
                    self.error(item_line, f"{where} entries must be strings")
            return out
        self.error(line, f"{where} must be a string or a list of strings")
        return []


def load(path: str | os.PathLike = DEFAULT_PATH, read_secrets: bool = True) -> Config:
    """Read, parse and validate a config file; raise ConfigError on any problem.

    `read_secrets=False` skips the SRS secrets file, so `explain` works for a
    user who may read the rules but not the secrets.
    """
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc.reason}"]) from None
    return loads(text, path, read_secrets)


def loads(text: str, path: str = "<string>", read_secrets: bool = True) -> Config:
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else 0
        reason = f"{exc.context}: {exc.problem}" if exc.context else exc.problem
        raise ConfigError([f"{path}:{line}: YAML syntax: {reason}"]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML refuses; carries a position, not a mark
        # libyaml counts the position in UTF-8 bytes, the pure-Python reader in characters
        before = text.encode("utf-8", "surrogatepass")[:exc.position] if _LIBYAML else text[:exc.position]
        line = before.count(b"\n" if _LIBYAML else "\n") + 1
        raise ConfigError([f"{path}:{line}: YAML syntax: {str(exc).splitlines()[0]}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML syntax: {exc}"]) from None
    except UnicodeEncodeError as exc:  # a lone surrogate: libyaml takes UTF-8 only
        line = text.count("\n", 0, exc.start) + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text: {exc.reason}"]) from None
    checker = _Checker(path)
    checker.read_secrets = read_secrets
    config = _build(checker, data, path)
    if checker.problems:
        raise ConfigError(checker.problems)
    return config


_TOP_KEYS = {"milter", "srs", "dkim", "routes", "default_route", "domains", "rules", "server_name", "auth",
             "bounces", "alias_files", "metrics", "notify", "mta_log", "fallback_after",
             "submission", "state"}


def _build(c: _Checker, data: Any, path: str) -> Config:
    if data is None:
        data = {}
    top = c.mapping(data, "the top level", 1, _TOP_KEYS)
    milter = _milter(c, top.get("milter"), c.line_of(top, "milter"))
    srs = _srs(c, top.get("srs"), c.line_of(top, "srs"), path)
    dkim = _dkim(c, top.get("dkim"), c.line_of(top, "dkim"), path)
    routes = _routes(c, top.get("routes"), c.line_of(top, "routes"))
    default_route = top.get("default_route", DIRECT if DIRECT in routes else None)
    if default_route is None:
        default_route = DIRECT
    if not isinstance(default_route, str) or default_route not in routes:
        c.error(c.line_of(top, "default_route"), f"default_route {default_route!r} is not a route")
    server_name = top.get("server_name", "routemilter")
    if not isinstance(server_name, str) or not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", server_name):
        c.error(c.line_of(top, "server_name"), "server_name must be a host name")
        server_name = "routemilter"

    fallback_after = DEFAULT_FALLBACK_AFTER
    if "fallback_after" in top:
        fallback_after = duration(c, top["fallback_after"], c.line_of(top, "fallback_after"), "fallback_after")
    rules_builder = _RuleBuilder(c, routes, default_route, fallback_after)
    domains = _domains(c, top.get("domains"), c.line_of(top, "domains"), rules_builder)
    rules = _rules(c, top.get("rules"), c.line_of(top, "rules"), rules_builder)
    for alias_file, fline in c.string_list(top.get("alias_files"), "alias_files", c.line_of(top, "alias_files")):
        c.files.append((_relative(alias_file, path), "aliases"))
        rules += _alias_file(c, _relative(alias_file, path), fline, domains, default_route,
                             srs.domain if srs else None, fallback_after)
    from .authconfig import check_references, parse_auth  # noqa: PLC0415 (its own module)
    from .state import parse_state  # noqa: PLC0415 (its own module)

    state = parse_state(c, top.get("state"), c.line_of(top, "state"), path)  # before files= below
    auth = parse_auth(c, top.get("auth"), c.line_of(top, "auth"), server_name)
    from . import visconfig  # noqa: PLC0415 (its own module)

    bounces = _bounces(c, top.get("bounces"), c.line_of(top, "bounces"), srs)
    notify = visconfig.parse_notify(c, top.get("notify"), c.line_of(top, "notify"), bounces is not None)
    config = Config(path, milter, srs, dkim, routes, default_route, domains, tuple(rules), server_name, auth,
                    bounces=bounces, notify=notify, fallback_after=fallback_after,
                    metrics=visconfig.parse_metrics(c, top.get("metrics"), c.line_of(top, "metrics")),
                    mta_log=visconfig.parse_mta_log(c, top.get("mta_log"), c.line_of(top, "mta_log")),
                    submission=_submission(c, top.get("submission"), c.line_of(top, "submission")),
                    files=tuple([(path, "secrets" if c.inline_secrets else "config")] + c.files),
                    state=state)
    visconfig.check_notify_names(c, notify, config, c.line_of(top, "notify"))
    _cross_checks(c, config, rules_builder)
    check_references(c, auth, config, c.line_of(top, "auth"))
    return config


def _milter(c: _Checker, raw: Any, line: int) -> MilterSettings:
    m = c.mapping(raw, "milter", line, {"socket", "socket_mode", "socket_group", "timeout", "max_hops"})
    settings = MilterSettings()
    socket = m.get("socket", settings.socket)
    if not isinstance(socket, str) or not re.match(r"^(unix|local):/.+|^inet6?:\d+(@.+)?$", socket):
        c.error(c.line_of(m, "socket"), "socket must be unix:/absolute/path or inet:PORT@HOST")
        socket = settings.socket
    mode = m.get("socket_mode", "0660")
    try:
        # Only text: YAML reads an unquoted 0660 as the number 432 and 660 as 660,
        # so a number cannot say which octal mode was meant.
        if not isinstance(mode, str):
            raise ValueError
        mode_int = int(mode, 8)
        if not 0 <= mode_int <= 0o777:
            raise ValueError
    except ValueError:
        c.error(c.line_of(m, "socket_mode"), "socket_mode must be quoted octal text, like \"0660\"")
        mode_int = settings.socket_mode
    group = m.get("socket_group")
    if group is not None and not isinstance(group, str):
        c.error(c.line_of(m, "socket_group"), "socket_group must be a group name")
        group = None
    timeout = _positive_int(c, m, "timeout", settings.timeout)
    max_hops = _positive_int(c, m, "max_hops", settings.max_hops)
    return MilterSettings(socket, mode_int, group, timeout, max_hops)


def _positive_int(c: _Checker, m: _Map, key: str, default: int, low: int = 1, high: int = 10**6) -> int:
    value = m.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        c.error(c.line_of(m, key), f"{key} must be a whole number from {low} to {high}")
        return default
    return value


def _relative(path: str, config_path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(config_path) or ".", path)


def _srs(c: _Checker, raw: Any, line: int, config_path: str) -> SRSSettings | None:
    if raw is None:
        return None
    m = c.mapping(raw, "srs", line, {"domain", "secrets", "secrets_file", "hash_length", "max_age_days"})
    domain = _domain_name(c, m.get("domain"), c.line_of(m, "domain"), "srs.domain")
    c.srs_domain_line = c.line_of(m, "domain")
    secrets: list[bytes] = []
    for secret, sline in c.string_list(m.get("secrets"), "srs.secrets", c.line_of(m, "secrets")):
        secrets.append(secret.encode())
        c.inline_secrets = True
    if "secrets_file" in m and c.read_secrets:
        fname = m["secrets_file"]
        fline = c.line_of(m, "secrets_file")
        if not isinstance(fname, str):
            c.error(fline, "srs.secrets_file must be a path")
        else:
            fpath = _relative(fname, config_path)
            c.files.append((fpath, "secrets"))
            try:
                lines = Path(fpath).read_text(encoding="utf-8").splitlines()
                stripped = (s.strip() for s in lines)
                secrets.extend(s.encode() for s in stripped if s and not s.startswith("#"))
            except OSError as exc:
                c.error(fline, f"cannot read srs.secrets_file {fpath}: {exc.strerror or exc}")
                return None
    for secret in secrets:
        if len(secret) < 16:
            c.error(line, "every SRS secret must be at least 16 characters")
            break
    if not secrets and c.read_secrets:
        c.error(line, "srs needs secrets or secrets_file")
    hash_length = _positive_int(c, m, "hash_length", 8, low=6, high=27)
    max_age = _positive_int(c, m, "max_age_days", 21, low=1, high=365)
    return SRSSettings(domain or "invalid", tuple(secrets), hash_length, max_age)


def _bounces(c: _Checker, raw: Any, line: int, srs: SRSSettings | None) -> BounceSettings | None:
    if raw is None:
        return None
    m = c.mapping(raw, "bounces", line, {"socket", "reinject", "max_age_days", "max_size", "deferral_listen"})
    if srs is None:
        c.error(line, "bounces needs srs: bounce tokens live in the SRS domain and use its secrets")
    d = BounceSettings()
    socket = m.get("socket", d.socket)
    if not isinstance(socket, str) or not re.match(r"^(unix|local):/.+|^inet:\d{1,5}(@[A-Za-z0-9.:-]+)?$", socket):
        c.error(c.line_of(m, "socket"), "bounces.socket must be unix:/absolute/path or inet:PORT@HOST")
        socket = d.socket
    reinject = m.get("reinject", d.reinject)
    if not isinstance(reinject, str) or not (
            re.fullmatch(r"\[?[A-Za-z0-9.:-]+\]?:\d{1,5}", reinject)
            or re.fullmatch(r"unix:/(?:[^\0]*/)?public/[A-Za-z0-9_-]{1,60}", reinject)):
        c.error(c.line_of(m, "reinject"), "bounces.reinject must be unix:/var/spool/postfix/public/NAME "
                "(a socket in Postfix's public/ folder) or HOST:PORT of Postfix's re-injection smtpd")
        reinject = d.reinject
    max_age = _positive_int(c, m, "max_age_days", srs.max_age_days if srs else d.max_age_days, low=1, high=365)
    max_size = _positive_int(c, m, "max_size", d.max_size, low=1024 * 1024, high=1 << 31)
    listen = m.get("deferral_listen", d.deferral_listen)
    if not isinstance(listen, str) or not _loopback_hostport(listen):
        c.error(c.line_of(m, "deferral_listen"), "bounces.deferral_listen must be a loopback HOST:PORT, like "
                                                  "127.0.0.1:10027 (it accepts mail without authentication)")
        listen = d.deferral_listen
    return BounceSettings(socket, reinject, max_age, max_size, listen)


def _loopback_hostport(text: str) -> bool:
    import ipaddress

    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def duration(c: _Checker, value: Any, line: int, where: str) -> int | None:
    """`0`, `90s`, `20m`, `2h`, `1d` (a bare number: seconds) or `never` (None)."""
    if value == "never":
        return None
    text = str(value).strip().lower() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    m = _DURATION.fullmatch(text)
    if m is None:
        c.error(line, f"{where} must be a duration like 0, 90s, 20m, 2h or 1d, or never; found {value!r}")
        return DEFAULT_FALLBACK_AFTER
    seconds = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds > MAX_FALLBACK_AFTER:
        c.error(line, f"{where} is longer than 30 days (Postfix bounces deferred mail after "
                      f"maximal_queue_lifetime, 5 days by default): use never")
        return DEFAULT_FALLBACK_AFTER
    return seconds


def _submission(c: _Checker, raw: Any, line: int) -> SubmissionSettings | None:
    if raw is None:
        return None
    m = c.mapping(raw, "submission", line, {"socket", "trusted_networks"})
    d = SubmissionSettings()
    socket = m.get("socket", d.socket)
    if not isinstance(socket, str) or not re.match(r"^(unix|local):/.+|^inet:\d{1,5}(@[A-Za-z0-9.:-]+)?$", socket):
        c.error(c.line_of(m, "socket"), "submission.socket must be unix:/absolute/path or inet:PORT@HOST")
        socket = d.socket
    networks = []
    for text, nline in c.string_list(m.get("trusted_networks"), "submission.trusted_networks",
                                     c.line_of(m, "trusted_networks")):
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as exc:
            c.error(nline, f"submission.trusted_networks: {text!r} is not a network like 192.0.2.0/24 ({exc})")
    return SubmissionSettings(socket, tuple(networks))


# A SASL login as Postfix compares it: its sender login table separates owners by
# commas or white space, so a login holds neither.
_LOGIN = re.compile(r"[^\s,\x00-\x1f\x7f]{1,255}")


def _senders(c: _Checker, m: _Map, name: str) -> tuple[str, ...]:
    logins = []
    for login, lline in c.string_list(m.get("senders"), f"rule {name} senders", c.line_of(m, "senders")):
        if not _LOGIN.fullmatch(login):
            c.error(lline, f"rule {name}: sender login {login!r} must be 1 to 255 characters without "
                           f"spaces, commas or control characters")
        elif login.lower() not in (x.lower() for x in logins):
            logins.append(login)
    return tuple(logins)


def _dkim(c: _Checker, raw: Any, line: int, config_path: str) -> DKIMSettings | None:
    if raw is None:
        return None
    m = c.mapping(raw, "dkim", line, {"domain", "keys"})
    domain = _domain_name(c, m.get("domain"), c.line_of(m, "domain"), "dkim.domain")
    keys_raw = m.get("keys")
    keys: list[DKIMKey] = []
    if not isinstance(keys_raw, list) or not keys_raw:
        c.error(c.line_of(m, "keys"), "dkim.keys must list at least one key (selector and key file)")
        keys_raw = []
    for i, item in enumerate(keys_raw):
        kline = c.line_of(keys_raw, i)
        k = c.mapping(item, "a dkim key", kline, {"selector", "key"})
        selector = k.get("selector")
        key_file = k.get("key")
        if not isinstance(selector, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", selector):
            c.error(kline, "a dkim key needs a selector (letters, digits, '.', '_', '-')")
            continue
        if not isinstance(key_file, str):
            c.error(kline, f"dkim key {selector!r} needs key: the private key file")
            continue
        keys.append(DKIMKey(selector, _relative(key_file, config_path)))
    return DKIMSettings(domain or "invalid", tuple(keys))


def _routes(c: _Checker, raw: Any, line: int) -> dict[str, Route]:
    routes = {DIRECT: Route(DIRECT, (DIRECT,))}
    if raw is None:
        return routes
    if not isinstance(raw, dict):
        c.error(line, "routes must map route names to lists of hops")
        return routes
    for name, hops_raw in raw.items():
        rline = c.line_of(raw, name)
        if not isinstance(name, str) or not _ROUTE_NAME.match(name):
            c.error(rline, f"route name {name!r} must be lowercase letters, digits, '-' or '_' (at most 31)")
            continue
        hops = []
        for hop, hline in c.string_list(hops_raw, f"route {name}", rline):
            match = None if hop == DIRECT else _HOP.match(hop)
            port = match and (match.group(1) or match.group(2))
            if hop != DIRECT and not match:
                c.error(hline, f"route {name}: hop {hop!r} must be 'mx' or a host like [relay.example]:25")
            elif port and not 1 <= int(port[1:]) <= 65535:
                c.error(hline, f"route {name}: hop {hop!r}: port must be from 1 to 65535")
            hops.append(hop)
        if not hops:
            c.error(rline, f"route {name} has no hops")
            continue
        if len(set(hops)) != len(hops):
            c.error(rline, f"route {name} lists a hop twice")
        if DIRECT in hops[1:]:
            c.error(rline, f"route {name}: 'mx' may only be the first hop (the MTA falls back to relays, not back to MX)")
        if name == DIRECT and hops != [DIRECT]:
            c.error(rline, "route mx is built in (the destination's own MX hosts) and cannot be redefined")
            continue
        routes[name] = Route(name, tuple(hops))
    return routes


def _domain_name(c: _Checker, raw: Any, line: int, where: str) -> str | None:
    if not isinstance(raw, str):
        c.error(line, f"{where} must be a domain name")
        return None
    try:
        return parse_domain(raw)
    except AddressError as exc:
        c.error(line, f"{where}: {exc}")
        return None


class _RuleBuilder:
    """Builds Rule objects, shared by `rules:` and each domain's catch_all."""

    ACTION_KEYS = {"to", "refuse", "discard", "keep", "senders"}

    def __init__(self, c: _Checker, routes: dict[str, Route], default_route: str,
                 fallback_after: int | None = DEFAULT_FALLBACK_AFTER):
        self.c = c
        self.routes = routes
        self.default_route = default_route
        self.fallback_after = fallback_after
        self.target_lines: list[tuple[str, int]] = []  # for the loop check

    def build(self, m: _Map, name: str, line: int, addresses=(), patterns=()) -> Rule:
        c = self.c
        destinations = tuple(self._destinations(m.get("to"), c.line_of(m, "to"), name))
        refuse = self._reply(m["refuse"], c.line_of(m, "refuse"), name) if "refuse" in m else None
        discard = m.get("discard", False)
        keep = m.get("keep", False)
        for flag, value in (("discard", discard), ("keep", keep)):
            if not isinstance(value, bool):
                c.error(c.line_of(m, flag), f"rule {name}: {flag} must be true or false")
        chosen = [k for k, on in (("to", bool(destinations) or "to" in m), ("refuse", "refuse" in m), ("discard", discard)) if on]
        if len(chosen) != 1 and not (keep and not chosen):
            c.error(line, f"rule {name}: give exactly one of to, refuse, discard (or keep alone); found {chosen or 'none'}")
        if keep and ("refuse" in m or discard):
            c.error(line, f"rule {name}: keep cannot be combined with refuse or discard")
        return Rule(name, line, tuple(addresses), tuple(patterns), destinations, refuse, bool(discard) is True,
                    bool(keep) is True, senders=_senders(c, m, name))

    def _destinations(self, raw: Any, line: int, rule: str):
        if raw is None:
            return
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            self.c.error(line, f"rule {rule}: to is empty")
        for i, item in enumerate(items):
            iline = self.c.line_of(raw, i) if isinstance(raw, list) else line
            if isinstance(item, str):
                target = self._target(item, None, iline, rule)
                if target:
                    yield Destination((target,), self.fallback_after)
                continue
            d = self.c.mapping(item, f"rule {rule} destination", iline,
                               {"address", "route", "fallback", "fallback_after"})
            after = self.fallback_after
            if "fallback_after" in d:
                aline = self.c.line_of(d, "fallback_after")
                after = duration(self.c, d["fallback_after"], aline, f"rule {rule}: fallback_after")
                if not d.get("fallback"):
                    self.c.error(aline, f"rule {rule}: fallback_after without fallback: there is no next address")
            primary = self._target(d.get("address"), d.get("route"), self.c.line_of(d, "address"), rule)
            chain = [primary] if primary else []
            fallback = d.get("fallback") or []
            if not isinstance(fallback, list):
                fallback = [fallback]
            for j, fb in enumerate(fallback):
                fline = self.c.line_of(d.get("fallback"), j) if isinstance(d.get("fallback"), list) else self.c.line_of(d, "fallback")
                if isinstance(fb, str):
                    target = self._target(fb, None, fline, rule)
                else:
                    f = self.c.mapping(fb, f"rule {rule} fallback", fline, {"address", "route"})
                    target = self._target(f.get("address"), f.get("route"), fline, rule)
                if target:
                    chain.append(target)
            if primary:
                addresses = [t.address for t in chain]
                if len(set(addresses)) != len(addresses):
                    self.c.error(iline, f"rule {rule}: a fallback chain names the same address twice")
                yield Destination(tuple(chain), after)

    def _target(self, address: Any, route: Any, line: int, rule: str) -> Target | None:
        if not isinstance(address, str):
            self.c.error(line, f"rule {rule}: a destination needs an address")
            return None
        try:
            normal = str(parse(address))
        except AddressError as exc:
            self.c.error(line, f"rule {rule}: destination {address!r}: {exc}")
            return None
        route = self.default_route if route is None else route
        if not isinstance(route, str) or route not in self.routes:
            self.c.error(line, f"rule {rule}: unknown route {route!r} (defined: {', '.join(sorted(self.routes))})")
        self.target_lines.append((normal, line))
        return Target(normal, route)

    def _reply(self, raw: Any, line: int, rule: str) -> Reply | None:
        if isinstance(raw, str):
            raw = {"text": raw}
        r = self.c.mapping(raw, f"rule {rule} refuse", line, {"code", "status", "text"})
        code = r.get("code", 550)
        status = r.get("status")
        text = r.get("text", "")
        if not isinstance(code, int) or isinstance(code, bool) or not (400 <= code <= 599):
            self.c.error(line, f"rule {rule}: refuse code must be 4xx or 5xx")
            return None
        if status is None:
            status = "5.7.1" if code >= 500 else "4.7.1"
        if not isinstance(status, str) or not _STATUS.match(status) or status[0] != str(code)[0]:
            self.c.error(line, f"rule {rule}: refuse status {status!r} must look like {str(code)[0]}.7.1 and match the code's class")
            return None
        if not isinstance(text, str) or not text.strip():
            self.c.error(line, f"rule {rule}: refuse needs a text")
            return None
        lines = tuple(part.strip() for part in text.strip().splitlines())
        if any(not part or any(ord(ch) < 0x20 or ord(ch) > 0x7E for ch in part) for part in lines):
            self.c.error(line, f"rule {rule}: refuse text must be printable ASCII, without empty lines")
            return None
        if len(lines) > 10 or any(len(part) > 400 for part in lines):
            self.c.error(line, f"rule {rule}: refuse text is limited to 10 lines of 400 characters")
            return None
        if any("%" in part for part in lines):
            # libmilter's reply text is a format string to the MTA: pymilter refuses a single
            # '%', and the client would then see the MTA's generic text instead of this one.
            self.c.error(line, f"rule {rule}: refuse text cannot contain '%' (write 'percent')")
            return None
        return Reply(code, status, lines)


def _domains(c: _Checker, raw: Any, line: int, rb: _RuleBuilder) -> dict[str, Domain]:
    if raw is None:
        c.error(line or 1, "domains: at least one managed domain is required")
        return {}
    if not isinstance(raw, dict) or not raw:
        c.error(line, "domains must map domain names to their settings")
        return {}
    domains: dict[str, Domain] = {}
    for name, settings in raw.items():
        dline = c.line_of(raw, name)
        domain = _domain_name(c, name, dline, "domain")
        if domain is None:
            continue
        if domain in domains:
            c.error(dline, f"domain {domain} is listed twice")
        d = c.mapping(settings, f"domain {domain}", dline,
                      {"plus_delimiters", "subdomain_addressing", "subdomain_exclude", "catch_all"})
        delims = d.get("plus_delimiters", "+")
        if delims is None:
            delims = ""
        if not isinstance(delims, str) or any(ch.isalnum() or ch in "@. \"" for ch in delims):
            c.error(c.line_of(d, "plus_delimiters"), "plus_delimiters must be punctuation characters like \"+\" or \"+-\"")
            delims = ""
        sub = d.get("subdomain_addressing", False)
        if not isinstance(sub, bool):
            c.error(c.line_of(d, "subdomain_addressing"), "subdomain_addressing must be true or false")
            sub = False
        exclude = set()
        for label, eline in c.string_list(d.get("subdomain_exclude"), "subdomain_exclude", c.line_of(d, "subdomain_exclude")):
            if not re.fullmatch(r"[a-z0-9-]{1,63}", label.lower()):
                c.error(eline, f"subdomain_exclude: {label!r} must be a single label, like imx")
            exclude.add(label.lower())
        catch_all = None
        if "catch_all" in d:
            cline = c.line_of(d, "catch_all")
            ca = c.mapping(d["catch_all"], f"domain {domain} catch_all", cline, _RuleBuilder.ACTION_KEYS)
            catch_all = rb.build(ca, f"catch-all@{domain}", cline)
        domains[domain] = Domain(domain, dline, delims, sub, frozenset(exclude), catch_all)
    return domains


def _rules(c: _Checker, raw: Any, line: int, rb: _RuleBuilder) -> list[Rule]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        c.error(line, "rules must be a list")
        return []
    rules = []
    names = set()
    for i, item in enumerate(raw):
        rline = c.line_of(raw, i)
        m = c.mapping(item, "a rule", rline, {"name", "addresses", "patterns"} | _RuleBuilder.ACTION_KEYS)
        name = m.get("name", f"rule-{i + 1}")
        if not isinstance(name, str) or not name.strip():
            c.error(rline, "rule name must be text")
            name = f"rule-{i + 1}"
        if name in names:
            c.error(rline, f"rule name {name!r} is used twice")
        names.add(name)
        addresses = []
        for addr, aline in c.string_list(m.get("addresses"), f"rule {name} addresses", c.line_of(m, "addresses")):
            try:
                addresses.append(str(parse(addr)))
            except AddressError as exc:
                c.error(aline, f"rule {name}: address {addr!r}: {exc}")
        patterns = []
        for pattern, pline in c.string_list(m.get("patterns"), f"rule {name} patterns", c.line_of(m, "patterns")):
            problem = pattern_problem(pattern)
            if problem:
                c.error(pline, f"rule {name}: pattern {pattern!r}: {problem}")
            else:
                patterns.append(pattern)
        if not addresses and not patterns and "addresses" not in m and "patterns" not in m:
            c.error(rline, f"rule {name} matches nothing: give addresses or patterns")
        rules.append(rb.build(m, name, rline, addresses, patterns))
    return rules


def pattern_problem(pattern: str) -> str | None:
    """Why a pattern is unusable, or None. Patterns run on RE2 (linear time)."""
    if not pattern:
        return "empty pattern"
    if len(pattern) > 1000:
        return "longer than 1000 characters"
    try:
        re2.compile(pattern)
    except re2.error as exc:
        return f"not a valid RE2 regular expression ({exc})"
    return None


def is_managed(config: Config, domain: str) -> str | None:
    """The managed domain that owns `domain` (itself or by subdomain addressing)."""
    return managed_owner(config.domains, domain)


def file_mode_problems(config: Config) -> list[str]:
    """Files of `config` that other local users could read secrets from or change routing
    with; what `check` and `run` refuse (entries starting with "warning:" do not stop them).

    Secrets (srs.secrets_file, or the config when it holds srs.secrets inline;
    state.password_file): nothing for
    others, no group write (group read is for the service's own group: 0640 root:routemilter).
    Config and alias files: no group or others write (anyone who can write them routes the
    mail); readable by all is fine when they hold no secret (`explain` for admins).
    """
    problems = []
    uid = os.geteuid()
    for path, kind in config.files:
        if path.startswith("<"):  # loads() of a string: no file
            continue
        try:
            info = os.stat(path)
        except OSError as exc:
            problems.append(f"{path}: cannot check permissions: {exc.strerror or exc}")
            continue
        mode = stat.S_IMODE(info.st_mode)
        what = {"secrets": "holds SRS secrets", "password": "holds the state store's password",
                "config": "sets the routing", "aliases": "sets the routing"}[kind]
        kind = "secrets" if kind == "password" else kind
        bad = mode & (0o027 if kind == "secrets" else 0o022)
        if bad:
            who = []
            if mode & 0o020:
                who.append("group can write")
            if mode & 0o007 and kind == "secrets":
                who.append("others can " + "/".join(v for v, b in (("read", 4), ("write", 2), ("execute", 1)) if mode & b))
            elif mode & 0o002:
                who.append("others can write")
            fix = "640" if kind == "secrets" else "644"
            problems.append(f"{path}: mode {mode:04o}: {', '.join(who)}; it {what} (chmod {fix})")
        if info.st_uid not in (0, uid):
            problems.append(f"warning: {path}: owned by uid {info.st_uid}, neither root nor uid {uid} "
                            f"(us): that user can change it")
    return problems


def managed_owner(domains: dict[str, Domain], domain: str) -> str | None:
    if domain in domains:
        return domain
    label, _, parent = domain.partition(".")
    owner = domains.get(parent)
    if owner and owner.subdomain_addressing and label not in owner.subdomain_exclude:
        return parent
    return None


def _alias_file(c: _Checker, path: str, line: int, domains: dict[str, Domain], default_route: str,
                srs_domain: str | None, fallback_after: int | None = DEFAULT_FALLBACK_AFTER) -> list[Rule]:
    """A Postfix-style alias table, one alias per line:

        alias@domain   destination[>fallback>...][, destination...]

    Large alias sets live here rather than in the YAML: a plain split per line
    loads 100,000 aliases in about a second, where YAML takes many. Each line
    is an exact rule named FILE:LINE, delivering on the default route.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        c.error(line, f"cannot read alias file {path}: {getattr(exc, 'strerror', None) or exc}")
        return []
    name = os.path.basename(path)
    rules = []
    owners: dict[str, str | None] = {}  # domain -> managing domain; few distinct domains

    def owner(address: str) -> str | None:
        domain = address[address.rindex("@") + 1:]
        if domain not in owners:
            owners[domain] = managed_owner(domains, domain) or ("srs" if domain == srs_domain else None)
        return owners[domain]

    for number, raw in enumerate(text.splitlines(), 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        alias, _, rest = entry.partition(" ") if " " in entry else entry.partition("\t")
        chains = [[hop.strip() for hop in item.split(">")] for item in rest.split(",") if item.strip()]
        if not chains:
            c.error(number, "expected an alias and at least one destination", path)
            continue
        try:
            alias = str(parse(alias))
            chains = [[str(parse(hop)) for hop in chain] for chain in chains]
        except AddressError as exc:
            c.error(number, f"{exc}", path)
            continue
        if owner(alias) in (None, "srs"):
            c.error(number, f"{alias} is not in a managed domain (add its domain under domains:)", path)
            continue
        looping = [hop for chain in chains for hop in chain if owner(hop) is not None]
        if looping:
            c.error(number, f"destination {looping[0]} is in a managed or the SRS domain: that would loop", path)
            continue
        if any(len(set(chain)) != len(chain) for chain in chains):
            c.error(number, "a fallback chain names the same address twice", path)
            continue
        destinations = tuple(Destination(tuple(Target(hop, default_route) for hop in chain), fallback_after)
                             for chain in chains)
        rules.append(Rule(f"{name}:{number}", number, (alias,), (), destinations, source=path))
    return rules


def _cross_checks(c: _Checker, config: Config, rb: _RuleBuilder) -> None:
    seen: dict[str, str] = {}
    for rule in config.rules:
        for addr in rule.addresses:
            domain = addr.rsplit("@", 1)[1]
            if is_managed(config, domain) is None and not rule.source:
                c.error(rule.line, f"rule {rule.name}: {addr} is not in a managed domain (add its domain under domains:)")
            if addr in seen:
                c.error(rule.line, f"rule {rule.name}: {addr} is already matched by rule {seen[addr]} "
                                   f"(exact addresses must be unique)", rule.source)
            seen[addr] = rule.name
    routes_of: dict[str, tuple[str, int]] = {}
    for address, line in rb.target_lines:
        domain = address.rsplit("@", 1)[1]
        owner = is_managed(config, domain)
        if owner is not None:
            c.error(line, f"destination {address} is in the managed domain {owner}: that would loop "
                          f"(if it is a subdomain handled elsewhere, add it to subdomain_exclude)")
        if config.srs and (domain == config.srs.domain):
            c.error(line, f"destination {address} is in the SRS domain {config.srs.domain}")
    # A destination address reaches the MTA once; it can carry only one route.
    for rule in config.all_rules():
        for dest in rule.destinations:
            for target in dest.chain:
                previous = routes_of.setdefault(target.address, (target.route, rule.line))
                if previous[0] != target.route:
                    c.error(rule.line, f"rule {rule.name}: {target.address} uses route {target.route} here but "
                                       f"{previous[0]} at line {previous[1]}; one address, one route", rule.source)
    if config.srs and config.srs.domain in config.domains:
        c.error(c.srs_domain_line, f"the SRS domain {config.srs.domain} must not also be a managed domain")
    if config.submission is None:
        for rule in config.all_rules():
            if rule.senders:
                c.error(rule.line, f"rule {rule.name}: senders needs a submission: section "
                                   f"(the sender login map is served from there)")
