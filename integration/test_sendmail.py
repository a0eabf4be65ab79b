"""The core scenarios through a real Sendmail 8.17 (INPUT_MAIL_FILTER), the real
`routemilter run` daemon and fake remote MX hosts.

Sendmail runs in a podman container (or a chroot, see sendmail.py) and is
configured with the lines `routemilter sendmail-config` prints: the milter
with F=T, the macros, the relay domains and the fallback smart host.

    ROUTEMILTER_IT_SENDMAIL_MODE=container|chroot pytest -m integration integration/test_sendmail.py
"""
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import sendmail as sm  # noqa: E402
from fakemx import RATE_LIMITED, FakeMX, free_port  # noqa: E402
from itconfig import bounces, fallback_rule, family  # noqa: E402
from mtaclient import Daemon  # noqa: E402
from routemilter.config import load  # noqa: E402
from routemilter.mtaconfig import sendmail_mc, sendmail_relay_domains  # noqa: E402
from stack import SRS_DOMAIN, Stack, header_sections  # noqa: E402

pytestmark = pytest.mark.integration

SENDER = "alice@sender.test"
GMAIL, OUTLOOK, RELAY = "127.0.0.2", "127.0.0.3", "127.0.0.5"

RULES = """
routes:
  via-relay: [mx, "[{relay}]:{port}"]
default_route: via-relay
domains:
  family.test:
    subdomain_addressing: true
  plain.test: {{}}
rules:
  - name: parents
    addresses: [parents@family.test]
    to: [mum@gmail.test, dad@outlook.test]
  - name: me
    addresses: [me@family.test]
    to: [me@outlook.test]
"""


def common_port(hosts) -> int:
    """One TCP port free on every host: Sendmail's mailer has one port for all."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as t:
                    t.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no common free port on {hosts}")


def message(to: str, n: int = 1) -> bytes:
    return (f"From: Alice <{SENDER}>\r\nTo: <{to}>\r\nSubject: sendmail test {n}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <sm{n}.{time.time()}@sender.test>\r\n"
            f"\r\nHello {to}, message {n}.\r\n").encode()


def printed_sections(text: str) -> dict[str, str]:
    """`routemilter sendmail-config` output by section: the text of each
    `dnl ---- NAME ----` header, keyed by the part of NAME the harness needs."""
    keys = ("before the MAILER() lines", "after the MAILER() lines", "mailertable", "relay-domains")
    sections, current = {}, None
    for line in text.splitlines():
        if line.startswith("dnl ---- "):
            current = next(k for k in keys if k in line)
            sections[current] = []
        elif current is not None and line:
            sections[current].append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


class SendmailStack(Stack):
    """stack.Stack with Sendmail in place of Postfix (same keys, SRS and DKIM checks).

    The routemilter daemon lives for the whole module (its start and stop are the
    slow part); each test gets fresh FakeMX hosts and a fresh Sendmail."""

    def __init__(self, workdir, rules_yaml, mailer_port):
        super().__init__(workdir, rules_yaml)
        self.mailer_port = mailer_port
        self.sendmail: sm.Sendmail | None = None
        self.relay: FakeMX | None = None

    def start_daemon(self):
        from routemilter.signing import generate_key
        os.makedirs(f"{self.workdir}/keys", exist_ok=True)
        for selector, algorithm in (("rsa", "rsa"), ("ed", "ed25519")):
            self.keys[selector] = generate_key(algorithm, f"{self.workdir}/keys/{selector}.key")
        self.socket = f"{self.workdir}/rm.sock"
        self.config_path = Path(self.workdir) / "routemilter.yaml"
        # 0660 root:root, the daemon's default: Sendmail's daemon children run as root.
        header = header_sections(self.workdir, self.socket, self.dkim_domain).replace(
            'socket_mode: "0666"', 'socket_mode: "0660"')
        self.config_path.write_text(header + self.rules_yaml)
        # Exactly what `routemilter sendmail-config` prints: the .mc lines, then relay-domains.
        printed = subprocess.run([sys.executable, "-m", "routemilter", "-c", str(self.config_path),
                                  "sendmail-config"], capture_output=True, text=True, check=True,
                                 timeout=60).stdout
        sections = printed_sections(printed)
        self.mc_lines = sections["before the MAILER() lines"]
        self.mc_after = sections.get("after the MAILER() lines", "")
        self.mailertable = dict(line.split() for line in sections.get("mailertable", "").splitlines())
        self.relay_domains = sections["relay-domains"].split()
        config = load(self.config_path)
        assert self.mc_lines == "\n".join(sendmail_mc(config))
        assert self.relay_domains == sendmail_relay_domains(config)
        self.daemon = Daemon(self.config_path, Path(self.socket)).start()
        return self

    def ensure_daemon(self):
        if self.daemon.proc.poll() is not None:
            self.daemon = Daemon(self.config_path, Path(self.socket)).start()

    def start_sendmail(self, subdir, mx_hosts, relay, **kw):
        self.mx_hosts, self.relay = mx_hosts, relay
        self.sendmail = sm.Sendmail(
            f"{self.workdir}/{subdir}", free_port(), self.mailer_port, milter_socket=self.socket,
            mc_lines=self.mc_lines, mc_after=self.mc_after, routes={**mx_hosts, **self.mailertable},
            relay_domains=self.relay_domains, **kw)
        self.sendmail.start()
        return self.sendmail

    def stop_sendmail(self):
        if self.sendmail:
            self.sendmail.stop()
            shutil.rmtree(self.sendmail.workdir, ignore_errors=True)
            self.sendmail = None

    def stop(self):
        self.stop_sendmail()
        if self.daemon:
            try:
                self.daemon.stop()
            except AssertionError:
                pass


@pytest.fixture(scope="module")
def sendmail_ready():
    """Build (or find) the image/rootfs once, outside any test's timing."""
    mode = sm.default_mode()
    if mode == "chroot" and not (sm.rootfs_ready() or shutil.which("debootstrap")):
        pytest.skip("no podman and no debootstrap: cannot run Sendmail")
    t0 = time.monotonic()
    built = sm.ensure_image() if mode == "container" else sm.ensure_rootfs()
    print(f"\nSendmail mode={mode} image/rootfs build={built:.1f}s (0 = cached) "
          f"[{time.monotonic() - t0:.1f}s]")
    return mode


@pytest.fixture(scope="module")
def shared(sendmail_ready):
    """The daemon and its config; the relay hop's port is the module's one mailer port."""
    workdir = sm.make_workdir()
    port = common_port([GMAIL, OUTLOOK, RELAY])
    st = SendmailStack(workdir, RULES.format(relay=RELAY, port=port), port)
    try:
        yield st.start_daemon()
    finally:
        st.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def stack(shared, request):
    """gmail.test on 127.0.0.2, outlook.test on 127.0.0.3, the fallback smart host (the
    default route's relay) on 127.0.0.5, all on the module's port; a fresh Sendmail."""
    port = shared.mailer_port
    mx = {"gmail.test": FakeMX(GMAIL, port, "gmail").start(),
          "outlook.test": FakeMX(OUTLOOK, port, "outlook").start()}
    relay = FakeMX(RELAY, port, "relay").start()
    shared.ensure_daemon()
    try:
        shared.start_sendmail(request.node.name[:40], mx, relay)
        print(f"Sendmail mode={shared.sendmail.mode} start={shared.sendmail.start_seconds:.2f}s")
        yield shared
    finally:
        shared.stop_sendmail()
        for m in [*mx.values(), relay]:
            try:
                m.stop()
            except RuntimeError:  # already stopped by the test
                pass


def milter_record(st, queue_id, timeout=10):
    """routemilter's one log line for a message, found by Sendmail's queue id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in st.daemon.log_text().splitlines():
            if f"queue_id={queue_id} " in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"no routemilter log line with queue_id={queue_id}:\n{st.daemon.log_text()[-2000:]}")


# --- the generated configuration, as Sendmail compiled it ---------------------------

def test_sendmail_cf_has_the_generated_milter_settings(stack):
    cf = Path(stack.sendmail.cf).read_text()
    sock = stack.socket
    assert f"Xroutemilter, S=unix:{sock}, F=T, T=C:30s;S:1m;R:1m;E:5m" in cf
    assert "O InputMailFilters=routemilter" in cf
    assert "O Milter.macros.eom={msg_id}, i" in cf
    assert re.search(r"^O Milter\.macros\.envfrom=i, .*\{mail_addr\}", cf, re.M)
    assert f"O FallbackSmartHost=[{RELAY}]" in cf
    # the generated HostStatusDirectory is overridden by the harness (one per instance)
    assert f"O HostStatusDirectory={stack.sendmail.workdir}/hoststat" in cf
    assert "family.test" in Path(f"{stack.sendmail.workdir}/relay-domains").read_text()


# --- routing ---------------------------------------------------------------------------

def test_fanout_exactly_once_with_srs_and_dkim(stack):
    r = stack.sendmail.send(SENDER, ["parents@family.test"], message("parents@family.test"))
    assert r.accepted, r
    qid = sm.queue_id_of(r)
    stack.mx_hosts["gmail.test"].wait_for(1, timeout=20)
    stack.mx_hosts["outlook.test"].wait_for(1, timeout=20)
    stack.sendmail.wait_queue_empty(20)
    time.sleep(0.5)  # nothing else may follow
    got = sorted((name, rcpt) for name, rcpt, _ in stack.arrivals())
    assert got == [("gmail", "mum@gmail.test"), ("outlook", "dad@outlook.test")]
    assert not stack.relay.messages
    for _, _, msg in stack.arrivals():
        assert msg.mail_from.endswith("@" + SRS_DOMAIN), msg.mail_from
        assert stack.srs.reverse(msg.mail_from) == SENDER
        assert sorted(stack.verify_dkim(msg.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
        assert b"X-Routemilter: mx.routemilter.test; rules=parents" in msg.data
    # Sendmail gave the milter its queue id ($i): the log line names this message.
    line = milter_record(stack, qid)
    assert "parents@family.test->parents:mum@gmail.test,dad@outlook.test" in line, line
    sent = [d for d in stack.sendmail.deliveries() if d["qid"] == qid]
    assert sorted(d["to"] for d in sent) == ["dad@outlook.test", "mum@gmail.test"], sent
    assert all(d["stat"].startswith("Sent") for d in sent), sent


def test_two_transactions_on_one_connection_and_overlapping_fanout(stack):
    """Sendmail keeps one milter connection per SMTP session: each message is routed
    on its own, and two routed recipients in one message reach each mailbox once."""
    with smtplib.SMTP("127.0.0.1", stack.sendmail.port, timeout=30) as s:
        s.ehlo("client.routemilter.test")
        s.sendmail(SENDER, ["parents@family.test", "me@family.test"], message("parents@family.test", 1))
        s.sendmail("bob@other.test", ["me@family.test"], message("me@family.test", 2))
    stack.sendmail.wait_queue_empty(20)
    stack.mx_hosts["outlook.test"].wait_for(2, timeout=20)
    time.sleep(0.5)
    got = sorted((n, rc, stack.srs.reverse(m.mail_from)) for n, rc, m in stack.arrivals())
    assert got == [("gmail", "mum@gmail.test", SENDER),
                   ("outlook", "dad@outlook.test", SENDER),
                   ("outlook", "me@outlook.test", SENDER),
                   ("outlook", "me@outlook.test", "bob@other.test")], got


def test_unknown_recipient_refused_at_rcpt(stack):
    r = stack.sendmail.send(SENDER, ["nobody@family.test", "me@family.test"], message("me@family.test"))
    code, text = r.rcpt["nobody@family.test"]
    assert code == 550 and text.startswith("5.1.1"), r.rcpt
    assert r.rcpt["me@family.test"][0] == 250 and r.accepted, r
    stack.mx_hosts["outlook.test"].wait_for(1, timeout=20)
    stack.sendmail.wait_queue_empty(20)
    assert [(n, rc) for n, rc, _ in stack.arrivals()] == [("outlook", "me@outlook.test")]


def test_subdomain_of_a_relay_domain_reaches_the_milter(stack):
    # relay-domains (class R) covers subdomains; the milter decides (no rule for kid@).
    r = stack.sendmail.send(SENDER, ["x@kid.family.test"], message("x@kid.family.test"))
    assert r.rcpt["x@kid.family.test"][0] == 550, r.rcpt


def test_unmanaged_subdomain_of_a_managed_domain_is_not_relayed(stack):
    # Sendmail's relay-domains (class R) covers every subdomain; routemilter refuses at
    # RCPT what it does not manage below its domains (issue #12 item 1), so nothing is
    # relayed unrouted (before: accepted and sent to the fallback smart host).
    for rcpt in ("x@sub.plain.test", "x@a.kid.family.test", f"x@a.{SRS_DOMAIN}"):
        r = stack.sendmail.send(SENDER, [rcpt], message(rcpt))
        code, text = r.rcpt[rcpt]
        assert code == 550 and "5.1.2" in text, r.rcpt
        assert not r.accepted
    time.sleep(2)
    assert stack.relay.messages == [] and not stack.arrivals()


def test_source_routed_recipient_reaches_only_its_destination(stack):
    # routemilter deletes the recipient without its source route, as Postfix stores it
    # (issue #12 item 2). Sendmail matches a delete in either form (it parses the
    # address; checked by reverting the fix): this shows the new form works here too.
    s = smtplib.SMTP("127.0.0.1", stack.sendmail.port, timeout=60)
    try:
        s.ehlo("client.sender.test")
        assert s.mail(SENDER)[0] == 250
        code, text = s.docmd("RCPT", "TO:<@ext.test:me@family.test>")
        assert code == 250, (code, text)
        code, text = s.data(message("me@family.test", 7))
        assert code == 250, (code, text)
        s.quit()
    finally:
        s.close()
    stack.mx_hosts["outlook.test"].wait_for(1, timeout=20)
    stack.sendmail.wait_queue_empty(20)
    time.sleep(1)
    assert sorted((n, r) for n, r, _ in stack.arrivals()) == [("outlook", "me@outlook.test")]
    assert not stack.relay.messages


def test_milter_killed_sendmail_tempfails(stack):
    stack.daemon.signal(signal.SIGKILL)
    stack.daemon.proc.wait(5)
    r = stack.sendmail.send(SENDER, ["me@family.test"], message("me@family.test"))
    assert not r.accepted, r
    stage, code, text = r.first_failure()
    assert 400 <= code < 500, r
    print(f"milter down: {stage} -> {code} {text}")
    stack.sendmail.wait_log(r"Milter \(routemilter\): .*(error connecting|to error state)", timeout=10)
    assert not stack.arrivals() and not stack.sendmail.queue_files()
    # Back up: the next attempt is routed again.
    stack.ensure_daemon()
    r = stack.sendmail.send(SENDER, ["me@family.test"], message("me@family.test"))
    assert r.accepted, r
    stack.mx_hosts["outlook.test"].wait_for(1, timeout=20)


# --- relay fallback: what Sendmail's FallbackSmartHost really does ------------------------

def test_rate_limited_rcpt_is_retried_at_the_primary_not_the_fallback_smarthost(stack):
    """451 4.7.650 at RCPT: Sendmail queues that recipient and retries the same MX;
    FallbackSmartHost is only for hosts that cannot be found or connected to."""
    outlook = stack.mx_hosts["outlook.test"]
    outlook.set_reply("dad@outlook.test", RATE_LIMITED)
    r = stack.sendmail.send(SENDER, ["parents@family.test"], message("parents@family.test"))
    assert r.accepted, r
    qid = sm.queue_id_of(r)
    stack.mx_hosts["gmail.test"].wait_for(1, timeout=20)
    # Several queue runs (every 2 s): each retries dad@ at outlook, never at the relay.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(a == "dad@outlook.test" for a, _ in outlook.rcpt_log) < 3:
        time.sleep(0.2)
    tries = [reply for a, reply in outlook.rcpt_log if a == "dad@outlook.test"]
    assert len(tries) >= 3 and all(t.startswith("451 4.7.650") for t in tries), tries
    assert not stack.relay.messages, [m.rcpt_tos for m in stack.relay.messages]
    assert stack.sendmail.queue_files(), "dad@ should still be queued"
    deferred = [d for d in stack.sendmail.deliveries() if d["qid"] == qid and d["to"] == "dad@outlook.test"]
    assert deferred and all(d["stat"].startswith("Deferred: 451 4.7.650") for d in deferred), deferred
    # The primary recovers: the next queue run delivers dad@ once, mum@ is not repeated.
    outlook.set_reply("dad@outlook.test", "250 2.1.5 OK")
    outlook.wait_for(1, timeout=20)
    stack.sendmail.wait_queue_empty(20)
    got = sorted((n, rc) for n, rc, _ in stack.arrivals())
    assert got == [("gmail", "mum@gmail.test"), ("outlook", "dad@outlook.test")]
    assert stack.srs.reverse(outlook.messages[0].mail_from) == SENDER
    assert len(stack.verify_dkim(outlook.messages[0].data)) == 2


def test_unreachable_primary_goes_to_the_fallback_smarthost(stack):
    """Connection refused at the destination's host: one last try through the
    fallback smart host, in the same delivery attempt."""
    stack.mx_hosts["outlook.test"].stop()
    r = stack.sendmail.send(SENDER, ["parents@family.test"], message("parents@family.test"))
    assert r.accepted, r
    qid = sm.queue_id_of(r)
    stack.relay.wait_for(1, timeout=20)
    stack.sendmail.wait_queue_empty(20)
    [msg] = stack.relay.messages
    assert msg.rcpt_tos == ["dad@outlook.test"]
    assert stack.srs.reverse(msg.mail_from) == SENDER
    assert sorted(stack.verify_dkim(msg.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    assert [(n, rc) for n, rc, _ in stack.arrivals()] == [("gmail", "mum@gmail.test")]
    sent = [d for d in stack.sendmail.deliveries() if d["qid"] == qid and d["to"] == "dad@outlook.test"]
    assert sent[-1]["stat"].startswith("Sent") and RELAY in (sent[-1]["relay"] or ""), sent


def test_primary_that_drops_the_connection_goes_to_the_fallback_smarthost_next_run(stack):
    """Connected, then reset: deferred in that attempt; with host status kept
    (HostStatusDirectory, which sendmail-config asks for) the next queue run goes
    straight to the fallback smart host. Without it Sendmail retries the same host
    for ever (seen with Debian's default, which has no HostStatusDirectory)."""
    outlook = stack.mx_hosts["outlook.test"]
    outlook.set_mode("reset")
    r = stack.sendmail.send(SENDER, ["parents@family.test"], message("parents@family.test"))
    assert r.accepted, r
    qid = sm.queue_id_of(r)
    stack.relay.wait_for(1, timeout=20)
    stack.sendmail.wait_queue_empty(20)
    assert stack.relay.messages[0].rcpt_tos == ["dad@outlook.test"]
    assert stack.srs.reverse(stack.relay.messages[0].mail_from) == SENDER
    tries = [d for d in stack.sendmail.deliveries() if d["qid"] == qid and d["to"] == "dad@outlook.test"]
    assert tries[0]["stat"].startswith("Deferred: Connection reset by [127.0.0.3]"), tries
    assert tries[-1]["stat"].startswith("Sent") and RELAY in tries[-1]["relay"], tries
    assert [(n, rc) for n, rc, _ in stack.arrivals()] == [("gmail", "mum@gmail.test")]


def test_milter_socket_below_a_world_writable_folder_is_refused(sendmail_ready):
    """What sendmail-config warns about: a socket under /var/tmp (sticky, world
    writable) makes Sendmail refuse the filter, here even to start."""
    sockdir = tempfile.mkdtemp(prefix="rmsock-", dir="/var/tmp")
    os.chmod(sockdir, 0o755)
    path = f"{sockdir}/rm.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    class UnsafeSocketSendmail(sm.Sendmail):
        def _mounts(self):
            return super()._mounts() + [(sockdir, sockdir, False)]

    workdir = sm.make_workdir()
    mta = UnsafeSocketSendmail(workdir, free_port(), 2525, mc_lines=(
        f"INPUT_MAIL_FILTER(`routemilter', `S=unix:{path}, F=T')dnl"))
    try:
        with pytest.raises(RuntimeError, match=r"local socket name /var/tmp/rmsock-\w+/rm.sock unsafe: "
                                               r"World writable directory"):
            mta.start(timeout=20)
    finally:
        mta.stop()
        listener.close()
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)



@pytest.mark.parametrize("host_status_dir", [False, "/var/lib/sendmail/host_status"],
                         ids=["undefined", "folder-missing"])
def test_without_host_status_a_dropping_host_never_falls_back(stack, host_status_dir):
    """Debian's default sendmail.mc keeps no HostStatusDirectory: each queue run is a
    new process that knows nothing of the last failure, so it retries the same host
    and never uses the fallback smart host. Hence the line sendmail-config adds, and
    its note: a HostStatusDirectory that does not exist silently does the same."""
    stack.stop_sendmail()
    stack.start_sendmail("no-host-status", stack.mx_hosts, stack.relay, host_status_dir=host_status_dir)
    stack.mx_hosts["outlook.test"].set_mode("reset")
    r = stack.sendmail.send(SENDER, ["me@family.test"], message("me@family.test"))
    assert r.accepted, r
    qid = sm.queue_id_of(r)

    def resets():
        return [d for d in stack.sendmail.deliveries()
                if d["qid"] == qid and d["stat"].startswith("Deferred: Connection reset by [127.0.0.3]")]
    deadline = time.monotonic() + 20
    while len(resets()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(resets()) >= 3, stack.sendmail.log_tail()
    assert not stack.relay.messages
    defined = re.search(r"^O HostStatusDirectory=(.*)", Path(stack.sendmail.cf).read_text(), re.M)
    assert (defined and defined.group(1)) == (host_status_dir or None)


# --- address-level fallback: Sendmail's own DSNs to routemilter's bounce handler ----------


def bounce_rules(workdir: str) -> str:
    return bounces(workdir) + family(
        fallback_rule("backup", "a@family.test", "a@gmail.test", "a@outlook.test"),
        fallback_rule("all-fail", "c@family.test", "c@gmail.test", "c@outlook.test"))


SENDER_MX = "127.0.0.4"


@pytest.fixture(scope="module")
def bounce_shared(sendmail_ready):
    workdir = sm.make_workdir("smb-")
    port = common_port([GMAIL, OUTLOOK, SENDER_MX])
    st = SendmailStack(workdir, bounce_rules(workdir), port)
    try:
        yield st.start_daemon()
    finally:
        st.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def bounce_stack(bounce_shared, request):
    """gmail.test refuses every address; sender.test is the original sender's MX."""
    port = bounce_shared.mailer_port
    mx = {"gmail.test": FakeMX(GMAIL, port, "gmail").start(),
          "outlook.test": FakeMX(OUTLOOK, port, "outlook").start(),
          "sender.test": FakeMX(SENDER_MX, port, "sender").start()}
    mx["gmail.test"].set_reply("*", "550 5.1.1 <{rcpt}> gmail: no such user")
    mx["outlook.test"].set_reply("c@outlook.test", "550 5.2.1 <{rcpt}> outlook: mailbox disabled")
    bounce_shared.ensure_daemon()
    try:
        bounce_shared.start_sendmail(request.node.name[:40], mx, None)
        yield bounce_shared
    finally:
        bounce_shared.stop_sendmail()
        for m in mx.values():
            m.stop()


def settle(st, expected, timeout=30):
    deadline = time.monotonic() + timeout
    while len(st.arrivals()) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    st.sendmail.wait_queue_empty(max(1.0, deadline - time.monotonic()))
    time.sleep(1.0)  # nothing more may come
    return st.arrivals()


def test_refused_primary_goes_to_the_fallback_address_through_sendmails_dsn(bounce_stack):
    """gmail refuses a@gmail.test with 550: Sendmail's DSN to the bounce token goes
    over LMTP to routemilter (mailertable + the rmbounce mailer from sendmail-config),
    which re-injects the original through the milter-less listener to a@outlook.test."""
    st = bounce_stack
    r = st.sendmail.send(SENDER, ["a@family.test"], message("a@family.test"))
    assert r.accepted, r
    got = settle(st, 1)
    assert [(n, rc) for n, rc, _ in got] == [("outlook", "a@outlook.test")], got
    msg = got[0][2]
    assert msg.mail_from.startswith("rmc=") and msg.mail_from.endswith("@" + SRS_DOMAIN), msg.mail_from
    assert sorted(st.verify_dkim(msg.data)) == ["routemilter.test/ed", "routemilter.test/rsa"]
    log = st.sendmail.log_text()
    assert re.search(r"to=<rmc=[^>]+>, .*mailer=rmbounce, .*stat=Sent", log), st.sendmail.log_tail()
    assert re.search(r"Milter: no active filter\n.*daemon=rm-reinject", log), st.sendmail.log_tail()
    assert "notes=a@gmail.test:fallback->a@outlook.test" in st.daemon.log_text()


def test_all_refused_sender_gets_one_bounce_with_every_reason(bounce_stack):
    from routemilter.dsn import parse_dsn
    st = bounce_stack
    r = st.sendmail.send(SENDER, ["c@family.test"], message("c@family.test"))
    assert r.accepted, r
    got = settle(st, 1)
    assert [(n, rc) for n, rc, _ in got] == [("sender", SENDER)], got
    msg = got[0][2]
    assert msg.mail_from in ("", "<>")
    report = parse_dsn(msg.data)
    assert [x.final_recipient for x in report.failed] == ["c@gmail.test", "c@outlook.test"]
    text = msg.data.decode("utf-8", "replace")
    assert "gmail: no such user" in text and "outlook: mailbox disabled" in text
