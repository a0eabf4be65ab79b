"""Send as your address (issue #18), end to end through a real Postfix with SASL.

One stack: Postfix configured from `routemilter postfix-config` (main.cf with
`smtpd_sender_login_maps` = routemilter's socketmap, master.cf with the
generated submission service: STARTTLS required, SASL through Dovecot,
`reject_sender_login_mismatch`), the real daemon, Dovecot's auth service with a
passwd-file (real logins), and fake MX hosts. The only changes to the generated
submission service: it listens on 127.0.0.1:PORT instead of 587 and Dovecot's
socket is in the test folder instead of /var/spool/postfix/private/auth.

Every copy's DKIM signatures are verified by dkimpy and by OpenDKIM (`opendkim -t`).

Run: .venv/bin/python -m pytest -q -p no:cacheprovider integration/test_sendas.py
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import smtplib
import ssl
import sys
import tempfile
import time
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from checks import OpenDKIM, dkim_algorithms, wait_arrivals  # noqa: E402
from dovecot import Dovecot  # noqa: E402
from fakemx import FakeMX, free_port  # noqa: E402
from postfix import default_mode  # noqa: E402
from routemilter.mtaconfig import DOVECOT_AUTH  # noqa: E402
from smtpsend import send  # noqa: E402
from stack import Stack  # noqa: E402

pytestmark = pytest.mark.integration

DOMAIN = "family.test"
TRUSTED_CLIENT = "127.0.0.9"  # submission.trusted_networks; other tests connect from 127.0.0.1
PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-2"}

RULES = """
submission:
  socket: unix:{workdir}/senders.sock
  trusted_networks: [{trusted}/32]
domains:
  family.test: {{}}
rules:
  - name: alice
    addresses: [alice@family.test]
    to: alice@gmail.test
    senders: [alice]
  - name: bob
    addresses: [bob@family.test]
    to: bob@gmail.test
    senders: Bob  # Dovecot reports the login "bob": compared case-insensitively, as Postfix does
"""


class SubmissionStack(Stack):
    """Stack whose generated submission service listens on a test port and asks the
    test's Dovecot; everything else exactly as `postfix-config` printed it."""

    submission_port = 0
    auth_socket = ""

    def postfix_settings(self):
        main, master, transport = super().postfix_settings()
        assert "\nsubmission inet n - n - - smtpd\n" in "\n" + master, master
        assert f"-o smtpd_sasl_path={DOVECOT_AUTH}\n" in master, master
        assert main["smtpd_sender_login_maps"] == f"socketmap:unix:{self.workdir}/senders.sock:senders", main
        master = master.replace("submission inet", f"127.0.0.1:{self.submission_port} inet", 1)
        master = master.replace(f"smtpd_sasl_path={DOVECOT_AUTH}", f"smtpd_sasl_path={self.auth_socket}", 1)
        main["smtpd_tls_cert_file"] = f"{self.workdir}/tls/cert.pem"
        main["smtpd_tls_key_file"] = f"{self.workdir}/tls/key.pem"
        return main, master, transport


def self_signed(folder: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(folder, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.routemilter.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    with open(f"{folder}/cert.pem", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(f"{folder}/key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


@pytest.fixture(scope="module")
def env():
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    mode = default_mode()
    if mode == "host" and not shutil.which("dovecot"):
        pytest.skip("host mode needs Dovecot (Debian package dovecot-core)")
    workdir = tempfile.mkdtemp(prefix="rmsa-", dir="/var/tmp")
    os.chmod(workdir, 0o755)
    gmail = FakeMX("127.0.0.2", free_port("127.0.0.2"), "gmail").start()
    elsewhere = FakeMX("127.0.0.3", free_port("127.0.0.3"), "elsewhere").start()
    dovecot = stack = None
    try:
        self_signed(f"{workdir}/tls")
        dovecot = Dovecot(workdir, PASSWORDS, mode=mode).start()
        # dkim.domain is the managed domain itself, as on a one-domain server: the forwarder's
        # own signing decision (signpolicy.py) and the outbound one meet on the same d=.
        stack = SubmissionStack(workdir, RULES.format(workdir=workdir, trusted=TRUSTED_CLIENT),
                                dkim_domain=DOMAIN, mx_hosts={"gmail.test": gmail, "elsewhere.test": elsewhere})
        stack.submission_port = free_port()
        stack.auth_socket = dovecot.auth_socket
        stack.start()
        stack.odk = OpenDKIM(workdir, stack.keys, DOMAIN)
        stack.gmail, stack.elsewhere = gmail, elsewhere
        yield stack
    finally:
        if stack is not None:
            stack.stop()
        if dovecot is not None:
            dovecot.stop()
        gmail.stop()
        elsewhere.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def message(from_header: str, to: str, message_id: str) -> bytes:
    return (f"From: {from_header}\r\nTo: <{to}>\r\nSubject: sent as my own address\r\n"
            f"Date: Fri, 27 Nov 2026 17:00:00 +0000\r\nMessage-ID: <{message_id}>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"Hello from my domain.\r\n").encode()


def submit(stack, login, mail_from, rcpts, data, password=None):
    """STARTTLS, AUTH, then one transaction on the submission port: {stage: (code, text)}."""
    out = {}
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test's self-signed certificate
    with smtplib.SMTP("127.0.0.1", stack.submission_port, timeout=60) as s:
        s.ehlo("laptop.test")
        out["auth_before_tls"] = "auth" in s.esmtp_features
        s.starttls(context=context)
        s.ehlo("laptop.test")
        if login is not None:
            out["auth"] = s.login(login, password or PASSWORDS[login])
        out["mail"] = s.mail(mail_from)
        if out["mail"][0] >= 400:
            return out
        out["rcpt"] = [s.rcpt(r) for r in rcpts]
        try:
            out["data"] = s.data(data)
        except smtplib.SMTPResponseException as exc:
            out["data"] = (exc.smtp_code, exc.smtp_error)
    return out


def arrived(stack, message_id, count=1):
    got = wait_arrivals([stack.gmail, stack.elsewhere], message_id, count, timeout=60)
    assert len(got) == count, (got, stack.postfix.log_tail(), stack.daemon.log_text()[-3000:])
    return got


def signatures(stack, data: bytes) -> dict[str, str]:
    """{domain/selector: 'pass'} as both verifiers see it; they must agree."""
    by_dkimpy = set(stack.verify_dkim(data))
    by_opendkim = {f"{DOMAIN}/{s}" for s, result in stack.odk.verify(data).items() if result == "pass"} \
        if f"d={DOMAIN}".encode() in data else set()
    ours = {x for x in by_dkimpy if x.startswith(DOMAIN + "/")}
    assert ours == by_opendkim, (by_dkimpy, by_opendkim)
    return by_dkimpy


def test_login_sends_as_own_alias_and_plus_address_signed_for_the_domain(env):
    for sender in ("alice@family.test", "alice+shop@family.test"):
        mid = f"{uuid.uuid4().hex}@laptop.test"
        data = message(f"Alice <{sender}>", "friend@elsewhere.test", mid)
        r = submit(env, "alice", sender, ["friend@elsewhere.test"], data)
        assert not r["auth_before_tls"], "AUTH offered before STARTTLS"
        assert r["auth"][0] == 235, r
        assert r["mail"][0] == 250 and r["data"][0] == 250, r
        [(mx, rcpt, copy)] = arrived(env, mid)
        assert (mx, rcpt) == ("elsewhere", "friend@elsewhere.test")
        assert copy.mail_from == sender  # envelope sender unchanged: no SRS for our own users
        assert dkim_algorithms(copy.data) == {"rsa": "rsa-sha256", "ed": "ed25519-sha256"}
        assert signatures(env, copy.data) == {f"{DOMAIN}/rsa", f"{DOMAIN}/ed"}
        assert copy.data.endswith(data)  # only headers prepended


def test_login_cannot_use_another_persons_alias(env):
    for sender in ("bob@family.test", "bob+x@family.test", "nobody@family.test", "alice@gmail.test"):
        mid = f"{uuid.uuid4().hex}@laptop.test"
        r = submit(env, "alice", sender, ["friend@elsewhere.test"],
                   message(f"<{sender}>", "friend@elsewhere.test", mid))
        code, text = r["mail"]
        assert code == 553 and text.startswith(b"5.7.1"), r
        assert b"not owned by user alice" in text, r
    # the owner may: the refusal is about the login, not the address
    mid = f"{uuid.uuid4().hex}@laptop.test"
    r = submit(env, "bob", "bob+x@family.test", ["friend@elsewhere.test"],
               message("<bob+x@family.test>", "friend@elsewhere.test", mid))
    assert r["data"][0] == 250, r
    arrived(env, mid)


def test_login_cannot_sign_another_persons_address_in_from_header(env):
    """Postfix checks the envelope only; the milter refuses a From: the login does not own."""
    mid = f"{uuid.uuid4().hex}@laptop.test"
    r = submit(env, "alice", "alice@family.test", ["friend@elsewhere.test"],
               message("Bob <bob@family.test>", "friend@elsewhere.test", mid))
    code, text = r["data"]
    assert code == 553 and text.startswith(b"5.7.1") and b"not owned by user alice" in text, r
    assert not wait_arrivals([env.gmail, env.elsewhere], mid, 1, timeout=3)


def test_login_mail_to_managed_address_is_routed_as_usual(env):
    mid = f"{uuid.uuid4().hex}@laptop.test"
    data = message("Alice <alice@family.test>", "bob@family.test", mid)
    r = submit(env, "alice", "alice@family.test", ["bob@family.test", "friend@elsewhere.test"], data)
    assert r["data"][0] == 250, r
    got = arrived(env, mid, 2)
    assert sorted((mx, rcpt) for mx, rcpt, _ in got) == [("elsewhere", "friend@elsewhere.test"),
                                                         ("gmail", "bob@gmail.test")]
    for _, _, copy in got:
        assert copy.mail_from == "alice@family.test"
        assert signatures(env, copy.data) == {f"{DOMAIN}/rsa", f"{DOMAIN}/ed"}


def test_unauthenticated_client_with_managed_from_is_not_signed(env):
    """Port 25 from 127.0.0.1 (Postfix's mynetworks relays it, the harness's setting): no
    login, not a trusted network, so no d=family.test signature on any copy: not as our
    user's mail (senders.py), not as a forward (signpolicy.py: an unverified aligned From)."""
    mid = f"{uuid.uuid4().hex}@spoof.test"
    data = message("Alice <alice@family.test>", "bob@family.test", mid)
    r = send("127.0.0.1", env.postfix.port, "alice@family.test", ["bob@family.test", "friend@elsewhere.test"], data)
    assert r.accepted, r  # routemilter does not refuse it (auth: with DMARC can), it does not vouch for it
    got = arrived(env, mid, 2)
    for mx, _, copy in got:
        signed = signatures(env, copy.data)
        assert not any(s.startswith(DOMAIN + "/") for s in signed), (mx, signed)
        assert f"d={DOMAIN}".encode() not in copy.data.split(b"\r\n\r\n", 1)[0]
    # the forwarded copy went the inbound way: SRS, so the unauthenticated sender is not ours
    [gmail_copy] = [c for mx, _, c in got if mx == "gmail"]
    assert gmail_copy.mail_from.startswith("SRS0="), gmail_copy.mail_from
    assert "dkim=skipped:from-aligned-unverified:family.test" in env.daemon.log_text()


def test_submission_refuses_unauthenticated_mail(env):
    mid = f"{uuid.uuid4().hex}@laptop.test"
    r = submit(env, None, "alice@family.test", ["friend@elsewhere.test"],
               message("<alice@family.test>", "friend@elsewhere.test", mid))
    code, text = r["mail"]
    assert code == 553 and b"not logged in" in text, r


def test_trusted_network_is_signed_without_login(env):
    mid = f"{uuid.uuid4().hex}@app.test"
    data = message("Notifications <bob@family.test>", "friend@elsewhere.test", mid)
    with smtplib.SMTP("127.0.0.1", env.postfix.port, timeout=60, source_address=(TRUSTED_CLIENT, 0)) as s:
        s.ehlo("app.test")
        s.sendmail("bob@family.test", ["friend@elsewhere.test"], data)
    [(_, _, copy)] = arrived(env, mid)
    assert copy.mail_from == "bob@family.test"
    assert signatures(env, copy.data) == {f"{DOMAIN}/rsa", f"{DOMAIN}/ed"}


def test_no_postfix_warnings_so_far(env):
    """The generated submission service and login map, used by every test above, drew no
    warning from Postfix (the two tests below provoke some on purpose)."""
    log = env.postfix.log_text()
    assert "postfix/submission" in log
    assert not re.findall(r".*(?:warning|fatal|panic):.*", log), log


def test_login_map_failure_is_temporary(env):
    """The socketmap answers TEMP (here: a reload dropped submission:, while Postfix still
    asks): Postfix answers 4xx at MAIL FROM, the client retries; nobody may send as anyone."""
    original = env.config_path.read_text()
    reduced = original.split("submission:")[0] + "domains:\n  family.test: {}\n" \
        "rules:\n  - name: alice\n    addresses: [alice@family.test]\n    to: alice@gmail.test\n"
    try:
        env.config_path.write_text(reduced)
        env.daemon.signal(signal.SIGUSR1)
        env.daemon.wait_log("reloaded", timeout=30)
        r = submit(env, "alice", "alice@family.test", ["friend@elsewhere.test"],
                   message("<alice@family.test>", "friend@elsewhere.test", f"{uuid.uuid4().hex}@laptop.test"))
        code, text = r["mail"]
        assert code == 451 and text.startswith(b"4.3.0") and b"Temporary lookup failure" in text, r
    finally:
        env.config_path.write_text(original)
        env.daemon.signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while env.daemon.log_text().count("reloaded") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    mid = f"{uuid.uuid4().hex}@laptop.test"
    r = submit(env, "alice", "alice@family.test", ["friend@elsewhere.test"],
               message("<alice@family.test>", "friend@elsewhere.test", mid))
    assert r["data"][0] == 250, r
    arrived(env, mid)


def test_daemon_down_is_a_temporary_failure(env):
    """Daemon stopped (milter and socketmap gone): Postfix answers 4xx (milter_default_action
    = tempfail) before anything is accepted. Runs last: it stops and restarts the daemon."""
    env.daemon.stop()
    try:
        with pytest.raises(smtplib.SMTPResponseException) as info:
            submit(env, "alice", "alice@family.test", ["friend@elsewhere.test"],
                   message("<alice@family.test>", "friend@elsewhere.test", f"{uuid.uuid4().hex}@laptop.test"))
        assert 400 <= info.value.smtp_code < 500, info.value
    finally:
        env.daemon.start()
    mid = f"{uuid.uuid4().hex}@laptop.test"
    r = submit(env, "alice", "alice@family.test", ["friend@elsewhere.test"],
               message("<alice@family.test>", "friend@elsewhere.test", mid))
    assert r["data"][0] == 250, r
    arrived(env, mid)
