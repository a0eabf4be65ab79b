"""bench/results.md: each benchmark keeps its own section there, between markers,
so benchmarks run alone or by `make bench` update only what they measured."""

from __future__ import annotations

import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.md"
HEAD = "# Benchmark results\n\nWritten by `make bench` (bench/run.py); each section by its own module.\n"


def write_section(name: str, title: str, text: str) -> None:
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = f"{begin}\n## {title}\n\n_Run {stamp}._\n\n{text.rstrip()}\n{end}"
    current = RESULTS.read_text() if RESULTS.exists() else HEAD
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(current):
        current = pattern.sub(lambda _: section, current)
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(current if current.endswith("\n") else current + "\n")
