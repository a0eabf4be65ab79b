#!/usr/bin/env python3
"""`make bench`: run the benchmarks in turn and print their reports.

Each entry of BENCHMARKS names a module in bench/ with `main(argv) -> str` (its
report); a module that checks targets lists the missed ones in a module-level
`FAILED` list, and the run exits 1 if any benchmark missed one.

    .venv/bin/python bench/run.py            # every benchmark below
    .venv/bin/python bench/run.py rules_bench
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARKS = [
    "rules_bench",  # rules engine: 100,000 aliases + 1,000 patterns, load time, memory, p99 per lookup
    "session_bench",  # milter callbacks in-process: Python CPU per message
    "state_bench",  # state store: Redis against memory, per operation and per message (BENCH_QUICK=1: shorter)
    "bigmsg_bench",  # 50 MiB message (daemon RSS) and a 1,000-recipient message
    "packets_bench",  # milter packets per message, both sides, before/after issue #16's cuts
    "mta_bench",  # Postfix end to end: the stock stack (postsrsd, OpenDKIM) vs routemilter (BENCH_QUICK=1: shorter)
]


def main(argv: list[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or BENCHMARKS
    missed: list[str] = []
    for name in names:
        module = importlib.import_module(name)
        print(f"## {name}\n", flush=True)
        started = time.perf_counter()
        report = module.main([])
        print(report, flush=True)
        missed += [f"{name}: {reason}" for reason in getattr(module, "FAILED", [])]
        print(f"({name}: {time.perf_counter() - started:.0f} s)\n", flush=True)
    print("## summary\n")
    print("\n".join(f"FAIL {m}" for m in missed) if missed else f"all {len(names)} benchmark(s) met their targets")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
