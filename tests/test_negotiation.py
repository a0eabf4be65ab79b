"""What the milter asks the MTA to send: no message bodies unless something reads them,
and never a signature over a body that was not sent (config reloaded mid-connection)."""

from __future__ import annotations

import Milter

from routemilter.config import loads
from routemilter.policy import Policy, PolicyHolder
from routemilter.session import Session
from testkit import ROUTE_ME, SRS_SECTION, DkimKeys, FakeCtx

BASE = "server_name: mx.family.test\n" + SRS_SECTION + ROUTE_ME


def policy(dkim_keys: DkimKeys, dkim: bool) -> Policy:
    section = dkim_keys.section(rsa="s") if dkim else ""
    return Policy.from_config(loads(BASE + section))


def negotiate(holder: PolicyHolder) -> tuple[Session, list[int]]:
    session = Session(holder)
    session._setctx(FakeCtx("QNEG1"))
    opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]  # the MTA offers every action and every protocol step
    assert session.negotiate(opts) == Milter.CONTINUE
    return session, opts


def test_no_body_requested_without_dkim(dkim_keys):
    session, opts = negotiate(PolicyHolder(policy(dkim_keys, dkim=False)))
    assert opts[1] & Milter.P_NOBODY
    assert not session.body_negotiated
    # Headers are still needed (loop detection), with no reply expected.
    assert not opts[1] & Milter.P_NOHDRS and opts[1] & Milter.P_NR_HDR


def test_body_requested_with_dkim(dkim_keys):
    session, opts = negotiate(PolicyHolder(policy(dkim_keys, dkim=True)))
    assert not opts[1] & Milter.P_NOBODY
    assert session.body_negotiated


def test_reload_turning_dkim_on_tempfails_on_a_connection_without_bodies(dkim_keys):
    holder = PolicyHolder(policy(dkim_keys, dkim=False))
    session, _ = negotiate(holder)
    holder.replace(policy(dkim_keys, dkim=True))
    # MAIL FROM gets no reply (SMFIP_NR_MAIL): the refusal comes at RCPT, before any DATA.
    assert session.envfrom("<a@sender.test>") == Milter.NOREPLY
    assert session.envrcpt("<me@family.test>") == Milter.TEMPFAIL
    assert session._ctx.replies and session._ctx.replies[0][0] == "451"
    # A new connection negotiates bodies again and is served.
    fresh, _ = negotiate(holder)
    assert fresh.envfrom("<a@sender.test>") == Milter.NOREPLY
    assert fresh.envrcpt("<me@family.test>") == Milter.CONTINUE


def test_negotiated_bits(dkim_keys):
    # Exactly what the MTA is asked to skip, computed by our negotiate() (not pymilter's,
    # which falls back to "send everything" on any error); P_SKIP: the milter understands
    # SMFIR_SKIP (pymilter's default when offered).
    _, opts = negotiate(PolicyHolder(policy(dkim_keys, dkim=False)))
    skipped = (Milter.P_NOCONNECT | Milter.P_NOHELO | Milter.P_NODATA | Milter.P_NOUNKNOWN | Milter.P_NOEOH
               | Milter.P_NOBODY | Milter.P_NR_MAIL | Milter.P_NR_HDR | Milter.P_NR_BODY | Milter.P_SKIP)
    assert opts[1] == skipped, hex(opts[1] ^ skipped)
    _, opts = negotiate(PolicyHolder(policy(dkim_keys, dkim=True)))
    assert opts[1] == skipped & ~Milter.P_NOBODY, hex(opts[1] ^ skipped)


def test_mail_from_failure_answered_at_rcpt(dkim_keys, monkeypatch):
    holder = PolicyHolder(policy(dkim_keys, dkim=False))
    session, _ = negotiate(holder)

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr("routemilter.session.Transaction", broken)
    assert session.envfrom("<a@sender.test>") == Milter.NOREPLY  # no reply to give: remembered
    assert session.envrcpt("<me@family.test>") == Milter.TEMPFAIL
    assert session._ctx.replies[-1][0] == "451"
