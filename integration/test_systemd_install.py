"""The Debian package on a fresh Debian 12 under real systemd, installed as
docs/install.md says.

A Debian 12 container boots systemd as PID 1 (sdcontainer.py: runc, cgroupfs,
SYS_ADMIN so the unit's mount sandbox is really applied). The test:

1. plays an existing mail server: Postfix running with a site's own
   relay_domains and smtpd_milters entries, and a "remote MX" (an SMTP sink on
   127.0.0.5:2525 inside the container);
2. copies in the .deb that `make deb` built and runs every command of
   docs/install.md's "## Install" section, as written, in order (the one manual
   step, editing the config, is done by writing the test's config);
3. checks the result: owners and modes, the unit active with its socket in
   Postfix's group, the site's own Postfix entries kept, and `postfix-config
   --apply` run a second time changing nothing;
4. routes a message through Postfix and the daemon to the sink (SRS sender,
   DKIM signature) and finds its queue id in the daemon's journal lines;
5. breaks the config: `systemctl reload routemilter` fails, `journalctl -p err`
   carries the refusal, the daemon keeps running (same PID) and mail keeps
   flowing; a fixed config reloads;
6. reinstalls the package (an upgrade): the daemon is restarted, config and
   keys are kept, mail flows; the unit starts with its socket folder missing;
   after a reboot it is up before postfix@-.service starts;
7. runs the "## Remove, purge" commands and finds nothing of the package left,
   and Postfix without routemilter's entries but with the site's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import sdcontainer  # noqa: E402

pytestmark = pytest.mark.integration

INSTALL_DOC = REPO / "docs" / "install.md"
SINK = r'''
import os, socketserver, sys, json
OUT = "/var/tmp/sink"
os.makedirs(OUT, exist_ok=True)
class H(socketserver.StreamRequestHandler):
    def reply(self, text): self.wfile.write(text.encode() + b"\r\n")
    def handle(self):
        self.reply("220 sink.test ESMTP")
        sender, rcpts = None, []
        while True:
            line = self.rfile.readline()
            if not line: return
            cmd = line.decode("latin-1").strip()
            verb = cmd[:4].upper()
            if verb in ("EHLO", "HELO"): self.reply("250 sink.test")
            elif verb == "MAIL": sender, rcpts = cmd[10:].strip(), []; self.reply("250 2.1.0 Ok")
            elif verb == "RCPT": rcpts.append(cmd[8:].strip()); self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                self.reply("354 go ahead")
                data = []
                while True:
                    l = self.rfile.readline()
                    if not l or l == b".\r\n": break
                    data.append(l[1:] if l.startswith(b"..") else l)
                n = len(os.listdir(OUT))
                with open(f"{OUT}/{n:04d}.json", "w") as f:
                    f.write(json.dumps({"from": sender, "to": rcpts, "data": b"".join(data).decode("latin-1")}) + "\n")
                self.reply("250 2.0.0 Ok: stored")
            elif verb == "QUIT": self.reply("221 bye"); return
            else: self.reply("250 Ok")
class S(socketserver.ThreadingTCPServer): allow_reuse_address = True
S(("127.0.0.5", 2525), H).serve_forever()
'''

CONFIG = """# the test's config (the install doc's "edit the config" step)
server_name: mx.routemilter.test
milter:
  socket: unix:/var/spool/postfix/routemilter/routemilter.sock
  socket_mode: "0660"
  socket_group: postfix
srs:
  domain: fwd.family.example
  secrets_file: /etc/routemilter/srs-secrets
bounces:
  socket: unix:/var/spool/postfix/routemilter/bounce.sock
  reinject: 127.0.0.1:10026
dkim:
  domain: family.example
  keys:
    - selector: rm2026
      key: /etc/routemilter/keys/rm2026.private
routes:
  sink: ["[127.0.0.5]:2525"]
domains:
  family.example: {{}}
rules:
  - name: me
    addresses: [me@family.example]
    to:
      - address: me@gmail.example
        route: {route}
"""

SEND = r'''
import smtplib, sys
with smtplib.SMTP("127.0.0.1", 25, timeout=60) as s:
    code, text = s.ehlo("client.test")
    msg = ("From: alice@sender.example\r\nTo: me@family.example\r\nSubject: %s\r\n"
           "Message-ID: <%s@sender.example>\r\n\r\nhello\r\n") % (sys.argv[1], sys.argv[1])
    s.mail("alice@sender.example")
    code, text = s.rcpt("me@family.example")
    assert code == 250, (code, text)
    code, text = s.data(msg)
    print(code, text.decode())
'''


def doc_commands(section: str) -> list[list[str]]:
    """The ```sh blocks of one "## " section of docs/install.md, as lists of commands
    (comment-only lines dropped, trailing comments kept: sh ignores them)."""
    text = INSTALL_DOC.read_text()
    m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no '## {section}' section in {INSTALL_DOC}"
    blocks = re.findall(r"```sh\n(.*?)```", m.group(1), re.S)
    assert blocks, f"no ```sh block in '## {section}'"
    return [[line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
            for block in blocks]


def test_readme_install_block_is_the_documented_one():
    # The README's five lines are the same commands this test runs from
    # docs/install.md (plus the build and the editor step).
    text = (REPO / "README.md").read_text()
    block = re.search(r"^## Installing on a mail server\n(.*?)(?=^#)", text, re.M | re.S).group(1)
    lines = [line.strip() for line in block.splitlines() if line.startswith("    ")]
    documented = {c for commands in doc_commands("Install") for c in commands}
    assert lines
    for line in lines:
        for command in line.split(" && "):
            command = command.replace("./dist/", "./")
            assert command == "make deb" or command.startswith("$EDITOR ") or command in documented, command


@pytest.fixture(scope="module")
def deb():
    reason = sdcontainer.usable()
    if reason:
        pytest.skip(reason)
    for tool in ("dpkg-deb", "git", "/usr/bin/python3"):
        if not (os.path.exists(tool) or subprocess.run(["which", tool], capture_output=True).returncode == 0):
            pytest.skip(f"{tool} is needed to build the .deb")
    t0 = time.monotonic()
    r = subprocess.run(["make", "-s", "deb"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    path = REPO / r.stdout.strip().splitlines()[-1]
    print(f"\n.deb built in {time.monotonic() - t0:.1f}s: {path.name} ({path.stat().st_size // 1024} KiB)")
    return path


@pytest.fixture(scope="module")
def machine(deb):
    built = sdcontainer.ensure_image()
    if built:
        print(f"image {sdcontainer.IMAGE} built in {built:.0f}s")
    m = sdcontainer.Machine(f"rm-sd-{os.getpid()}")
    try:
        boot = m.boot()
        print(f"systemd booted in {boot:.1f}s")
        yield m
    finally:
        m.remove()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def put(m: sdcontainer.Machine, path: str, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write(text)
    try:
        m.copy_in(f.name, path)
    finally:
        os.unlink(f.name)


def sink_messages(m) -> list[dict]:
    import json

    r = m.sh("cat /var/tmp/sink/*.json 2>/dev/null", check=False)
    return [json.loads(x) for x in r.stdout.splitlines() if x.strip()]


def send(m, tag: str) -> str:
    """One message through Postfix's port 25; returns Postfix's queue id."""
    r = m.sh(f"python3 /root/send.py {tag}")
    queue_id = re.search(r"queued as (\w+)", r.stdout)
    assert queue_id, r.stdout
    return queue_id.group(1)


def delivered(m, tag: str) -> dict | None:
    return next((x for x in sink_messages(m) if f"Subject: {tag}" in x["data"]), None)


def test_install_route_reload_purge(deb, machine):
    m = machine
    t0 = time.monotonic()
    # 1. An existing mail server: its own relay domain and an existing milter entry
    #    (a stand-in for OpenDKIM, `default_action=accept` so it cannot block mail).
    m.sh("postconf -e 'relay_domains = site.example' "
         "'smtpd_milters = { inet:127.0.0.1:8891, default_action=accept }' "
         "'maximal_backoff_time = 10s' 'minimal_backoff_time = 5s' 'queue_run_delay = 5s'"
         " && systemctl restart postfix@-")
    put(m, "/root/sink.py", SINK)
    put(m, "/root/send.py", SEND)
    m.sh("systemd-run --unit fakemx python3 /root/sink.py")
    wait_for(lambda: m.sh("python3 -c \"import socket; socket.create_connection(('127.0.0.5', 2525), 2)\"",
                          check=False).returncode == 0, 30, "the sink on 127.0.0.5:2525")

    # 2. docs/install.md, "## Install", every command as written.
    blocks = doc_commands("Install")
    assert len(blocks) == 2, blocks
    (install_cmd,) = blocks[0]
    assert install_cmd == f"apt-get install ./{deb.name}", \
        f"docs/install.md installs {install_cmd!r}; make deb built {deb.name}"
    m.copy_in(str(deb), f"/root/{deb.name}")
    m.sh(f"cd /root && {install_cmd}", timeout=300)
    owner = m.sh("stat -c '%U:%G %a' /etc/routemilter /etc/routemilter/routemilter.yaml "
                 "/etc/routemilter/keys /etc/routemilter/srs-secrets").stdout.split("\n")
    assert owner[:4] == ["root:routemilter 750", "root:routemilter 640", "root:routemilter 750",
                         "root:routemilter 640"], owner
    assert "postfix" in m.sh("id -nG routemilter").stdout.split()
    assert m.sh("systemctl is-enabled routemilter", check=False).stdout.strip() == "disabled"
    m.sh("test -f /usr/share/man/man8/routemilter.8.gz && test -f /usr/share/man/man5/routemilter.yaml.5.gz")

    # The manual step: edit the config (keep the file's owner and mode: cat >).
    put(m, "/root/routemilter.yaml", CONFIG.format(route="sink"))
    m.sh("cat /root/routemilter.yaml > /etc/routemilter/routemilter.yaml")
    for command in blocks[1]:
        r = m.sh(f"cd /root && {command}", timeout=120)
        # No warning for the admin who follows the guide (a key owner warning was one).
        assert "warning" not in (r.stdout + r.stderr).lower(), (command, r.stdout, r.stderr)
    assert m.sh("systemctl is-active routemilter").stdout.strip() == "active"
    pid = m.sh("systemctl show -p MainPID --value routemilter").stdout.strip()
    sock = m.sh("stat -c '%G %a %F' /var/spool/postfix/routemilter/routemilter.sock").stdout.strip()
    assert sock == "postfix 660 socket", sock
    # The sandbox is really applied (SYS_ADMIN): / is read-only for the daemon.
    options = m.sh(f"findmnt --task {pid} -no OPTIONS /").stdout.split()
    assert options and options[-1].startswith("ro,"), options
    # The site's own entries stayed; a second --apply changes nothing.
    main = m.sh("postconf -h relay_domains smtpd_milters").stdout
    assert "site.example" in main and "inet:127.0.0.1:8891" in main and "family.example" in main, main
    before = m.sh("md5sum /etc/postfix/main.cf /etc/postfix/master.cf").stdout
    again = m.sh("routemilter postfix-config --apply").stdout
    assert "nothing changed" in again, again
    assert m.sh("md5sum /etc/postfix/main.cf /etc/postfix/master.cf").stdout == before
    assert m.sh("postconf -M | grep -c '^rm_sink '").stdout.strip() == "1"
    installed = time.monotonic()

    # 3. A message through Postfix and the daemon to the "remote MX".
    queue_id = send(m, "first")
    msg = wait_for(lambda: delivered(m, "first"), 60, "the first message at the sink")
    assert msg["to"] == ["<me@gmail.example>"], msg
    # The return address is in the SRS domain (a bounce token, as bounces: is set).
    assert re.match(r"<[^@]+=sender\.example=alice@fwd\.family\.example>", msg["from"]), msg
    assert "DKIM-Signature:" in msg["data"] and "s=rm2026" in msg["data"], msg["data"][:2000]
    # docs/install.md: one message's story by its queue id, Postfix's lines and ours.
    story = m.sh(f"journalctl -g {queue_id} --no-pager").stdout
    assert f"queue_id={queue_id}" in story and "routemilter[" in story and "postfix/cleanup[" in story, story
    # docs/operations.md: `routemilter trace` tells that story from the journal (both units)
    traced = json.loads(m.sh(f"routemilter trace {queue_id} --json").stdout)
    steps = {s["step"]: s for s in traced["steps"]}
    assert steps["routed"]["destinations"] == ["me@gmail.example"], traced
    assert steps["delivered"]["to"] == "me@gmail.example" and steps["delivered"]["time"], traced
    # An LMTP session on the bounce listener (aiosmtpd): none of its INFO chatter.
    lmtp = m.sh("python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); "
                "s.connect('/var/spool/postfix/routemilter/bounce.sock'); s.recv(512); "
                "s.sendall(b'LHLO client.test\\r\\n'); print(s.recv(512)); s.sendall(b'QUIT\\r\\n'); s.recv(512)\"")
    assert "250" in lmtp.stdout, lmtp.stdout
    time.sleep(1)
    journal = m.sh("journalctl -u routemilter -o cat --no-pager").stdout
    assert "Available AUTH mechanisms" not in journal and "Peer:" not in journal, journal[-3000:]
    assert "Traceback" not in journal, journal[-3000:]

    # 4. A broken config: reload fails, the refusal is at err, mail keeps flowing.
    put(m, "/root/broken.yaml", CONFIG.format(route="nowhere"))
    m.sh("cat /root/broken.yaml > /etc/routemilter/routemilter.yaml")
    reload = m.sh("systemctl reload routemilter", check=False)
    assert reload.returncode != 0, reload
    errors = m.sh("journalctl -u routemilter -p err -o cat --no-pager").stdout
    assert "config refused" in errors and "nowhere" in errors, errors
    assert m.sh("systemctl is-active routemilter").stdout.strip() == "active"
    assert m.sh("systemctl show -p MainPID --value routemilter").stdout.strip() == pid
    send(m, "second")
    wait_for(lambda: delivered(m, "second"), 60, "the second message (after the refused reload)")
    m.sh("cat /root/routemilter.yaml > /etc/routemilter/routemilter.yaml && systemctl reload routemilter")
    wait_for(lambda: "reloaded" in m.sh("journalctl -u routemilter -o cat --no-pager").stdout, 20,
             "the daemon's 'reloaded' line")

    # An upgrade (here: the same package again): postinst restarts the running daemon,
    # the admin's config, key and SRS secret stay.
    kept = m.sh("md5sum /etc/routemilter/routemilter.yaml /etc/routemilter/srs-secrets "
                "/etc/routemilter/keys/rm2026.private").stdout
    m.sh(f"cd /root && apt-get install --reinstall ./{deb.name}", timeout=300)
    assert m.sh("systemctl is-active routemilter").stdout.strip() == "active"
    assert m.sh("systemctl show -p MainPID --value routemilter").stdout.strip() != pid
    assert m.sh("md5sum /etc/routemilter/routemilter.yaml /etc/routemilter/srs-secrets "
                "/etc/routemilter/keys/rm2026.private").stdout == kept
    send(m, "third")
    wait_for(lambda: delivered(m, "third"), 60, "the third message (after the upgrade)")
    # A host where the socket folder is missing (tmpfiles not run, folder removed): the
    # unit creates it before any sandboxed command (once: 226/NAMESPACE, nothing ran).
    m.sh("systemctl stop routemilter && rm -rf /var/spool/postfix/routemilter && systemctl start routemilter")
    assert m.sh("stat -c '%U:%G %a' /var/spool/postfix/routemilter").stdout.strip() == "routemilter:postfix 2750"
    # A reboot: the enabled unit is up before Debian's real Postfix unit starts, and
    # the sink (a transient unit) is started again.
    print(f"reboot in {m.reboot():.1f}s")
    ready = int(m.sh("systemctl show -p ActiveEnterTimestampMonotonic --value routemilter").stdout)
    postfix = int(m.sh("systemctl show -p InactiveExitTimestampMonotonic --value postfix@-").stdout)
    assert 0 < ready <= postfix, (ready, postfix)
    m.sh("systemd-run --unit fakemx python3 /root/sink.py")
    send(m, "fourth")
    wait_for(lambda: delivered(m, "fourth"), 60, "the fourth message (after a reboot)")

    # 5. docs/install.md, "## Remove, purge".
    for block in doc_commands("Remove, purge"):
        for command in block:
            # The admin answers apt's "Do you want to continue? [Y/n]".
            r = m.sh(command, timeout=120, answer="y\n")
            assert "warning" not in (r.stdout + r.stderr).lower(), (command, r.stdout, r.stderr)
    left = m.sh("ls -d /etc/routemilter /opt/routemilter /usr/sbin/routemilter /var/lib/routemilter "
                "/var/spool/postfix/routemilter /lib/systemd/system/routemilter.service 2>&1", check=False)
    assert left.stdout.count("No such file") == 6, left.stdout
    status = m.sh("dpkg-query -W -f='${Status}' routemilter", check=False).stdout.strip()
    assert status in ("", "unknown ok not-installed")
    stray = m.sh("find / -xdev -name '*routemilter*' -not -path '/root/*' -not -path '/var/lib/dpkg/*'",
                 check=False).stdout.split()
    assert stray == [], stray
    # Postfix no longer names it (--remove), and mail for the site still flows.
    main = m.sh("postconf -n; postconf -M").stdout
    assert "routemilter" not in main and "rm_sink" not in main, main
    assert "inet:127.0.0.1:8891" in main and "site.example" in main, main
    print(f"install+configure {installed - t0:.1f}s, total {time.monotonic() - t0:.1f}s")
