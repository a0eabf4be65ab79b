"""Checks over the whole config, once every section is built: no address routed
twice or back into a managed domain, one route per address, references between
sections."""

from __future__ import annotations

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
