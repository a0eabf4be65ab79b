"""Dovecot's auth service for SASL tests: the real thing Postfix's submission
service asks on Debian (`smtpd_sasl_type = dovecot`), with a passwd-file.

Container mode runs `dovecot -F` in its own container from the Postfix test image
(it has dovecot-core, see pfcontainer.py) with --network=host and the workdir
bind-mounted at the same path, so the auth socket in the workdir is the one the
Postfix container connects to. Host mode runs the host's `dovecot` (Debian
package dovecot-core), if installed.
"""
import os
import shutil
import subprocess
import time
import uuid

import pfcontainer

CONF = """\
# Auth only: no IMAP/POP3; Postfix asks this service over {auth}.
base_dir = {dir}/run
state_dir = {dir}/state
log_path = /dev/stderr
protocols = none
listen = 127.0.0.1
ssl = no
# Postfix's submission service only offers AUTH after STARTTLS (smtpd_tls_auth_only).
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%u {dir}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener {auth} {{
    mode = 0666
  }}
}}
"""


def sha512_crypt(password: str) -> str:
    """What `doveadm pw -s SHA512-CRYPT` writes, made by OpenSSL on the host."""
    out = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password, capture_output=True,
                         text=True, check=True, timeout=30).stdout.strip()
    return "{SHA512-CRYPT}" + out


class Dovecot:
    def __init__(self, workdir: str, users: dict[str, str], mode: str = "container"):
        self.dir = os.path.join(os.path.abspath(workdir), "dovecot")
        self.auth_socket = os.path.join(self.dir, "auth")
        self.users = users
        self.mode = mode
        self.proc = None
        self.name = None
        self.log_path = os.path.join(self.dir, "log")

    def start(self, timeout: float = 60.0) -> "Dovecot":
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        with open(os.path.join(self.dir, "users"), "w") as f:
            for login, password in self.users.items():
                f.write(f"{login}:{sha512_crypt(password)}\n")
        conf = os.path.join(self.dir, "dovecot.conf")
        with open(conf, "w") as f:
            f.write(CONF.format(dir=self.dir, auth=self.auth_socket))
        if self.mode == "container":
            self.name = f"routemilter-it-dovecot-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            args = pfcontainer.cmd("run", "--rm", "--name", self.name, "--network=host",
                                   "--label", f"routemilter-it.pid={os.getpid()}",
                                   "-v", f"{self.dir}:{self.dir}", pfcontainer.IMAGE,
                                   "dovecot", "-F", "-c", conf)
        else:
            binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
            if not os.path.exists(binary):
                raise RuntimeError("dovecot is not installed (Debian package dovecot-core)")
            args = [binary, "-F", "-c", conf]
        with open(self.log_path, "ab") as log:  # dovecot keeps its own copy of the descriptor
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.auth_socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot did not open {self.auth_socket}:\n{self.log()}")
            time.sleep(0.1)
        return self

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.name:
            pfcontainer.run("rm", "-f", "--ignore", self.name, check=False, timeout=60)
            self.name = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.proc = None
