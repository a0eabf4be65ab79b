"""`postfix-config --apply/--commands/--remove` against the real postconf(1) on a
scratch config directory: the site's own list entries stay, ours are added once,
a second run changes nothing, and --remove takes ours out again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from routemilter.postconf import entry_key, merge_list, split_list

pytestmark = pytest.mark.skipif(not shutil.which("postconf"), reason="needs Postfix's postconf")

CONFIG = """
server_name: mx.family.test
milter:
  socket: unix:/var/spool/postfix/routemilter/routemilter.sock
srs:
  domain: fwd.family.test
  secrets: ["0123456789abcdef0123"]
bounces:
  socket: unix:/var/spool/postfix/routemilter/bounce.sock
  reinject: 127.0.0.1:10026
routes:
  backup: [mx, "[127.0.0.9]:2525"]
domains:
  family.test: {}
rules:
  - name: me
    addresses: [me@family.test]
    to:
      - address: me@gmail.test
        route: backup
"""
SITE_MAIN = """compatibility_level = 3.6
smtpd_milters = inet:localhost:8891, { unix:/run/other.sock, default_action=accept }
relay_domains = other.example $mydestination
transport_maps = hash:/etc/postfix/transport
"""


def test_split_list_keeps_groups_and_expressions():
    assert split_list("a, b  c,{ unix:x, default_action=tempfail },${{$x} <level {2} {y} {}}") == [
        "a", "b", "c", "{ unix:x, default_action=tempfail }", "${{$x} <level {2} {y} {}}"]
    assert entry_key("{ unix:X.sock, default_action=accept }") == "unix:x.sock"
    # Same socket with other options: replaced in place, never listed twice.
    assert merge_list(["a", "{ unix:s, default_action=accept }"], ["{ unix:s, default_action=tempfail }", "b"]) == [
        "a", "{ unix:s, default_action=tempfail }", "b"]


@pytest.fixture
def site(tmp_path):
    (tmp_path / "main.cf").write_text(SITE_MAIN)
    dist = Path("/usr/share/postfix/master.cf.dist")  # Debian's stock master.cf
    (tmp_path / "master.cf").write_text(dist.read_text() if dist.exists() else "smtp inet n - y - - smtpd\n")
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(CONFIG)
    return tmp_path, cfg


def cli(cfg, directory, *args):
    r = subprocess.run([sys.executable, "-m", "routemilter", "-c", str(cfg), "postfix-config",
                        "--config-directory", str(directory), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def postconf(directory, *args):
    return subprocess.run(["postconf", "-c", str(directory), *args], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def test_apply_merges_is_idempotent_and_remove_undoes(site):
    d, cfg = site
    master_before = (d / "master.cf").read_text()
    cli(cfg, d, "--apply")
    got = {line.split(" = ")[0]: line.split(" = ", 1)[1] for line in postconf(d, "-n").splitlines()}
    assert got["smtpd_milters"] == ("inet:localhost:8891, { unix:/run/other.sock, default_action=accept }, "
                                    "{ unix:routemilter/routemilter.sock, default_action=tempfail }")
    assert got["relay_domains"] == "other.example, $mydestination, family.test, fwd.family.test"
    assert got["transport_maps"] == f"hash:/etc/postfix/transport, hash:{d}/routemilter_transport"
    assert "relay_domains" not in got["parent_domain_matches_subdomains"]
    assert (d / "routemilter_transport.db").exists()
    services = postconf(d, "-M")
    assert [x.split()[0] for x in services.splitlines()].count("rm_backup") == 1
    assert "rm_backup/unix/smtp_fallback_relay = [127.0.0.9]:2525" in postconf(d, "-P")

    files = {name: (d / name).read_bytes() for name in ("main.cf", "master.cf", "routemilter_transport")}
    assert "nothing changed" in cli(cfg, d, "--apply")
    assert {name: (d / name).read_bytes() for name in files} == files
    # --commands against an applied config: no main.cf change left to make.
    assert " -e " not in cli(cfg, d, "--commands")
    # The same commands on a fresh copy of the site reach the same files.
    fresh = d / "fresh"
    fresh.mkdir()
    (fresh / "main.cf").write_text(SITE_MAIN)
    (fresh / "master.cf").write_text(master_before)
    subprocess.run(["sh", "-c", cli(cfg, fresh, "--commands")], check=True, capture_output=True, timeout=120)
    assert (fresh / "master.cf").read_bytes() == files["master.cf"]
    assert postconf(fresh, "-n").replace(str(fresh), "D") == postconf(d, "-n").replace(str(d), "D")

    cli(cfg, d, "--remove")
    after = postconf(d, "-n")
    assert "smtpd_milters = inet:localhost:8891, { unix:/run/other.sock, default_action=accept }" in after
    assert "relay_domains = other.example, $mydestination" in after
    assert "transport_maps = hash:/etc/postfix/transport" in after
    assert "routemilter" not in after and "rm_" not in postconf(d, "-M")
    assert (d / "master.cf").read_text() == master_before
    assert not (d / "routemilter_transport").exists()


def test_apply_keeps_the_sites_own_sender_login_maps(site):
    """With `submission:`, our socketmap is added to smtpd_sender_login_maps after the
    site's own tables, which keep answering for their logins."""
    d, cfg = site
    (d / "main.cf").write_text(SITE_MAIN + "smtpd_sender_login_maps = hash:/etc/postfix/sender_login\n")
    cfg.write_text(CONFIG + "submission: {}\n")
    cli(cfg, d, "--apply")
    got = postconf(d, "-h", "smtpd_sender_login_maps").strip()
    assert got.startswith("hash:/etc/postfix/sender_login, socketmap:"), got
    assert "nothing changed" in cli(cfg, d, "--apply")
