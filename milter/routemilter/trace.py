"""`routemilter trace`: the whole story of a message from the daemon's and the MTA's logs.

Given a queue id, a Message-ID, or an address (with a time window), it finds the
message's queue ids, follows every link between them (Postfix's "sender
non-delivery notification: B", the bounce handler's bounce_qid/orig_qid/new_qids,
any routemilter line naming several queue ids), and prints every step in log
order: received, routed by which rule to which destinations, each destination
delivered / deferred (with the remote reply) / bounced, relay fallback, address
fallback after a bounce or a deferral, the final bounce, notices sent.

Logs: files (`--log` for the daemon's, `--mta-log` for Postfix's maillog_file), or
the journal (`journalctl -u UNIT`), the default when no file is named.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypedDict

from .mtalog import QID, Interpreter, PostfixLine, parse_postfix

_DAEMON = re.compile(r"(?:^|\s)routemilter\.mail:\s(?P<msg>.*)$")
_ISO = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?)\s")
_KV = re.compile(r'(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>"[^"]*"|\S*)')
_PREFIXES = ("bounce refused", "bounce tempfail", "bounce", "notice", "deferral", "fallback")
_QID_ONLY = re.compile(rf"^(?:{QID})$")
_QID_KEYS = re.compile(r"^(?:\w+_)?(?:queue_ids?|qids?)$")  # queue_id, new_queue_id, bounce_qid, new_qids ...


@dataclass
class Step:
    index: int  # position in the log: the order of the story
    time: str | None
    queue_id: str
    kind: str
    text: str
    data: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"time": self.time, "queue_id": self.queue_id, "step": self.kind, "text": self.text, **self.data}


class DaemonLine(TypedDict):
    prefix: str  # "bounce", "deferral", "notice" ...; "" for the per-message line
    fields: dict[str, str]
    ts: str | None
    raw: str  # the line after the prefix


def parse_daemon(line: str) -> DaemonLine | None:
    """A routemilter.mail line -> {"prefix", "fields", "ts", "raw"}; None for other lines."""
    m = _DAEMON.search(line.rstrip("\n"))
    if m is None:
        return None
    msg = m.group("msg")
    prefix = ""
    for p in _PREFIXES:
        if msg.startswith(p + " "):
            prefix, msg = p, msg[len(p) + 1:]
            break
    fields = {k: v[1:-1] if v.startswith('"') and v.endswith('"') and len(v) >= 2 else v
              for k, v in ((m2.group("key"), m2.group("value")) for m2 in _KV.finditer(msg))}
    ts = _ISO.match(line)
    return {"prefix": prefix, "fields": fields, "ts": ts.group(1) if ts else None, "raw": msg}


def _qids_in(value: str) -> list[str]:
    return [v for v in re.split(r"[,\s]+", value or "") if _QID_ONLY.match(v)]


def record_qids(rec: DaemonLine) -> list[str]:
    out = []
    for key, value in rec["fields"].items():
        if _QID_KEYS.match(key):
            out += _qids_in(value)
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------ time


def parse_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """'2026-11-27 17:00', '2026-11-27T17:00:05+00:00', '17:00' (today), '2h' / '30m' (ago)."""
    now = now or dt.datetime.now(dt.UTC)
    text = text.strip()
    m = re.fullmatch(r"(\d+)\s*([smhd])", text)
    if m:
        return now - dt.timedelta(seconds=int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])
    if re.fullmatch(r"\d\d:\d\d(:\d\d)?", text):
        text = f"{now.date().isoformat()}T{text}"
    value = dt.datetime.fromisoformat(text.replace(" ", "T"))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def log_time(ts: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """A log line's timestamp: ISO, or syslog's 'Nov 27 16:59:25' (this year; last year if in the future)."""
    if not ts:
        return None
    try:
        value = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    except ValueError:
        pass
    now = now or dt.datetime.now(dt.UTC)
    try:
        value = dt.datetime.strptime(f"{now.year} {ts.split('.')[0]}", "%Y %b %d %H:%M:%S").replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    return value.replace(year=now.year - 1) if value > now + dt.timedelta(days=1) else value


# ------------------------------------------------------------------ the story


class Logs:
    def __init__(self, daemon_lines: Iterable[str], mta_lines: Iterable[str]):
        self.mta = [p for p in (parse_postfix(line) for line in mta_lines) if p is not None]
        self.daemon = [r for r in (parse_daemon(line) for line in daemon_lines) if r is not None]

    def find(self, query: str, since: dt.datetime | None = None, until: dt.datetime | None = None) -> set[str]:
        """The queue ids the query names directly (a queue id, a Message-ID, an address)."""
        q = query.strip()
        bare = q.strip("<>").lower()

        def in_window(ts: str | None) -> bool:
            t = log_time(ts)
            return t is None or ((since is None or t >= since) and (until is None or t <= until))

        if _QID_ONLY.match(q) and (any(p["qid"] == q for p in self.mta) or
                                   any(q in record_qids(r) for r in self.daemon)):
            return {q}
        found = set()
        for p in self.mta:
            if not p["qid"] or not in_window(p["ts"]):
                continue
            if (p["kind"] == "message-id" and p["message_id"].lower() == bare) or (
                    "@" in bare and p["kind"] in ("delivery", "from")
                    and bare in (p.get("to", "").lower(), p.get("orig_to", "").lower(), p.get("from", "").lower())):
                found.add(p["qid"])
        if "@" in bare:
            pattern = re.compile(r"(?:^|[<\s,:>])" + re.escape(bare) + r"(?:$|[>\s,-])", re.I)
            for r in self.daemon:
                if r["prefix"] == "" and pattern.search(" ".join(r["fields"].get(k, "") for k in ("from", "rcpts",
                                                                                                "added"))):
                    qid = r["fields"].get("queue_id", "-")
                    if _QID_ONLY.match(qid) and ((since is None and until is None) or
                                                 any(p["qid"] == qid and in_window(p["ts"]) for p in self.mta)):
                        found.add(qid)
        return found

    def related(self, seeds: set[str]) -> set[str]:
        """Every queue id linked to the seeds: bounces, re-injected copies, notices about them."""
        links: dict[str, set[str]] = defaultdict(set)
        notices: set[str] = set()
        for p in self.mta:
            if p["kind"] == "ndn" and p["qid"] is not None:
                links[p["qid"]].add(p["qid2"])
                links[p["qid2"]].add(p["qid"])
        for r in self.daemon:
            qids = record_qids(r)
            if r["prefix"] == "notice":  # a notice lists several messages: link each to it, not to each other
                own = _qids_in(r["fields"].get("qid", ""))
                for subject in _qids_in(r["fields"].get("queue_ids", "")):
                    links[subject].update(own)
                notices.update(own)
                continue
            for a in qids:
                links[a].update(q for q in qids if q != a)
        seen, todo = set(), list(seeds)
        while todo:
            qid = todo.pop()
            if qid in seen:
                continue
            seen.add(qid)
            if qid not in notices:
                todo.extend(links.get(qid, ()))
        return seen

    def story(self, qids: set[str]) -> list[Step]:
        steps: list[Step] = []
        anchored: dict[int, list[DaemonLine]] = defaultdict(list)  # mta index -> daemon records to show after it
        before: dict[int, list[DaemonLine]] = defaultdict(list)
        loose: list[DaemonLine] = []
        first_line: dict[str, int] = {}
        cleanup_line: dict[str, int] = {}
        bounce_delivery: dict[str, int] = {}
        for i, p in enumerate(self.mta):
            if p["qid"] in qids:
                first_line.setdefault(p["qid"], i)
                if p["kind"] == "message-id":
                    cleanup_line.setdefault(p["qid"], i)
                if p["kind"] == "delivery" and "routemilter" in p.get("reply", ""):
                    bounce_delivery.setdefault(p["qid"], i)
        for r in self.daemon:
            mine = [q for q in record_qids(r) if q in qids]
            if not mine:
                continue
            f = r["fields"]
            if r["prefix"] == "" and f.get("queue_id") in qids:
                where = cleanup_line.get(f["queue_id"], first_line.get(f["queue_id"]))
                (anchored[where].append(r) if where is not None else loose.append(r))
            elif r["prefix"].startswith("bounce") and f.get("bounce_qid") in bounce_delivery:
                before[bounce_delivery[f["bounce_qid"]]].append(r)
            else:
                where = max((first_line[q] for q in mine if q in first_line), default=None)
                (anchored[where].append(r) if where is not None else loose.append(r))
        interpreter = Interpreter()
        n = 0
        for i, p in enumerate(self.mta):
            for r in before.get(i, []):
                steps += self._daemon_steps(r, n)
                n += 1
            if p["qid"] in qids:
                step = self._mta_step(p, interpreter, n)
                if step is not None:
                    steps.append(step)
                n += 1
            for r in anchored.get(i, []):
                steps += self._daemon_steps(r, n)
                n += 1
        for r in loose:
            steps += self._daemon_steps(r, n)
            n += 1
        last = None
        for step in steps:  # routemilter's lines in a plain file carry no time: the MTA line's before it
            if step.time is None:
                step.time = last
            last = step.time
        return steps

    # -- the MTA's lines

    @staticmethod
    def _mta_step(p: PostfixLine, interpreter: Interpreter, n: int) -> Step | None:
        kind, qid, ts = p["kind"], p["qid"], p["ts"]
        if qid is None:
            return None
        facts = interpreter.feed(p)
        service = p["prog"].split("/")
        if kind == "client":
            how = "re-injected by routemilter" if any("reinject" in s for s in service) else "received"
            return Step(n, ts, qid, "received", f"{how} from {p['client']}", {"client": p["client"]})
        if kind == "message-id":
            return Step(n, ts, qid, "message-id", f"message-id <{p['message_id']}>", {"message_id": p["message_id"]})
        if kind == "from":
            return Step(n, ts, qid, "queued", f"queued, envelope sender <{p['from']}>, {p['nrcpt']} recipient(s)",
                        {"from": p["from"], "nrcpt": p["nrcpt"]})
        if kind == "said":
            return Step(n, ts, qid, "remote-reply", f"{p['host']} said: {p['reply']}"
                        + (f" (in reply to {p['cmd']})" if p.get("cmd") else ""),
                        {"host": p["host"], "reply": p["reply"], "command": p.get("cmd", "")})
        if kind == "conn":
            return Step(n, ts, qid, "connection", f"{p['host']}: {p['why']}", {"host": p["host"], "reply": p["why"]})
        if kind == "ndn":
            return Step(n, ts, qid, "bounce-created", f"Postfix created a {p['what']} notification: queue id "
                        f"{p['qid2']}", {"bounce_qid": p["qid2"]})
        if kind == "removed":
            return Step(n, ts, qid, "removed", "removed from the queue (done)")
        if kind == "reject":
            return Step(n, ts, qid, "refused", f"refused at {p['stage']}: {p['reply']} (to <{p['to']}>)",
                        {"reply": p["reply"], "to": p["to"]})
        if kind == "delivery":
            data: dict[str, object] = {"to": p["to"], "relay": p["relay"], "status": p["status"], "dsn": p["dsn"],
                                       "reply": p["reply"], "delay": p["delay"]}
            fallback = any(f.get("type") == "relay-fallback" for f in facts)
            if p["status"] == "sent":
                if "routemilter" in p["reply"]:
                    return Step(n, ts, qid, "handed-to-routemilter", f"<{p['to']}>: handed to routemilter "
                                f"({p['relay']}): {p['reply']}", data)
                text = f"<{p['to']}>: delivered via {p['relay']}: {p['reply']}"
                if fallback:
                    text += "  [relay fallback: the host before it failed]"
                    data["relay_fallback"] = True
                return Step(n, ts, qid, "delivered", text, data)
            if p["status"] == "deferred":
                return Step(n, ts, qid, "deferred", f"<{p['to']}>: deferred ({p['delay']:.0f} s since arrival): "
                            f"{p['reply']}", data)
            if p["status"] == "bounced":
                return Step(n, ts, qid, "bounced", f"<{p['to']}>: bounced: {p['reply']}", data)
            return Step(n, ts, qid, p["status"], f"<{p['to']}>: {p['status']}: {p['reply']}", data)
        if kind == "other" and any(w in p["text"] for w in ("milter-", "warning", "status=expired", "reject")):
            return Step(n, ts, qid, "note", p["text"])
        return None

    # -- routemilter's lines

    @staticmethod
    def _daemon_steps(r: DaemonLine, n: int) -> list[Step]:
        f, ts, prefix = r["fields"], r["ts"], r["prefix"]
        if prefix == "":
            qid = f.get("queue_id", "-")
            out = [Step(n, ts, qid, "sender", f"routemilter: envelope sender {f.get('from', '<>')}",
                        {"from": f.get("from", "<>").strip("<>")})]
            for item in f.get("rcpts", "").split():
                rcpt, _, how = item.partition("->")
                rule, _, dests = how.partition(":")
                if rule == "refused":
                    out.append(Step(n, ts, qid, "refused", f"routemilter refused <{rcpt}> ({dests})",
                                    {"rcpt": rcpt, "reply": dests}))
                elif rule == "unsrs":
                    out.append(Step(n, ts, qid, "routed", f"routemilter: <{rcpt}> is an SRS return address: to "
                                    f"<{dests}>", {"rcpt": rcpt, "destinations": [dests]}))
                elif dests:
                    keep = dests.endswith("+keep")
                    targets = dests.removesuffix("+keep").split(",")
                    out.append(Step(n, ts, qid, "routed", f"routemilter: <{rcpt}> routed by rule {rule} to "
                                    + ", ".join(f"<{t}>" for t in targets) + (" (and kept)" if keep else ""),
                                    {"rcpt": rcpt, "rule": rule, "destinations": targets}))
                elif rule == "pass" and rcpt.lower().startswith("rmb="):
                    out.append(Step(n, ts, qid, "bounce-accepted", "routemilter: a bounce to our return address "
                                    f"<{rcpt}>, for the bounce handler", {"rcpt": rcpt}))
                else:
                    out.append(Step(n, ts, qid, "routed", f"routemilter: <{rcpt}>: {rule}", {"rcpt": rcpt,
                                                                                            "rule": rule}))
            outcome = f.get("outcome", "")
            if outcome != "accept":
                out.append(Step(n, ts, qid, "outcome", f"routemilter: message {outcome}", {"outcome": outcome}))
            if f.get("notes"):
                out.append(Step(n, ts, qid, "note", f"routemilter: {f['notes']}", {"notes": f["notes"]}))
            return out
        if prefix == "bounce":
            qid = f.get("bounce_qid", "-")
            new = _qids_in(f.get("new_qids", ""))
            sent = [s for s in f.get("sent", "").split(",") if s and s != "-"]
            qid_of = {}
            for s, q in zip(sent, new, strict=False):  # a failed submission has no queue id
                kind, _, arrow = s.partition(":")
                qid_of[(kind, arrow.split("->")[-1].strip("<>"))] = q
            out = []
            for note in f.get("notes", "").split():
                address, _, what = note.partition(":")
                if what.startswith("fallback->"):
                    nxt = what[len("fallback->"):]
                    q = qid_of.get(("fallback", nxt), "-")
                    out.append(Step(n, ts, qid, "address-fallback", f"routemilter: <{address}> bounced: address "
                                    f"fallback to <{nxt}> (re-injected as queue id {q})",
                                    {"failed": address, "next": nxt, "new_qid": q, "orig_qid": f.get("orig_qid")}))
                elif what in ("chain-exhausted", "not-in-chain") or what.startswith("cannot-forward"):
                    out.append(Step(n, ts, qid, "chain-exhausted", f"routemilter: <{address}>: {what}: no address "
                                    "left to try", {"failed": address, "orig_qid": f.get("orig_qid")}))
                elif note.startswith("final-bounce->"):
                    to = note[len("final-bounce->"):]
                    q = qid_of.get(("final-bounce", to), "-")
                    out.append(Step(n, ts, qid, "final-bounce", f"routemilter: one bounce listing every failure "
                                    f"sent to the sender <{to}> (queue id {q})", {"to": to, "new_qid": q}))
                else:
                    out.append(Step(n, ts, qid, "bounce-note", f"routemilter: bounce: {note}", {"note": note}))
            return out or [Step(n, ts, qid, "bounce-handled", f"routemilter: bounce handled: {r['raw']}")]
        if prefix == "deferral":
            qid = f.get("queue_id", "-")
            decision = f.get("decision", "")
            rcpt = f.get("rcpt", "").strip("<>")
            if decision == "fallback":
                text = (f"routemilter: <{rcpt}> deferred for {f.get('age', '?')} (fallback_after "
                        f"{f.get('fallback_after', '?')}): address fallback to {f.get('to', '?')} (re-injected as "
                        f"queue id {f.get('new_queue_id', '-')})")
                return [Step(n, ts, qid, "deferral-fallback", text,
                             {"failed": rcpt, "next": f.get("to", "").strip("<>"),
                              "new_qid": f.get("new_queue_id", "-"), **f})]
            waited = f" (deferred {f['age']}, fallback_after {f.get('fallback_after', '?')})" if "age" in f else ""
            return [Step(n, ts, qid, "deferral", f"routemilter: deferred copy for <{rcpt}>: {decision}{waited}",
                         dict(f))]
        if prefix == "notice":
            return [Step(n, ts, f.get("qid", "-"), "notice", f"routemilter: notice ({f.get('channel', 'mail')}, "
                         f"{f.get('result', '')}) to {f.get('to', '-')} about {f.get('destination', '-')}", dict(f))]
        qid = (record_qids(r) or ["-"])[0]
        return [Step(n, ts, qid, prefix.replace(" ", "-") or "routemilter", f"routemilter: {prefix} {r['raw']}".strip(),
                     dict(f))]


# ------------------------------------------------------------------ the command


def _read(paths: list[str] | None, unit: str, since: dt.datetime | None) -> list[str]:
    if paths:
        lines = []
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines += fh.read().splitlines()
        return lines
    cmd = ["journalctl", "--no-pager", "-q", "-o", "short-iso-precise", "-u", unit]
    if since is not None:
        cmd += ["--since", (since - dt.timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")]
    result = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=300, check=False)
    if result.returncode != 0:
        raise OSError(f"journalctl -u {unit} failed: {result.stderr.strip() or result.returncode}")
    return result.stdout.splitlines()


def cmd_trace(args: argparse.Namespace) -> int:
    from .config import ConfigError, load  # noqa: PLC0415

    mta_files, mta_unit = args.mta_log, args.mta_unit
    if not mta_files and mta_unit is None:
        try:  # the MTA log the daemon follows, if the config names one
            settings = load(args.config, read_secrets=False).mta_log
        except (ConfigError, OSError):
            settings = None
        if settings is not None and settings.file:
            mta_files = [settings.file]
        mta_unit = settings.journal_unit if settings is not None and settings.journal_unit else "postfix@-"
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        print(f"routemilter: trace: bad time: {exc}", file=sys.stderr)
        return 2
    try:
        logs = Logs(_read(args.log, args.unit, since), _read(mta_files, mta_unit or "postfix@-", since))
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"routemilter: trace: cannot read the logs: {exc}", file=sys.stderr)
        return 2
    seeds = logs.find(args.query, since, until)
    if not seeds:
        print(f"routemilter: trace: nothing found for {args.query!r}", file=sys.stderr)
        return 1
    qids = logs.related(seeds)
    steps = logs.story(qids)
    if args.json:
        print(json.dumps({"query": args.query, "queue_ids": sorted(qids), "steps": [s.as_dict() for s in steps]},
                         indent=2))
        return 0
    print(f"{args.query}: queue ids {', '.join(sorted(qids))}")
    for s in steps:
        print(f"{s.time or '':<19} {s.queue_id:<12} {s.text}")
    return 0
