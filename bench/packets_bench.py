#!/usr/bin/env python3
"""Milter packets per message, on both sides of the socket, for each milter setup.

The setups of mta_bench.py (same Postfix, same load, same checks of what the
sink receives), with milterproxy.CountingProxy between Postfix and the milter:
it counts what Postfix sends (the MTA's side: commands and macro packets) and
what the milter answers (replies and modification packets), per message, and
records the protocol options the milter negotiated (SMFIP_* bits).

    .venv/bin/python bench/packets_bench.py [--messages 200] [--before DIR]

By default the routemilter setups also run from the code before issue #16's
changes (BEFORE_REF, extracted with `git archive`), for the before/after table;
--before DIR takes the package source from DIR/milter instead, --before none skips it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mta_bench
from milterproxy import MODIFICATIONS
from results import write_section

FAILED: list[str] = []
BEFORE_REF = "9700dd1"  # main before issue #16 (conversation cuts), for the before/after counts
REPO = Path(__file__).resolve().parent.parent


def extract_before(ref: str, into: Path) -> str | None:
    """The milter package source at git `ref`, extracted under `into`; None without git or ref."""
    try:
        data = subprocess.run(["git", "-C", str(REPO), "archive", ref, "milter"], capture_output=True,
                              check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return str(into / "milter")

# SMFIP_* protocol bits (libmilter mfapi.h), in the order of the conversation.
PROTOCOL_BITS = [
    (0x1, "NOCONNECT"), (0x1000, "NR_CONN"), (0x2, "NOHELO"), (0x2000, "NR_HELO"), (0x4, "NOMAIL"),
    (0x4000, "NR_MAIL"), (0x8, "NORCPT"), (0x8000, "NR_RCPT"), (0x200, "NODATA"), (0x10000, "NR_DATA"),
    (0x100, "NOUNKNOWN"), (0x20000, "NR_UNKN"), (0x20, "NOHDRS"), (0x80, "NR_HDR"), (0x40, "NOEOH"),
    (0x40000, "NR_EOH"), (0x10, "NOBODY"), (0x80000, "NR_BODY"), (0x800, "RCPT_REJ"), (0x100000, "HDR_LEADSPC"),
    (0x400, "SKIP"),
]


def decode_protocol(bits: int) -> str:
    return " ".join(name for bit, name in PROTOCOL_BITS if bits & bit) or "-"


def per_message(counts, direction: str, n: int) -> dict[str, float]:
    return {name: c / n for (d, name), c in counts.items() if d == direction}


def fmt(items: dict[str, float]) -> str:
    return ", ".join(f"{name} {v:g}" for name, v in sorted(items.items(), key=lambda kv: (-kv[1], kv[0])))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--setups", default=",".join(s.key for s in mta_bench.SETUPS if s.filter))
    p.add_argument("--before", metavar="DIR", help=f"package source to compare with (default: git {BEFORE_REF}; "
                   "'none' to skip)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rmpackets-", dir="/var/tmp"))
    work.chmod(0o755)
    before_note = ""
    if args.before is None:
        args.before = extract_before(BEFORE_REF, work / "before")
        before_note = (f" [before]: the same setup run from the code at {BEFORE_REF} (before issue #16)."
                       if args.before else f" (no before/after: git {BEFORE_REF} not available)")
    elif args.before == "none":
        args.before = None
    wanted = args.setups.split(",")
    setups = [dataclasses.replace(s, runs=[]) for s in mta_bench.SETUPS + mta_bench.EXTRA_SETUPS
              if s.key in wanted and s.filter]
    if args.before:
        setups += [dataclasses.replace(s, key=s.key + "@before", title=s.title + " [before]",
                                       pythonpath=args.before, runs=[])
                   for s in list(setups) if s.filter == "routemilter"]
    msgfile = work / "message.txt"
    mta_bench.message_file(msgfile, 4096)
    rows = []
    try:
        for s in setups:
            print(f"starting {s.key} ...", file=sys.stderr, flush=True)
            mta_bench.start_setup(s, work, proxy=True)
            mta_bench.run_load(s, 20, args.sessions, msgfile, record=False)  # warm-up
            s.proxy.reset()
            mta_bench.run_load(s, args.messages, args.sessions, msgfile, record=False)
            time.sleep(0.5)  # the last quit packets
            n = args.messages
            mta = per_message(s.proxy.counts, "mta", n)
            milter = per_message(s.proxy.counts, "milter", n)
            mods = {k: v for k, v in milter.items() if k in MODIFICATIONS}
            protocols = {proto for _, _, proto in s.proxy.optneg}
            rows.append((s, sum(mta.values()), sum(milter.values()), sum(mods.values()),
                         s.proxy.bytes["mta"] / n, s.proxy.bytes["milter"] / n, mta, milter, protocols))
            mta_bench.stop_setup(s)
    finally:
        for s in setups:
            mta_bench.stop_setup(s)
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"{args.messages} messages (`smtp-source -s {args.sessions}`, one message per SMTP session, so one "
             "milter connection per message), counted by a relay on the milter socket (bench/milterproxy.py); "
             f"per message.{before_note}", "",
             "| setup | MTA -> milter packets | milter -> MTA packets | of which modifications | replies the MTA "
             "waits for | bytes MTA -> milter | bytes milter -> MTA |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s, tm, tf, tmod, bm, bf, *_ in rows:
        # Every milter packet that is not a modification ends a step the MTA waited on.
        lines.append(f"| {s.title} | {tm:g} | {tf:g} | {tmod:g} | {tf - tmod:g} | {bm:.0f} | {bf:.0f} |")
    lines += ["", "By packet type, per message, and the protocol options each milter negotiated:", ""]
    for s, *_, mta, milter, protocols in rows:
        lines += [f"- {s.title}:",
                  f"  - MTA -> milter: {fmt(mta)}",
                  f"  - milter -> MTA: {fmt(milter)}",
                  "  - negotiated: " + "; ".join(f"0x{p:06x} ({decode_protocol(p)})" for p in sorted(protocols))]
    text = "\n".join(lines) + "\n"
    if not args.no_write:
        write_section("packets_bench", "Milter packets per message (both sides)", text)
    return text


if __name__ == "__main__":
    print(main())
