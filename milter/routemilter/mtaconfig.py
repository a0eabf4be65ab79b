"""`postfix-config` and `sendmail-config`: the MTA side, generated from the YAML.

The milter decides *where* mail goes; the MTA decides *how* it gets there.
Each route (a chain of hops) becomes an MTA transport that tries the hops in
order with the MTA's own fallback mechanism, so queueing, retries and TLS stay
with the MTA.
"""

from __future__ import annotations

import os

from . import sockets
from .config import DIRECT, BounceSettings, Config, Route, SubmissionSettings

QUEUE_DIRECTORY = "/var/spool/postfix"


def transport_name(route: Route) -> str:
    return f"rm_{route.name}".replace("-", "_")


def used_routes(config: Config) -> dict[str, Route]:
    names = {config.default_route}
    for rule in config.all_rules():
        for dest in rule.destinations:
            names.update(target.route for target in dest.chain)
    return {name: config.routes[name] for name in sorted(names)}


DEFERRAL_PREFIX = "rmd_"


def deferral_transport_name(route: Route) -> str:
    return f"{DEFERRAL_PREFIX}{route.name}".replace("-", "_")


def deferral_routes(config: Config) -> dict[str, set[str]]:
    """Route name -> the addresses that need the route's deferral transport: every address
    that has a next address in some chain whose fallback_after is not `never`. (An
    address reaches the MTA once, so it is that wherever else it appears; the listener
    looks up the message's own chain and answers "keep retrying" where it is the last.)"""
    if not deferrals_enabled(config):
        return {}
    out: dict[str, set[str]] = {}
    for rule in config.all_rules():
        for dest in rule.destinations:
            if dest.fallback_after is None:
                continue
            for target in dest.chain[:-1]:
                out.setdefault(target.route, set()).add(target.address)
    return out


def deferrals_enabled(config: Config) -> bool:
    """Deferral-driven fallback needs the bounce machinery: tokens (srs) and re-injection."""
    return bool(config.bounces and config.srs)


def transport_entries(config: Config) -> list[tuple[str, str]]:
    """(recipient address, transport:nexthop) for every destination not on plain MX
    delivery, and for chain addresses whose deferral hands over to routemilter."""
    entries: dict[str, str] = {}
    deferring = deferral_routes(config)
    for rule in config.all_rules():
        for dest in rule.destinations:
            for target in dest.chain:
                route = config.routes[target.route]
                nexthop = "" if route.hops[0] == DIRECT else route.hops[0]
                if target.address in deferring.get(route.name, ()):
                    entries[target.address] = f"{deferral_transport_name(route)}:{nexthop}"
                    continue
                if route.hops == (DIRECT,):
                    continue
                entries[target.address] = f"{transport_name(route)}:{nexthop}"
    if config.bounces and config.srs:
        entries[config.srs.domain] = f"{BOUNCE_TRANSPORT}:{bounce_nexthop(config.bounces)}"
    return sorted(entries.items())


BOUNCE_TRANSPORT = "rm_bounce"


def bounce_nexthop(bounces: BounceSettings) -> str:
    """LMTP next hop of routemilter's bounce listener (bounces.socket)."""
    address = sockets.parse(bounces.socket)
    if address.unix:
        return f"unix:{address.path}"
    return f"inet:[{address.host or '127.0.0.1'}]:{address.port}"


def bounce_main(config: Config) -> list[tuple[str, str, str]]:
    """main.cf settings for address-level fallback through bounces."""
    if not (config.bounces and config.srs):
        return []
    return [
        ("bounce_size_limit", "10240000",
         "Return the whole message in bounces (default 50000 bytes: larger messages come back as "
         "headers only, and routemilter cannot forward them to the next fallback address)."),
        (f"{BOUNCE_TRANSPORT}_destination_recipient_limit", "1",
         "One bounce token per LMTP delivery to routemilter: a retry never repeats another's work."),
    ]


def milter_socket_for_postfix(socket: str) -> str:
    """Postfix's chrooted smtpd/cleanup run in the queue directory: a socket
    under it is named relative to it and works chrooted or not."""
    address = sockets.parse(socket)
    if address.unix and address.path.startswith(QUEUE_DIRECTORY + "/"):
        return f"unix:{os.path.relpath(address.path, QUEUE_DIRECTORY)}"
    if address.kind == "inet":
        return f"inet:{address.host or '127.0.0.1'}:{address.port}"
    return f"unix:{address.path}"


# Postfix 3.x default of parent_domain_matches_subdomains, without relay_domains.
PARENT_MATCHES_WITHOUT_RELAY_DOMAINS = ("debug_peer_list, fast_flush_domains, mynetworks, "
                                        "permit_mx_backup_networks, qmqpd_authorized_clients, "
                                        "smtpd_access_maps")


def postfix_relay_domains(config: Config) -> list[str]:
    """relay_domains entries: exactly what routemilter manages, nothing deeper
    (matched exactly, see parent_domain_matches_subdomains): each managed domain;
    for subdomain addressing `!label.domain` for its subdomain_exclude (first
    match wins), then an inline regexp table for exactly one more label (a
    `.domain` entry would match every depth: x.kid.domain, x.imx.domain, names
    below the SRS domain); the SRS domain. `$$` is main.cf's literal `$`."""
    out = []
    one_label = []
    for name, domain in config.domains.items():
        out.append(name)
        if domain.subdomain_addressing:
            out += [f"!{label}.{name}" for label in sorted(domain.subdomain_exclude)]
            one_label.append(name.replace(".", "\\."))
    if config.srs:
        out.append(config.srs.domain)
    if one_label:
        out.append("regexp:{{/^[^.]+\\.(" + "|".join(one_label) + ")$$/ OK}}")
    return out


def postfix_main(config: Config,
                 transport_file: str = "/etc/postfix/routemilter_transport") -> list[tuple[str, str, str]]:
    """main.cf settings as (name, value, why)."""
    socket = milter_socket_for_postfix(config.milter.socket)
    settings = [
        ("smtpd_milters", f"{{ {socket}, default_action=tempfail }}",
         "Pass every SMTP and locally generated message (bounces included) through routemilter."),
        ("non_smtpd_milters", f"{{ {socket}, default_action=tempfail }}", ""),
        ("milter_protocol", "6", ""),
        ("milter_default_action", "tempfail",
         "Unreachable or failing milter: 4xx, the client keeps the message (never accept unrouted)."),
        ("internal_mail_filter_classes", "bounce", "Let routemilter see Postfix's own bounces."),
        ("relay_domains", ", ".join(postfix_relay_domains(config)),
         "Mail for these domains is accepted and rewritten by routemilter; nothing else is relayed."),
        ("parent_domain_matches_subdomains", PARENT_MATCHES_WITHOUT_RELAY_DOMAINS,
         "Postfix's default minus relay_domains: relay_domains = example.net must not also relay\n"
         "# for anything.example.net (routemilter refuses such mail); one label below a domain is\n"
         "# matched (the regexp table) only where subdomain_addressing makes those names ours."),
        ("disable_mime_output_conversion", "yes",
         "Do not re-encode 8-bit bodies on the way out: that would break the DKIM signature."),
        ("smtp_line_length_limit", "0",
         "Send lines longer than 998 characters as received: Postfix would break them after\n"
         "# routemilter signed the message, and the DKIM signature would fail at the destination."),
        ("lmtp_line_length_limit", "0",
         "The same for bounces delivered to routemilter over LMTP: it checks its own signature on the\n"
         "# returned copy before trying the next fallback address."),
    ]
    settings += bounce_main(config)
    for name in sorted(deferral_routes(config)):
        settings.append((f"{deferral_transport_name(config.routes[name])}_destination_recipient_limit", "1",
                         "One recipient per delivery on this transport: routemilter's deferral listener\n"
                         "# decides per destination (not yet, or the next address) and SMTP has one reply to DATA."))
    settings += submission_main(config)
    if transport_entries(config):
        settings.append(("transport_maps", f"hash:{transport_file}",
                         "Destinations that use a route other than plain MX."))
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
    return lines + deferral_master(config) + bounce_master(config) + submission_master(config)


def deferral_nexthop(bounces: BounceSettings) -> str:
    address = sockets.parse(bounces.deferral_listen)
    return f"[{address.host}]:{address.port}"


def deferral_master(config: Config) -> list[str]:
    """One smtp transport per route used by chain addresses with fallback_after: the
    route's own hops first, then routemilter's deferral listener as the last
    smtp_fallback_relay. Postfix tries it in the same delivery attempt exactly when
    every hop before it answered 4xx or could not be reached (5xx bounces as before)."""
    lines: list[str] = []
    if config.bounces is None:  # no deferral routes either (deferrals_enabled)
        return lines
    for name in sorted(deferral_routes(config)):
        route = config.routes[name]
        transport = deferral_transport_name(route)
        first = "the destination's MX hosts" if route.hops[0] == DIRECT else route.hops[0]
        fallback = list(route.hops[1:]) + [deferral_nexthop(config.bounces)]
        lines += [
            f"# route {route.name} for addresses with a next address in their chain: {first}, then "
            + ", then ".join(fallback[:-1] + ["routemilter's deferral listener (fallback_after)"]),
            f"{transport} unix - - n - - smtp",
            f"  -o syslog_name=postfix/{transport}",
            f"  -o smtp_fallback_relay={','.join(fallback)}",
        ]
    return lines


def bounce_master(config: Config) -> list[str]:
    """The LMTP transport to routemilter's bounce handler and the loopback smtpd it
    re-injects fallback copies and final bounces through (no milters: the copy is
    already routed, SRS-rewritten and signed)."""
    if not (config.bounces and config.srs):
        return []
    reinject = config.bounces.reinject
    lines = [
        f"# bounces to {config.srs.domain}: over LMTP to routemilter (address-level fallback)",
        f"{BOUNCE_TRANSPORT} unix - - n - - lmtp",
        f"  -o syslog_name=postfix/{BOUNCE_TRANSPORT}",
    ]
    if sockets.parse(reinject).unix:
        # A unix socket in public/ (postfix:postdrop, mode 0710): only Postfix, root and the
        # postdrop group can connect. routemilter's user must be in group postdrop.
        return lines + [
            "# routemilter re-injects fallback copies and final bounces here, without milters:",
            f"# {QUEUE_DIRECTORY}/public/{os.path.basename(reinject)}, reachable only by Postfix, root and",
            "# group postdrop (add routemilter's user to it: usermod -a -G postdrop routemilter)",
            f"{os.path.basename(reinject)} unix n - n - - smtpd",
        ] + REINJECT_OPTIONS
    address = sockets.parse(reinject)
    listen = f"{address.host}:{address.port}"
    return lines + [
        "# routemilter re-injects fallback copies and final bounces here (keep it on loopback).",
        "# WARNING: any local user or container on loopback can relay through this listener",
        "# without the milter; prefer bounces.reinject: unix:/var/spool/postfix/public/rm_reinject",
        f"{listen} inet n - n - - smtpd",
    ] + REINJECT_OPTIONS


# The re-injection smtpd: no milters or address mappings (the copy is already routed,
# rewritten and signed), and only the daemon may use it (loopback, or the socket's group).
# smtpd names a unix-socket client localhost[127.0.0.1], and insists on a reject.
REINJECT_OPTIONS = [
    "  -o syslog_name=postfix/rm_reinject",
    "  -o smtpd_milters=",
    "  -o receive_override_options=no_milters,no_address_mappings,no_header_body_checks,no_unknown_recipient_checks",
    "  -o mynetworks=127.0.0.0/8",
    "  -o smtpd_client_restrictions=permit_mynetworks,reject",
    "  -o smtpd_helo_restrictions=",
    "  -o smtpd_sender_restrictions=",
    "  -o smtpd_relay_restrictions=permit_mynetworks,reject",
    "  -o smtpd_recipient_restrictions=permit_mynetworks,reject",
    "  -o smtpd_data_restrictions=",
    "  -o smtpd_end_of_data_restrictions=",
]


SENDER_MAP = "senders"  # the socketmap's table name (senders.py answers any name)
DOVECOT_AUTH = "private/auth"  # Dovecot's auth listener for Postfix, relative to the queue directory


def sender_login_map(submission: SubmissionSettings) -> str:
    """The smtpd_sender_login_maps table: routemilter's socketmap (submission.socket)."""
    kind, _, path = milter_socket_for_postfix(submission.socket).partition(":")
    return f"socketmap:{kind}:{path}:{SENDER_MAP}"


def submission_main(config: Config) -> list[tuple[str, str, str]]:
    """main.cf settings for our users' outgoing mail (senders.py)."""
    if config.submission is None:
        return []
    return [
        ("smtpd_sender_login_maps", sender_login_map(config.submission),
         "Who may send as which address: answered by routemilter from the rules' senders:\n"
         "# (plus-addresses, subdomain addresses, patterns and catch-alls as for incoming mail)."),
    ]


def submission_master(config: Config, sasl_path: str = DOVECOT_AUTH) -> list[str]:
    """The submission service (port 587): STARTTLS required, SASL through Dovecot's auth
    service, and a login may use only the MAIL FROM addresses it owns. smtpd_delay_reject=no
    answers that at MAIL FROM (553 5.7.1) instead of at the first RCPT TO."""
    if config.submission is None:
        return []
    return [
        "# submission (port 587) for your users: STARTTLS, then SASL (Dovecot), then only their own addresses",
        "submission inet n - n - - smtpd",
        "  -o syslog_name=postfix/submission",
        "  -o smtpd_tls_security_level=encrypt",
        "  -o smtpd_tls_auth_only=yes",
        "  -o smtpd_sasl_auth_enable=yes",
        "  -o smtpd_sasl_type=dovecot",
        f"  -o smtpd_sasl_path={sasl_path}",
        "  -o smtpd_delay_reject=no",
        "  -o smtpd_client_restrictions=",
        "  -o smtpd_helo_restrictions=",
        "  -o smtpd_sender_restrictions=reject_sender_login_mismatch,permit_sasl_authenticated,reject",
        "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
        "  -o smtpd_recipient_restrictions=",
        "  -o smtpd_reject_unlisted_recipient=no",
    ]


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


def _sendmail_host(hop: str) -> tuple[str, int | None]:
    """A route hop as Sendmail names a host ("[relay.example]" keeps its brackets:
    no MX lookup), and the hop's port if it names one."""
    host, port = hop, None
    if hop.startswith("["):
        close = hop.index("]")
        host, rest = hop[: close + 1], hop[close + 1 :]
        port = int(rest[1:]) if rest.startswith(":") else None
    elif ":" in hop:
        host, _, number = hop.rpartition(":")
        port = int(number)
    return host, port


def sendmail_milter_socket(socket: str) -> str:
    address = sockets.parse(socket)
    return f"unix:{address.path}" if address.unix else socket  # inet:port@host is the same in both


def sendmail_mc(config: Config) -> list[str]:
    """sendmail.mc lines (m4), to go before the MAILER() lines."""
    socket = sendmail_milter_socket(config.milter.socket)
    out = [
        "dnl F=T: tempfail when the milter is unreachable or fails, so mail is never accepted unrouted.",
        "dnl T=: connect 30s, each command 1m (send S, read R), end of message 5m (signing happens there).",
        f"INPUT_MAIL_FILTER(`routemilter', `S={socket}, F=T, T=C:30s;S:1m;R:1m;E:5m')dnl",
        "dnl routemilter logs the queue id $i: Sendmail sends it with MAIL FROM by default; at end",
        "dnl of message too. Keep the default {msg_id} (the double quotes protect the comma).",
        "define(`confMILTER_MACROS_EOM', ``{msg_id}, i'')dnl",
    ]
    if sockets.parse(socket).unix:
        out += [
            "dnl Sendmail refuses a milter socket below a group- or world-writable folder (/tmp,",
            "dnl /var/tmp): \"local socket name ... unsafe\", and will not even start if the socket",
            "dnl exists then. It connects as root, or as confRUN_AS_USER if you set one: then give",
            "dnl that user's group the socket (milter.socket_group).",
        ]
    default = config.routes[config.default_route]
    relays = [h for h in default.hops if h != DIRECT]
    if default.hops[0] != DIRECT:
        host, port = _sendmail_host(relays[0])
        out.append(f"dnl default route {default.name}: every message goes through {relays[0]} first")
        out.append(f"define(`SMART_HOST', `relay:{host}')dnl")
        if port not in (None, 25):
            out.append(f"define(`RELAY_MAILER_ARGS', `TCP $h {port}')dnl")
        relays = relays[1:]
    if relays:
        host, port = _sendmail_host(relays[0])
        out += [
            f"dnl default route {default.name}: one last try through {relays[0]} when the first hop's",
            "dnl hosts cannot be found or connected to (in the same attempt), or on a later queue run",
            "dnl when the host failed after connecting (dropped connection) and its status was kept.",
            "dnl Not when a reachable host answers 4xx to RCPT (such as 451 4.7.650 rate limiting): that",
            "dnl recipient waits in the queue for the next retry of the same host.",
            f"define(`confFALLBACK_SMARTHOST', `{host}')dnl",
            "dnl Keep host status between queue runs (Debian: DAEMON_HOSTSTATS=\"Yes\" in",
            "dnl /etc/mail/sendmail.conf sets the same); without it a host that drops connections is",
            "dnl retried for ever and the fallback smart host never used. Sendmail does not create the",
            "dnl folder and says nothing when it is missing: mkdir -m 0700 /var/lib/sendmail/host_status",
            "define(`confHOST_STATUS_DIRECTORY', `/var/lib/sendmail/host_status')dnl",
        ]
        if port not in (None, 25):
            out.append("dnl WARNING: Sendmail reaches the fallback smart host with the recipient's own mailer,")
            out.append(f"dnl so on that mailer's port (25), not on {port}.")
        if len(relays) > 1:
            out.append("dnl Sendmail has a single fallback smart host; not used: " + ", ".join(relays[1:]))
    others = [r for r in used_routes(config).values() if r.name != default.name and r.hops != (DIRECT,)]
    if others:
        out.append("dnl Per-address routes are a Postfix feature; with Sendmail these routes use the")
        out.append("dnl default route: " + ", ".join(r.name for r in others))
    if deferral_routes(config):
        out += [
            "dnl fallback_after (deferral-driven fallback) works with Postfix only. Sendmail has one",
            "dnl fallback smart host for all mail (confFALLBACK_SMARTHOST), tried only when a",
            "dnl destination's hosts cannot be found or connected to, never when a reachable host",
            "dnl answers 4xx (the article's 451 4.7.650), and reached on the recipient mailer's port 25,",
            "dnl where Sendmail itself listens: routemilter's deferral listener cannot be that hop. With",
            "dnl Sendmail a chain moves on when its address bounces: after confTO_QUEUERETURN (5 days by",
            "dnl default) for a destination that keeps deferring. To move on sooner, shorten it, e.g.",
            "dnl define(`confTO_QUEUERETURN', `1d')dnl   (it applies to all mail in the queue).",
        ]
    if config.bounces and config.srs and sockets.parse(config.bounces.reinject).unix:
        out += [
            "dnl WARNING: bounces.reinject is a unix socket, which only Postfix can serve: for Sendmail",
            "dnl set bounces.reinject: 127.0.0.1:PORT (a loopback listener without the milter; any local",
            "dnl user can relay through it) and run sendmail-config again. Bounces are not handled until then.",
        ]
    elif config.bounces and config.srs:
        reinject = sockets.parse(config.bounces.reinject)
        out += [
            f"dnl Bounces to {config.srs.domain}: Sendmail's own DSNs never pass through a milter, so the",
            f"dnl mailertable sends that domain to routemilter's bounce handler (mailer {SENDMAIL_BOUNCE_MAILER},",
            "dnl defined after the MAILER() lines), which re-injects fallback copies through this",
            "dnl loopback listener without the milter. If this is your .mc's first DAEMON_OPTIONS, add",
            "dnl DAEMON_OPTIONS(`Name=MTA') too: the first one replaces Sendmail's default listener.",
            "ifdef(`_MAILER_TABLE_', `', `FEATURE(`mailertable')')dnl",
            f"DAEMON_OPTIONS(`Port={reinject.port}, Addr={reinject.host}, Name=rm-reinject, InputMailFilters=')dnl",
        ]
    return out


SENDMAIL_BOUNCE_MAILER = "rmbounce"


def sendmail_mc_after(config: Config) -> list[str]:
    """sendmail.mc lines after the MAILER() lines: the LMTP mailer to routemilter's
    bounce handler (its rulesets come from MAILER(`smtp'))."""
    if not (config.bounces and config.srs):
        return []
    kind, _, path = config.bounces.socket.partition(":")
    if kind in ("unix", "local"):
        target = f"FILE {path}"
    else:
        port, _, host = path.partition("@")
        target = f"TCP {host or '127.0.0.1'} {port}"
    return [
        "MAILER_DEFINITIONS",
        f"M{SENDMAIL_BOUNCE_MAILER}, P=[IPC], F=mnqXz, S=EnvFromSMTP/HdrFromSMTP, R=EnvToSMTP, E=\\r\\n,"
        f" L=2040, T=DNS/RFC822/SMTP, A={target}",
    ]


def sendmail_mailertable(config: Config) -> list[tuple[str, str]]:
    """/etc/mail/mailertable entries."""
    if not (config.bounces and config.srs):
        return []
    return [(config.srs.domain, f"{SENDMAIL_BOUNCE_MAILER}:localhost")]


def sendmail_relay_domains(config: Config) -> list[str]:
    """/etc/mail/relay-domains (class R, subdomains included): the managed domains
    and the SRS domain bounces come back to."""
    return list(config.domains) + ([config.srs.domain] if config.srs else [])


def sendmail_config(config: Config) -> str:
    out = ["dnl ---- sendmail.mc (routemilter), before the MAILER() lines; then: make -C /etc/mail"
           " && systemctl reload sendmail ----"]
    out += sendmail_mc(config)
    after = sendmail_mc_after(config)
    if after:
        out += ["", "dnl ---- sendmail.mc (routemilter), after the MAILER() lines ----"] + after
    table = sendmail_mailertable(config)
    if table:
        out += ["", "dnl ---- /etc/mail/mailertable (then: make -C /etc/mail) ----"]
        out += [f"{domain} {value}" for domain, value in table]
    out += ["", "dnl ---- /etc/mail/relay-domains ----"] + sendmail_relay_domains(config)
    return "\n".join(out) + "\n"
