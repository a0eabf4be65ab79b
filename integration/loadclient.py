"""A small, bounded, parallel SMTP client that can account for every message.

smtp-source cannot give each message its own id, so this sends messages that
each carry a unique `X-Load-Id` header (and Message-ID), keeps every SMTP
reply per message, and classifies the outcome from the client's side:

* accepted:  250 after DATA: the server took responsibility for it;
* tempfail:  a 4xx anywhere (or a connection refused/closed before DATA):
             the client still holds it and will retry;
* refused:   a 5xx: the client gives up (should not happen in these tests);
* ambiguous: the connection died after the end of DATA was sent, before the
             reply: the client cannot know (counted; must stay 0 here).

Bounded: a fixed number of worker threads, a per-transaction timeout and a
deadline for the whole run. Only loopback addresses.
"""

from __future__ import annotations

import queue
import re
import smtplib
import threading
import time
from dataclasses import dataclass, field

from fakemx import check_loopback

ID_HEADER = "X-Load-Id"
ID_PATTERN = re.compile(rb"^X-Load-Id: (\S+)\r?$", re.MULTILINE)


@dataclass
class Attempt:
    outcome: str  # accepted | tempfail | refused | ambiguous
    stage: str  # where it ended: connect, mail, rcpt, data, done
    reply: str
    accepted_rcpts: list[str] = field(default_factory=list)
    queue_id: str | None = None


@dataclass
class Job:
    load_id: str
    sender: str
    rcpts: list[str]
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def final(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None


def message(job: Job, body_lines: int = 20) -> bytes:
    head = (f"From: Load Test <{job.sender}>\r\nTo: {', '.join(job.rcpts)}\r\n"
            f"Subject: load {job.load_id}\r\nDate: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{job.load_id}@load.sender.test>\r\n{ID_HEADER}: {job.load_id}\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
    body = "".join(f"line {i} of message {job.load_id}: the quick brown fox jumps over the lazy dog\r\n"
                   for i in range(body_lines))
    return (head + body).encode()


def send_one(host: str, port: int, job: Job, timeout: float = 60.0) -> Attempt:
    """One SMTP transaction for `job`; never raises."""
    stage, reply = "connect", ""
    s = smtplib.SMTP(timeout=timeout)
    try:
        code, msg = s.connect(host, port)
        reply = f"{code} {msg.decode(errors='replace')}"
        if code != 220:
            return Attempt("tempfail" if 400 <= code < 500 else "refused", stage, reply)
        s.ehlo("load.client.test")
        stage = "mail"
        code, msg = s.mail(job.sender)
        reply = f"{code} {msg.decode(errors='replace')}"
        if code >= 400:
            return Attempt("tempfail" if code < 500 else "refused", stage, reply)
        stage = "rcpt"
        accepted, codes = [], []
        for rcpt in job.rcpts:
            code, msg = s.rcpt(rcpt)
            codes.append((code, msg.decode(errors="replace")))
            if 200 <= code < 300:
                accepted.append(rcpt)
        if not accepted:
            worst = min(codes)  # a 4xx beats a 5xx: retry
            return Attempt("tempfail" if 400 <= worst[0] < 500 else "refused", stage, f"{worst[0]} {worst[1]}")
        stage = "data"
        code, msg = s.docmd("DATA")
        if code != 354:
            outcome = "tempfail" if 400 <= code < 500 else "refused"
            return Attempt(outcome, stage, f"{code} {msg.decode(errors='replace')}")
        data = message(job).replace(b"\r\n.", b"\r\n..")
        try:
            s.send(data + b"\r\n.\r\n")
            code, msg = s.getreply()
        except (smtplib.SMTPException, OSError) as exc:
            return Attempt("ambiguous", "data-end", f"{type(exc).__name__}: {exc}", accepted)
        text = msg.decode(errors="replace")
        reply = f"{code} {text}"
        m = re.search(r"queued as (\S+)", text)
        if 200 <= code < 300:
            return Attempt("accepted", "done", reply, accepted, m.group(1) if m else None)
        return Attempt("tempfail" if code < 500 else "refused", "data-end", reply, accepted)
    except (smtplib.SMTPException, OSError) as exc:
        # Nothing was handed over (the end of DATA is handled above): a retry is safe.
        return Attempt("tempfail", stage, f"{type(exc).__name__}: {exc}")
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            pass
        s.close()


def run(host: str, port: int, jobs: list[Job], workers: int = 6, deadline_s: float = 600.0,
        progress=None, retries: int = 0, backoff: float = 0.2) -> float:
    """Send every job (appending an Attempt per try); return the seconds taken.

    A tempfailed job goes back to the end of the queue after `backoff` seconds,
    up to `retries` more times, as a real client's queue would retry it.
    `progress(accepted)` is called after each accepted message, from the workers.
    """
    check_loopback(host)
    todo: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        todo.put(job)
    done = [0]
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + deadline_s

    def worker():
        while time.monotonic() < stop_at:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            attempt = send_one(host, port, job, timeout=min(60.0, max(1.0, stop_at - time.monotonic())))
            job.attempts.append(attempt)
            if attempt.outcome == "tempfail" and len(job.attempts) <= retries:
                time.sleep(backoff)
                todo.put(job)
                continue
            with lock:
                done[0] += 1
                count = done[0] if attempt.outcome == "accepted" else None
            if progress is not None and count is not None:
                progress(count)

    threads = [threading.Thread(target=worker, name=f"load-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + 70)
    if any(t.is_alive() for t in threads) or not todo.empty():
        raise TimeoutError(f"load run did not finish within {deadline_s}s ({done[0]} of {len(jobs)} sent)")
    return time.monotonic() - started
