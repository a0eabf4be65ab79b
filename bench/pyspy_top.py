#!/usr/bin/env python3
"""Summarize py-spy's collapsed stacks (--format raw): where the milter's time goes.

    .venv/bin/python bench/pyspy_top.py FILE [N]

Prints the N functions with the most samples on top of the stack (self) and the
N with the most samples anywhere in the stack (inclusive), and the share of
samples by libmilter callback (Session.envfrom, .header, .eom, ...).
"""
import collections
import re
import sys


def main(path: str, n: int = 25) -> None:
    self_c, incl_c, cb = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not count.isdigit():
            continue
        count = int(count)
        frames = [re.sub(r" \(/[^)]*/", " (", f) for f in stack.split(";") if not f.startswith("thread (")]
        if not frames or frames[-1].startswith(("Daemon._milter_main", "Thread.run")):
            continue  # a thread inside libmilter (C), or the main loop: not Python work
        total += count
        self_c[frames[-1]] += count
        for f in set(frames):
            incl_c[f] += count
        callback = next((f.split(" ")[0] for f in frames if re.match(
            r"(Session\.\w+|\w+_callback|Base\.\w+_bytes) ", f)), "other: " + frames[0])
        cb[callback] += count
    print(f"{total} samples")
    for title, counter in (("self", self_c), ("inclusive", incl_c), ("by first callback frame", cb)):
        print(f"\n-- {title}")
        for frame, c in counter.most_common(n):
            print(f"{100 * c / total:6.1f}%  {frame}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)
