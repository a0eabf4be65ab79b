"""`postfix-config` and `sendmail-config`: the MTA side, generated from the YAML.

The milter decides *where* mail goes; the MTA decides *how* it gets there.
Each route (a chain of hops) becomes an MTA transport that tries the hops in
order with the MTA's own fallback mechanism, so queueing, retries and TLS stay
with the MTA.
"""

from __future__ import annotations

import os

from .config import DIRECT, Config, Route, load

QUEUE_DIRECTORY = "/var/spool/postfix"


def transport_name(route: Route) -> str:
    return f"rm_{route.name}".replace("-", "_")


def used_routes(config: Config) -> dict[str, Route]:
    names = {config.default_route}
    for rule in list(config.rules) + [d.catch_all for d in config.domains.values() if d.catch_all]:
        for dest in rule.destinations:
            names.update(target.route for target in dest.chain)
    return {name: config.routes[name] for name in sorted(names)}


def transport_entries(config: Config) -> list[tuple[str, str]]:
    """(recipient address, transport:nexthop) for every destination not on plain MX delivery."""
    entries: dict[str, str] = {}
    for rule in list(config.rules) + [d.catch_all for d in config.domains.values() if d.catch_all]:
        for dest in rule.destinations:
            for target in dest.chain:
                route = config.routes[target.route]
                if route.hops == (DIRECT,):
                    continue
                nexthop = "" if route.hops[0] == DIRECT else route.hops[0]
                entries[target.address] = f"{transport_name(route)}:{nexthop}"
    return sorted(entries.items())


def milter_socket_for_postfix(socket: str) -> str:
    """Postfix's chrooted smtpd/cleanup run in the queue directory: a socket
    under it is named relative to it and works chrooted or not."""
    kind, _, path = socket.partition(":")
    if kind in ("unix", "local") and path.startswith(QUEUE_DIRECTORY + "/"):
        return f"unix:{os.path.relpath(path, QUEUE_DIRECTORY)}"
    if kind == "inet":
        port, _, host = path.partition("@")
        return f"inet:{host or '127.0.0.1'}:{port}"
    return f"unix:{path}"


def postfix_main(config: Config, transport_file: str = "/etc/postfix/routemilter_transport") -> list[tuple[str, str, str]]:
    """main.cf settings as (name, value, why)."""
    socket = milter_socket_for_postfix(config.milter.socket)
    relay_domains = list(config.domains) + ([config.srs.domain] if config.srs else [])
    settings = [
        ("smtpd_milters", f"{{ {socket}, default_action=tempfail }}",
         "Pass every SMTP and locally generated message (bounces included) through routemilter."),
        ("non_smtpd_milters", f"{{ {socket}, default_action=tempfail }}", ""),
        ("milter_protocol", "6", ""),
        ("milter_default_action", "tempfail",
         "Unreachable or failing milter: 4xx, the client keeps the message (never accept unrouted)."),
        ("internal_mail_filter_classes", "bounce", "Let routemilter see Postfix's own bounces."),
        ("relay_domains", ", ".join(relay_domains),
         "Mail for these domains is accepted and rewritten by routemilter; nothing else is relayed."),
        ("disable_mime_output_conversion", "yes",
         "Do not re-encode 8-bit bodies on the way out: that would break the DKIM signature."),
    ]
    if transport_entries(config):
        settings.append(("transport_maps", f"hash:{transport_file}", "Destinations that use a route other than plain MX."))
    return settings


def postfix_master(config: Config) -> list[str]:
    """master.cf lines: one smtp transport per route, with the MTA's relay fallback."""
    lines = []
    for route in used_routes(config).values():
        if route.hops == (DIRECT,):
            continue
        first = "the destination's MX hosts" if route.hops[0] == DIRECT else route.hops[0]
        fallback = list(route.hops[1:])
        lines.append(f"# route {route.name}: {first}, then {', then '.join(fallback) or 'nothing else'}")
        lines.append(f"{transport_name(route)} unix - - n - - smtp")
        lines.append(f"  -o syslog_name=postfix/{transport_name(route)}")
        if fallback:
            lines.append(f"  -o smtp_fallback_relay={','.join(fallback)}")
    return lines


def postfix_config(config: Config, transport_file: str = "/etc/postfix/routemilter_transport") -> str:
    out = ["# ---- main.cf (routemilter) ----"]
    for name, value, why in postfix_main(config, transport_file):
        if why:
            out.append(f"# {why}")
        out.append(f"{name} = {value}")
    if milter_socket_for_postfix(config.milter.socket).startswith("unix:/"):
        out.append(f"# NOTE: Debian chroots smtpd and cleanup in {QUEUE_DIRECTORY}; put the socket under it")
        out.append(f"# (milter.socket: unix:{QUEUE_DIRECTORY}/routemilter/routemilter.sock) or set the")
        out.append("# chroot column of smtp, cleanup and pickup to n in master.cf.")
    out += ["", "# ---- master.cf (routemilter): one transport per route with relay fallback ----"]
    out += postfix_master(config)
    entries = transport_entries(config)
    if entries:
        out += ["", f"# ---- {transport_file} (then: postmap {transport_file}) ----"]
        width = max(len(address) for address, _ in entries)
        out += [f"{address.ljust(width)} {value}" for address, value in entries]
    return "\n".join(out) + "\n"


def sendmail_config(config: Config) -> str:
    kind, _, path = config.milter.socket.partition(":")
    socket = f"unix:{path}" if kind in ("unix", "local") else config.milter.socket.replace("inet:", "inet:")
    out = [
        "dnl ---- sendmail.mc (routemilter); then: make -C /etc/mail && systemctl reload sendmail ----",
        "dnl F=T: tempfail when the milter is unreachable, so mail is never accepted unrouted.",
        f"INPUT_MAIL_FILTER(`routemilter', `S={socket}, F=T, T=C:30s;S:1m;R:1m;E:5m')dnl",
        "define(`confMILTER_MACROS_EOM', `{msg_id}, i')dnl",
    ]
    default = config.routes[config.default_route]
    relays = [h for h in default.hops if h != DIRECT]
    if relays:
        out.append("dnl Sendmail has one fallback smarthost for all mail: the default route's first relay.")
        out.append(f"define(`confFALLBACK_SMARTHOST', `{relays[0]}')dnl")
    others = [r for r in used_routes(config).values() if r.name != default.name and r.hops != (DIRECT,)]
    if others:
        out.append("dnl Per-address routes are a Postfix feature; with Sendmail these routes use the")
        out.append("dnl default route: " + ", ".join(r.name for r in others))
    relay_domains = list(config.domains) + ([config.srs.domain] if config.srs else [])
    out += ["", "dnl ---- /etc/mail/relay-domains ----"] + relay_domains
    return "\n".join(out) + "\n"


def cmd_postfix(args) -> int:
    print(postfix_config(load(args.config, read_secrets=False)), end="")
    return 0


def cmd_sendmail(args) -> int:
    print(sendmail_config(load(args.config, read_secrets=False)), end="")
    return 0
