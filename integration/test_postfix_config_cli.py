"""`routemilter postfix-config`, exactly as printed, accepted by a real Postfix.

The CLI (`.venv/bin/routemilter -c CFG postfix-config`, a subprocess) prints three
sections: main.cf lines, master.cf lines and the transport map. This test
pastes them into a Postfix instance (the harness's minimal base main.cf and
master.cf, as an admin's existing files would be) and asks Postfix about them:

* `postconf -n`, `postconf -M`, `postconf -P` and `postfix check` report no
  warning or error that the base config alone does not;
* `postfix reload` takes the config and the live values are the printed ones;
* with the CLI config and nothing else deciding relaying (mynetworks does not
  contain the test client): mail for a managed domain is accepted and leaves
  through the generated relay-first transport (first relay down, second relay
  takes it), mail for anyone else is refused (no open relay).

The only edit made to the printed text: the transport map's path
(/etc/postfix/routemilter_transport) becomes a file in the test's config folder.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import pfcontainer  # noqa: E402
from checks import arrivals_of, seed_message, wait_arrivals  # noqa: E402
from fakemx import FakeMX, free_port  # noqa: E402
from mtaclient import Daemon  # noqa: E402
from postfix import Postfix  # noqa: E402
from routemilter.signing import generate_key  # noqa: E402
from stack import SRS_DOMAIN, header_sections  # noqa: E402

pytestmark = pytest.mark.integration

CLI = os.path.join(REPO, ".venv", "bin", "routemilter")
EXAMPLES = os.path.join(REPO, "conf", "examples")
TRANSPORT_PATH = "/etc/postfix/routemilter_transport"
SENDER = "alice@sender.test"

ROUTES_RULES = """
routes:
  mx-then-relay: [mx, "[127.0.0.20]:{fb_port}"]
  relay-first: ["[127.0.0.21]:{dead_port}", "[127.0.0.22]:{relay_b_port}"]
domains:
  family.test: {{}}
rules:
  - name: dariusz
    addresses: [dariusz@family.test]
    to:
      - address: dariusz@ratelimited.test
        route: mx-then-relay
  - name: far
    addresses: [far@family.test]
    to:
      - address: someone@far.test
        route: relay-first
      - address: other@far.test
        route: relay-first
"""


def cli_postfix_config(config_path: str) -> str:
    r = subprocess.run([CLI, "-c", config_path, "postfix-config"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr, (r.returncode, r.stderr)
    return r.stdout


def parse(text: str) -> tuple[dict[str, str], str, str]:
    """The CLI's three sections: ({main.cf name: value}, master.cf text, transport text)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"# ---- (\S+)", line)
        if m:
            current = m.group(1)
            sections[current] = []
        elif current:
            sections[current].append(line)
    assert list(sections)[:2] == ["main.cf", "master.cf"], list(sections)
    main = {}
    for line in sections["main.cf"]:
        if line.strip() and not line.startswith("#"):
            name, sep, value = line.partition(" = ")
            assert sep and re.fullmatch(r"[a-z_]+", name), line
            main[name] = value
    master = "\n".join(sections["master.cf"]).strip() + "\n"
    assert len(sections) < 3 or list(sections)[2] == TRANSPORT_PATH, list(sections)
    transport = "\n".join(line for line in sections.get(TRANSPORT_PATH, [])
                          if line.strip() and not line.startswith("#"))
    return main, master, transport + ("\n" if transport else "")


def warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r"warning|fatal|error", line, re.I)]


class Env:
    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="rmcli-", dir="/var/tmp")
        os.chmod(self.workdir, 0o755)
        os.makedirs(f"{self.workdir}/keys")
        self.keys = {sel: generate_key(alg, f"{self.workdir}/keys/{sel}.key")
                     for sel, alg in (("rsa", "rsa"), ("ed", "ed25519"))}
        self.socket = f"{self.workdir}/rm.sock"
        self.started = []
        self.fb = self._mx("127.0.0.20", "fallback-relay")
        self.relay_b = self._mx("127.0.0.22", "relay-b")
        self.elsewhere = self._mx("127.0.0.30", "elsewhere")
        # mynetworks without the test client: relaying is decided by the
        # generated relay_domains alone, as for mail from the internet.
        self.pf = Postfix(f"{self.workdir}/pf", free_port(), milter_socket=self.socket,
                          relayhost=f"[{self.elsewhere.host}]:{self.elsewhere.port}",
                          main_extra={"mynetworks": "127.0.0.254/32"})
        self.base_main = dict(self.pf.main)
        self.daemon = None

    def _mx(self, host, name):
        mx = FakeMX(host, free_port(host), name).start()
        self.started.append(mx)
        return mx

    def write_yaml(self, name: str, rules: str) -> str:
        path = f"{self.workdir}/{name}"
        Path(path).write_text(header_sections(self.workdir, self.socket, "routemilter.test") + rules)
        return path

    def apply(self, cli_text: str) -> tuple[dict, str, str]:
        """Install the CLI's text as this Postfix's config (not reloaded)."""
        conf_transport = f"{self.pf.conf}/routemilter_transport"
        main, master, transport = parse(cli_text)
        main = {k: v.replace(TRANSPORT_PATH, conf_transport) for k, v in main.items()}
        self.pf.main = {**self.base_main, **main}
        self.pf.master_extra = master
        self.pf.maps = {"routemilter_transport": transport} if transport else {}
        self.pf.write_config()
        return main, master, transport

    def sh(self, script: str) -> subprocess.CompletedProcess:
        """Run a shell script where this Postfix runs (inside its container in
        container mode): one podman exec instead of one per command."""
        args = ["sh", "-c", script]
        if self.pf.mode == "container":
            args = pfcontainer.cmd("exec", self.pf.container, *args)
        return subprocess.run(args, capture_output=True, text=True, timeout=60)

    def check(self) -> list[str]:
        """Warnings from postconf -n/-M/-P and postfix check for the current files."""
        c = self.pf.conf
        r = self.sh(f"set -e; postconf -c {c} -n >/dev/null; postconf -c {c} -M >/dev/null; "
                    f"postconf -c {c} -P >/dev/null; postfix -c {c} check")
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        return warnings(r.stdout + r.stderr)

    def stop(self):
        if self.daemon:
            self.daemon.stop()
        self.pf.stop()
        for mx in self.started:
            mx.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def env():
    e = Env()
    try:
        e.pf.start()
        print(f"\nPostfix mode={e.pf.mode} start={e.pf.start_seconds:.2f}s")
        e.baseline = e.check()  # what the harness's own base config already says
        yield e
    finally:
        e.stop()


CONFIGS = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".yaml")) + ["routes"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.split(".")[0] for c in CONFIGS])
def test_postfix_accepts_generated_config(env, config):
    if config == "routes":
        rules = ROUTES_RULES.format(fb_port=env.fb.port, dead_port=free_port("127.0.0.21"),
                                    relay_b_port=env.relay_b.port)
    else:
        rules = Path(EXAMPLES, config).read_text()
    text = cli_postfix_config(env.write_yaml(f"cli-{config}", rules))
    main, _master, transport = env.apply(text)
    new = [w for w in env.check() if w not in env.baseline]
    assert new == [], "\n".join(new) + "\n--- CLI output ---\n" + text
    env.pf.reload()
    live = dict(line.split(" = ", 1) for line in env.pf.postconf("-n").splitlines() if " = " in line)
    for name, value in main.items():
        assert live.get(name) == value, (name, live.get(name), value)
    # Every generated transport is a real master.cf service, every map entry resolves.
    services = env.pf.postconf("-M")
    for line in transport.splitlines():
        address, target = line.split()
        service = target.split(":", 1)[0]
        assert re.search(rf"^{service}\s+unix\s", services, re.M), (service, services)
        # postmap is the host's: same Debian Postfix and libdb as the image.
        got = subprocess.run(["postmap", "-c", env.pf.conf, "-q", address, f"hash:{env.pf.conf}/routemilter_transport"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        assert got == target, (address, got, target)


def test_generated_config_routes_mail_and_refuses_relaying(env):
    """The `routes` config as printed: far@ fans out over the relay-first route
    (first relay down: relay-b takes both copies, once each); a domain that is
    not managed is refused at RCPT even though the client is not trusted."""
    rules = ROUTES_RULES.format(fb_port=env.fb.port, dead_port=free_port("127.0.0.21"),
                                relay_b_port=env.relay_b.port)
    config = env.write_yaml("routes-flow.yaml", rules)
    env.apply(cli_postfix_config(config))
    env.pf.reload()
    env.daemon = Daemon(Path(config), Path(env.socket)).start()
    time.sleep(1)  # reload: let the new smtpd processes take over
    data = seed_message(SENDER, "far@family.test", "cli-flow-1@sender.test")
    result = env.pf.send(SENDER, ["far@family.test"], data)
    assert result.accepted, (result, env.pf.log_tail())
    got = wait_arrivals(env.started, "cli-flow-1@sender.test", 2, timeout=45)
    env.pf.wait_queue_empty(30)
    time.sleep(0.5)
    got = arrivals_of(env.started, "cli-flow-1@sender.test")
    assert sorted((n, r) for n, r, _ in got) == [("relay-b", "other@far.test"), ("relay-b", "someone@far.test")], got

    refused = env.pf.send(SENDER, ["victim@elsewhere.test"],
                          seed_message(SENDER, "victim@elsewhere.test", "cli-relay@x"))
    code, text = refused.rcpt["victim@elsewhere.test"]
    assert 400 <= code < 600 and "Relay access denied" in text, (code, text)
    assert not refused.accepted
    assert env.elsewhere.messages == []


def rcpt_replies(env, rcpts: list[str]) -> dict[str, tuple[int, str]]:
    """RCPT replies only (one transaction, then RSET): nothing is queued."""
    s = smtplib.SMTP("127.0.0.1", env.pf.port, timeout=30)
    try:
        s.ehlo("outside.test")
        assert s.mail(SENDER)[0] == 250
        out = {}
        for rcpt in rcpts:
            code, text = s.rcpt(rcpt)
            out[rcpt] = (code, text.decode(errors="replace"))
        s.rset()
        s.quit()
    finally:
        s.close()
    return out


RELAYED = "relayed"
DENIED = "Relay access denied"


@pytest.mark.parametrize("config, expect", [
    ("approach1-regex-aliases.yaml", {
        "user1@mydomain.net": RELAYED, "x@user2.mydomain.net": RELAYED,
        "x@other.mydomain.net": RELAYED,       # subdomain addressing: the catch-all's
        "x@imx.mydomain.net": DENIED,          # subdomain_exclude: not ours, not relayed
        # One label deep only (issue #12): `.mydomain.net` matched every depth.
        "x@a.user2.mydomain.net": DENIED, "x@a.imx.mydomain.net": DENIED,
        "x@a.fwd.routemilter.test": DENIED,    # below the SRS domain
        "victim@elsewhere.test": DENIED}),
    ("approach3-simple-backup.yaml", {
        "dariusz@mydomain.net": RELAYED,
        "x@sub.mydomain.net": DENIED,          # no subdomain addressing: not ours
        "victim@elsewhere.test": DENIED}),
    # The SRS domain below a domain with subdomain addressing (docs/configuration.md's layout):
    # `.mydomain.net` also relayed every name below the SRS domain.
    ("approach1-regex-aliases.yaml:fwd.mydomain.net", {
        "x@user2.mydomain.net": RELAYED,
        "x@a.fwd.mydomain.net": DENIED, "x@a.b.fwd.mydomain.net": DENIED}),
], ids=["subdomain-addressing", "exact-domain", "srs-below-managed"])
def test_relay_domains_match_what_routemilter_manages(env, config, expect):
    """A client outside mynetworks may relay to exactly the addresses routemilter
    rewrites; a subdomain it does not manage is refused by Postfix at RCPT."""
    config, _, srs_domain = config.partition(":")
    path = env.write_yaml(f"relay-{config}", Path(EXAMPLES, config).read_text())
    if srs_domain:
        Path(path).write_text(Path(path).read_text().replace(SRS_DOMAIN, srs_domain))
    env.apply(cli_postfix_config(path))
    env.pf.reload()
    if env.daemon:
        env.daemon.stop()
    env.daemon = Daemon(Path(path), Path(env.socket)).start()
    time.sleep(1)  # reload: let the new smtpd processes take over
    replies = rcpt_replies(env, list(expect))
    for rcpt, want in expect.items():
        code, text = replies[rcpt]
        if want == RELAYED:
            assert code == 250, (rcpt, code, text)
        else:
            assert code in (454, 554) and DENIED in text, (rcpt, code, text)


def test_apply_merges_into_a_site_config_and_routes_mail(env):
    """`postfix-config --apply` (postconf -e/-M/-P on the instance's config folder)
    instead of pasting: the site's own relay domain and milter entry stay, a
    second run changes nothing, Postfix reports no new warning, and mail leaves
    through the generated relay-first transport."""
    rules = ROUTES_RULES.format(fb_port=env.fb.port, dead_port=free_port("127.0.0.21"),
                                relay_b_port=env.relay_b.port)
    config = env.write_yaml("routes-apply.yaml", rules)
    # The site before routemilter: its own relay domain; its smtpd_milters already
    # names this socket (the harness's), which --apply must update, not duplicate.
    env.pf.main = {**env.base_main, "relay_domains": "site.test"}
    env.pf.master_extra = ""
    env.pf.maps = {}
    env.pf.write_config()
    apply = [CLI, "-c", config, "postfix-config", "--apply", "--config-directory", env.pf.conf]
    first = subprocess.run(apply, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    files = {name: Path(env.pf.conf, name).read_bytes() for name in ("main.cf", "master.cf")}
    second = subprocess.run(apply, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "nothing changed" in second.stdout, (second.stdout, second.stderr)
    assert {name: Path(env.pf.conf, name).read_bytes() for name in files} == files
    new = [w for w in env.check() if w not in env.baseline]
    assert new == [], new
    env.pf.reload()
    live = dict(line.split(" = ", 1) for line in env.pf.postconf("-n").splitlines() if " = " in line)
    assert live["relay_domains"] == "site.test, family.test, fwd.routemilter.test", live["relay_domains"]
    assert live["smtpd_milters"] == f"{{ unix:{env.socket}, default_action=tempfail }}", live["smtpd_milters"]
    assert [line.split()[0] for line in env.pf.postconf("-M").splitlines()].count("rm_relay_first") == 1
    if env.daemon:
        env.daemon.stop()
    env.daemon = Daemon(Path(config), Path(env.socket)).start()
    time.sleep(1)  # reload: let the new smtpd processes take over
    data = seed_message(SENDER, "far@family.test", "cli-apply-1@sender.test")
    result = env.pf.send(SENDER, ["far@family.test"], data)
    assert result.accepted, (result, env.pf.log_tail())
    wait_arrivals(env.started, "cli-apply-1@sender.test", 2, timeout=45)
    env.pf.wait_queue_empty(30)
    time.sleep(0.5)
    got = arrivals_of(env.started, "cli-apply-1@sender.test")
    assert sorted((n, r) for n, r, _ in got) == [("relay-b", "other@far.test"), ("relay-b", "someone@far.test")], got
