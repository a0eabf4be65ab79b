"""What systemd and a sysadmin see: sd_notify, dkim-keygen, check on keys, bad config at start."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

from mtaclient import REPO, stopped_cleanly
from testkit import ROUTE_ME

ROUTEMILTER = [sys.executable, "-m", "routemilter"]

CONFIG = """
milter:
  socket: unix:{dir}/rm.sock
dkim:
  domain: family.test
  keys:
    - selector: s1
      key: {dir}/s1.key
"""


def run(*args, **kw):
    return subprocess.run([*ROUTEMILTER, *args], capture_output=True, text=True, cwd=REPO, timeout=60, **kw)


def test_dkim_keygen_writes_0600_key_and_prints_record(tmp_path):
    key = tmp_path / "s1.key"
    result = run("dkim-keygen", "--selector", "s1", "--domain", "family.test", str(key))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert result.stdout.startswith("s1._domainkey.family.test.") and "v=DKIM1; k=rsa; p=" in result.stdout
    again = run("dkim-keygen", "--selector", "s1", "--domain", "family.test", str(key))
    assert again.returncode == 1 and "exist" in again.stderr  # never overwrites a key


def test_check_refuses_a_group_readable_key(tmp_path, write_config):
    key = tmp_path / "s1.key"
    assert run("dkim-keygen", "--selector", "s1", "--domain", "family.test", str(key)).returncode == 0
    cfg = write_config(CONFIG.format(dir=tmp_path) + ROUTE_ME, "rm.yaml")
    ok = run("-c", str(cfg), "check")
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr
    key.chmod(0o640)
    bad = run("-c", str(cfg), "check")
    assert bad.returncode == 1 and "s1" in bad.stderr and "group" in bad.stderr


def test_daemon_refuses_to_start_on_a_bad_config(tmp_path, write_config):
    cfg = write_config("domains:\n  family.test:\n    catch_all: {to: [x@family.test]}\n", "rm.yaml")
    result = run("-c", str(cfg), "run")
    assert result.returncode == 1
    assert f"{cfg}:3:" in result.stderr and "loop" in result.stderr
    assert not (tmp_path / "rm.sock").exists()


def test_sd_notify_ready_after_the_socket_is_open(tmp_path, write_config):
    key = tmp_path / "s1.key"
    assert run("dkim-keygen", "--selector", "s1", "--domain", "family.test", str(key)).returncode == 0
    cfg = write_config(CONFIG.format(dir=tmp_path) + ROUTE_ME, "rm.yaml")
    notify_path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(15)
    proc = subprocess.Popen([*ROUTEMILTER, "-c", str(cfg), "run"], cwd=REPO,
                            env=dict(os.environ, NOTIFY_SOCKET=notify_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = listener.recv(4096).decode()
        assert "READY=1" in ready
        assert (tmp_path / "rm.sock").exists()  # READY only once the MTA can connect
        proc.send_signal(signal.SIGUSR1)  # reload (systemctl reload): RELOADING then READY again
        assert "RELOADING=1" in listener.recv(4096).decode()
        assert "READY=1" in listener.recv(4096).decode()
        proc.terminate()
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert stopped_cleanly(proc.wait(15)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()


def test_libmilter_stopping_by_itself_is_a_failure_for_systemd_to_restart(tmp_path, write_config):
    """libmilter's own signal thread also waits for SIGHUP: when the kernel hands it the
    signal (rare for a signal sent to the process; certain for one sent to that thread),
    libmilter stops. That must not look like a clean stop (exit 0 is not restarted)."""
    key = tmp_path / "s1.key"
    assert run("dkim-keygen", "--selector", "s1", "--domain", "family.test", str(key)).returncode == 0
    cfg = write_config(CONFIG.format(dir=tmp_path) + ROUTE_ME, "rm.yaml")
    proc = subprocess.Popen([*ROUTEMILTER, "-c", str(cfg), "run"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "rm.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.1)
        time.sleep(0.5)  # libmilter's signal thread starts with its listener
        libc = ctypes.CDLL(None, use_errno=True)
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            if int(tid) != proc.pid:  # every other thread: Python's reload, or libmilter's stop
                libc.tgkill(proc.pid, int(tid), signal.SIGHUP)
        assert proc.wait(30) == 75  # EXIT_LIBMILTER_STOPPED: the unit restarts it
        assert "libmilter stopped by itself" in proc.stderr.read()
        assert not (tmp_path / "rm.sock").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_systemd_unit_is_valid_and_hardened(tmp_path):
    unit = (REPO / "systemd" / "routemilter.service").read_text()
    # verify needs the binaries to exist: point them at this machine's.
    local = unit.replace("/usr/sbin/routemilter", sys.executable)
    path = tmp_path / "routemilter.service"
    path.write_text(local)
    # verify also looks up the Documentation= man pages: the package's, from man/.
    for page in (REPO / "man").glob("*.[1-8]"):
        section = tmp_path / "man" / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section / page.name)
    verify = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, MANPATH=str(tmp_path / "man")))
    problems = [line for line in verify.stderr.splitlines() if "routemilter.service" in line]
    assert not problems, problems
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)],
                              capture_output=True, text=True, timeout=60)
    last = [line for line in security.stdout.splitlines() if "Overall exposure level" in line]
    assert last, security.stdout + security.stderr
    score = float(last[0].split(":")[1].split()[0])
    assert score <= 2.0, last[0]
    for option in ("Type=notify", "ExecReload=", "User=routemilter", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert option in unit
