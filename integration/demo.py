"""`make demo`: routemilter routing real mail through a real Postfix.

For each scenario: start Postfix (in a container when podman works, else a
private instance), the routemilter daemon, and fake remote MX hosts on
127.0.0.x; send mail to the addresses the scenario uses; print what arrived
where, with the SRS envelope sender reversed and the DKIM signatures verified.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fakemx import RATE_LIMITED, FakeMX, free_port, start_hosts  # noqa: E402
from itconfig import bounces, fallback_rule, family  # noqa: E402
from stack import Stack, destination_domains  # noqa: E402

EXAMPLES = os.path.join(HERE, "..", "conf", "examples")
SENDER = "alice@sender.test"

# The addresses each seed worker in the article is written for.
SEED_SCENARIOS = [
    ("approach1-regex-aliases.yaml", ["user1+shop@mydomain.net", "x@user2.mydomain.net", "someone@mydomain.net"]),
    ("approach2-user-table.yaml", ["first@seconddomain.de", "third_alias2@firstdomain.de", "who@firstdomain.de"]),
    ("approach3-simple-backup.yaml", ["dariusz@mydomain.net", "unknown@mydomain.net"]),
    ("fanout.yaml", ["family@mydomain.net"]),
    ("fanout-with-backups.yaml", ["family@mydomain.net"]),
]

FAMILY = """
routes:
  via-relay: [mx, "[127.0.0.9]:{relay_port}"]
domains:
  family.test:
    subdomain_addressing: true
rules:
  - name: me
    addresses: [me@family.test]
    to:
      - address: me@gmail.test
        fallback: [me@outlook.test]
  - name: parents
    addresses: [parents@family.test]
    to: [mum@gmail.test, dad@outlook.test]
  - name: kid-shops
    patterns: ['kid\\+.*@family\\.test']
    to: [kid@gmail.test]
  - name: old
    addresses: [old@family.test]
    refuse: "This address has moved; write to me@family.test"
  - name: dariusz
    addresses: [dariusz@family.test]
    to:
      - address: dariusz@ratelimited.test
        route: via-relay
"""


def message(to: str, n: int) -> bytes:
    return (f"From: Alice <{SENDER}>\r\nTo: <{to}>\r\nSubject: demo {n}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <demo{n}@sender.test>\r\n"
            f"\r\nHello {to}, this is message {n}.\r\n").encode()


def send_and_report(stack: Stack, addresses: list[str]) -> None:
    for n, rcpt in enumerate(addresses, 1):
        result = stack.postfix.send(SENDER, [rcpt], message(rcpt, n))
        code, text = result.rcpt.get(rcpt, (None, ""))
        if result.accepted:
            print(f"  sent to {rcpt}: accepted ({result.queue_id or 'queued'})")
        else:
            stage, code, text = result.first_failure()
            print(f"  sent to {rcpt}: refused at {stage}: {code} {text}")
    stack.postfix.wait_queue_empty(60)
    time.sleep(0.5)
    for name, rcpt, msg in sorted(stack.arrivals(), key=lambda a: (a[1], a[0])):
        try:
            original = stack.srs.reverse(msg.mail_from)
        except Exception as exc:  # noqa: BLE001 - shown, not hidden
            original = f"not SRS ({exc})"
        signed = ", ".join(stack.verify_dkim(msg.data)) or "NONE"
        via = f" via {msg.peer_name}" if getattr(msg, "peer_name", None) else ""
        print(f"  arrived at {name:<18} for {rcpt:<26} MAIL FROM {msg.mail_from}")
        print(f"      SRS reverses to {original}; DKIM verified: {signed}{via}")


def run_scenario(title: str, rules_yaml: str, addresses: list[str], mx_hosts: dict[str, FakeMX]) -> Stack:
    print(f"\n=== {title}")
    workdir = tempfile.mkdtemp(prefix="rmdemo-", dir="/var/tmp")
    stack = Stack(workdir, rules_yaml, mx_hosts=mx_hosts)
    stack.start()
    print(f"  (Postfix mode: {stack.postfix.mode})")
    send_and_report(stack, addresses)
    return stack


def bounce_rules(workdir: str) -> str:
    return bounces(workdir) + family(
        fallback_rule("me", "me@family.test", "me@gmail.test", "me@imx.test", "me@outlook.test"),
        fallback_rule("gone", "gone@family.test", "gone@gmail.test", "gone@outlook.test"))


def rate_limit_scenario() -> Stack:
    """The article's failure (docs/fallback.md): Gmail answers 451 4.7.650, the
    approach 3 worker's config (fallback_after: 0) moves the mail on to Outlook."""
    example = "approach3-simple-backup.yaml"
    print(f"\n=== the article's failure: Gmail rate-limits us, the mail arrives at Outlook (conf/examples/{example})")
    workdir = tempfile.mkdtemp(prefix="rmdemo-", dir="/var/tmp")
    path = os.path.join(EXAMPLES, example)
    mx_hosts = start_hosts(destination_domains(path), 14)
    mx_hosts["gmail.com"].set_reply("*", RATE_LIMITED)
    with open(path) as f:
        rules = bounces(workdir, deferral_listen=f"127.0.0.1:{free_port()}") + f.read()
    stack = Stack(workdir, rules, mx_hosts=mx_hosts)
    stack.start()
    print(f"  (Postfix mode: {stack.postfix.mode})")
    rcpt = "dariusz@mydomain.net"
    result = stack.postfix.send(SENDER, [rcpt], message(rcpt, 200))
    outcome = f"accepted ({result.queue_id})" if result.accepted else result.first_failure()
    print(f"  sent to {rcpt}: {outcome}")
    deadline = time.monotonic() + 60
    while not stack.arrivals() and time.monotonic() < deadline:
        time.sleep(0.2)
    stack.postfix.wait_queue_empty(30)
    time.sleep(0.5)
    for address, reply in mx_hosts["gmail.com"].rcpt_log:
        print(f"  gmail.com answered RCPT {address}: {reply}")
    for line in stack.daemon.log_text().splitlines():
        if "routemilter.mail: deferral " in line:
            print("  routemilter: " + line.split("routemilter.mail: ", 1)[1])
    for name, got, msg in stack.arrivals():
        signed = ", ".join(stack.verify_dkim(msg.data)) or "NONE"
        print(f"  arrived at {name:<12} for {got:<22} DKIM verified: {signed}")
        for line in msg.data.decode("utf-8", "replace").splitlines():
            if line.startswith("X-Routemilter-Failed:"):
                print(f"      {line}")
    stack.stop()
    for mx in mx_hosts.values():
        mx.stop()
    return stack


def bounce_scenario() -> Stack:
    """Address-level fallback through real bounces (docs/fallback.md)."""
    print("\n=== address-level fallback: a 550 from the primary sends the message on to the backup")
    workdir = tempfile.mkdtemp(prefix="rmdemo-", dir="/var/tmp")
    mx_hosts = start_hosts(["gmail.test", "imx.test", "outlook.test", "sender.test"], 10)
    mx_hosts["gmail.test"].set_reply("*", "550 5.1.1 <{rcpt}> The email account that you tried to reach does not exist")
    mx_hosts["outlook.test"].set_reply("gone@outlook.test",
                                       "550 5.5.0 <{rcpt}> Requested action not taken: mailbox unavailable")
    stack = Stack(workdir, bounce_rules(workdir), mx_hosts=mx_hosts)
    stack.start()
    print(f"  (Postfix mode: {stack.postfix.mode})")
    for n, rcpt in enumerate(["me@family.test", "gone@family.test"], 1):
        result = stack.postfix.send(SENDER, [rcpt], message(rcpt, 100 + n))
        print(f"  sent to {rcpt}: {'accepted' if result.accepted else result.first_failure()}")
    deadline = time.monotonic() + 60
    while len(stack.arrivals()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    stack.postfix.wait_queue_empty(30)
    for name, rcpt, msg in sorted(stack.arrivals(), key=lambda a: a[1]):
        signed = ", ".join(stack.verify_dkim(msg.data)) or "NONE"
        sender = msg.mail_from if msg.mail_from.startswith("<") else f"<{msg.mail_from}>"
        print(f"  arrived at {name:<12} for {rcpt:<20} MAIL FROM {sender}  DKIM verified: {signed}")
        if name == "sender.test":
            text = msg.data.decode("utf-8", "replace")
            reasons = [line.strip() for line in text.splitlines() if line.startswith("  <")]
            print("      one bounce to the sender, listing every destination tried:")
            for line in reasons:
                print(f"        {line}")
    for rcpt, reply in mx_hosts["gmail.test"].rcpt_log:
        print(f"  gmail.test answered RCPT {rcpt}: {reply}")
    stack.stop()
    for mx in mx_hosts.values():
        mx.stop()
    return stack


def main() -> int:
    stacks = []
    try:
        stacks.append(rate_limit_scenario())
        for filename, addresses in SEED_SCENARIOS:
            path = os.path.join(EXAMPLES, filename)
            mx_hosts = start_hosts(destination_domains(path), 2)
            with open(path) as f:
                stack = run_scenario(f"seed worker: conf/examples/{filename}", f.read(), addresses, mx_hosts)
            stacks.append(stack)
            stack.stop()
            for mx in mx_hosts.values():
                mx.stop()

        stacks.append(bounce_scenario())

        # A family domain: plus and subdomain addressing, fan-out, a refusal, and a
        # destination that rate-limits us (the seeds' 451 4.7.650) reached via a relay.
        mx_hosts = start_hosts(["gmail.test", "outlook.test", "ratelimited.test"], 2)
        relay = FakeMX("127.0.0.9", free_port("127.0.0.9"), "backup-relay").start()
        mx_hosts["ratelimited.test"].set_reply("*", RATE_LIMITED)
        stack = run_scenario("family.test: plus/subdomain addressing, fan-out, refusal, relay fallback",
                             FAMILY.format(relay_port=relay.port),
                             ["me+news@family.test", "anything@me.family.test", "parents@family.test",
                              "kid+shop@family.test", "nobody@family.test", "old@family.test", "dariusz@family.test"],
                             mx_hosts)
        stacks.append(stack)
        print(f"  rate-limited host answered: {mx_hosts['ratelimited.test'].rcpt_log[:1]}")
        for msg in relay.messages:
            print(f"  arrived at backup-relay for {', '.join(msg.rcpt_tos)} (smtp_fallback_relay took over)")

        print("\n=== routemilter killed (SIGKILL): Postfix must tempfail, not accept unrouted mail")
        stack.daemon.proc.send_signal(signal.SIGKILL)
        stack.daemon.proc.wait(10)
        result = stack.postfix.send(SENDER, ["me@family.test"], message("me@family.test", 99))
        stage, code, text = result.first_failure() or ("-", "accepted!", "")
        print(f"  sent to me@family.test: {stage}: {code} {text}")
        stack.stop()
        relay.stop()
        for mx in mx_hosts.values():
            mx.stop()
        return 0 if code and str(code).startswith("4") else 1
    finally:
        for stack in stacks:
            stack.stop()
            shutil.rmtree(stack.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
