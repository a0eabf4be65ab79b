"""The routing part of the config: managed domains, rules, and alias files.

`domains:` and `rules:` in the YAML and each line of an alias file become Rule
objects (model.py); RuleBuilder builds the part they share (destinations with
their fallback chains and routes, refusals, the sender logins).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import re2

from ..addresses import AddressError, parse
from .model import DEFAULT_FALLBACK_AFTER, Destination, Domain, Reply, Route, Rule, Target, default, managed_domain
from .yamlcheck import Checker, Map

_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
# A SASL login as Postfix compares it: its sender login table separates owners by
# commas or white space, so a login holds neither.
_LOGIN = re.compile(r"[^\s,\x00-\x1f\x7f]{1,255}")


class RuleBuilder:
    """Builds Rule objects, shared by `rules:` and each domain's catch_all."""

    ACTION_KEYS: ClassVar[set[str]] = {"to", "refuse", "discard", "keep", "senders"}

    def __init__(self, c: Checker, routes: dict[str, Route], default_route: str,
                 fallback_after: int | None = DEFAULT_FALLBACK_AFTER):
        self.c = c
        self.routes = routes
        self.default_route = default_route
        self.fallback_after = fallback_after
        self.target_lines: list[tuple[str, int]] = []  # for the loop check

    def build(self, m: Map, name: str, line: int, addresses: Iterable[str] = (),
              patterns: Iterable[str] = ()) -> Rule:
        c = self.c
        destinations = tuple(self._destinations(m.get("to"), c.line_of(m, "to"), name))
        refuse = self._reply(m["refuse"], c.line_of(m, "refuse"), name) if "refuse" in m else None
        discard = m.get("discard", default(Rule, "discard"))
        keep = m.get("keep", default(Rule, "keep"))
        for flag, value in (("discard", discard), ("keep", keep)):
            if not isinstance(value, bool):
                c.error(c.line_of(m, flag), f"rule {name}: {flag} must be true or false")
        chosen = [k for k, on in (("to", bool(destinations) or "to" in m), ("refuse", "refuse" in m),
                                  ("discard", discard)) if on]
        if len(chosen) != 1 and not (keep and not chosen):
            c.error(line, f"rule {name}: give exactly one of to, refuse, discard (or keep alone); "
                          f"found {chosen or 'none'}")
        if keep and ("refuse" in m or discard):
            c.error(line, f"rule {name}: keep cannot be combined with refuse or discard")
        return Rule(name, line, tuple(addresses), tuple(patterns), destinations, refuse, bool(discard),
                    bool(keep), senders=self._senders(m, name))

    def _destinations(self, raw: Any, line: int, rule: str) -> Iterator[Destination]:
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
                after = self.c.duration(d["fallback_after"], aline, f"rule {rule}: fallback_after")
                if not d.get("fallback"):
                    self.c.error(aline, f"rule {rule}: fallback_after without fallback: there is no next address")
            primary = self._target(d.get("address"), d.get("route"), self.c.line_of(d, "address"), rule)
            chain = [primary] if primary else []
            fallback = d.get("fallback") or []
            if not isinstance(fallback, list):
                fallback = [fallback]
            for j, fb in enumerate(fallback):
                if isinstance(d.get("fallback"), list):
                    fline = self.c.line_of(d.get("fallback"), j)
                else:
                    fline = self.c.line_of(d, "fallback")
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
            self.c.error(line, f"rule {rule}: refuse status {status!r} must look like {str(code)[0]}.7.1 "
                               f"and match the code's class")
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

    def _senders(self, m: Map, name: str) -> tuple[str, ...]:
        c = self.c
        logins: list[str] = []
        for login, lline in c.string_list(m.get("senders"), f"rule {name} senders", c.line_of(m, "senders")):
            if not _LOGIN.fullmatch(login):
                c.error(lline, f"rule {name}: sender login {login!r} must be 1 to 255 characters without "
                               f"spaces, commas or control characters")
            elif login.lower() not in (x.lower() for x in logins):
                logins.append(login)
        return tuple(logins)


def domains(c: Checker, raw: Any, line: int, rb: RuleBuilder) -> dict[str, Domain]:
    if raw is None:
        c.error(line or 1, "domains: at least one managed domain is required")
        return {}
    if not isinstance(raw, dict) or not raw:
        c.error(line, "domains must map domain names to their settings")
        return {}
    result: dict[str, Domain] = {}
    for name, settings in raw.items():
        dline = c.line_of(raw, name)
        domain = c.domain_name(name, dline, "domain")
        if domain is None:
            continue
        if domain in result:
            c.error(dline, f"domain {domain} is listed twice")
        d = c.mapping(settings, f"domain {domain}", dline,
                      {"plus_delimiters", "subdomain_addressing", "subdomain_exclude", "catch_all"})
        delims = d.get("plus_delimiters", default(Domain, "plus_delimiters"))
        if delims is None:
            delims = ""
        if not isinstance(delims, str) or any(ch.isalnum() or ch in "@. \"" for ch in delims):
            c.error(c.line_of(d, "plus_delimiters"),
                    "plus_delimiters must be punctuation characters like \"+\" or \"+-\"")
            delims = ""
        sub = d.get("subdomain_addressing", default(Domain, "subdomain_addressing"))
        if not isinstance(sub, bool):
            c.error(c.line_of(d, "subdomain_addressing"), "subdomain_addressing must be true or false")
            sub = False
        exclude = set()
        for label, eline in c.string_list(d.get("subdomain_exclude"), "subdomain_exclude",
                                          c.line_of(d, "subdomain_exclude")):
            if not re.fullmatch(r"[a-z0-9-]{1,63}", label.lower()):
                c.error(eline, f"subdomain_exclude: {label!r} must be a single label, like imx")
            exclude.add(label.lower())
        catch_all = None
        if "catch_all" in d:
            cline = c.line_of(d, "catch_all")
            ca = c.mapping(d["catch_all"], f"domain {domain} catch_all", cline, RuleBuilder.ACTION_KEYS)
            catch_all = rb.build(ca, f"catch-all@{domain}", cline)
        result[domain] = Domain(domain, dline, delims, sub, frozenset(exclude), catch_all)
    return result


def rules(c: Checker, raw: Any, line: int, rb: RuleBuilder) -> list[Rule]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        c.error(line, "rules must be a list")
        return []
    result = []
    names = set()
    for i, item in enumerate(raw):
        rline = c.line_of(raw, i)
        m = c.mapping(item, "a rule", rline, {"name", "addresses", "patterns"} | RuleBuilder.ACTION_KEYS)
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
        result.append(rb.build(m, name, rline, addresses, patterns))
    return result


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


def alias_file(c: Checker, path: str, line: int, domains: dict[str, Domain], default_route: str,
               srs_domain: str | None, fallback_after: int | None = DEFAULT_FALLBACK_AFTER) -> list[Rule]:
    """A Postfix-style alias table, one alias per line:

        alias@domain   destination[>fallback>...][, destination...]

    Large alias sets live here rather than in the YAML: a plain split per line
    loads 100,000 aliases in about a second, where YAML takes many. Each line
    is an exact rule named FILE:LINE, delivering on the default route.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        c.error(line, f"cannot read alias file {path}: {exc.strerror or exc}")
        return []
    except UnicodeDecodeError as exc:
        c.error(line, f"cannot read alias file {path}: {exc}")
        return []
    name = os.path.basename(path)
    result = []
    owners: dict[str, str | None] = {}  # domain -> managing domain; few distinct domains

    def owner(address: str) -> str | None:
        domain = address[address.rindex("@") + 1:]
        if domain not in owners:
            owners[domain] = managed_domain(domains, domain) or ("srs" if domain == srs_domain else None)
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
        result.append(Rule(f"{name}:{number}", number, (alias,), (), destinations, source=path))
    return result
