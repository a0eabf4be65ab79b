"""Visibility end to end with a real Postfix: trace, notices, metrics (issue 13).

One Postfix and daemon for the module, configured with `metrics:`, `mta_log:`
(the daemon follows Postfix's maillog_file) and `notify:` (an admin mailbox on a
FakeMX and a webhook on a local http.server). Each test uses its own rule and
destinations, so the counters and notices it checks are its own.

* `routemilter trace <queue id>` (the real CLI, on the real logs) tells the story
  of a message whose primary is rate limited (451 4.7.650) and which went out
  through the fallback relay, and of one whose primary bounced (550) and whose
  backup address got it, with the remote replies and every queue id.
* several failures of one destination give the admin ONE digest (DKIM-signed,
  with the replies and the trace command) and the webhook one POST; mail that
  was delivered gives none.
* the metrics endpoint, scraped over HTTP, moves by exactly the messages sent.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from checks import seed_message  # noqa: E402
from fakemx import RATE_LIMITED, FakeMX, free_port  # noqa: E402
from stack import SRS_DOMAIN, Stack  # noqa: E402

pytestmark = pytest.mark.integration

SENDER = "alice@sender.test"
INTERVAL = 12  # notify.interval in seconds: long enough for a test's failures to fall in one digest
RULES = """
bounces:
  socket: unix:{workdir}/bounce.sock
  reinject: 127.0.0.1:{reinject_port}
  deferral_listen: 127.0.0.1:{deferral_port}
metrics:
  listen: 127.0.0.1:{metrics_port}
mta_log:
  file: {workdir}/pf/maillog
notify:
  to: admin@admin.test
  interval: {interval}s
  defer_after: 0s   # any deferral is "too long" here: Postfix's next retry would be minutes away
  webhook:
    url: http://127.0.0.1:{hook_port}/hook
    retries: 2
    timeout: 5
routes:
  mx-then-relay: [mx, "[{fb.host}]:{fb.port}"]
domains:
  family.test: {{}}
rules:
  - name: dariusz
    addresses: [dariusz@family.test]
    to:
      - address: dariusz@ratelimited.test
        route: mx-then-relay
  - name: backup
    addresses: [a@family.test]
    to:
      - address: a@gmail.test
        fallback: [a@outlook.test]
  - name: digest
    addresses: [d@family.test]
    to:
      - address: d@gmail.test
        fallback: [d@outlook.test]
  - name: fine
    addresses: [ok@family.test]
    to:
      - address: ok@gmail.test
        fallback: [ok@outlook.test]
  - name: counted
    addresses: [m@family.test]
    to:
      - address: m@gmail.test
        fallback: [m@outlook.test]
  - name: counted-bounce
    addresses: [mb@family.test]
    to:
      - address: mb@gmail.test
        fallback: [mb@outlook.test]
  - name: stuck
    addresses: [stuck@family.test]
    to:
      - address: stuck@ratelimited.test
  - name: deferring
    addresses: [rl@family.test]
    to:
      - address: rl@ratelimited.test
        fallback_after: 0
        fallback: [rl@outlook.test]
  - name: counted-relay
    addresses: [mr@family.test]
    to:
      - address: mr@ratelimited.test
        route: mx-then-relay
"""
REFUSE = {
    "a@gmail.test": "550 5.1.1 <{rcpt}> gmail: no such user",
    "d@gmail.test": "550 5.2.1 <{rcpt}> gmail: mailbox disabled",
    "mb@gmail.test": "550 5.1.1 <{rcpt}> gmail: no such user",
}


class Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def env():
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    workdir = tempfile.mkdtemp(prefix="rmvis-", dir="/var/tmp")
    os.chmod(workdir, 0o755)
    started = []

    def mx(host, name):
        server = FakeMX(host, free_port(host), name).start()
        started.append(server)
        return server

    hosts = {d: mx(f"127.0.0.{40 + n}", d) for n, d in enumerate(
        ["ratelimited.test", "gmail.test", "outlook.test", "admin.test", "sender.test"])}
    fb = mx("127.0.0.50", "fallback-relay")
    hosts["ratelimited.test"].set_reply("*", RATE_LIMITED)
    for rcpt, reply in REFUSE.items():
        hosts["gmail.test"].set_reply(rcpt, reply)
    Hook.received = []
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    metrics_port = free_port()
    rules = RULES.format(workdir=workdir, reinject_port=free_port(), deferral_port=free_port(),
                         metrics_port=metrics_port, interval=INTERVAL, hook_port=hook.server_address[1], fb=fb)
    stack = Stack(workdir, rules, mx_hosts=hosts)
    stack.fb = fb
    stack.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    stack.hook = hook
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        hook.shutdown()
        hook.server_close()
        for server in started:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def send(env, rcpt: str, tag: str) -> str:
    """Send one message; its queue id."""
    result = env.postfix.send(SENDER, [rcpt], seed_message(SENDER, rcpt, f"{tag}@sender.test", tag))
    assert result.accepted, result
    return re.search(r"queued as (\w+)", result.data[1]).group(1)


def tagged(env, tag: str) -> list:
    out = []
    for server in list(env.mx_hosts.values()) + [env.fb]:
        for msg in server.messages:
            if tag.encode() in msg.data:
                out += [(server.name, rcpt, msg) for rcpt in msg.rcpt_tos]
    return out


def settle(env, tag: str, expected: int, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while len(tagged(env, tag)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    env.postfix.wait_queue_empty(max(5.0, deadline - time.monotonic()))
    got = tagged(env, tag)
    assert len(got) == expected, (got, env.postfix.log_tail(40))
    return got


def trace(env, query: str, *extra: str) -> dict:
    """The real CLI on the real logs."""
    cmd = [sys.executable, "-m", "routemilter", "-c", str(env.config_path), "trace", query,
           "--log", str(env.daemon.log_path), "--mta-log", env.postfix.maillog, "--json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, (out.stdout, out.stderr)
    return json.loads(out.stdout)


def wait_trace(env, qid: str, done, timeout: float = 30) -> dict:
    """Trace until `done(steps)` holds: Postfix may write the last lines a moment after the queue is empty."""
    deadline = time.monotonic() + timeout
    while True:
        story = trace(env, qid)
        if done(story["steps"]) or time.monotonic() > deadline:
            return story
        time.sleep(0.5)


def scrape(env) -> dict:
    """Every sample of the endpoint, by (name, sorted labels), through a real HTTP client."""
    with urllib.request.urlopen(env.metrics_url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def notices(env, destination: str) -> list:
    return [m for m in env.mx_hosts["admin.test"].messages
            if f"Subject: [routemilter] {destination}:".encode() in m.data]


# ------------------------------------------------------------------ trace


def test_trace_rate_limited_primary_relay_fallback(env):
    qid = send(env, "dariusz@family.test", "vis-relay")
    (name, rcpt, _), = settle(env, "vis-relay", 1)
    assert (name, rcpt) == ("fallback-relay", "dariusz@ratelimited.test")
    story = wait_trace(env, qid, lambda steps: any(s["step"] == "delivered" for s in steps))
    steps = story["steps"]
    kinds = [s["step"] for s in steps]
    assert story["queue_ids"] == [qid], story
    assert kinds.index("received") < kinds.index("routed") < kinds.index("remote-reply") < kinds.index("delivered")
    routed, = [s for s in steps if s["step"] == "routed"]
    assert (routed["rcpt"], routed["rule"], routed["destinations"]) == (
        "dariusz@family.test", "dariusz", ["dariusz@ratelimited.test"])
    reply, = [s for s in steps if s["step"] == "remote-reply"]
    assert reply["reply"] == RATE_LIMITED and reply["host"].startswith("127.0.0.40"), reply
    delivered, = [s for s in steps if s["step"] == "delivered"]
    assert delivered["to"] == "dariusz@ratelimited.test" and delivered["relay_fallback"] is True
    assert delivered["relay"].startswith(f"{env.fb.host}[{env.fb.host}]:{env.fb.port}")
    # the same story found by Message-ID and by address
    assert trace(env, "<vis-relay@sender.test>")["queue_ids"] == [qid]
    assert qid in trace(env, "dariusz@family.test", "--since", "1h")["queue_ids"]


def test_trace_bounce_fallback_joins_bounce_and_reinjected_copy(env):
    qid = send(env, "a@family.test", "vis-bounce")
    (name, rcpt, _), = settle(env, "vis-bounce", 1)
    assert (name, rcpt) == ("outlook.test", "a@outlook.test")

    def complete(steps):
        return any(s["step"] == "delivered" and s["to"] == "a@outlook.test" for s in steps)

    story = wait_trace(env, qid, complete)
    steps = story["steps"]
    assert complete(steps), json.dumps(steps, indent=1)
    bounced, = [s for s in steps if s["step"] == "bounced"]
    assert bounced["to"] == "a@gmail.test" and "550 5.1.1 <a@gmail.test> gmail: no such user" in bounced["reply"]
    created, = [s for s in steps if s["step"] == "bounce-created"]
    fallback, = [s for s in steps if s["step"] == "address-fallback"]
    assert fallback["queue_id"] == created["bounce_qid"]  # the bounce handler's line names the bounce
    assert fallback["orig_qid"] == qid  # ... and the original
    assert (fallback["failed"], fallback["next"]) == ("a@gmail.test", "a@outlook.test")
    copy = fallback["new_qid"]
    assert sorted(story["queue_ids"]) == sorted({qid, created["bounce_qid"], copy})
    delivered = [s for s in steps if s["step"] == "delivered" and s["to"] == "a@outlook.test"]
    assert [s["queue_id"] for s in delivered] == [copy]
    order = [s["step"] for s in steps]
    assert order.index("routed") < order.index("bounced") < order.index("address-fallback")
    # starting from the re-injected copy finds the same story
    assert sorted(trace(env, copy)["queue_ids"]) == sorted(story["queue_ids"])


# ------------------------------------------------------------------ notices


def test_one_digest_for_several_failures_none_for_delivered_mail(env):
    before = len(Hook.received)
    qids = [send(env, "d@family.test", f"vis-digest-{n}") for n in range(3)]
    for n in range(3):
        settle(env, f"vis-digest-{n}", 1)
    for n in range(2):
        send(env, "ok@family.test", f"vis-fine-{n}")
    for n in range(2):
        (name, rcpt, _), = settle(env, f"vis-fine-{n}", 1)
        assert (name, rcpt) == ("gmail.test", "ok@gmail.test")
    admin = env.mx_hosts["admin.test"]
    deadline = time.monotonic() + INTERVAL + 30
    while not notices(env, "d@gmail.test") and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(INTERVAL + 3)  # a second notice about the same failures would be here now
    env.postfix.wait_queue_empty(20)
    got = notices(env, "d@gmail.test")
    assert len(got) == 1, [m.data[:300] for m in admin.messages]
    notice = got[0]
    assert notice.rcpt_tos == ["admin@admin.test"] and notice.mail_from in ("", "<>")
    text = notice.data.decode()
    print("\nnotice:\n" + text[text.index("From: "):])
    for qid in qids:
        assert f"routemilter trace {qid}" in text
    assert text.count("remote reply: 550 5.2.1 <d@gmail.test> gmail: mailbox disabled") == 3
    assert "fallback address used" in text and "sent instead to d@outlook.test" in text
    assert sorted(env.verify_dkim(notice.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    assert notices(env, "ok@gmail.test") == [] and not any(b"ok@gmail.test" in m.data for m in admin.messages)
    posts = [p for p in Hook.received[before:] if p["destination"] == "d@gmail.test"]
    assert len(posts) == 1, Hook.received[before:]
    print("\nwebhook payload:", json.dumps(posts[0]))
    assert sorted(p["queue_id"] for p in posts[0]["problems"]) == sorted(qids)  # bounces are handled in any order
    assert {p["kind"] for p in posts[0]["problems"]} == {"bounce-fallback"}
    assert not any(p["destination"] == "ok@gmail.test" for p in Hook.received)
    # the notice went around the milter (never routed, never counted) and is not itself reported
    log = env.daemon.log_text()
    notice_qid = re.search(r"notice to=<admin@admin.test> destination=d@gmail.test .*?qid=(\w+)", log).group(1)
    assert f"queue_id={notice_qid}" not in log
    assert not re.search(r"notice .*queue_ids=\S*" + notice_qid, log)


# ------------------------------------------------------------------ metrics


def test_metrics_move_by_exactly_the_messages_sent(env):
    before = scrape(env)
    for n in range(3):
        send(env, "m@family.test", f"vis-count-{n}")
    for n in range(3):
        settle(env, f"vis-count-{n}", 1)
    after = scrape(env)
    assert delta(before, after, "routemilter_messages_routed_total") == 3
    assert delta(before, after, "routemilter_messages_total", outcome="accept") == 3
    assert delta(before, after, "routemilter_milter_message_seconds_count") == 3
    assert delta(before, after, "routemilter_fallbacks_total", kind="bounce") == 0
    assert delta(before, after, "routemilter_bounces_total", result="handled") == 0

    # two bounce-driven fallbacks: each also brings Postfix's bounce through the milter
    before = scrape(env)
    for n in range(2):
        send(env, "mb@family.test", f"vis-countb-{n}")
    for n in range(2):
        settle(env, f"vis-countb-{n}", 1)
    after = scrape(env)
    assert delta(before, after, "routemilter_messages_routed_total") == 2
    assert delta(before, after, "routemilter_fallbacks_total", kind="bounce") == 2
    assert delta(before, after, "routemilter_bounces_total", result="handled") == 2
    assert delta(before, after, "routemilter_messages_total", outcome="accept") == 4  # 2 forwards + 2 bounces
    assert delta(before, after, "routemilter_chains_exhausted_total") == 0

    # relay fallback and the MTA's deferral counter come from the followed maillog
    before = scrape(env)
    for n in range(2):
        send(env, "mr@family.test", f"vis-countr-{n}")
    for n in range(2):
        settle(env, f"vis-countr-{n}", 1)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = scrape(env)
        if delta(before, after, "routemilter_fallbacks_total", kind="relay") >= 2:
            break
        time.sleep(0.3)
    time.sleep(1)
    after = scrape(env)
    assert delta(before, after, "routemilter_fallbacks_total", kind="relay") == 2
    assert delta(before, after, "routemilter_mta_deferrals_total", domain="ratelimited.test", code="451 4.7.650") == 2
    assert delta(before, after, "routemilter_messages_routed_total") == 2

    # refusals: an unknown recipient and a forged return address, each counted once
    before = scrape(env)
    result = env.postfix.send(SENDER, ["nobody@family.test"], seed_message(SENDER, "nobody@family.test",
                                                                          "vis-unknown@sender.test", "x"))
    assert result.rcpt["nobody@family.test"][0] == 550
    forged = f"rmb=aaaaaaaaaa=aa=x=p0=sender.test=alice@{SRS_DOMAIN}"
    result = env.postfix.send("", [forged], b"Subject: forged\r\n\r\nx\r\n")
    assert result.rcpt[forged][0] == 550
    # the milter records a refused-only transaction when the client disconnects (close): poll
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = scrape(env)
        if delta(before, after, "routemilter_refused_total", reason="bad_token") >= 1:
            break
        time.sleep(0.3)
    time.sleep(1)
    after = scrape(env)
    assert delta(before, after, "routemilter_refused_total", reason="unknown_user") == 1
    assert delta(before, after, "routemilter_refused_total", reason="bad_token") == 1
    assert delta(before, after, "routemilter_tokens_refused_total") == 1
    assert delta(before, after, "routemilter_messages_routed_total") == 0


def test_deferral_seen_in_the_mta_log_gives_a_notice_and_a_trace(env):
    """A destination that only answers 451 and has no fallback: Postfix defers. The
    follower reads the deferral from the maillog; the admin is told, with the reply."""
    before = scrape(env)
    qid = send(env, "stuck@family.test", "vis-stuck")
    try:
        deadline = time.monotonic() + INTERVAL + 40
        while not notices(env, "stuck@ratelimited.test") and time.monotonic() < deadline:
            time.sleep(0.5)
        (notice,) = notices(env, "stuck@ratelimited.test")
        text = notice.data.decode()
        assert "deferred too long, queue id " + qid in text
        assert "remote reply: host 127.0.0.40[127.0.0.40] said: " + RATE_LIMITED in text
        assert f"routemilter trace {qid}" in text
    finally:  # Postfix retries it every second or two here (harness backoff): take it out of the queue
        env.postfix.exec("postsuper", "-d", qid, check=False)
        env.postfix.wait_queue_empty(30)
    time.sleep(2)  # the follower reads the last lines
    steps = trace(env, qid)["steps"]
    deferred = [s for s in steps if s["step"] == "deferred"]
    assert deferred and all(s["to"] == "stuck@ratelimited.test" and RATE_LIMITED in s["reply"] for s in deferred)
    after = scrape(env)
    # one count per deferral Postfix logged (one per delivery attempt), and one notice for all of them
    assert delta(before, after, "routemilter_mta_deferrals_total", domain="ratelimited.test",
                 code="451 4.7.650") == len(deferred)
    assert len(notices(env, "stuck@ratelimited.test")) == 1


def test_deferral_fallback_in_trace_notice_and_metrics(env):
    """The primary only answers 451 4.7.650; the deferral listener (issue 11) moves the copy
    to the backup address: trace, notice and metrics all show it, once."""
    before = scrape(env)
    qid = send(env, "rl@family.test", "vis-deferral")
    (name, rcpt, _), = settle(env, "vis-deferral", 1)
    assert (name, rcpt) == ("outlook.test", "rl@outlook.test")

    def complete(steps):
        return any(s["step"] == "delivered" and s["to"] == "rl@outlook.test" for s in steps)

    story = wait_trace(env, qid, complete)
    steps = story["steps"]
    assert complete(steps), json.dumps(steps, indent=1)
    said = [s for s in steps if s["step"] == "remote-reply"]
    assert said and said[0]["reply"] == RATE_LIMITED, steps
    fallback, = [s for s in steps if s["step"] == "deferral-fallback"]
    assert fallback["failed"] == "rl@ratelimited.test" and fallback["next"] == "rl@outlook.test"
    delivered, = [s for s in steps if s["step"] == "delivered" and s["to"] == "rl@outlook.test"]
    assert delivered["queue_id"] == fallback["new_qid"] and fallback["new_qid"] in story["queue_ids"]
    deadline = time.monotonic() + INTERVAL + 30
    while not notices(env, "rl@ratelimited.test") and time.monotonic() < deadline:
        time.sleep(0.5)
    (notice,) = notices(env, "rl@ratelimited.test")
    text = notice.data.decode()
    assert f"fallback address used after deferral, queue id {qid}" in text and "rl@outlook.test" in text
    after = scrape(env)
    assert delta(before, after, "routemilter_fallbacks_total", kind="deferral") == 1
    assert delta(before, after, "routemilter_fallbacks_total", kind="relay") == 0
    assert delta(before, after, "routemilter_mta_deferrals_total", domain="ratelimited.test", code="451 4.7.650") == 1
    assert delta(before, after, "routemilter_messages_routed_total") == 1


def test_reloads_counted_ok_and_refused(env):
    before = scrape(env)
    good = env.config_path.read_text()
    env.daemon.signal(signal.SIGUSR1)
    wait_metric(env, before, "routemilter_reloads_total", 1, result="ok")
    env.config_path.write_text(good + "\nnot_a_key: 1\n")
    try:
        env.daemon.signal(signal.SIGUSR1)
        wait_metric(env, before, "routemilter_reloads_total", 1, result="refused")
    finally:
        env.config_path.write_text(good)
    after = scrape(env)
    assert delta(before, after, "routemilter_reloads_total", result="ok") == 1
    assert delta(before, after, "routemilter_reloads_total", result="refused") == 1
    assert "reload refused" in env.daemon.log_text()


def wait_metric(env, before, name, value, timeout=15, **labels):
    deadline = time.monotonic() + timeout
    while delta(before, scrape(env), name, **labels) < value and time.monotonic() < deadline:
        time.sleep(0.2)


def test_metrics_endpoint_is_on_loopback_only(env):
    port = int(env.metrics_url.rsplit(":", 1)[1].split("/")[0])
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False)
    local = [line.split()[3] for line in out.stdout.splitlines() if line.strip()]
    assert local == [f"127.0.0.1:{port}"], out.stdout
