"""Fixtures for tests that run a real Postfix against fake remote MX hosts."""
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fakemx import FakeMX, free_port
from postfix import Postfix


def pytest_report_header(config):
    """Say up front which Postfix the integration tests run against."""
    from postfix import default_mode
    try:
        mode = default_mode()
    except ValueError as exc:
        mode = f"invalid ({exc})"
    return f"routemilter integration: Postfix mode={mode} (ROUTEMILTER_IT_MODE=container|host)"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Repeat the mode at the end, where `pytest -q` (make test) shows it too."""
    ran = [r for key in ("passed", "failed", "error")
           for r in terminalreporter.stats.get(key, [])
           if "integration" in getattr(r, "keywords", {})]
    sendmail_ran = [r for r in ran if "test_sendmail.py" in r.nodeid]
    ran = [r for r in ran if r not in sendmail_ran]
    if ran:
        from postfix import default_mode
        terminalreporter.write_line(
            f"routemilter integration: {len(ran)} result(s) against Postfix mode={default_mode()}")
    if sendmail_ran:
        from sendmail import default_mode as sendmail_mode
        terminalreporter.write_line(
            f"routemilter integration: {len(sendmail_ran)} result(s) against Sendmail 8.17 "
            f"mode={sendmail_mode()} (ROUTEMILTER_IT_SENDMAIL_MODE=container|chroot)")


@pytest.fixture
def it_workdir():
    """A short, world-searchable folder (Postfix runs as `postfix`; unix socket
    paths must stay under 108 bytes), removed afterwards."""
    d = tempfile.mkdtemp(prefix="rmit-", dir="/var/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_mx():
    """make_mx(name) -> started FakeMX on the next loopback address (127.0.0.2, .3, ...)."""
    started = []

    def make(name, host=None, **kw):
        host = host or f"127.0.0.{len(started) + 2}"
        mx = FakeMX(host, free_port(host), name, **kw).start()
        started.append(mx)
        return mx

    yield make
    for mx in started:
        mx.stop()


@pytest.fixture
def make_postfix(it_workdir):
    """make_postfix(**Postfix kwargs) -> started Postfix on a free port; stopped after."""
    if not shutil.which("postfix"):
        pytest.skip("postfix is not installed")
    started = []

    def make(subdir="pf", **kw):
        pf = Postfix(os.path.join(it_workdir, subdir), free_port(), **kw)
        started.append(pf)
        pf.start()
        print(f"\nPostfix mode={pf.mode} start={pf.start_seconds:.2f}s "
              f"image_build={pf.image_build_seconds:.1f}s")
        return pf

    yield make
    for pf in started:
        pf.stop()
