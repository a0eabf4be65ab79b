"""Checks over the whole config, once every section is built: no address routed
twice or back into a managed domain, one route per address; and the file modes
of everything the config read."""

from __future__ import annotations

import os
import stat

from .model import Config, is_managed, managed_domain
from .yamlcheck import Checker


def cross_checks(c: Checker, config: Config, target_lines: list[tuple[str, int]]) -> None:
    """`target_lines`: (address, line) of every destination in the YAML (RuleBuilder)."""
    seen: dict[str, str] = {}
    for rule in config.rules:
        for addr in rule.addresses:
            domain = addr.rsplit("@", 1)[1]
            if not is_managed(config, domain) and not rule.source:
                c.error(rule.line, f"rule {rule.name}: {addr} is not in a managed domain "
                                   f"(add its domain under domains:)")
            if addr in seen:
                c.error(rule.line, f"rule {rule.name}: {addr} is already matched by rule {seen[addr]} "
                                   f"(exact addresses must be unique)", rule.source)
            seen[addr] = rule.name
    routes_of: dict[str, tuple[str, int]] = {}
    for address, line in target_lines:
        domain = address.rsplit("@", 1)[1]
        owner = managed_domain(config.domains, domain)
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
                rights = (("read", 4), ("write", 2), ("execute", 1))
                who.append("others can " + "/".join(v for v, b in rights if mode & b))
            elif mode & 0o002:
                who.append("others can write")
            fix = "640" if kind == "secrets" else "644"
            problems.append(f"{path}: mode {mode:04o}: {', '.join(who)}; it {what} (chmod {fix})")
        if info.st_uid not in (0, uid):
            problems.append(f"warning: {path}: owned by uid {info.st_uid}, neither root nor uid {uid} "
                            f"(us): that user can change it")
    return problems
