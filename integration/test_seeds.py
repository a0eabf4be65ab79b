"""Every seed worker config, end to end through a real Postfix.

For each conf/examples/*.yaml: one stack (Postfix configured from
`routemilter postfix-config`, the real `routemilter run` daemon, one FakeMX per
destination domain, plus a catch-all relayhost "elsewhere" that would receive
anything misrouted, including bounces). Every alias form the seed uses is sent
once, then each forwarded copy is checked: right FakeMX, exactly once, SRS
envelope sender that reverses to the original, DKIM (rsa + ed25519) verified by
dkimpy and by OpenDKIM, and the original header and body bytes unchanged.

Run: .venv/bin/python -m pytest -m integration integration/test_seeds.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from checks import ADDED_OK, SRS0, OpenDKIM, added_headers, arrivals_of, dkim_algorithms, seed_message  # noqa: E402
from fakemx import FakeMX, free_port, start_hosts  # noqa: E402
from routemilter.config import load  # noqa: E402
from stack import Stack, destination_domains  # noqa: E402

pytestmark = pytest.mark.integration

EXAMPLES = os.path.join(HERE, "..", "conf", "examples")
SENDER = "alice@sender.test"
UNKNOWN = (550, "5.1.1")


@dataclass
class Case:
    name: str
    rcpts: list[str]                 # one SMTP transaction to all of these
    expect: list[str]                # destination addresses, each exactly once
    refused: list[str] = field(default_factory=list)  # refused at RCPT with 550 5.1.1


# The addresses each seed worker is written for, in every alias form it handles.
SEEDS: dict[str, list[Case]] = {
    "approach1-regex-aliases.yaml": [
        Case("exact", ["user1@mydomain.net"], ["user1@gmail.com"]),
        Case("plus", ["user1+shop@mydomain.net"], ["user1@gmail.com"]),
        Case("subdomain", ["anything@user1.mydomain.net"], ["user1@gmail.com"]),
        Case("case-insensitive", ["User2@MyDomain.NET"], ["user2@gmail.com"]),
        Case("plus-user2", ["user2+news@mydomain.net"], ["user2@gmail.com"]),
        Case("subdomain-user2", ["x@user2.mydomain.net"], ["user2@gmail.com"]),
        Case("catch-all", ["someone@mydomain.net"], ["user3@gmail.com"]),
        Case("catch-all-subdomain", ["x@other.mydomain.net"], ["user3@gmail.com"]),
        # Three aliases of user1 plus user2 in one transaction: one copy each.
        Case("aliases-deduplicated", ["user1@mydomain.net", "user1+a@mydomain.net",
                                      "b@user1.mydomain.net", "user2@mydomain.net"],
             ["user1@gmail.com", "user2@gmail.com"]),
    ],
    "approach2-user-table.yaml": [
        Case("first-domain1", ["first@firstdomain.de"], ["first@gmail.com"]),
        Case("first-domain2", ["first@seconddomain.de"], ["first@gmail.com"]),
        Case("second", ["second@firstdomain.de"], ["second@gmail.com"]),
        # The worker matches whole addresses: a plus-extension goes to the catch-all.
        Case("second-plus", ["second+tag@firstdomain.de"], ["catchall@gmail.com"]),
        Case("third-alias1", ["third_alias1@firstdomain.de"], ["third@gmail.com"]),
        Case("third-alias2", ["third_alias2@firstdomain.de"], ["third@gmail.com"]),
        Case("fourth", ["fourth@firstdomain.de"], ["fourth@gmail.com"]),
        Case("catch-all-domain1", ["who@firstdomain.de"], ["catchall@gmail.com"]),
        Case("catch-all-domain2", ["second@seconddomain.de"], ["catchall@gmail.com"]),
        Case("mixed", ["first@firstdomain.de", "first@seconddomain.de", "who@seconddomain.de",
                       "third_alias1@firstdomain.de"],
             ["first@gmail.com", "catchall@gmail.com", "third@gmail.com"]),
    ],
    "approach3-simple-backup.yaml": [
        Case("exact", ["dariusz@mydomain.net"], ["dariusz@gmail.com"]),
        Case("plus", ["Dariusz+news@mydomain.net"], ["dariusz@gmail.com"]),
        Case("unknown", ["unknown@mydomain.net"], [], refused=["unknown@mydomain.net"]),
        Case("known-and-unknown", ["nobody@mydomain.net", "dariusz@mydomain.net"],
             ["dariusz@gmail.com"], refused=["nobody@mydomain.net"]),
    ],
    "fanout.yaml": [
        Case("fan-out", ["family@mydomain.net"], ["email1@gmail.com", "email2@gmail.com"]),
        Case("unknown", ["everyone@mydomain.net"], [], refused=["everyone@mydomain.net"]),
    ],
    "fanout-with-backups.yaml": [
        Case("fan-out", ["family@mydomain.net"], ["email1@gmail.com", "email2@gmail.com"]),
        Case("shared-backup-rule", ["everyone@mydomain.net"], ["email1@gmail.com", "email2@gmail.com"]),
        # Both rules in one message: still one copy per mailbox.
        Case("both-rules", ["family@mydomain.net", "everyone@mydomain.net"],
             ["email1@gmail.com", "email2@gmail.com"]),
        Case("unknown", ["unknown@mydomain.net"], [], refused=["unknown@mydomain.net"]),
    ],
}


def message_id(config: str, case: Case) -> str:
    return f"{config.split('.')[0]}.{case.name}@sender.test"


@dataclass
class Seed:
    config: str
    stack: Stack
    elsewhere: FakeMX
    opendkim: OpenDKIM
    managed: list[str]
    sent: dict = field(default_factory=dict)      # case name -> (SendResult, bytes)
    seconds: float = 0.0

    @property
    def all_mx(self):
        return [*self.stack.mx_hosts.values(), self.elsewhere]


def start_seed(config: str) -> tuple[Seed, callable]:
    """A running stack for one seed config, every case already sent and delivered;
    returns (seed, stop)."""
    path = os.path.join(EXAMPLES, config)
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="rmseed-", dir="/var/tmp")
    mx_hosts = start_hosts(destination_domains(path), 2)
    # Anything not routed to a destination's FakeMX (the managed domain itself,
    # a bounce to the sender) would reach this relayhost instead of vanishing.
    elsewhere = FakeMX("127.0.0.30", free_port("127.0.0.30"), "elsewhere").start()
    with open(path) as f:
        stack = Stack(workdir, f.read(), mx_hosts=mx_hosts,
                      postfix_kwargs={"relayhost": f"[{elsewhere.host}]:{elsewhere.port}"})

    def stop():
        stack.stop()
        elsewhere.stop()
        for mx in mx_hosts.values():
            mx.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    try:
        stack.start()
        print(f"\n[{config}] Postfix mode={stack.postfix.mode} start={stack.postfix.start_seconds:.2f}s")
        s = Seed(config, stack, elsewhere, OpenDKIM(workdir, stack.keys, stack.dkim_domain),
                 managed=list(load(stack.config_path, read_secrets=False).domains))
        for case in SEEDS[config]:
            data = seed_message(SENDER, case.rcpts[0], message_id(config, case), f"{config} {case.name}")
            s.sent[case.name] = (stack.postfix.send(SENDER, case.rcpts, data), data)
        expected = sum(len(c.expect) for c in SEEDS[config])
        deadline = time.monotonic() + 60
        while sum(len(m.rcpt_tos) for mx in s.all_mx for m in mx.messages) < expected:
            if time.monotonic() > deadline:
                break  # the tests report what is missing
            time.sleep(0.1)
        stack.postfix.wait_queue_empty(30)
        time.sleep(0.5)  # a duplicate would be in flight now; let it land
        s.seconds = time.monotonic() - t0
        return s, stop
    except BaseException:
        stop()
        raise


@pytest.fixture(scope="class")
def seed(request):
    """One stack per seed config (per test class), torn down with the class."""
    s, stop = start_seed(request.cls.config)
    yield s
    stop()


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = SEEDS[metafunc.cls.config]
        metafunc.parametrize("case", cases, ids=[c.name for c in cases])


def copies(seed: Seed, case: Case):
    return arrivals_of(seed.all_mx, message_id(seed.config, case))


def test_every_example_config_is_covered():
    examples = {f for f in os.listdir(EXAMPLES) if f.endswith(".yaml")}
    assert examples == set(SEEDS), examples ^ set(SEEDS)


class SeedTests:
    """The checks, run for each seed config (subclasses below)."""

    config = ""

    def test_smtp_replies(self, seed, case):
        """Known aliases accepted; unknown recipients refused at RCPT with 550 5.1.1."""
        result, _ = seed.sent[case.name]
        for rcpt in case.rcpts:
            assert rcpt in result.rcpt, result
            code, text = result.rcpt[rcpt]
            if rcpt in case.refused:
                assert (code, text.split()[0]) == UNKNOWN, (rcpt, code, text)
            else:
                assert code == 250, (rcpt, code, text)
        if case.expect:
            assert result.accepted, result
        else:
            assert result.data is None, result  # nothing accepted, DATA never sent

    def test_each_destination_exactly_once_at_its_mx(self, seed, case):
        got = sorted((name, rcpt) for name, rcpt, _ in copies(seed, case))
        want = sorted((addr.rsplit("@", 1)[1], addr) for addr in case.expect)
        assert got == want, (got, want, seed.stack.postfix.deliveries())

    def test_envelope_sender_is_srs_of_the_original(self, seed, case):
        for _name, rcpt, msg in copies(seed, case):
            assert SRS0.match(msg.mail_from), (rcpt, msg.mail_from)
            assert seed.stack.srs.reverse(msg.mail_from) == SENDER, (rcpt, msg.mail_from)

    def test_dkim_rsa_and_ed25519_verify_with_dkimpy(self, seed, case):
        for _name, rcpt, msg in copies(seed, case):
            assert dkim_algorithms(msg.data) == {"rsa": "rsa-sha256", "ed": "ed25519-sha256"}, rcpt
            assert sorted(seed.stack.verify_dkim(msg.data)) == ["routemilter.test/ed", "routemilter.test/rsa"], rcpt

    def test_dkim_rsa_and_ed25519_verify_with_opendkim(self, seed, case):
        for _name, rcpt, msg in copies(seed, case):
            assert seed.opendkim.verify(msg.data) == {"rsa": "pass", "ed": "pass"}, rcpt

    def test_headers_and_body_byte_identical(self, seed, case):
        _, original = seed.sent[case.name]
        for _name, rcpt, msg in copies(seed, case):
            added = added_headers(msg.data, original)
            assert set(added) <= ADDED_OK, (rcpt, added)
            for required in ("received", "dkim-signature", "x-routemilter"):
                assert required in added, (rcpt, added)

    def test_nothing_misrouted(self, seed):
        """No copy for the managed domains, none at the catch-all relayhost, no bounce,
        every Postfix delivery `sent`."""
        assert seed.elsewhere.messages == [], [(m.mail_from, m.rcpt_tos) for m in seed.elsewhere.messages]
        sent_to = {r.lower() for c in SEEDS[seed.config] for r in c.rcpts}
        for mx in seed.all_mx:
            for msg in mx.messages:
                for rcpt in msg.rcpt_tos:
                    domain = rcpt.rsplit("@", 1)[1].lower()
                    assert domain not in seed.managed and rcpt.lower() not in sent_to, (mx.name, rcpt)
        total = sum(len(m.rcpt_tos) for mx in seed.all_mx for m in mx.messages)
        assert total == sum(len(c.expect) for c in SEEDS[seed.config])
        statuses = {d["status"] for d in seed.stack.postfix.deliveries()}
        assert statuses == {"sent"}, seed.stack.postfix.deliveries()
        print(f"[{seed.config}] stack up, {len(SEEDS[seed.config])} messages sent and delivered "
              f"in {seed.seconds:.1f}s (Postfix mode={seed.stack.postfix.mode})")

    def test_one_log_line_per_message(self, seed):
        """The daemon logged each accepted message once, with Postfix's queue id."""
        log = seed.stack.daemon.log_text()
        for case in SEEDS[seed.config]:
            result, _ = seed.sent[case.name]
            if result.accepted:
                assert result.queue_id and log.count(f"queue_id={result.queue_id} ") == 1, (case.name, result)


class TestApproach1RegexAliases(SeedTests):
    config = "approach1-regex-aliases.yaml"


class TestApproach2UserTable(SeedTests):
    config = "approach2-user-table.yaml"


class TestApproach3SimpleBackup(SeedTests):
    config = "approach3-simple-backup.yaml"


class TestFanout(SeedTests):
    config = "fanout.yaml"


class TestFanoutWithBackups(SeedTests):
    config = "fanout-with-backups.yaml"
