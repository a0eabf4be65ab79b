"""`sendmail-config --apply`: merge routemilter's lines into /etc/mail instead of
pasting them (pasting twice defined the milter twice).

The lines come from mtaconfig.py (sendmail_mc, sendmail_mc_after,
sendmail_mailertable, sendmail_relay_domains). Here:

* sendmail.mc gets them as marked blocks, before the first MAILER line and after
  the last one; a second run replaces the blocks, so it changes nothing;
* relay-domains gains the missing domains, mailertable the missing entries (an
  entry for the same domain is replaced); the site's other lines stay.

Sendmail then needs its .cf rebuilt: `make -C /etc/mail` (Debian) and a reload.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .config import Config, load
from .mtaconfig import sendmail_config, sendmail_mailertable, sendmail_mc, sendmail_mc_after, sendmail_relay_domains

BEFORE = ("dnl ---- routemilter (begin): sendmail-config --apply rewrites this block ----",
          "dnl ---- routemilter (end) ----")
AFTER = ("dnl ---- routemilter after MAILER (begin): sendmail-config --apply rewrites this block ----",
         "dnl ---- routemilter after MAILER (end) ----")
MAILER_LINE = re.compile(r"^\s*MAILER\(")


class MergeError(Exception):
    pass


def _strip_block(lines: list[str], markers: tuple[str, str]) -> list[str]:
    if markers[0] not in lines:
        return lines
    start = lines.index(markers[0])
    try:
        end = lines.index(markers[1], start)
    except ValueError:
        raise MergeError(f"sendmail.mc has {markers[0]!r} without its end line") from None
    return lines[:start] + lines[end + 1:]


def merge_mc(text: str, before: list[str], after: list[str]) -> str:
    lines = _strip_block(_strip_block(text.splitlines(), BEFORE), AFTER)
    if any("INPUT_MAIL_FILTER(`routemilter'" in line for line in lines):
        raise MergeError("sendmail.mc already defines the routemilter filter outside routemilter's block "
                         "(pasted by hand?): remove those lines, then run --apply again")
    mailers = [i for i, line in enumerate(lines) if MAILER_LINE.match(line)]
    if not mailers:
        raise MergeError("sendmail.mc has no MAILER(...) line to put routemilter's lines before")
    first = mailers[0]
    # Debian's .mc has MAILER_DEFINITIONS right above its MAILER lines: stay above it.
    while first > 0 and lines[first - 1].strip().startswith("MAILER_DEFINITIONS"):
        first -= 1
    block = [BEFORE[0], *before, BEFORE[1]]
    lines[first:first] = block
    if after:
        last = max(i for i, line in enumerate(lines) if MAILER_LINE.match(line))
        lines[last + 1:last + 1] = [AFTER[0], *after, AFTER[1]]
    return "\n".join(lines) + "\n"


def merge_relay_domains(text: str, domains: list[str]) -> str:
    lines = text.splitlines()
    present = {line.strip().lower() for line in lines}
    lines += [d for d in domains if d.lower() not in present]
    return "\n".join(lines) + "\n" if lines else ""


def merge_table(text: str, entries: list[tuple[str, str]]) -> str:
    """key value lines: ours replace an entry with the same key, or are appended."""
    ours = {key.lower(): f"{key} {value}" for key, value in entries}
    out = []
    for line in text.splitlines():
        key = line.split(None, 1)[0].lower() if line.strip() and not line.lstrip().startswith("#") else None
        out.append(ours.pop(key) if key in ours else line)
    out += [f"{k} {v}" for k, v in entries if k.lower() in ours]
    return "\n".join(out) + "\n"


def _replace(path: str, text: str) -> bool:
    """Write text to path (same mode) if it differs; True when written."""
    old = Path(path).read_text() if os.path.exists(path) else None
    if old == text:
        return False
    mode = os.stat(path).st_mode & 0o7777 if old is not None else 0o644
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".routemilter.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def apply(config: Config, mail_dir: str, log: Callable[[str], None] = print) -> int:
    changes = 0
    mc = os.path.join(mail_dir, "sendmail.mc")
    try:
        text = Path(mc).read_text()
    except OSError as exc:
        raise MergeError(f"cannot read {mc}: {exc.strerror}") from None
    if _replace(mc, merge_mc(text, sendmail_mc(config), sendmail_mc_after(config))):
        log(f"updated {mc}")
        changes += 1
    relay = os.path.join(mail_dir, "relay-domains")
    current = Path(relay).read_text() if os.path.exists(relay) else ""
    if _replace(relay, merge_relay_domains(current, sendmail_relay_domains(config))):
        log(f"updated {relay}")
        changes += 1
    table = sendmail_mailertable(config)
    if table:
        path = os.path.join(mail_dir, "mailertable")
        current = Path(path).read_text() if os.path.exists(path) else ""
        if _replace(path, merge_table(current, table)):
            log(f"updated {path}")
            changes += 1
    return changes


def cmd_sendmail(args: argparse.Namespace) -> int:
    config = load(args.config, read_secrets=False)
    if not args.apply:
        print(sendmail_config(config), end="")
        return 0
    try:
        changes = apply(config, args.mail_dir)
    except (MergeError, OSError) as exc:
        print(f"routemilter: sendmail-config: {exc}", file=sys.stderr)
        return 1
    print(f"{changes} change(s); now: make -C {args.mail_dir} && systemctl reload sendmail" if changes
          else "Sendmail already has routemilter's settings: nothing changed")
    return 0
