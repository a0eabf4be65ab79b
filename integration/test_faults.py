"""Faults under load, through the real Postfix: nothing lost, nothing misrouted.

test_zero_loss_under_daemon_faults
    A bounded parallel client (loadclient.py) pushes N uniquely tagged
    messages (fan-out, patterns, catch-all, pass-through recipients) through
    Postfix + routemilter + fake MX hosts, while the daemon is SIGKILLed and
    restarted several times, stopped with SIGTERM, and reloaded with valid and
    with broken configs (YAML error, unknown route, missing DKIM key). Every
    message is accounted for: accepted and delivered to exactly its routed
    destinations, or answered 4xx (the client keeps it; it is retried after the
    faults and must then be delivered). Accepted-and-lost, misrouted,
    duplicated and bounced must all be 0. Prints the counts.
    N = 300 in `make test`; ROUTEMILTER_LONG=1 sends 2,000.

test_relay_faults_*
    A destination host that hangs, resets connections or answers slowly: the
    mail stays queued in Postfix and goes out via the route's fallback relay,
    or to the destination once it is back.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
import time
from collections import Counter

import pytest

from fakemx import FakeMX, free_port, start_hosts
from loadclient import ID_PATTERN, Job, run
from stack import Stack

pytestmark = pytest.mark.integration

LONG = os.environ.get("ROUTEMILTER_LONG", "") not in ("", "0")
MESSAGES = int(os.environ.get("ROUTEMILTER_LOAD_MESSAGES", 2000 if LONG else 300))
WORKERS = 8 if LONG else 6

RULES = r"""
domains:
  family.test:
    catch_all:
      to: [catch@gmail.test]
rules:
  - name: solo
    addresses: [solo@family.test]
    to: [solo@gmail.test]
  - name: fan
    addresses: [fan@family.test]
    to: [fan1@gmail.test, fan2@outlook.test]
  - name: shops
    patterns: ['shop-.*@family\.test']
    to: [shops@outlook.test]
"""
# The same routing, written differently: a valid reload must not change where mail goes.
RULES_RELOADED = RULES.replace("rules:\n", "rules:\n  - name: unused\n    addresses: [unused@family.test]\n"
                                            "    to: [unused@gmail.test]\n")
BROKEN = {
    "yaml-syntax": RULES + "  - name: [unclosed\n",
    "unknown-route": RULES.replace("to: [solo@gmail.test]", "to: [{address: solo@gmail.test, route: nowhere}]"),
}


def expected_destinations(rcpts: list[str]) -> set[str]:
    """Where each recipient must end up, written independently of the rules engine."""
    out = set()
    for rcpt in rcpts:
        local, domain = rcpt.split("@")
        if domain != "family.test":
            out.add(rcpt)  # not ours: passed through untouched
        elif local == "solo":
            out.add("solo@gmail.test")
        elif local == "fan":
            out |= {"fan1@gmail.test", "fan2@outlook.test"}
        elif local.startswith("shop-"):
            out.add("shops@outlook.test")
        else:
            out.add("catch@gmail.test")
    return out


def make_jobs(n: int) -> list[Job]:
    jobs = []
    for i in range(n):
        r = random.Random(i)
        load_id = f"zl{i:05d}"
        pool = ["solo@family.test", "fan@family.test", f"shop-{i}@family.test", f"c{i}@family.test",
                f"ext{i}@outlook.test"]
        jobs.append(Job(load_id, f"sender{i % 7}@sender.test", r.sample(pool, r.randint(1, 3))))
    return jobs


class Chaos:
    """Faults injected at fixed points of the load (by messages done), one at a time."""

    def __init__(self, stack: Stack, total: int, header: str):
        self.stack, self.total, self.header = stack, total, header
        self.done = 0
        self.log: list[str] = []
        self.kills = self.reloads_ok = self.reloads_refused = self.stops = 0
        kinds = ["reload-ok", "kill", "reload-broken:yaml-syntax", "kill", "stop-start", "reload-ok",
                 "kill", "reload-broken:unknown-route", "kill", "reload-broken:missing-key", "kill"]
        if total >= 1000:
            kinds = kinds * 2
        self.plan = [(int(total * (k + 1) / (len(kinds) + 2)), kind) for k, kind in enumerate(kinds)]
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self.error: BaseException | None = None

    def progress(self, done: int) -> None:
        self.done = done

    def _wait_log(self, marker: str, before: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stack.daemon.log_text().count(marker) > before:
                return
            time.sleep(0.05)
        raise TimeoutError(f"daemon did not log {marker!r} within {timeout}s")

    def _restart(self) -> None:
        daemon = self.stack.daemon
        daemon.proc.wait(15)
        daemon.start(timeout=30)

    def _write(self, rules: str) -> None:
        self.stack.config_path.write_text(self.header + rules)

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + 900
            for at, kind in self.plan:
                while self.done < at and time.monotonic() < deadline:
                    time.sleep(0.01)
                if self.done < at:
                    return  # the load ended (or timed out) first
                daemon = self.stack.daemon
                t0 = time.monotonic()
                if kind == "kill":
                    daemon.proc.send_signal(signal.SIGKILL)
                    time.sleep(0.3)  # Postfix meets a dead socket meanwhile
                    self._restart()
                    self.kills += 1
                elif kind == "stop-start":
                    daemon.proc.send_signal(signal.SIGTERM)
                    self._restart()
                    self.stops += 1
                elif kind == "reload-ok":
                    before = daemon.log_text().count("reloaded ")
                    self._write(RULES_RELOADED if self.reloads_ok % 2 == 0 else RULES)
                    daemon.signal(signal.SIGUSR1)
                    self._wait_log("reloaded ", before)
                    self.reloads_ok += 1
                else:
                    broken = kind.split(":", 1)[1]
                    before = daemon.log_text().count("reload refused")
                    if broken == "missing-key":
                        missing = self.header.replace("/keys/rsa.key", "/keys/missing.key")
                        self.stack.config_path.write_text(missing + RULES)
                    else:
                        self._write(BROKEN[broken])
                    daemon.signal(signal.SIGUSR1)
                    self._wait_log("reload refused", before)
                    self._write(RULES)  # valid again before any restart reads it
                    self.reloads_refused += 1
                self.log.append(f"{kind}@{at} ({time.monotonic() - t0:.1f}s)")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def account(stack: Stack, jobs: list[Job], sink: FakeMX) -> dict:
    arrivals: dict[str, Counter] = {}
    no_id = 0
    for mx in stack.mx_hosts.values():
        for msg in list(mx.messages):
            m = ID_PATTERN.search(msg.data)
            if not m:
                no_id += 1
                continue
            arrivals.setdefault(m.group(1).decode(), Counter()).update(msg.rcpt_tos)
    counts = Counter(sent=len(jobs), bounced=len(sink.messages), no_id=no_id)
    problems = []
    for job in jobs:
        outcomes = [a.outcome for a in job.attempts]
        counts["attempts"] += len(outcomes)
        counts["accepted_first_try"] += outcomes[0] == "accepted"
        counts["tempfailed"] += outcomes[0] == "tempfail"
        counts["tempfail_answers"] += outcomes.count("tempfail")
        counts["refused"] += "refused" in outcomes
        counts["ambiguous"] += "ambiguous" in outcomes
        got = arrivals.pop(job.load_id, Counter())
        accepted = [a for a in job.attempts if a.outcome == "accepted"]
        if len(accepted) > 1:
            counts["accepted_twice"] += 1
            problems.append(f"{job.load_id}: accepted {len(accepted)} times")
        if not accepted:
            counts["never_accepted"] += 1
            if got:
                counts["phantom"] += 1
                problems.append(f"{job.load_id}: never accepted but delivered to {dict(got)}")
            continue
        want = expected_destinations(accepted[0].accepted_rcpts)
        counts["routes"] += len(want)
        missing = want - set(got)
        extra = set(got) - want
        dup = {r: c for r, c in got.items() if c > 1}
        counts["delivered"] += not missing
        if missing:
            counts["lost"] += 1
            problems.append(f"{job.load_id}: accepted ({accepted[0].queue_id}) but {sorted(missing)} never arrived")
        if extra:
            counts["misrouted"] += 1
            problems.append(f"{job.load_id}: delivered to unexpected {sorted(extra)}")
        if dup:
            counts["duplicated"] += 1
            problems.append(f"{job.load_id}: duplicated {dup}")
    counts["unknown_ids"] = len(arrivals)
    return {"counts": counts, "problems": problems}


def header_for(stack: Stack) -> str:
    text = stack.config_path.read_text()
    return text[: text.index("domains:")]


def test_zero_loss_under_daemon_faults(it_workdir, capsys):
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    hosts = start_hosts(["gmail.test", "outlook.test", "family.test", "fwd.routemilter.test"], 20)
    sink = hosts["sender.test"] = FakeMX("127.0.0.24", free_port("127.0.0.24"), "sender.test").start()
    stack = Stack(it_workdir, RULES, mx_hosts=hosts)
    try:
        stack.start()
        header = header_for(stack)
        jobs = make_jobs(MESSAGES)
        chaos = Chaos(stack, len(jobs), header)
        chaos.thread.start()
        pf = stack.postfix
        elapsed = run("127.0.0.1", pf.port, jobs, workers=WORKERS, deadline_s=1500 if LONG else 300,
                      progress=chaos.progress, retries=100, backoff=0.2)
        chaos.thread.join(60)
        assert chaos.error is None, f"fault injection failed: {chaos.error!r}\n{stack.daemon.log_text()[-3000:]}"
        assert stack.daemon.proc.poll() is None, stack.daemon.log_text()[-3000:]
        tempfail_replies = Counter(re.sub(r"\s+", " ", a.reply)[:60] for j in jobs for a in j.attempts
                                   if a.outcome == "tempfail")
        # Anything still tempfailed after its in-run retries: once more, faults over (bounded).
        for _ in range(5):
            pending = [j for j in jobs if j.final.outcome == "tempfail"]
            if not pending:
                break
            time.sleep(1)
            run("127.0.0.1", pf.port, pending, workers=WORKERS, deadline_s=300)
        pf.wait_queue_empty(300 if LONG else 120)
        time.sleep(1)
        result = account(stack, jobs, sink)
        c = result["counts"]
        summary = (f"zero-loss ({pf.mode} Postfix, {len(jobs)} messages, {WORKERS} clients, "
                   f"{elapsed:.1f}s under faults): "
                   f"sent={c['sent']} routes={c['routes']} attempts={c['attempts']} "
                   f"accepted_first_try={c['accepted_first_try']} tempfailed={c['tempfailed']} "
                   f"(4xx answers={c['tempfail_answers']}, all retried) "
                   f"refused={c['refused']} ambiguous={c['ambiguous']} never_accepted={c['never_accepted']} | "
                   f"delivered={c['delivered']} lost={c['lost']} misrouted={c['misrouted']} "
                   f"duplicated={c['duplicated']} phantom={c['phantom']} bounced={c['bounced']} "
                   f"unknown={c['unknown_ids']} | kills={chaos.kills} stop-starts={chaos.stops} "
                   f"reloads ok={chaos.reloads_ok} refused={chaos.reloads_refused}")
        with capsys.disabled():  # printed by `make test` too, pass or fail
            print("\n" + summary)
            print("  faults (kind@accepted-count):", ", ".join(chaos.log))
            print("  tempfail answers:", dict(tempfail_replies))
        assert not result["problems"], "\n".join(result["problems"][:30])
        assert c["lost"] == c["misrouted"] == c["duplicated"] == c["phantom"] == 0
        assert c["bounced"] == 0 and c["refused"] == 0 and c["ambiguous"] == 0 and c["unknown_ids"] == 0
        assert c["delivered"] == c["sent"], summary
        assert chaos.kills >= 4 and chaos.reloads_ok >= 2 and chaos.reloads_refused >= 3, chaos.log
        assert c["tempfailed"] > 0, "the faults never reached a client: the test proves nothing"
        assert all(r.startswith("4") or "Error" in r for r in tempfail_replies), tempfail_replies
    finally:
        stack.stop()
        for mx in hosts.values():
            mx.stop()


# ------------------------------------------------------------- relay faults

RELAY_RULES = """
routes:
  via-relay: [mx, "[{host}]:{port}"]
domains:
  family.test: {{}}
rules:
  - name: hang
    addresses: [hang@family.test]
    to: [{{address: hang@hang.test, route: via-relay}}]
  - name: reset
    addresses: [reset@family.test]
    to: [{{address: reset@reset.test, route: via-relay}}]
  - name: slow
    addresses: [slow@family.test]
    to: [slow@slow.test]
  - name: down
    addresses: [down@family.test]
    to: [down@down.test]
"""


class _SlowHandler:
    """aiosmtpd handler that answers every RCPT and DATA after a delay."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    async def handle_RCPT(self, *args):  # noqa: N802 - the name aiosmtpd calls
        import asyncio

        await asyncio.sleep(self.delay)
        return await self.inner.handle_RCPT(*args)

    async def handle_DATA(self, *args):  # noqa: N802 - the name aiosmtpd calls
        import asyncio

        await asyncio.sleep(self.delay)
        return await self.inner.handle_DATA(*args)


@pytest.fixture
def relay_stack(it_workdir):
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    hosts = start_hosts(["hang.test", "reset.test", "slow.test", "down.test"], 30, hang_seconds=20)
    relay = FakeMX("127.0.0.35", free_port("127.0.0.35"), "fallback-relay").start()
    stack = Stack(it_workdir, RELAY_RULES.format(host=relay.host, port=relay.port), mx_hosts=hosts)
    try:
        stack.start()
        yield stack, hosts, relay
    finally:
        stack.stop()
        relay.stop()
        for mx in hosts.values():
            mx.stop()


def _msg(to: str) -> bytes:
    return (f"From: alice@sender.test\r\nTo: {to}\r\nSubject: relay fault\r\n"
            f"Message-ID: <{to}@sender.test>\r\n\r\nbody\r\n").encode()


def test_relay_faults_fall_back_or_wait(relay_stack):
    stack, hosts, relay = relay_stack
    pf = stack.postfix
    hosts["hang.test"].set_mode("hang")  # accepts TCP, never greets
    hosts["reset.test"].set_mode("reset")  # TCP RST on connect
    hosts["slow.test"]._controller.handler = _SlowHandler(hosts["slow.test"]._controller.handler, 3.0)
    hosts["down.test"].set_mode("reset")  # no fallback route: must wait in the queue
    for rcpt in ("hang@family.test", "reset@family.test", "slow@family.test", "down@family.test"):
        r = pf.send("alice@sender.test", [rcpt], _msg(rcpt))
        assert r.accepted, r

    # Hanging and resetting primaries: the route's fallback relay takes the mail.
    relay.wait_for(2, timeout=60)
    assert sorted(r for m in relay.messages for r in m.rcpt_tos) == ["hang@hang.test", "reset@reset.test"]
    assert hosts["hang.test"].messages == [] and hosts["reset.test"].messages == []
    # Slow (3 s per reply, inside Postfix's timeouts): delivered to the destination itself.
    hosts["slow.test"].wait_for(1, timeout=60)
    assert [m.rcpt_tos for m in hosts["slow.test"].messages] == [["slow@slow.test"]]

    # Down with no fallback: deferred, kept in the queue, not bounced.
    pf.wait_log(r"to=<down@down\.test>.*status=deferred", timeout=30)
    assert "down@down.test" in pf.queue()
    time.sleep(3)
    assert hosts["down.test"].messages == []
    hosts["down.test"].set_mode("normal")  # the destination returns
    pf.flush()
    hosts["down.test"].wait_for(1, timeout=60)
    pf.wait_queue_empty(60)
    time.sleep(1)
    assert [m.rcpt_tos for m in hosts["down.test"].messages] == [["down@down.test"]]  # once
    assert len(relay.messages) == 2  # nothing went twice
    assert "status=bounced" not in pf.log_text()
    sent = [(d["to"], d["relay"].split("[")[0]) for d in pf.deliveries() if d["status"] == "sent"]
    deferred = sum(d["status"] == "deferred" for d in pf.deliveries())
    print(f"\nrelay faults: sent={sent} deferred_attempts={deferred}")
