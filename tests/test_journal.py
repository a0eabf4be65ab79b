"""Priorities reach journald: lines on a stderr that is the journal stream carry
sd-daemon "<N>" prefixes (errors <3>), anything else sees plain lines; aiosmtpd's
INFO chatter is silenced."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from routemilter import daemon


def run_check(tmp_path, as_journal: bool):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("domains:\n  family.test: {}\nrules:\n  - name: x\n    addresses: [x@family.test]\n"
                   "    to: [{address: y@gmail.test, route: nowhere}]\n")
    err = tmp_path / "stderr"
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    with open(err, "w") as f:
        if as_journal:
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        r = subprocess.run([sys.executable, "-m", "routemilter", "-c", str(cfg), "check"], stderr=f,
                           stdout=subprocess.DEVNULL, env=env, timeout=60)
    assert r.returncode == 1
    return err.read_text().splitlines()


def test_check_errors_at_err_only_when_stderr_is_the_journal(tmp_path):
    journal = run_check(tmp_path, True)
    assert journal and all(line.startswith("<3>") for line in journal), journal
    assert any("nowhere" in line for line in journal)
    plain = run_check(tmp_path, False)
    assert [f"<3>{line}" for line in plain] == journal


def test_daemon_logging_priorities_and_no_aiosmtpd_chatter(tmp_path, monkeypatch):
    out = tmp_path / "stderr"
    with open(out, "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        monkeypatch.setattr(sys, "stderr", f)
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        try:
            daemon.setup_logging("INFO")
            logging.getLogger("routemilter").error("reload refused: x\nsecond line")
            logging.getLogger("routemilter").warning("careful")
            logging.getLogger("routemilter.mail").info("queue_id=ABC action=route")
            logging.getLogger("mail.log").info("Available AUTH mechanisms: LOGIN PLAIN")
            logging.getLogger("mail.log").warning("a real aiosmtpd problem")
        finally:
            root.handlers[:], _ = saved
            root.setLevel(saved[1])
            for name in ("mail.log", "mail.debug"):
                logging.getLogger(name).setLevel(logging.NOTSET)
    lines = out.read_text().splitlines()
    assert lines == ["<3>ERROR routemilter: reload refused: x", "<3>second line",
                     "<4>WARNING routemilter: careful", "<6>INFO routemilter.mail: queue_id=ABC action=route",
                     "<4>WARNING mail.log: a real aiosmtpd problem"], lines
