"""What the milter asks the MTA to send: no message bodies unless something reads them,
and never a signature over a body that was not sent (config reloaded mid-connection)."""

from __future__ import annotations

import Milter

from routemilter.config import loads
from routemilter.policy import Policy, PolicyHolder
from routemilter.session import Session
from routemilter.signing import generate_key

BASE = """
server_name: mx.family.test
srs:
  domain: fwd.family.test
  secrets: ["a-test-secret-of-enough-length"]
domains:
  family.test: {{}}
rules:
  - name: me
    addresses: [me@family.test]
    to: [me@gmail.test]
{dkim}"""


class Ctx:
    def __init__(self):
        self.priv = None
        self.replies = []

    def setpriv(self, priv):
        self.priv = priv

    def getpriv(self):
        return self.priv

    def getsymval(self, name):
        return "QNEG1" if name == "i" else None

    def setreply(self, *args):
        self.replies.append(args)


def policy(tmp_path, dkim: bool) -> Policy:
    section = ""
    if dkim:
        key = tmp_path / "rsa.key"
        if not key.exists():
            generate_key("rsa", str(key))
        section = f"dkim:\n  domain: family.test\n  keys:\n    - selector: s\n      key: {key}\n"
    return Policy.from_config(loads(BASE.format(dkim=section)))


def negotiate(holder: PolicyHolder) -> tuple[Session, list[int]]:
    session = Session(holder)
    session._setctx(Ctx())
    opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]  # the MTA offers every action and every protocol step
    assert session.negotiate(opts) == Milter.CONTINUE
    return session, opts


def test_no_body_requested_without_dkim(tmp_path):
    session, opts = negotiate(PolicyHolder(policy(tmp_path, dkim=False)))
    assert opts[1] & Milter.P_NOBODY
    assert not session.body_negotiated
    # Headers are still needed (loop detection), with no reply expected.
    assert not opts[1] & Milter.P_NOHDRS and opts[1] & Milter.P_NR_HDR


def test_body_requested_with_dkim(tmp_path):
    session, opts = negotiate(PolicyHolder(policy(tmp_path, dkim=True)))
    assert not opts[1] & Milter.P_NOBODY
    assert session.body_negotiated


def test_reload_turning_dkim_on_tempfails_on_a_connection_without_bodies(tmp_path):
    holder = PolicyHolder(policy(tmp_path, dkim=False))
    session, _ = negotiate(holder)
    holder.replace(policy(tmp_path, dkim=True))
    assert session.envfrom("<a@sender.test>") == Milter.TEMPFAIL
    assert session._ctx.replies and session._ctx.replies[0][0] == "451"
    # A new connection negotiates bodies again and is served.
    fresh, _ = negotiate(holder)
    assert fresh.envfrom("<a@sender.test>") == Milter.CONTINUE
