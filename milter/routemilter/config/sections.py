"""The settings sections of the config: milter, srs, bounces, submission, dkim, routes.

Each builder checks its mapping and returns the section's dataclass (model.py);
a value left out takes the dataclass default, and a wrong one is reported and
replaced by it, so the other checks still run.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from .. import sockets
from .model import (
    DIRECT,
    BounceSettings,
    DKIMKey,
    DKIMSettings,
    MilterSettings,
    Route,
    SRSSettings,
    SubmissionSettings,
    default,
)
from .yamlcheck import Checker, relative

_HOP = re.compile(r"^\[[A-Za-z0-9.:-]+\](:\d{1,5})?$|^[A-Za-z0-9.-]+(:\d{1,5})?$")
_ROUTE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")
_PUBLIC_SOCKET = re.compile(r"/(?:[^\0]*/)?public/[A-Za-z0-9_-]{1,60}")


def _socket(value: Any, inet6: bool = True) -> bool:
    """A listening socket libmilter-style: unix:/absolute/path or inet:PORT@HOST."""
    try:
        address = sockets.parse(value) if isinstance(value, str) else None
    except ValueError:
        return False
    return address is not None and not address.hostport and (inet6 or address.kind != "inet6")


def milter(c: Checker, raw: Any, line: int) -> MilterSettings:
    m = c.mapping(raw, "milter", line, {"socket", "socket_mode", "socket_group", "timeout", "max_hops"})
    d = MilterSettings()
    socket = m.get("socket", d.socket)
    if not _socket(socket):
        c.error(c.line_of(m, "socket"), "socket must be unix:/absolute/path or inet:PORT@HOST")
        socket = d.socket
    mode = m.get("socket_mode", f"{d.socket_mode:04o}")
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
        mode_int = d.socket_mode
    group = m.get("socket_group", d.socket_group)
    if group is not None and not isinstance(group, str):
        c.error(c.line_of(m, "socket_group"), "socket_group must be a group name")
        group = d.socket_group
    timeout = c.positive_int(m, "timeout", d.timeout)
    max_hops = c.positive_int(m, "max_hops", d.max_hops)
    return MilterSettings(socket, mode_int, group, timeout, max_hops)


def srs(c: Checker, raw: Any, line: int, config_path: str) -> SRSSettings | None:
    if raw is None:
        return None
    m = c.mapping(raw, "srs", line, {"domain", "secrets", "secrets_file", "hash_length", "max_age_days"})
    domain = c.domain_name(m.get("domain"), c.line_of(m, "domain"), "srs.domain")
    c.srs_domain_line = c.line_of(m, "domain")
    secrets: list[bytes] = []
    for secret, _sline in c.string_list(m.get("secrets"), "srs.secrets", c.line_of(m, "secrets")):
        secrets.append(secret.encode())
        c.inline_secrets = True
    if "secrets_file" in m and c.read_secrets:
        fname = m["secrets_file"]
        fline = c.line_of(m, "secrets_file")
        if not isinstance(fname, str):
            c.error(fline, "srs.secrets_file must be a path")
        else:
            fpath = relative(fname, config_path)
            c.files.append((fpath, "secrets"))
            try:
                lines = Path(fpath).read_text(encoding="utf-8").splitlines()
                stripped = (s.strip() for s in lines)
                secrets.extend(s.encode() for s in stripped if s and not s.startswith("#"))
            except OSError as exc:
                c.error(fline, f"cannot read srs.secrets_file {fpath}: {exc.strerror or exc}")
                return None
    for value in secrets:
        if len(value) < 16:
            c.error(line, "every SRS secret must be at least 16 characters")
            break
    if not secrets and c.read_secrets:
        c.error(line, "srs needs secrets or secrets_file")
    hash_length = c.positive_int(m, "hash_length", default(SRSSettings, "hash_length"), low=6, high=27)
    max_age = c.positive_int(m, "max_age_days", default(SRSSettings, "max_age_days"), low=1, high=365)
    return SRSSettings(domain or "invalid", tuple(secrets), hash_length, max_age)


def bounces(c: Checker, raw: Any, line: int, srs: SRSSettings | None) -> BounceSettings | None:
    if raw is None:
        return None
    m = c.mapping(raw, "bounces", line, {"socket", "reinject", "max_age_days", "max_size", "deferral_listen"})
    if srs is None:
        c.error(line, "bounces needs srs: bounce tokens live in the SRS domain and use its secrets")
    d = BounceSettings()
    socket = m.get("socket", d.socket)
    if not _socket(socket, inet6=False):
        c.error(c.line_of(m, "socket"), "bounces.socket must be unix:/absolute/path or inet:PORT@HOST")
        socket = d.socket
    reinject = m.get("reinject", d.reinject)
    if not _reinject(reinject):
        c.error(c.line_of(m, "reinject"), "bounces.reinject must be unix:/var/spool/postfix/public/NAME "
                "(a socket in Postfix's public/ folder) or HOST:PORT of Postfix's re-injection smtpd")
        reinject = d.reinject
    max_age = c.positive_int(m, "max_age_days", srs.max_age_days if srs else d.max_age_days, low=1, high=365)
    max_size = c.positive_int(m, "max_size", d.max_size, low=1024 * 1024, high=1 << 31)
    listen = m.get("deferral_listen", d.deferral_listen)
    if not _loopback_hostport(listen):
        c.error(c.line_of(m, "deferral_listen"), "bounces.deferral_listen must be a loopback HOST:PORT, like "
                                                  "127.0.0.1:10027 (it accepts mail without authentication)")
        listen = d.deferral_listen
    return BounceSettings(socket, reinject, max_age, max_size, listen)


def _reinject(value: Any) -> bool:
    """HOST:PORT, or a unix socket in Postfix's public/ folder."""
    try:
        address = sockets.parse(value) if isinstance(value, str) else None
    except ValueError:
        return False
    if address is None or address.kind == "inet6":
        return False
    return address.hostport or bool(address.unix and _PUBLIC_SOCKET.fullmatch(address.path))


def _loopback_hostport(value: Any) -> bool:
    try:
        address = sockets.parse(value) if isinstance(value, str) else None
        return address is not None and address.hostport and ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False


def submission(c: Checker, raw: Any, line: int) -> SubmissionSettings | None:
    if raw is None:
        return None
    m = c.mapping(raw, "submission", line, {"socket", "trusted_networks"})
    d = SubmissionSettings()
    socket = m.get("socket", d.socket)
    if not _socket(socket, inet6=False):
        c.error(c.line_of(m, "socket"), "submission.socket must be unix:/absolute/path or inet:PORT@HOST")
        socket = d.socket
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for text, nline in c.string_list(m.get("trusted_networks"), "submission.trusted_networks",
                                     c.line_of(m, "trusted_networks")):
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as exc:
            c.error(nline, f"submission.trusted_networks: {text!r} is not a network like 192.0.2.0/24 ({exc})")
    return SubmissionSettings(socket, tuple(networks))


def dkim(c: Checker, raw: Any, line: int, config_path: str) -> DKIMSettings | None:
    if raw is None:
        return None
    m = c.mapping(raw, "dkim", line, {"domain", "keys"})
    domain = c.domain_name(m.get("domain"), c.line_of(m, "domain"), "dkim.domain")
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
        keys.append(DKIMKey(selector, relative(key_file, config_path)))
    return DKIMSettings(domain or "invalid", tuple(keys))


def routes(c: Checker, raw: Any, line: int) -> dict[str, Route]:
    result = {DIRECT: Route(DIRECT, (DIRECT,))}
    if raw is None:
        return result
    if not isinstance(raw, dict):
        c.error(line, "routes must map route names to lists of hops")
        return result
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
            c.error(rline, f"route {name}: 'mx' may only be the first hop "
                           f"(the MTA falls back to relays, not back to MX)")
        if name == DIRECT and hops != [DIRECT]:
            c.error(rline, "route mx is built in (the destination's own MX hosts) and cannot be redefined")
            continue
        result[name] = Route(name, tuple(hops))
    return result
