"""`postfix-config --commands / --apply`: merge routemilter's settings into a
site's existing Postfix config with postconf(1), instead of printing whole
assignments that replace the site's values when pasted.

The settings themselves come from mtaconfig.py (postfix_main, postfix_master,
transport_entries); this module only decides how they meet what is already
there:

* list-valued main.cf parameters (smtpd_milters, relay_domains, transport_maps,
  ...) keep the site's entries and gain ours at the end; an entry already there
  (same milter socket, same domain, same table) is not added twice;
* parent_domain_matches_subdomains keeps the site's list minus relay_domains;
* other parameters are set (postconf -e);
* master.cf services are written whole with postconf -M and their -o options
  with postconf -P, which replace an existing entry of the same name/type
  instead of appending a duplicate;
* the transport map is routemilter's own file, rewritten and postmap'ed.

Running it twice changes nothing the second time. `--remove` undoes it (before
the package is purged: otherwise Postfix tempfails mail for a missing milter).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .config import Config, load
from .mtaconfig import milter_socket_for_postfix, postfix_config, postfix_main, postfix_master, transport_entries

TRANSPORT_FILE = "/etc/postfix/routemilter_transport"
LIST_PARAMETERS = {"smtpd_milters", "non_smtpd_milters", "relay_domains", "transport_maps",
                   "internal_mail_filter_classes", "smtpd_sender_login_maps"}
# main.cf parameter: entries routemilter needs removed from the site's list.
REMOVE_FROM = {"parent_domain_matches_subdomains": {"relay_domains"}}


class PostconfError(Exception):
    pass


def split_list(value: str) -> list[str]:
    """A Postfix list: entries separated by commas or whitespace; `{ ... }` groups
    (a milter with its options) and `${...}` expressions stay whole."""
    items, token, depth = [], "", 0
    for ch in value:
        if depth == 0 and ch in ", \t\r\n":
            if token:
                items.append(token)
            token = ""
            continue
        depth += (ch == "{") - (ch == "}")
        token += ch
    if token:
        items.append(token)
    return items


def entry_key(item: str) -> str:
    """What makes two list entries the same: a milter group's socket, else the text."""
    if item.startswith("{"):
        inner = split_list(item.strip("{} \t"))
        return inner[0].lower() if inner else ""
    return item.lower()


def merge_list(current: list[str], ours: list[str]) -> list[str]:
    """The site's entries in their order, ours replacing an entry with the same key
    in place, the rest of ours appended."""
    out = list(current)
    keys = [entry_key(x) for x in out]
    for item in ours:
        key = entry_key(item)
        if key in keys:
            out[keys.index(key)] = item
        else:
            out.append(item)
            keys.append(key)
    return out


class Postconf:
    """postconf(1) on one configuration directory (None: Postfix's default)."""

    def __init__(self, config_directory: str | None = None):
        self.options = ["-c", config_directory] if config_directory else []
        self.base = ["postconf"] + self.options
        self.config_directory = config_directory

    def _run(self, *args: str) -> str:
        try:
            r = subprocess.run(self.base + list(args), capture_output=True, text=True, timeout=60)
        except FileNotFoundError as exc:
            raise PostconfError(f"cannot run postconf: {exc.strerror}; is Postfix installed?") from None
        if r.returncode != 0:
            raise PostconfError(f"postconf {' '.join(args)}: {r.stderr.strip() or r.returncode}")
        return r.stdout

    def explicit(self, name: str) -> str | None:
        """The value set in main.cf, or None when the default applies."""
        out = self._run("-n", name)
        return out.partition("=")[2].strip() if out.strip() else None

    def effective(self, name: str) -> str:
        explicit = self.explicit(name)
        return explicit if explicit is not None else self._run("-hx", name).strip()

    def directory(self) -> str:
        return self.config_directory or self._run("-h", "config_directory").strip()


def main_commands(config: Config, pc: Postconf, transport_file: str) -> list[list[str]]:
    """postconf -e arguments for every main.cf parameter that needs to change."""
    commands = []
    for name, value, _why in postfix_main(config, transport_file):
        current = pc.effective(name)
        if name in REMOVE_FROM:
            new = [x for x in split_list(current) if x not in REMOVE_FROM[name]]
            changed = new != split_list(current)
            value = ", ".join(new)
        elif name in LIST_PARAMETERS:
            new = merge_list(split_list(current), split_list(value))
            changed = new != split_list(current)
            value = ", ".join(new)
        else:
            changed = pc.explicit(name) != value
        if changed:
            commands.append(["-e", f"{name} = {value}"])
    return commands


def master_services(config: Config) -> list[tuple[str, str, list[str]]]:
    """(name/type, entry without -o options, [param=value, ...]) from postfix_master."""
    services: list[tuple[str, str, list[str]]] = []
    for line in postfix_master(config):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            option = line.split(None, 1)[1] if line.split()[0] == "-o" else None
            if option is None:
                raise PostconfError(f"master.cf continuation line not understood: {line!r}")
            services[-1][2].append(option)
        else:
            fields = line.split()
            services.append((f"{fields[0]}/{fields[1]}", " ".join(fields), []))
    return services


def master_commands(config: Config) -> list[list[str]]:
    commands = []
    for service, entry, options in master_services(config):
        commands.append(["-M", f"{service}={entry}"])  # replaces an entry of that name/type
        commands += [["-P", f"{service}/{option}"] for option in options]
    return commands


def transport_text(config: Config) -> str:
    entries = transport_entries(config)
    if not entries:
        return ""
    width = max(len(address) for address, _ in entries)
    return "".join(f"{address.ljust(width)} {value}\n" for address, value in entries)


def commands_text(config: Config, pc: Postconf, transport_file: str) -> str:
    """A shell script with the same effect as --apply, for review or pasting."""
    out = ["#!/bin/sh", "# routemilter postfix-config --commands: merges into the existing Postfix config",
           "set -e"]
    base = " ".join(shlex.quote(x) for x in pc.base)
    if milter_socket_for_postfix(config.milter.socket).startswith("unix:/"):
        out.append("# NOTE: Debian chroots smtpd and cleanup in /var/spool/postfix: put the socket under it.")
    text = transport_text(config)
    if text:
        out += [f"cat > {shlex.quote(transport_file)} <<'EOF'", text.rstrip("\n"), "EOF",
                " ".join(shlex.quote(x) for x in ["postmap", *pc.options, f"hash:{transport_file}"])]
    for args in main_commands(config, pc, transport_file) + master_commands(config):
        out.append(f"{base} {' '.join(shlex.quote(a) for a in args)}")
    return "\n".join(out) + "\n"


def apply(config: Config, pc: Postconf, transport_file: str, log: Callable[[str], None] = print) -> int:
    """Merge into the config directory now. Returns the number of changes made."""
    changes = 0
    text = transport_text(config)
    if text:
        old = Path(transport_file).read_text() if os.path.exists(transport_file) else None
        if old != text:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(transport_file), prefix=".routemilter_transport.")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, transport_file)
            log(f"wrote {transport_file}")
            changes += 1
        if old != text or not os.path.exists(transport_file + ".db"):
            r = subprocess.run(["postmap", *pc.options, f"hash:{transport_file}"], capture_output=True, text=True,
                               timeout=60)
            if r.returncode != 0:
                raise PostconfError(f"postmap {transport_file}: {r.stderr.strip()}")
    before = _master_text(pc)
    for args in main_commands(config, pc, transport_file):
        pc._run(*args)
        log(f"postconf {args[0]} {args[1]}")
        changes += 1
    for args in master_commands(config):
        pc._run(*args)
    if _master_text(pc) != before:
        log("master.cf: " + ", ".join(s for s, _, _ in master_services(config)))
        changes += 1
    return changes


def remove(config: Config, pc: Postconf, transport_file: str, log: Callable[[str], None] = print) -> int:
    """Undo apply(): take routemilter's entries out of the list parameters (a list
    left empty is reset to Postfix's default), its master.cf services out, and its
    transport map away. Settings shared with the rest of the site (milter_protocol,
    milter_default_action, ...) stay; they are listed for the admin to review."""
    changes = 0
    kept = []
    for name, value, _why in postfix_main(config, transport_file):
        if name not in LIST_PARAMETERS:
            if name.startswith("rm_"):  # routemilter's own transports' settings
                if pc.explicit(name) is not None:
                    pc._run("-X", name)
                    log(f"postconf -X {name}")
                    changes += 1
            elif name not in REMOVE_FROM:
                kept.append(name)
            continue
        current = pc.explicit(name)
        if current is None:
            continue
        ours = {entry_key(x) for x in split_list(value)}
        left = [x for x in split_list(current) if entry_key(x) not in ours]
        if left != split_list(current):
            args = ["-e", f"{name} = {', '.join(left)}"] if left else ["-X", name]
            pc._run(*args)
            log(f"postconf {' '.join(args)}")
            changes += 1
    services = {s for s, _, _ in master_services(config)}
    present = set()
    for line in pc._run("-M").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            present.add(f"{fields[0]}/{fields[1]}")
    for service in sorted(services & present):
        pc._run("-MX", service)
        log(f"postconf -MX {service}")
        changes += 1
    for path in (transport_file, transport_file + ".db"):
        if os.path.exists(path):
            os.unlink(path)
            log(f"removed {path}")
            changes += 1
    if kept:
        log("left as they are (review them): " + ", ".join(kept))
    return changes


def _master_text(pc: Postconf) -> str:
    try:
        with open(os.path.join(pc.directory(), "master.cf")) as f:
            return f.read()
    except OSError:
        return ""


def cmd_postfix(args: argparse.Namespace) -> int:
    config = load(args.config, read_secrets=False)
    if not (args.commands or args.apply or args.remove):
        print(postfix_config(config), end="")
        return 0
    pc = Postconf(args.config_directory)
    transport_file = TRANSPORT_FILE
    if args.config_directory:
        transport_file = os.path.join(args.config_directory, "routemilter_transport")
    try:
        if args.commands:
            print(commands_text(config, pc, transport_file), end="")
            return 0
        if args.remove:
            changes = remove(config, pc, transport_file)
            print(f"{changes} change(s); now: systemctl reload postfix")
            return 0
        changes = apply(config, pc, transport_file)
    except (PostconfError, OSError) as exc:
        print(f"routemilter: postfix-config: {exc}", file=sys.stderr)
        return 1
    print(f"{changes} change(s); now: postfix check && systemctl reload postfix" if changes
          else "Postfix already has routemilter's settings: nothing changed")
    return 0
