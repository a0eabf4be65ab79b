"""Unit tests for visibility (issue 13): config sections, Postfix log parsing, trace
joins, the metrics sink, the digest notifier and the webhook's bounded retries.
End to end through a real Postfix: integration/test_visibility_postfix.py."""

from __future__ import annotations

import http.server
import json
import os
import threading
from typing import ClassVar

import pytest

from routemilter import events, mtalog, trace
from routemilter.config import ConfigError, loads
from routemilter.events import Event
from routemilter.metrics import Metrics
from routemilter.notify import Notifier, post_json
from routemilter.state import MemoryStore
from routemilter.visconfig import NotifySettings, WebhookSettings

BASE = """
srs:
  domain: fwd.example.net
  secrets: ["0123456789abcdef0123"]
bounces:
  reinject: 127.0.0.1:10026
domains:
  family.example: {}
rules:
  - name: me
    addresses: [me@family.example]
    to: [me@gmail.example]
"""

MAILLOG = """\
Nov 27 16:59:25 mta postfix/smtpd[95]: AEAA617818E: client=localhost[127.0.0.1]
Nov 27 16:59:25 mta postfix/cleanup[97]: AEAA617818E: message-id=<m1@sender.example>
Nov 27 16:59:25 mta postfix/qmgr[93]: AEAA617818E: from=<rmb=x@fwd.example.net>, size=1256, nrcpt=2 (queue active)
Nov 27 16:59:25 mta postfix/rm_a/smtp[98]: AEAA617818E: host 127.0.0.2[127.0.0.2] said: 451 4.7.650 The mail server has been temporarily rate limited due to IP reputation. (in reply to RCPT TO command)
Nov 27 16:59:25 mta postfix/rm_a/smtp[98]: AEAA617818E: to=<d@ratelimited.example>, relay=127.0.0.20[127.0.0.20]:2525, delay=0.02, delays=0.01/0.01/0/0, dsn=2.0.0, status=sent (250 2.0.0 OK queued)
Nov 27 16:59:25 mta postfix/qmgr[93]: AEAA617818E: removed
Nov 27 16:59:26 mta postfix/smtpd[95]: B0914178190: client=localhost[127.0.0.1]
Nov 27 16:59:26 mta postfix/cleanup[97]: B0914178190: message-id=<m2@sender.example>
Nov 27 16:59:26 mta postfix/smtp[99]: B0914178190: to=<a@gmail.example>, relay=127.0.0.3[127.0.0.3]:25, delay=0.02, delays=0/0.01/0/0, dsn=5.1.1, status=bounced (host 127.0.0.3[127.0.0.3] said: 550 5.1.1 <a@gmail.example> no such user (in reply to RCPT TO command))
Nov 27 16:59:26 mta postfix/cleanup[97]: B41C6178195: message-id=<20261127165925.B41C6178195@mta.example>
Nov 27 16:59:26 mta postfix/bounce[100]: B0914178190: sender non-delivery notification: B41C6178195
Nov 27 16:59:26 mta postfix/rm_reinject/smtpd[103]: B9604178196: client=localhost[127.0.0.1]
Nov 27 16:59:26 mta postfix/rm_bounce/lmtp[102]: B41C6178195: to=<rmb=y@fwd.example.net>, relay=mta.example[/run/bounce.sock], delay=0.02, delays=0/0.01/0/0.01, dsn=2.0.0, status=sent (250 2.0.0 routemilter: bounce handled)
Nov 27 16:59:26 mta postfix/smtp[99]: B9604178196: to=<a@outlook.example>, relay=127.0.0.4[127.0.0.4]:25, delay=0, delays=0/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 OK queued)
Nov 27 16:59:27 mta postfix/smtpd[95]: C0000000001: client=localhost[127.0.0.1]
Nov 27 16:59:27 mta postfix/smtp[99]: C0000000001: to=<other@gmail.example>, relay=127.0.0.3[127.0.0.3]:25, delay=0, delays=0/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 OK queued)
"""  # noqa: E501 - log lines as Postfix writes them
DAEMON = """\
INFO routemilter.mail: queue_id=AEAA617818E from=<alice@sender.example> rcpts=d@family.example->dariusz:d@ratelimited.example outcome=accept ms=8.9
INFO routemilter.mail: queue_id=B0914178190 from=<alice@sender.example> rcpts=a@family.example->backup:a@gmail.example outcome=accept ms=4.0
INFO routemilter.mail: bounce rcpt=<rmb=y@fwd.example.net> from=<> bounce_qid=B41C6178195 orig_qid=B0914178190 notes=a@gmail.example:fallback->a@outlook.example sent=fallback:<rmb=z@fwd.example.net>-><a@outlook.example> new_qids=B9604178196 ms=11.9
INFO routemilter.mail: queue_id=C0000000001 from=<bob@sender.example> rcpts=o@family.example->other:other@gmail.example outcome=accept ms=1.0
INFO routemilter.mail: notice to=<admin@family.example> destination=a@gmail.example problems=2 queue_ids=B0914178190,C0000000001 channel=mail result=sent qid=D0000000001
"""  # noqa: E501 - log lines as the daemon writes them


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        loads(text, "x.yaml")
    return exc.value.problems


# ------------------------------------------------------------------ config


def test_config_sections_parse_with_defaults():
    config = loads(BASE + "metrics: {}\nnotify:\n  to: admin@family.example\nmta_log:\n  file: /var/log/mail.log\n")
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9470)
    assert config.notify.to == "admin@family.example" and config.notify.interval == 900
    assert config.notify.defer_after == 1800 and config.notify.submit is None
    assert config.mta_log.file == "/var/log/mail.log"
    off = loads(BASE)
    assert off.metrics is None and off.notify is None and off.mta_log is None  # all off by default


def test_config_errors_name_every_line():
    text = BASE.replace("bounces:\n  reinject: 127.0.0.1:10026\n", "") + (
        "metrics:\n  listen: everywhere\n"
        "notify:\n  to: not-an-address\n  interval: soon\n  rules: {nosuch: a@b.example}\n"
        "  webhook: {url: ftp://x, retries: 99}\n"
        "mta_log:\n  file: relative.log\n")
    problems = "\n".join(_problems(text))
    for expected in ("metrics.listen must be HOST:PORT", "notify.to", "notify.interval must be a duration",
                     "no rule named 'nosuch'", "notify.webhook.url", "notify needs submit",
                     "mta_log.file must be an absolute path"):
        assert expected in problems, problems
    assert all(p.startswith("x.yaml:") for p in _problems(text))


def test_notify_address_most_specific_first():
    n = NotifySettings(to="all@x.example", domains={"family.example": "fam@x.example"}, rules={"me": "me@x.example"})
    assert n.addresses_for(["me"], ["family.example"]) == ["me@x.example"]
    assert n.addresses_for(["other"], ["family.example"]) == ["fam@x.example"]
    assert n.addresses_for(["other"], ["kid.example"]) == ["all@x.example"]


# ------------------------------------------------------------------ log parsing and trace


def test_postfix_lines_parse():
    lines = [mtalog.parse_postfix(line) for line in MAILLOG.splitlines()]
    said = lines[3]
    assert (said["kind"], said["qid"], said["host"], said["cmd"]) == ("said", "AEAA617818E", "127.0.0.2[127.0.0.2]",
                                                                       "RCPT TO")
    assert mtalog.reply_code(said["reply"]) == "451 4.7.650"
    sent = lines[4]
    assert (sent["kind"], sent["to"], sent["status"], sent["delay"]) == ("delivery", "d@ratelimited.example", "sent",
                                                                         0.02)
    assert lines[10]["kind"] == "ndn" and lines[10]["qid2"] == "B41C6178195"
    iso = mtalog.parse_postfix("2026-11-27T16:59:25.123456+00:00 mta postfix/qmgr[93]: AEAA617818E: removed")
    assert iso["kind"] == "removed" and iso["ts"].startswith("2026-11-27T16:59:25")
    assert mtalog.parse_postfix("Nov 27 16:59:25 mta sshd[1]: AEAA617818E: hello") is None


def test_interpreter_relay_fallback_only_when_another_host_delivered():
    interp = mtalog.Interpreter()
    facts = [f for line in MAILLOG.splitlines() for f in interp.feed(mtalog.parse_postfix(line))]
    kinds = [(f["qid"], f["type"]) for f in facts]
    assert ("AEAA617818E", "relay-fallback") in kinds
    assert ("B0914178190", "bounced") in kinds
    assert ("C0000000001", "delivered") in kinds
    # the same host answering 451 for one recipient and 250 for another is no relay fallback
    same = mtalog.Interpreter()
    same.feed(mtalog.parse_postfix("Nov 27 16:59:25 mta postfix/smtp[9]: AAAAAAAAAA1: host 127.0.0.5[127.0.0.5] "
                                   "said: 451 4.7.650 limited (in reply to RCPT TO command)"))
    fact, = same.feed(mtalog.parse_postfix("Nov 27 16:59:25 mta postfix/smtp[9]: AAAAAAAAAA1: to=<ok@p.example>, "
                                           "relay=127.0.0.5[127.0.0.5]:25, delay=0.1, delays=0/0/0/0, dsn=2.0.0, "
                                           "status=sent (250 ok)"))
    assert fact["type"] == "delivered"
    # a destination's 451, then routemilter's deferral listener as the last fallback relay: not a relay
    # fallback (the listener's own event counts the move); the reply kept is the destination's
    listener = mtalog.Interpreter()
    listener.feed(mtalog.parse_postfix("Nov 27 16:59:25 mta postfix/rm_x/smtp[9]: AAAAAAAAAA2: host 127.0.0.5"
                                       "[127.0.0.5] said: 451 4.7.650 limited (in reply to RCPT TO command)"))
    fact, = listener.feed(mtalog.parse_postfix(
        "Nov 27 16:59:25 mta postfix/rm_x/smtp[9]: AAAAAAAAAA2: to=<a@gmail.example>, relay=127.0.0.1[127.0.0.1]:"
        "10027, delay=0.1, delays=0/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 routemilter: moved on from "
        "a@gmail.example to a@outlook.example)"))
    assert fact["type"] == "to-routemilter" and fact["reply"] == "451 4.7.650 limited"
    m = Metrics()
    m(Event("mta", fact, fact))
    bounce_handled = {"type": "to-routemilter", "to": "rmb=x@fwd.example", "reply": "250 2.0.0 routemilter: bounce"}
    m(Event("mta", bounce_handled, bounce_handled))
    assert m.registry.get_sample_value("routemilter_mta_deferrals_total",
                                       {"domain": "gmail.example", "code": "451 4.7.650"}) == 1
    assert m.registry.get_sample_value("routemilter_fallbacks_total", {"kind": "relay"}) == 0


def test_trace_joins_bounce_and_reinjected_copy_but_not_other_messages_of_a_notice():
    logs = trace.Logs(DAEMON.splitlines(), MAILLOG.splitlines())
    seeds = logs.find("B0914178190")
    qids = logs.related(seeds)
    assert qids == {"B0914178190", "B41C6178195", "B9604178196", "D0000000001"}  # not C0000000001
    steps = logs.story(qids)
    kinds = [s.kind for s in steps]
    assert kinds.index("routed") < kinds.index("bounced") < kinds.index("address-fallback")
    fallback, = [s for s in steps if s.kind == "address-fallback"]
    assert fallback.data["new_qid"] == "B9604178196" and fallback.queue_id == "B41C6178195"
    assert any(s.kind == "delivered" and s.queue_id == "B9604178196" for s in steps)
    assert all(s.time for s in steps)  # routemilter's lines get the time of the MTA line before them
    # from the copy, by Message-ID, by address
    assert logs.related(logs.find("B9604178196")) == qids
    assert logs.find("<m2@sender.example>") == {"B0914178190"}
    assert logs.find("a@family.example") == {"B0914178190"}
    relay = logs.story(logs.related(logs.find("AEAA617818E")))
    delivered, = [s for s in relay if s.kind == "delivered"]
    assert delivered.data.get("relay_fallback") is True
    assert next(s for s in relay if s.kind == "remote-reply").data["reply"].startswith("451 4.7.650")


def test_trace_reads_deferral_listener_lines():
    daemon = DAEMON + ("INFO routemilter.mail: deferral queue_id=AEAA617818E rcpt=<d@ratelimited.example> "
                       "fallback_after=30m age=31m decision=fallback to=<d@backup.example> from=<rmb=x@f> "
                       "sender=<rmb=w@f> new_queue_id=E000000000A ms=3.0\n")
    logs = trace.Logs(daemon.splitlines(), MAILLOG.splitlines())
    qids = logs.related(logs.find("AEAA617818E"))
    assert "E000000000A" in qids
    step, = [s for s in logs.story(qids) if s.kind == "deferral-fallback"]
    assert step.data["next"] == "d@backup.example" and step.data["new_qid"] == "E000000000A"


def test_trace_cli_json(tmp_path, capsys):
    from routemilter.cli import main

    (tmp_path / "d.log").write_text(DAEMON)
    (tmp_path / "m.log").write_text(MAILLOG)
    rc = main(["-c", str(tmp_path / "none.yaml"), "trace", "AEAA617818E", "--log", str(tmp_path / "d.log"),
               "--mta-log", str(tmp_path / "m.log"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["queue_ids"] == ["AEAA617818E"] and any(s["step"] == "routed" for s in out["steps"])
    assert main(["-c", str(tmp_path / "none.yaml"), "trace", "nobody@nowhere.example", "--log",
                 str(tmp_path / "d.log"), "--mta-log", str(tmp_path / "m.log")]) == 1


def test_bounce_queue_ids_from_postfix_bounce():
    dsn = (b"Received: by mta.example (Postfix)\r\n\tid DD817194AA3; Fri, 27 Nov 2026 17:07:35 +0000 (UTC)\r\n"
           b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n--B\r\n"
           b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mta.example\r\n"
           b"X-Postfix-Queue-ID: D0712194A9E\r\n\r\nFinal-Recipient: rfc822; a@gmail.example\r\n")
    assert events.bounce_queue_ids(dsn) == ("DD817194AA3", "D0712194A9E")
    # a remote MTA's report: its queue id is not ours; ours is in the returned message's Received
    remote = (b"Received: from mx.gmail.example by mta.example (Postfix) with ESMTP id 1111111111A\r\n\r\n"
              b"--B\r\nReporting-MTA: dns; mx.gmail.example\r\nX-Postfix-Queue-ID: 9999999999Z\r\n\r\n--B\r\n"
              b"Received: by mx.gmail.example with SMTP id zz\r\n"
              b"Received: from sender.example by mta.example (Postfix) with ESMTP id 2222222222B\r\n")
    assert events.bounce_queue_ids(remote) == ("1111111111A", "2222222222B")
    assert events.queued_as("2.0.0 Ok: queued as B9604178196") == "B9604178196"


# ------------------------------------------------------------------ metrics


def test_metrics_from_events():
    m = Metrics()
    m(Event("bounce", {}, {"notes": ["a@x:fallback->b@x", "c@x:chain-exhausted", "final-bounce->s@x"]}))
    m(Event("mta", {}, {"type": "relay-fallback", "to": "d@ratelimited.example", "reply": "451 4.7.650 slow",
                        "failed_host": "127.0.0.2[127.0.0.2]"}))
    m(Event("mta", {}, {"type": "deferred", "to": "d@ratelimited.example", "reply": "451 4.7.650 slow"}))
    m(Event("deferral", {"decision": "fallback"}))
    m(Event("deferral", {"decision": "not-yet"}))
    m(Event("reload", {"result": "refused"}))
    get = m.registry.get_sample_value
    assert get("routemilter_fallbacks_total", {"kind": "bounce"}) == 1
    assert get("routemilter_fallbacks_total", {"kind": "relay"}) == 1
    assert get("routemilter_fallbacks_total", {"kind": "deferral"}) == 1
    assert get("routemilter_chains_exhausted_total") == 1
    assert get("routemilter_mta_deferrals_total", {"domain": "ratelimited.example", "code": "451 4.7.650"}) == 2
    assert get("routemilter_reloads_total", {"result": "refused"}) == 1


def test_a_failing_sink_does_not_stop_the_log_line(caplog):
    def broken(event):
        raise RuntimeError("boom")

    events.bus.subscribe(broken)
    try:
        with caplog.at_level("INFO", logger="routemilter"):
            events.bus.publish(Event("message", {"queue_id": "X1", "outcome": "accept"}))
    finally:
        events.bus.unsubscribe(broken)
    assert any(r.getMessage() == "queue_id=X1 outcome=accept" for r in caplog.records)
    assert any("sink" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ notices


class _Holder:
    def __init__(self, config):
        self.current = type("P", (), {"config": config, "signer": None})()
        self.store = MemoryStore()


def _notifier(clock):
    config = loads(BASE + "notify:\n  to: admin@family.example\n  interval: 60s\n")
    sent = []
    n = Notifier(_Holder(config), clock=lambda: clock[0],
                 submitter=lambda hp, subs: sent.extend(subs) or ["2.0.0 Ok: queued as F00000000A"])
    return n, sent


def test_digest_one_notice_per_destination_per_interval():
    clock = [1000.0]
    n, sent = _notifier(clock)
    for k in range(3):
        n(Event("bounce", {"orig_qid": f"Q00000000{k}"}, {"notes": ["a@gmail.example:fallback->a@outlook.example"],
                                                           "failures": [("a@gmail.example", "550 5.1.1 no such user")],
                                                           "submissions": [("fallback", "a@outlook.example",
                                                                            f"R00000000{k}")]}))
    n(Event("bounce", {"orig_qid": "Q000000009"}, {"notes": ["b@gmail.example:chain-exhausted"],
                                                    "failures": [("b@gmail.example", "552 full")]}))
    assert n.flush() == 0  # the interval has not passed
    clock[0] += 61
    assert n.flush() == 2  # one per destination
    assert n.flush() == 0
    (a,) = [s for s in sent if b"a@gmail.example: 3 delivery" in s.data]
    assert a.mail_from == "" and a.rcpt == "admin@family.example"
    text = a.data.decode()
    assert text.count("remote reply: 550 5.1.1 no such user") == 3 and "routemilter trace Q000000001" in text
    assert "Auto-Submitted: auto-generated" in text
    # the same failure reported again (a retried bounce) is not a new problem
    n(Event("bounce", {"orig_qid": "Q000000000"}, {"notes": ["a@gmail.example:fallback->a@outlook.example"]}))
    clock[0] += 61
    assert n.flush() == 0


def test_recent_messages_only_kept_when_enabled():
    recent = events.RecentMessages(size=2)
    recent.add("Q1", {"kind": "forward"})
    assert recent.get("Q1") is None
    recent.enabled = True
    for q in ("Q1", "Q2", "Q3"):
        recent.add(q, {"kind": "forward"})
    assert recent.get("Q1") is None and recent.get("Q3") == {"kind": "forward"}  # bounded


def test_no_notice_for_mail_routemilter_did_not_route():
    clock = [1000.0]
    n, sent = _notifier(clock)
    fact = {"type": "relay-fallback", "qid": "NOTOURS0001", "to": "admin@family.example", "reply": "451 x",
            "relay": "r", "failed_host": "h", "delay": 10.0}
    n(Event("mta", fact, fact))  # e.g. a notice that itself needed the fallback relay
    clock[0] += 3600
    assert n.flush() == 0 and sent == []


class _Flaky(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list] = []

    def do_POST(self):
        _Flaky.hits.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(500 if len(_Flaky.hits) < 3 else 204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_retries_are_bounded():
    _Flaky.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        pauses = []
        assert post_json(WebhookSettings(url, 5, retries=1), {"destination": "x"}, sleep=pauses.append) is False
        assert len(_Flaky.hits) == 2 and pauses == [1]  # the first try and one retry, then it gives up
        assert post_json(WebhookSettings(url, 5, retries=3), {"destination": "y"}, sleep=pauses.append) is True
        assert len(_Flaky.hits) == 3 and _Flaky.hits[-1] == {"destination": "y"}
        dead = WebhookSettings("http://127.0.0.1:9/none", 1, retries=2)
        assert post_json(dead, {}, sleep=pauses.append) is False
    finally:
        server.shutdown()
        server.server_close()


def test_tail_file_follows_appends_and_rotation(tmp_path):
    path = tmp_path / "maillog"
    path.write_text("old line\n")
    stop = threading.Event()
    got = []
    lines = mtalog.tail_file(str(path), stop, poll=0.05)

    def reader():
        for line in lines:
            got.append(line)
            if len(got) == 2:
                stop.set()

    thread = threading.Thread(target=reader)
    thread.start()
    import time

    time.sleep(0.3)
    with open(path, "a") as fh:
        fh.write("new one\n")
    time.sleep(0.3)
    os.rename(path, tmp_path / "maillog.1")
    path.write_text("after rotation\n")
    thread.join(5)
    stop.set()
    assert got == ["new one", "after rotation"]


def test_deferral_listener_event_gives_a_notice_and_a_count():
    """The deferral listener's line (issue 11) as an event: one notice, one fallback counted."""
    clock = [1000.0]
    n, sent = _notifier(clock)
    m = Metrics()
    fields = {"queue_id": "AAAAAAAAAA1", "rcpt": "<me@gmail.example>", "fallback_after": "30m", "age": "31m",
              "decision": "fallback", "to": "<me@outlook.example>", "new_queue_id": "BBBBBBBBBB2"}
    events.bus.subscribe(n)
    events.bus.subscribe(m)
    try:
        events.deferral(dict(fields))
        events.deferral({**fields, "decision": "not-yet"})
    finally:
        events.bus.unsubscribe(n)
        events.bus.unsubscribe(m)
    clock[0] += 61
    assert n.flush() == 1
    text = sent[0].data.decode()
    assert "fallback address used after deferral, queue id AAAAAAAAAA1" in text
    assert "sent instead to me@outlook.example (queue id BBBBBBBBBB2)" in text
    assert m.registry.get_sample_value("routemilter_fallbacks_total", {"kind": "deferral"}) == 1
