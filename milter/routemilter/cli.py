"""The `routemilter` command: one CLI, like postfix/postmap/opendkim."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TypedDict

from . import __version__, journal
from .config import DEFAULT_PATH, Config, ConfigError, Destination, format_duration, load
from .rules import Action, Decision, Router

Command = Callable[[argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    command: Command = args.func
    try:
        return command(args)
    except ConfigError as exc:
        # Under systemd (ExecStartPre, ExecReload) these lines are logged at err.
        err = journal.prefix(journal.ERR)
        print(f"{err}routemilter: config refused ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"{err}  {problem}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routemilter",
        description="Mail-routing milter: alias rules, fan-out, fallback chains, SRS and DKIM "
                    "for Postfix and Sendmail.",
    )
    parser.add_argument("--version", action="version", version=f"routemilter {__version__}")
    parser.add_argument("-c", "--config", default=DEFAULT_PATH,
                        help=f"config file (default: {DEFAULT_PATH})")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("check", help="validate the config and keys, and reach the state store if it is "
                                      "shared; exit 1 listing every problem")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("explain", help="show where addresses would be routed, and why; with --sender, "
                                       "whether a SASL login may send as them")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.add_argument("--sender", metavar="LOGIN",
                   help="say whether LOGIN may send as each ADDRESS (the rules' senders:), and why")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("run", help="run the milter daemon (systemd: Type=notify)")
    p.add_argument("--user", metavar="USER",
                   help="started as root: become USER (and its groups) once the sockets are open "
                        "and the keys read (systemd: use User= instead)")
    p.set_defaults(func=_lazy("daemon", "cmd_run"))

    p = sub.add_parser("postfix-config", help="print the main.cf, master.cf and transport snippets, "
                                              "or merge them into Postfix's config (--apply)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--commands", action="store_true",
                      help="print postconf commands that add to the site's existing settings (idempotent)")
    mode.add_argument("--apply", action="store_true",
                      help="run those commands and write the transport map; then reload Postfix")
    mode.add_argument("--remove", action="store_true",
                      help="take routemilter's entries and services out of Postfix's config again")
    p.add_argument("--config-directory", metavar="DIR",
                   help="Postfix config directory for --commands/--apply (default: postconf's)")
    p.set_defaults(func=_lazy("postconf", "cmd_postfix"))

    p = sub.add_parser("sendmail-config", help="print the sendmail.mc snippets, or merge them into "
                                               "/etc/mail (--apply)")
    p.add_argument("--apply", action="store_true",
                   help="add them to sendmail.mc, relay-domains and mailertable (idempotent); "
                        "then make -C /etc/mail and reload Sendmail")
    p.add_argument("--mail-dir", metavar="DIR", default="/etc/mail", help="Sendmail's folder (default /etc/mail)")
    p.set_defaults(func=_lazy("sendmailmerge", "cmd_sendmail"))

    p = sub.add_parser("token", help="decode and check a bounce token (a return address of a forward)")
    p.add_argument("address")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("trace", help="the whole story of a message from the daemon's and the MTA's logs")
    p.add_argument("query", help="a queue id, a Message-ID, or an email address (with --since/--until)")
    p.add_argument("--log", action="append", metavar="FILE",
                   help="the daemon's log file (repeatable; default: journalctl -u routemilter)")
    p.add_argument("--mta-log", action="append", metavar="FILE",
                   help="Postfix's log file, e.g. its maillog_file (repeatable; default: mta_log: from the "
                        "config, else journalctl -u postfix@-)")
    p.add_argument("--unit", default="routemilter", help="the daemon's systemd unit (default: routemilter)")
    p.add_argument("--mta-unit", default=None, help="Postfix's systemd unit (default: postfix@-)")
    p.add_argument("--since", help="start of the time window: 2026-11-27 17:00, 17:00 (today), or 2h (ago)")
    p.add_argument("--until", help="end of the time window, same forms")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_lazy("trace", "cmd_trace"))

    p = sub.add_parser("dkim-keygen", help="write a DKIM private key (mode 0600) and print its DNS record")
    p.add_argument("key_file", help="where to write the private key (must not exist)")
    p.add_argument("--selector", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.set_defaults(func=cmd_dkim_keygen)
    return parser


def _lazy(module: str, function: str) -> Command:
    """Import the daemon/MTA code only for the commands that need it."""

    def run(args: argparse.Namespace) -> int:
        import importlib  # noqa: PLC0415 (the lazy import itself)

        command: Command = getattr(importlib.import_module(f"routemilter.{module}"), function)
        return command(args)

    return run


def cmd_check(args: argparse.Namespace) -> int:
    config = load(args.config)
    from .config import file_mode_problems  # noqa: PLC0415 (the CLI imports what a command needs, when run)

    problems = file_mode_problems(config)
    if config.dkim:
        from .signing import key_problems  # noqa: PLC0415

        for key in config.dkim.keys:
            problems += [f"dkim key {key.selector}: {p}" for p in key_problems(key.key_file)]
    if config.dkim and config.auth is not None and config.auth.arc and not problems:
        from .arc import ArcSealer  # noqa: PLC0415
        from .signing import SigningError  # noqa: PLC0415

        try:  # ARC seals with an RSA key of dkim.keys
            ArcSealer.from_settings(config.dkim, config.auth.authserv_id)
        except SigningError as exc:
            problems.append(f"auth.arc: {exc}")
    if config.state is not None and config.state.backend != "memory":
        from .state import StoreError, open_store  # noqa: PLC0415

        try:
            open_store(config.state).ping()
        except StoreError as exc:
            problems.append(f"state: {exc}")
    errors = [p for p in problems if " warning:" not in p and not p.startswith("warning:")]
    for problem in problems:
        level = journal.WARNING if " warning:" in problem else journal.ERR
        print(journal.prefix(level) + problem, file=sys.stderr)
    if errors:
        return 1
    print(summary(config))
    return 0


def summary(config: Config) -> str:
    exact = sum(len(r.addresses) for r in config.rules)
    patterns = sum(len(r.patterns) for r in config.rules)
    state = config.state
    shared = f", state: redis at {state.where} (reachable)" if state is not None and state.backend == "redis" else ""
    return (f"{config.path}: OK: {len(config.domains)} domain(s), {len(config.rules)} rule(s) "
            f"({exact} exact address(es), {patterns} pattern(s)), {len(config.routes)} route(s){shared}")


def cmd_explain(args: argparse.Namespace) -> int:
    config = load(args.config, read_secrets=False)
    router = Router(config)
    if args.sender is not None:
        return explain_sender(config, router, args.sender, args.addresses, args.json)
    decisions = [router.decide(address) for address in args.addresses]
    if args.json:
        print(json.dumps([decision_to_dict(d, config) for d in decisions], indent=2))
    else:
        print("\n\n".join(describe(d, config) for d in decisions))
    return 0


class SenderAnswer(TypedDict):
    """One answer of `explain --sender` (its --json form)."""

    login: str
    address: str
    allowed: bool
    owners: list[str]
    reason: str


def explain_sender(config: Config, router: Router, login: str, addresses: list[str], as_json: bool) -> int:
    from .senders import Senders  # noqa: PLC0415

    senders = Senders(config, router)
    answers: list[SenderAnswer] = []
    for address in addresses:
        allowed, _ = senders.may_send(login, address)
        owners = senders.owners(address)
        answers.append({"login": login, "address": owners.address, "allowed": allowed,
                        "owners": list(owners.owners), "reason": owners.reason})
    if as_json:
        print(json.dumps(answers, indent=2))
    else:
        print("\n\n".join(
            f"{a['login']} {'MAY' if a['allowed'] else 'MAY NOT'} send as {a['address']}\n"
            f"  owners: {', '.join(a['owners']) or 'none (nobody may send as it)'}\n"
            f"  why:    {a['reason']}"
            + ("" if config.submission else "\n  note:   no submission: section, so nothing enforces this yet")
            for a in answers))
    return 0


def decision_to_dict(decision: Decision, config: Config) -> dict[str, object]:
    out: dict[str, object] = {
        "address": decision.address,
        "action": decision.action.value,
        "rule": decision.rule.name if decision.rule else None,
        "rule_line": decision.rule.line if decision.rule else None,
        "reason": decision.reason,
        "keep": decision.keep,
        "destinations": [
            [{"address": t.address, "route": t.route, "hops": list(config.routes[t.route].hops),
              "fallback_after": _fallback_after(dest, pos, config)}
             for pos, t in enumerate(dest.chain)]
            for dest in decision.destinations
        ],
    }
    if decision.reply:
        out["reply"] = {"code": decision.reply.code, "status": decision.reply.status,
                        "text": list(decision.reply.lines)}
    return out


def describe(decision: Decision, config: Config) -> str:
    lines = [decision.address, f"  action: {decision.action.value}", f"  why:    {decision.reason}"]
    if decision.action is Action.REFUSE:
        lines.append(f"  reply:  {decision.reply}")
    for n, dest in enumerate(decision.destinations, 1):
        for position, target in enumerate(dest.chain):
            label = f"  destination {n}:" if position == 0 else f"    then fallback {position}:"
            hops = " -> ".join(config.routes[target.route].hops)
            lines.append(f"{label} {target.address}  (route {target.route}: {hops}"
                         f"{_deferred_text(dest, position, config)})")
    if decision.keep:
        lines.append("  keep:   the original recipient also gets a copy")
    return "\n".join(lines)


def _fallback_after(dest: Destination, position: int, config: Config) -> str | None:
    """How long this address may defer before the next one takes over: a duration, or
    "never" (only a bounce moves on); None for the last address of a chain."""
    if position + 1 >= len(dest.chain):
        return None
    from .mtaconfig import deferrals_enabled  # noqa: PLC0415

    return format_duration(dest.fallback_after) if deferrals_enabled(config) else "never"


def _deferred_text(dest: Destination, position: int, config: Config) -> str:
    after = _fallback_after(dest, position, config)
    if after is None:
        return ""
    if after != "never":
        return f"; deferred for {after}: next address"
    from .mtaconfig import deferrals_enabled  # noqa: PLC0415

    why = "fallback_after: never" if deferrals_enabled(config) else "needs srs: and bounces:"
    return f"; deferred: waits for a bounce ({why})"


def cmd_token(args: argparse.Namespace) -> int:
    """`routemilter token ADDRESS`: what a bounce token says, or why it is refused."""
    from .addresses import strip_envelope  # noqa: PLC0415
    from .tokens import TokenCodec, TokenError, rule_id  # noqa: PLC0415

    config = load(args.config)
    if config.srs is None or config.bounces is None:
        print("routemilter: bounces (and srs) are not configured", flush=True)
        return 1
    codec = TokenCodec(config.srs, config.bounces.max_age_days)
    address = strip_envelope(args.address)
    try:
        token = codec.check(address)
    except TokenError as exc:
        print(f"{address}: refused: {exc}")
        return 1
    every = config.all_rules()
    names = [r.name for r in every if token.rules is None or rule_id(r.name) in token.rules]
    print(f"{address}: valid")
    print(f"  original sender: {token.sender}")
    print(f"  rules: {', '.join(names) or '(none in the current config)'}")
    if token.dest is None:
        print("  copy: first fan-out (the failed recipient names the destination)")
    else:
        print(f"  copy: destination {token.dest + 1}, chain position {token.pos} (0 = primary)")
    if token.binding is None:
        print("  message: not bound (older rmb= token, accepted until it expires)")
    elif token.binding == "x":
        print("  message: not bound (the forward was not DKIM-signed)")
    else:
        print(f"  message: bound to our DKIM signature with b= digest {token.binding}")
    return 0


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from .signing import SigningError, dns_record, generate_key  # noqa: PLC0415

    try:
        txt = generate_key(args.algorithm, args.key_file, bits=args.bits)
    except (SigningError, OSError) as exc:
        print(f"routemilter: dkim-keygen: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.key_file} (mode 0600). Publish this DNS record:", file=sys.stderr)
    print(dns_record(args.selector, args.domain, txt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
