"""Reading the MTA's log: Postfix's lines parsed into facts, and a follower.

Delivery results (delivered, deferred with the remote reply, bounced, moved on to
the fallback relay) exist only in Postfix's log. `parse_postfix` turns one line
into a dict; `trace` (trace.py) reads whole logs with it on demand, and the daemon
follows the log live (`Follower`) to publish `mta` events, from which the metrics
count deferrals by domain and reply code and the notifier learns that a
destination has deferred too long or that the fallback relay was used.

Why a follower in the daemon rather than only `trace` on demand: notices must go
out while a destination is failing, without anyone running a command, and the
deferral counters must move when Prometheus scrapes. The follower reads only
lines appended after it starts (no replay on restart) and costs one regex per line.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NotRequired, TypedDict

from .events import Facts

if TYPE_CHECKING:
    from .visconfig import MTALogSettings

log = logging.getLogger("routemilter")

QID = r"[0-9A-F]{6,12}|[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10,20}"  # short and long (enable_long_queue_ids)
_PREFIX = re.compile(
    r"^(?P<ts>\w{3} [ \d]\d \d\d:\d\d:\d\d(?:\.\d+)?|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?)"
    r"\s+(?P<host>\S+)\s+(?P<prog>[^\s\[:]+)(?:\[(?P<pid>\d+)\])?:\s(?P<msg>.*)$")
_QMSG = re.compile(r"^(?P<qid>" + QID + r"): (?P<rest>.*)$")
_DELIVERY = re.compile(r"^to=<(?P<to>[^>]*)>,(?: orig_to=<(?P<orig_to>[^>]*)>,)? relay=(?P<relay>[^,]*),"
                       r"(?: conn_use=\d+,)? delay=(?P<delay>[\d.]+),.*? dsn=(?P<dsn>[\d.]+), "
                       r"status=(?P<status>\w+)(?: \((?P<reply>.*)\))?$")
_SAID = re.compile(r"^host (?P<host>\S+) (?:said|refused to talk to me): (?P<reply>.*?)(?: \(in reply to (?P<cmd>.+?)"
                   r" command\))?$")
_CONN = re.compile(r"^(?:connect to (?P<host>\S+?): (?P<why>.+)|lost connection with (?P<host2>\S+) (?P<why2>.+)|"
                   r"conversation with (?P<host3>\S+) timed out (?P<why3>.+))$")
_NDN = re.compile(r"^sender (?P<what>non-delivery|delivery status|delay) notification: (?P<qid>" + QID + r")$")
_FROM = re.compile(r"^from=<(?P<from>[^>]*)>, size=(?P<size>\d+), nrcpt=(?P<nrcpt>\d+)")
_REPLY_CODE = re.compile(r"\b([245]\d\d)[ -]([245]\.\d{1,3}\.\d{1,3})?")
_NOQUEUE = re.compile(r"^NOQUEUE: (?:milter-)?reject: (?P<stage>\S+) from (?P<client>\S+): (?P<reply>.*?); "
                      r"from=<(?P<from>[^>]*)> to=<(?P<to>[^>]*)>")
_MILTER_REJECT = re.compile(r"^milter-reject: (?P<stage>\S+) from (?P<client>\S+): (?P<reply>.*?); "
                            r"from=<(?P<from>[^>]*)> to=<(?P<to>[^>]*)>")


# One parsed line: the first seven keys always; the rest by kind (see parse_postfix).
PostfixLine = TypedDict("PostfixLine", {
    "ts": str, "server": str, "prog": str, "pid": str | None, "qid": str | None, "kind": str, "text": str,
    "client": NotRequired[str],  # client
    "message_id": NotRequired[str],  # message-id
    "from": NotRequired[str], "nrcpt": NotRequired[int],  # from (and reject: from)
    "to": NotRequired[str], "orig_to": NotRequired[str], "relay": NotRequired[str], "delay": NotRequired[float],
    "dsn": NotRequired[str], "status": NotRequired[str], "reply": NotRequired[str],  # delivery
    "host": NotRequired[str], "cmd": NotRequired[str], "why": NotRequired[str],  # said, conn
    "qid2": NotRequired[str], "what": NotRequired[str],  # ndn
    "stage": NotRequired[str],  # reject
})


def parse_postfix(line: str) -> PostfixLine | None:
    """One Postfix log line -> {ts, server, prog, pid, qid, kind, ...}; None if it is not Postfix's.

    kinds: client, message-id, from, delivery (to, relay, delay, dsn, status, reply),
    said (host, reply, cmd: a remote host's reply before Postfix moved on or deferred),
    conn (host, why), ndn (qid2: the bounce Postfix made), removed, reject, other."""
    m = _PREFIX.match(line.rstrip("\n"))
    if m is None or not m.group("prog").startswith("postfix"):
        return None
    out: PostfixLine = {"ts": m.group("ts"), "server": m.group("host"), "prog": m.group("prog"), "pid": m.group("pid"),
                        "qid": None, "kind": "other", "text": m.group("msg")}
    msg = m.group("msg")
    nq = _NOQUEUE.match(msg)
    if nq:
        _reject(out, nq)
        return out
    q = _QMSG.match(msg)
    if q is None:
        return out
    out["qid"] = q.group("qid")
    rest = q.group("rest")
    out["text"] = rest
    if rest.startswith("client="):
        out.update({"kind": "client", "client": rest[7:].split(",")[0]})
    elif rest.startswith("message-id="):
        out.update({"kind": "message-id", "message_id": rest[11:].strip().strip("<>")})
    elif rest == "removed":
        out["kind"] = "removed"
    elif (d := _DELIVERY.match(rest)) is not None:
        out.update({"kind": "delivery", "to": d.group("to"), "orig_to": d.group("orig_to") or "",
                    "relay": d.group("relay"), "delay": float(d.group("delay")), "dsn": d.group("dsn"),
                    "status": d.group("status"), "reply": d.group("reply") or ""})
    elif (s := _SAID.match(rest)) is not None:
        out.update({"kind": "said", "host": s.group("host"), "reply": s.group("reply"), "cmd": s.group("cmd") or ""})
    elif (c := _CONN.match(rest)) is not None:
        out.update({"kind": "conn", "host": c.group("host") or c.group("host2") or c.group("host3"),
                    "why": c.group("why") or c.group("why2") or c.group("why3")})
    elif (n := _NDN.match(rest)) is not None:
        out.update({"kind": "ndn", "qid2": n.group("qid"), "what": n.group("what")})
    elif (f := _FROM.match(rest)) is not None:
        out.update({"kind": "from", "from": f.group("from"), "nrcpt": int(f.group("nrcpt"))})
    elif (r := _MILTER_REJECT.match(rest)) is not None:
        _reject(out, r)
    return out


def _reject(out: PostfixLine, m: re.Match[str]) -> None:
    out.update({"kind": "reject", "reply": m.group("reply"), "to": m.group("to"), "from": m.group("from"),
                "stage": m.group("stage")})


def reply_code(text: str) -> str:
    """'451 4.7.650 The mail server ...' -> '451 4.7.650'; the first reply code in a text."""
    m = _REPLY_CODE.search(text or "")
    if m is None:
        return "none"
    return f"{m.group(1)} {m.group(2)}" if m.group(2) else m.group(1)


# ------------------------------------------------------------------- follower


def tail_file(path: str, stop: threading.Event, poll: float = 0.5) -> Iterator[str]:
    """Lines appended to `path` from now on; follows rotation (a new inode) and truncation."""
    fh = None
    inode = None
    first = True  # the file as found at start: from its end (history is trace's job)
    buffer = ""
    try:
        while not stop.is_set():
            if fh is None:
                try:
                    fh = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 (kept open while following)
                except OSError:
                    stop.wait(poll * 4)
                    continue
                inode = os.fstat(fh.fileno()).st_ino
                if first:
                    fh.seek(0, os.SEEK_END)
                first = False
            chunk = fh.read(65536)
            if chunk:
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                yield from lines
                continue
            try:
                st = os.stat(path)
                if st.st_ino != inode or st.st_size < fh.tell():  # rotated or truncated: the new file from its start
                    fh.close()
                    fh, buffer = None, ""
                    continue
            except OSError:
                pass
            stop.wait(poll)
    finally:
        if fh is not None:
            fh.close()


def tail_journal(unit: str, stop: threading.Event) -> Iterator[str]:
    """Lines journald gets from `unit` from now on (journalctl -f, ISO timestamps)."""
    proc = subprocess.Popen(["journalctl", "-f", "-n", "0", "-u", unit, "-o", "short-iso-precise"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace")

    def stopper() -> None:
        stop.wait()
        proc.terminate()

    threading.Thread(target=stopper, daemon=True).start()
    lines = proc.stdout
    assert lines is not None  # stdout=PIPE
    try:
        for line in lines:
            yield line.rstrip("\n")
    finally:
        proc.terminate()
        proc.wait(5)


class Follower:
    """A thread that follows the MTA's log and calls `on_line` with each parsed Postfix
    line. A failure in the follower is logged; it never touches mail."""

    def __init__(self, settings: MTALogSettings, on_line: Callable[[PostfixLine], None]):
        self.settings = settings
        self.on_line = on_line
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mta-log", daemon=True)

    def start(self) -> Follower:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)

    def _lines(self) -> Iterator[str]:
        if self.settings.file:
            return tail_file(self.settings.file, self.stop_event)
        if self.settings.journal_unit:
            return tail_journal(self.settings.journal_unit, self.stop_event)
        raise ValueError("mta_log names neither a file nor a journal unit")  # config.py refuses that

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                for line in self._lines():
                    parsed = parse_postfix(line)
                    if parsed is not None and parsed["qid"]:
                        self.on_line(parsed)
            except Exception:
                log.exception("mta_log: following the MTA log failed; retrying in 5 s")
                self.stop_event.wait(5)
            else:
                if not self.stop_event.is_set():
                    self.stop_event.wait(1)  # journalctl ended: start it again


def _host(text: str) -> str:
    """'127.0.0.2[127.0.0.2]:25' or 'mx.example[1.2.3.4]' -> the name before the address."""
    return (text or "").split("[", 1)[0].split(":", 1)[0].lower()


class Interpreter:
    """Turns followed Postfix lines into facts: a destination delivered, deferred (with
    the remote reply and the delay so far) or bounced, and a relay fallback (a remote
    host answered 4xx or could not be reached, and the same delivery attempt then
    succeeded through another host: Postfix logs the first host's reply without a
    recipient, then the recipient's delivery line)."""

    MAX_PENDING = 10_000

    def __init__(self) -> None:
        # (qid, smtp pid) -> the last failing host's line
        self._pending: dict[tuple[str, str | None], PostfixLine] = {}

    def feed(self, p: PostfixLine) -> list[Facts]:
        qid = p["qid"]
        if qid is None:
            return []
        kind, key = p["kind"], (qid, p["pid"])
        if kind in ("said", "conn"):
            if len(self._pending) >= self.MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            self._pending[key] = p
            return []
        if kind == "removed":
            for k in [k for k in self._pending if k[0] == qid]:
                del self._pending[k]
            return []
        if kind != "delivery":
            return []
        status, reply = p["status"], p["reply"]
        fact: Facts = {"qid": qid, "to": p["to"], "relay": p["relay"], "delay": p["delay"], "dsn": p["dsn"],
                       "status": status, "reply": reply, "ts": p["ts"]}
        before = self._pending.pop(key, None)
        if before is not None and _host(before["host"]) == _host(p["relay"]):
            self._pending[key] = before  # that host's reply was for another recipient of the same session
            before = None
        if before is not None:
            # The destination's own reply is the one that matters (the last host's, e.g. the
            # fallback relay's or routemilter's deferral listener's, stays as final_reply).
            fact.update({"reply": before.get("reply") or before.get("why") or "", "failed_host": before["host"],
                         "final_reply": reply})
        if "routemilter" in reply:
            # handed to routemilter's own listener (deferral-driven fallback): its events say what it did
            fact["type"] = "to-routemilter" if status == "sent" else "deferred"
        elif status == "sent" and before is not None:
            fact.update({"type": "relay-fallback", "delivered_reply": reply})
        else:
            fact["type"] = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced"}.get(status, status)
        return [fact]
