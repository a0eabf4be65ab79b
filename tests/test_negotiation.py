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
    # MAIL FROM gets no reply (SMFIP_NR_MAIL): the refusal comes at RCPT, before any DATA.
    assert session.envfrom("<a@sender.test>") == Milter.NOREPLY
    assert session.envrcpt("<me@family.test>") == Milter.TEMPFAIL
    assert session._ctx.replies and session._ctx.replies[0][0] == "451"
    # A new connection negotiates bodies again and is served.
    fresh, _ = negotiate(holder)
    assert fresh.envfrom("<a@sender.test>") == Milter.NOREPLY
    assert fresh.envrcpt("<me@family.test>") == Milter.CONTINUE


def test_negotiated_bits(tmp_path):
    # Exactly what the MTA is asked to skip, computed by our negotiate() (not pymilter's,
    # which falls back to "send everything" on any error); P_SKIP: the milter understands
    # SMFIR_SKIP (pymilter's default when offered).
    _, opts = negotiate(PolicyHolder(policy(tmp_path, dkim=False)))
    skipped = (Milter.P_NOCONNECT | Milter.P_NOHELO | Milter.P_NODATA | Milter.P_NOUNKNOWN | Milter.P_NOEOH
               | Milter.P_NOBODY | Milter.P_NR_MAIL | Milter.P_NR_HDR | Milter.P_NR_BODY | Milter.P_SKIP)
    assert opts[1] == skipped, hex(opts[1] ^ skipped)
    _, opts = negotiate(PolicyHolder(policy(tmp_path, dkim=True)))
    assert opts[1] == skipped & ~Milter.P_NOBODY, hex(opts[1] ^ skipped)


def test_mail_from_failure_answered_at_rcpt(tmp_path, monkeypatch):
    holder = PolicyHolder(policy(tmp_path, dkim=False))
    session, _ = negotiate(holder)

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr("routemilter.session.Transaction", broken)
    assert session.envfrom("<a@sender.test>") == Milter.NOREPLY  # no reply to give: remembered
    assert session.envrcpt("<me@family.test>") == Milter.TEMPFAIL
    assert session._ctx.replies[-1][0] == "451"
