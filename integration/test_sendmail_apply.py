"""`routemilter sendmail-config --apply` on Debian's own /etc/mail/sendmail.mc,
checked by the real Sendmail tools: run twice it changes nothing the second
time, m4 builds a sendmail.cf that defines the routemilter filter exactly once
(pasting the printed snippet twice defined it twice), and Sendmail accepts the
.cf (`sendmail -bt`). The site's own relay-domains and mailertable lines stay.

Runs in the Sendmail image of integration/sendmail.py (podman) when it exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import pfcontainer  # noqa: E402
import sendmail as sm  # noqa: E402

pytestmark = pytest.mark.integration

CLI = str(REPO / ".venv" / "bin" / "routemilter")
CONFIG = """
server_name: mx.family.test
milter:
  socket: unix:/var/run/routemilter/routemilter.sock
srs:
  domain: fwd.family.test
  secrets: ["0123456789abcdef0123"]
bounces:
  socket: unix:/var/run/routemilter/bounce.sock
  reinject: 127.0.0.1:10026
routes:
  backup: [mx, "[relay.example]"]
default_route: backup
domains:
  family.test: {}
rules:
  - name: me
    addresses: [me@family.test]
    to: [me@gmail.test]
"""


@pytest.fixture(scope="module")
def image():
    if sm.default_mode() != "container":
        pytest.skip("needs podman for the Sendmail image")
    sm.ensure_image()
    return sm.IMAGE


def in_image(image, mail_dir, script):
    return subprocess.run(pfcontainer.cmd("run", "--rm", "--hostname", "mx.family.test", "-v",
                                          f"{mail_dir}:{mail_dir}", image, "sh", "-c", script),
                          capture_output=True, text=True, timeout=180)


def test_apply_twice_one_filter_and_sendmail_accepts_it(image):
    work = Path(tempfile.mkdtemp(prefix="rmsm-", dir="/var/tmp"))
    try:
        stock = in_image(image, str(work), f"cp /etc/mail/sendmail.mc {work}/sendmail.mc")
        assert stock.returncode == 0, stock.stderr
        (work / "relay-domains").write_text("site.test\n")
        (work / "mailertable").write_text("other.test esmtp:[127.0.0.9]\n")
        cfg = work / "rm.yaml"
        cfg.write_text(CONFIG)
        run = [CLI, "-c", str(cfg), "sendmail-config", "--apply", "--mail-dir", str(work)]
        first = subprocess.run(run, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        files = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
        second = subprocess.run(run, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0 and "nothing changed" in second.stdout, (second.stdout, second.stderr)
        assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == files
        assert (work / "relay-domains").read_text() == "site.test\nfamily.test\nfwd.family.test\n"
        assert (work / "mailertable").read_text() == ("other.test esmtp:[127.0.0.9]\n"
                                                     "fwd.family.test rmbounce:localhost\n")

        built = in_image(image, str(work), f"cd {work} && m4 sendmail.mc > sendmail.cf && "
                                           f"sendmail -C {work}/sendmail.cf -bt </dev/null >bt.out 2>&1; "
                                           f"echo rc=$?; cat bt.out")
        assert built.returncode == 0 and "rc=0" in built.stdout, built.stdout + built.stderr
        cf = (work / "sendmail.cf").read_text()
        assert [line for line in cf.splitlines() if line.startswith("Xroutemilter")] == [
            "Xroutemilter, S=unix:/var/run/routemilter/routemilter.sock, F=T, T=C:30s;S:1m;R:1m;E:5m"]
        assert "O InputMailFilters=routemilter" in cf
        assert "Mrmbounce," in cf  # the mailer of the block after the MAILER lines
        assert "warning" not in built.stdout.lower(), built.stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_hand_pasted_filter_is_refused(tmp_path):
    mc = tmp_path / "sendmail.mc"
    mc.write_text("include(`cf.m4')dnl\nINPUT_MAIL_FILTER(`routemilter', `S=unix:/x')dnl\nMAILER(`smtp')dnl\n")
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(CONFIG)
    r = subprocess.run([CLI, "-c", str(cfg), "sendmail-config", "--apply", "--mail-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "pasted by hand" in r.stderr, r.stderr
    assert "routemilter (begin)" not in mc.read_text()
