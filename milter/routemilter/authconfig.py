"""The `auth:` section of routemilter.yaml: inbound authentication and reputation policy.

Parsed with config.py's checker (same file:line errors); kept in its own module so
the routing config stays readable. Example::

    auth:
      authserv_id: mx.family.example   # names this server in Authentication-Results (default: server_name)
      dns_server: 127.0.0.1:53         # default: the system resolver (/etc/resolv.conf)
      dns_timeout: 5                   # seconds for the whole of one lookup
      on_dns_error: tempfail           # or accept: forward with a temperror result
      arc: true                        # ARC-seal forwards with the dkim: RSA key
      trusted_networks: [192.0.2.25/32] # backup MX, own applications: results recorded, never refused
      arc_trusted_sealers: [lists.example.org]  # their valid ARC seal overrides a DMARC p=reject failure
      dmarc_reject: refuse             # refuse | accept   (p=reject senders that fail DMARC)
      spf_fail: accept                 # refuse | accept   (SPF -all failures)
      spam_header: X-Spam-Flag         # a verdict header written by rspamd/SpamAssassin before us
      spam_pattern: "^\\s*yes"         # RE2, case-insensitive, on that header's value
      spam_action: refuse              # refuse | discard | accept
      rate_limit: {messages: 100, seconds: 3600, per: sender-destination}
      from_rewrite: never              # never | dmarc (senders publishing p=quarantine/reject) | always
                                       # | dmarc-bounce (only re-sends a copy a destination refused for DMARC)
      domains:                         # per managed domain, any policy key above
        kid.family.example: {spf_fail: refuse}
      rules:                           # per rule name (wins over the domain)
        shop-aliases: {spam_action: discard}
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import re2

if TYPE_CHECKING:
    from .config import Config
    from .config.yamlcheck import Checker

#: The libraries auth: needs beyond routemilter's own (the `auth` extra in pyproject.toml).
AUTH_MODULES = ("spf", "dmarc", "authres")

#: Keys that may be set globally and overridden per domain or per rule.
POLICY_KEYS = {"dmarc_reject", "spf_fail", "spam_header", "spam_pattern", "spam_action",
               "rate_limit", "from_rewrite"}
GLOBAL_KEYS = {"authserv_id", "dns_server", "dns_timeout", "on_dns_error", "arc", "domains", "rules",
               "trusted_networks", "arc_trusted_sealers"}
_CHOICES = {
    "dmarc_reject": ("refuse", "accept"),
    "spf_fail": ("refuse", "accept"),
    "spam_action": ("refuse", "discard", "accept"),
    "from_rewrite": ("never", "dmarc", "always", "dmarc-bounce"),
}
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,100}$")




@dataclass(frozen=True, slots=True)
class RateLimit:
    messages: int
    seconds: int
    per: str = "destination"  # or "sender-destination"


@dataclass(frozen=True, slots=True)
class AuthRules:
    """What to do with a routed recipient's mail; the strictest of a message's recipients wins."""

    dmarc_reject: str = "refuse"
    spf_fail: str = "accept"
    spam_header: str | None = None
    spam_pattern: str = r"^\s*yes"
    spam_action: str = "refuse"
    rate_limit: RateLimit | None = None
    from_rewrite: str = "never"


@dataclass(frozen=True, slots=True)
class AuthSettings:
    authserv_id: str
    dns_server: tuple[str, int] | None = None
    dns_timeout: float = 5.0
    on_dns_error: str = "tempfail"  # or "accept"
    arc: bool = True
    # checked and sealed, never refused (backup MX, own apps)
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    arc_trusted_sealers: tuple[str, ...] = ()  # an ARC pass sealed by these overrides a DMARC reject
    default: AuthRules = field(default_factory=AuthRules)
    domains: dict[str, AuthRules] = field(default_factory=dict)
    rules: dict[str, AuthRules] = field(default_factory=dict)
    #: (section, name) -> line of each override, for check_references' errors
    lines: dict[tuple[str, str], int] = field(default_factory=dict, compare=False, repr=False)

    def rules_for(self, domain: str | None, rule: str | None) -> AuthRules:
        if rule is not None and rule in self.rules:
            return self.rules[rule]
        if domain is not None and domain in self.domains:
            return self.domains[domain]
        return self.default


def missing_modules() -> list[str]:
    """The auth: libraries that are not installed (found without importing them)."""
    return [name for name in AUTH_MODULES if importlib.util.find_spec(name) is None]


def parse_auth(c: Checker, raw: Any, line: int, server_name: str) -> AuthSettings | None:
    """Build AuthSettings from the YAML `auth:` mapping; problems go to checker `c`."""
    if raw is None:
        return None
    missing = missing_modules()
    if missing:
        c.error(line, f"auth: needs the optional 'auth' extra, which is not installed (no module "
                      f"{', '.join(missing)}): pip install 'routemilter[auth]'")
    m = c.mapping(raw, "auth", line, GLOBAL_KEYS | POLICY_KEYS)
    lines: dict[tuple[str, str], int] = {}  # (section, name) -> line, for check_references
    authserv_id = m.get("authserv_id", server_name)
    if not isinstance(authserv_id, str) or not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", authserv_id):
        c.error(c.line_of(m, "authserv_id"), "auth.authserv_id must be a host name")
        authserv_id = server_name
    server = None
    if "dns_server" in m:
        server = _dns_server(c, m["dns_server"], c.line_of(m, "dns_server"))
    timeout = m.get("dns_timeout", 5)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0.1 <= timeout <= 60:
        c.error(c.line_of(m, "dns_timeout"), "auth.dns_timeout must be a number of seconds from 0.1 to 60")
        timeout = 5
    on_error = m.get("on_dns_error", "tempfail")
    if on_error not in ("tempfail", "accept"):
        c.error(c.line_of(m, "on_dns_error"), "auth.on_dns_error must be tempfail or accept")
        on_error = "tempfail"
    arc = m.get("arc", True)
    if not isinstance(arc, bool):
        c.error(c.line_of(m, "arc"), "auth.arc must be true or false")
        arc = True
    trusted = []
    for text, tline in c.string_list(m.get("trusted_networks"), "auth.trusted_networks",
                                     c.line_of(m, "trusted_networks")):
        try:
            trusted.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            c.error(tline, f"auth.trusted_networks: {text!r} is not an IP network like 192.0.2.0/24")
    sealers = []
    for text, sline in c.string_list(m.get("arc_trusted_sealers"), "auth.arc_trusted_sealers",
                                     c.line_of(m, "arc_trusted_sealers")):
        if not re.fullmatch(r"(?=.{1,253}$)([A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}", text.rstrip(".")):
            c.error(sline, f"auth.arc_trusted_sealers: {text!r} is not a domain name")
        else:
            sealers.append(text.rstrip(".").lower())
    default = _policy(c, m, "auth", AuthRules())
    overrides: dict[str, dict[str, AuthRules]] = {}
    for section in ("domains", "rules"):
        table: dict[str, AuthRules] = {}
        raw_section = m.get(section)
        if raw_section is None:
            overrides[section] = table
            continue
        if not isinstance(raw_section, dict):
            c.error(c.line_of(m, section), f"auth.{section} must map names to policy settings")
            overrides[section] = table
            continue
        for name, settings in raw_section.items():
            nline = c.line_of(raw_section, name)
            where = f"auth.{section}.{name}"
            sm = c.mapping(settings, where, nline, POLICY_KEYS)
            key = str(name).lower().rstrip(".") if section == "domains" else str(name)
            lines[(section, key)] = nline
            table[key] = _policy(c, sm, where, default)
        overrides[section] = table
    return AuthSettings(authserv_id, server, float(timeout), on_error, arc, tuple(trusted), tuple(sealers), default,
                        overrides["domains"], overrides["rules"], lines)


def check_references(c: Checker, settings: AuthSettings | None, config: Config, line: int) -> None:
    """Overrides must name managed domains and existing rules; ARC needs a DKIM RSA key."""
    if settings is None:
        return
    lines = settings.lines
    for domain in settings.domains:
        if domain not in config.domains:
            c.error(lines.get(("domains", domain), line), f"auth.domains: {domain} is not a managed domain")
    names = {rule.name for rule in config.rules} | {f"catch-all@{d}" for d in config.domains}
    for rule in settings.rules:
        if rule not in names:
            c.error(lines.get(("rules", rule), line), f"auth.rules: no rule is named {rule!r}")
    if settings.arc and config.dkim is None:
        c.error(line, "auth.arc needs a dkim: section (ARC seals with the DKIM domain's RSA key); "
                      "add one or set arc: false")


def _dns_server(c: Checker, raw: Any, line: int) -> tuple[str, int] | None:
    if not isinstance(raw, str):
        c.error(line, "auth.dns_server must be an IP address, optionally with :port")
        return None
    match = re.fullmatch(r"\[?([0-9A-Fa-f:.]+?)\]?(?::(\d{1,5}))?", raw.strip())

    try:
        host = match.group(1) if match else raw
        if match and ":" in host and not raw.startswith("["):
            host, port = raw, None  # a bare IPv6 address: no port
        else:
            port = match.group(2) if match else None
        ipaddress.ip_address(host)
        port_n = int(port) if port else 53
        if not 1 <= port_n <= 65535:
            raise ValueError
    except ValueError:
        c.error(line, "auth.dns_server must be an IP address, optionally with :port "
                      "(127.0.0.1:5353, [::1]:53)")
        return None
    return host, port_n


def _policy(c: Checker, m: dict[Any, Any], where: str, base: AuthRules) -> AuthRules:
    changes: dict[str, Any] = {}
    for key, choices in _CHOICES.items():
        if key in m:
            value = m[key]
            if value not in choices:
                c.error(c.line_of(m, key), f"{where}.{key} must be one of {', '.join(choices)}")
            else:
                changes[key] = value
    if "spam_header" in m:
        value = m["spam_header"]
        if value is None:
            changes["spam_header"] = None
        elif not isinstance(value, str) or not _HEADER_NAME.match(value):
            c.error(c.line_of(m, "spam_header"), f"{where}.spam_header must be a header field name")
        else:
            changes["spam_header"] = value
    if "spam_pattern" in m:
        value = m["spam_pattern"]
        try:
            if not isinstance(value, str) or not value:
                raise ValueError("must be text")
            re2.compile(value)
            changes["spam_pattern"] = value
        except (ValueError, re2.error) as exc:
            c.error(c.line_of(m, "spam_pattern"), f"{where}.spam_pattern: not a valid RE2 pattern ({exc})")
    if "rate_limit" in m:
        value = m["rate_limit"]
        rline = c.line_of(m, "rate_limit")
        if value is None or value is False:
            changes["rate_limit"] = None
        else:
            r = c.mapping(value, f"{where}.rate_limit", rline, {"messages", "seconds", "per"})
            messages: Any = r.get("messages")
            seconds: Any = r.get("seconds", 3600)
            per: Any = r.get("per", "destination")
            ok = True
            for name, number in (("messages", messages), ("seconds", seconds)):
                if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 10**7:
                    c.error(rline, f"{where}.rate_limit.{name} must be a whole number from 1 to 10000000")
                    ok = False
            if per not in ("destination", "sender-destination"):
                c.error(rline, f"{where}.rate_limit.per must be destination or sender-destination")
                ok = False
            if ok:
                changes["rate_limit"] = RateLimit(messages, seconds, per)
    return replace(base, **changes)
