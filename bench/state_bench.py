#!/usr/bin/env python3
"""What the shared Redis state store costs against the in-memory one, in the same run.

Starts its own redis-server (Debian package redis-server) on a unix socket and
on a 127.0.0.1 port, and measures, interleaved, for the memory backend and for
Redis over each:

* per operation (wall-clock median): `claim`, `window_count`, `window_add`;
* per message: the whole milter callbacks in-process (session_bench's driver)
  for a forward under `auth:` with a rate limit, the only per-message store use
  today (one window_count at RCPT and one window_add at end of message per
  destination; DNS answered in-process with "no record", so no network).

The ratios matter, not the absolute numbers (a shared, noisy machine).

    .venv/bin/python bench/state_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import Milter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import redisserver  # noqa: E402
from results import write_section  # noqa: E402
from routemilter.authcheck import Authenticator  # noqa: E402
from routemilter.config import loads  # noqa: E402
from routemilter.policy import Policy, PolicyHolder  # noqa: E402
from routemilter.session import Session  # noqa: E402
from routemilter.state import MemoryStore, RedisStore, StateSettings  # noqa: E402
from session_bench import one_message  # noqa: E402

YAML = """\
server_name: mx.bench.test
srs:
  domain: fwd.bench.test
  secrets: ["bench-secret-0123456789abcdef"]
auth:
  arc: false
  rules:
    family: {rate_limit: {messages: 10000000, seconds: 3600}}
domains:
  mydomain.net: {}
rules:
  - name: family
    addresses: [family@mydomain.net]
    to: [email1@gmail.com, email2@gmail.com]
"""


def per_op(store, ops: int) -> dict[str, float]:
    """One pass per kind of operation: µs per call."""
    out = {}
    for name, call in (("claim", lambda i: store.claim(f"bench:c:{i}:{id(store)}", 60)),
                       ("window_count", lambda i: store.window_count("bench:w", 60)),
                       ("window_add", lambda i: store.window_add("bench:w", 60))):
        call(-1)
        t0 = time.perf_counter()
        for i in range(ops):
            call(i)
        out[name] = (time.perf_counter() - t0) / ops * 1e6
    return out


def per_message(holder: PolicyHolder, messages: int) -> float:
    Milter.factory = lambda: Session(holder)
    one_message(None)
    t0 = time.perf_counter()
    for _ in range(messages):
        one_message(None)
    return (time.perf_counter() - t0) / messages * 1e6


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", default=bool(os.environ.get("BENCH_QUICK")),
                   help="fewer operations and runs (also: environment BENCH_QUICK=1)")
    args = p.parse_args(argv)
    ops, messages, reps = (500, 200, 3) if args.quick else (5000, 1500, 5)
    if not redisserver.available():
        raise SystemExit("redis-server is not installed (scripts/install-deps.sh installs it)")
    work = tempfile.mkdtemp(prefix="rmstate-")
    unix_dir, tcp_dir = os.path.join(work, "u"), os.path.join(work, "t")
    os.makedirs(unix_dir)
    os.makedirs(tcp_dir)
    servers = [redisserver.RedisServer(unix_dir).start(), redisserver.RedisServer(tcp_dir, unix=False).start()]
    try:
        stores = {
            "memory": MemoryStore(),
            "redis, unix socket": RedisStore(StateSettings("redis", url=servers[0].url)),
            "redis, TCP 127.0.0.1": RedisStore(StateSettings("redis", url=servers[1].url)),
        }
        config = loads(YAML)
        holders = {}
        for name, store in stores.items():
            policy = Policy.from_config(config, store)
            auth = Authenticator.from_config(config, lookup=lambda name, qtype: [], store=store)
            holders[name] = PolicyHolder(dataclasses.replace(policy, auth=auth), store)
        op_results = {name: {} for name in stores}
        msg_results = {name: [] for name in stores}
        for _ in range(reps):
            for name, store in stores.items():  # interleaved
                for op, us in per_op(store, ops).items():
                    op_results[name].setdefault(op, []).append(us)
                msg_results[name].append(per_message(holders[name], messages))
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    base_ops = {op: statistics.median(v) for op, v in op_results["memory"].items()}
    base_msg = statistics.median(msg_results["memory"])
    lines = [f"Wall-clock µs, median of {reps} interleaved runs ({ops} operations, {messages} messages each; "
             f"one thread; redis-server on this machine). Ratio: against memory in the same run.", "",
             "| backend | claim | window_count | window_add | per message (auth + rate limit, 2 destinations) |",
             "|---|---:|---:|---:|---:|"]
    for name in stores:
        cells = []
        for op in ("claim", "window_count", "window_add"):
            us = statistics.median(op_results[name][op])
            cells.append(f"{us:.1f}" if name == "memory" else f"{us:.1f} ({us / base_ops[op]:.0f}x)")
        msg = statistics.median(msg_results[name])
        cells.append(f"{msg:.0f}" if name == "memory" else
                     f"{msg:.0f} ({msg / base_msg:.2f}x, +{msg - base_msg:.0f} µs)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_section("state_bench", "State store: Redis against memory (per operation, per message)", text)
    return text


if __name__ == "__main__":
    sys.stdout.write(main())
