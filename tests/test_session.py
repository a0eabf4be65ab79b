"""Session and Transaction in-process: the never-lose-mail paths.

A fake libmilter context records what the session asks of the MTA, so faults
can be injected into the policy without a daemon.
"""

from __future__ import annotations

import logging

import Milter
import pytest

from routemilter.config import loads
from routemilter.policy import Policy, PolicyHolder
from routemilter.session import Session
from routemilter.signing import SigningError
from routemilter.transaction import Transaction
from testkit import ROUTE_ME, SRS_SECTION, FakeCtx

CONFIG = "server_name: mx.family.test\n" + SRS_SECTION + ROUTE_ME


def make_session(policy=None):
    policy = policy or Policy.from_config(loads(CONFIG))
    session = Session(PolicyHolder(policy))
    ctx = FakeCtx()
    session._setctx(ctx)
    session._actions = Milter.CURR_ACTS
    return session, ctx


def feed(session, sender="<alice@sender.test>", rcpts=("<me@family.test>",)):
    assert session.envfrom(sender) == Milter.CONTINUE
    results = [session.envrcpt(r) for r in rcpts]
    session.header("From", b"alice@sender.test")
    session.header("Subject", b"hi")
    session.body(b"hello\r\n")
    return results, session.eom()


def test_normal_message_is_routed():
    session, ctx = make_session()
    results, eom = feed(session)
    assert results == [Milter.CONTINUE] and eom == Milter.CONTINUE
    assert ("delrcpt", "<me@family.test>") in ctx.calls and ("addrcpt", "<me@gmail.test>") in ctx.calls
    assert any(c[0] == "chgfrom" and c[1].startswith("<SRS0=") for c in ctx.calls)


def test_exception_at_rcpt_tempfails_with_queue_id_logged(caplog):
    session, ctx = make_session()

    def broken(address):
        raise RuntimeError("injected fault")

    session.holder.current.router.decide = broken  # an instance attribute shadows the method
    session.envfrom("<alice@sender.test>")
    with caplog.at_level(logging.ERROR, logger="routemilter.mail"):
        assert session.envrcpt("<me@family.test>") == Milter.TEMPFAIL
    assert ("setreply", "451", "4.3.0", ("routemilter: temporary internal error, please try again later",)) in ctx.calls
    assert "queue_id=QFAKE1" in caplog.text and "injected fault" in caplog.text
    # The rest of the transaction is tempfailed too: nothing is changed at EOM.
    assert session.eom() == Milter.TEMPFAIL
    assert not [c for c in ctx.calls if c[0] in ("addrcpt", "delrcpt", "chgfrom")]


def test_exception_in_noreply_header_tempfails_at_eom(monkeypatch):
    session, ctx = make_session()
    session.envfrom("<alice@sender.test>")
    session.envrcpt("<me@family.test>")

    def broken(name, value):
        raise ValueError("injected header fault")

    monkeypatch.setattr(session.tx, "add_header", broken)
    # The MTA does not wait for a header reply: the callback must say CONTINUE.
    assert session.header("Subject", b"x") in (Milter.CONTINUE, Milter.NOREPLY)
    assert session.eom() == Milter.TEMPFAIL
    assert not [c for c in ctx.calls if c[0] in ("addrcpt", "delrcpt")]


def test_exception_while_applying_plan_tempfails(monkeypatch):
    session, _ctx = make_session()

    def broken(self, rcpt, params=None):
        raise OSError("MTA went away")

    monkeypatch.setattr(Session, "addrcpt", broken)
    _, eom = feed(session)
    assert eom == Milter.TEMPFAIL


def test_signing_error_forwards_unsigned_rather_than_dropping():
    policy = Policy.from_config(loads(CONFIG))

    class FailingSigner:  # Signer's interface: the whole message to sign(), as without dkimpy's streaming hook
        streams = False

        def sign(self, message, body=None, domain=None):
            raise SigningError("no From header")

    policy = Policy(policy.config, policy.router, policy.srs, FailingSigner())
    session, ctx = make_session(policy)
    _, eom = feed(session)
    assert eom == Milter.CONTINUE
    assert ("addrcpt", "<me@gmail.test>") in ctx.calls
    assert not [c for c in ctx.calls if c[0] == "addheader" and c[1] == "DKIM-Signature"]


def test_unrewritable_sender_keeps_original_sender():
    policy = Policy.from_config(loads(CONFIG))
    tx = Transaction(policy, '<"odd local"@sender.test>')
    assert tx.add_recipient("<me@family.test>") is None
    plan = tx.plan()
    assert plan.new_sender is None and plan.add == ["me@gmail.test"]
    assert any(note.startswith("srs=skipped") for note in plan.notes)


@pytest.mark.parametrize("count,expect_loop", [(19, False), (20, True)])
def test_hop_limit(count, expect_loop):
    policy = Policy.from_config(loads(CONFIG))
    tx = Transaction(policy, "<alice@sender.test>")
    tx.add_recipient("<me@family.test>")
    for i in range(count):
        tx.add_header("X-Routemilter", f"other{i}.example; rules=x".encode())
    plan = tx.plan()
    assert (plan.reply is not None and plan.reply.code == 554) == expect_loop


def test_foreign_recipients_only_changes_nothing():
    policy = Policy.from_config(loads(CONFIG))
    tx = Transaction(policy, "<alice@sender.test>")
    tx.add_recipient("<bob@elsewhere.test>")
    for _i in range(30):  # even many trace headers: not ours to judge
        tx.add_header("X-Routemilter", b"mx.family.test; rules=me")
    plan = tx.plan()
    assert (plan.reply, plan.add, plan.delete, plan.new_sender, plan.headers) == (None, [], [], None, [])


def test_each_recipient_is_parsed_once(monkeypatch):
    """The Transaction parses RCPT TO once and hands the parsed address to the router."""
    import routemilter.addresses as addresses
    import routemilter.rules as rules

    calls = []
    real = addresses.parse

    def counting(raw):
        calls.append(raw)
        return real(raw)

    monkeypatch.setattr(addresses, "parse", counting)
    monkeypatch.setattr(rules, "parse", counting)
    tx = Transaction(Policy.from_config(loads(CONFIG)), "<alice@sender.test>")
    assert tx.add_recipient("<Me@Family.test>") is None
    assert tx.recipients[0].decision.address == "me@family.test"
    assert calls == ["<Me@Family.test>"]
    assert tx.add_recipient("<nobody@family.test>") is not None  # refused by the rules, still one parse
    assert calls == ["<Me@Family.test>", "<nobody@family.test>"]


def test_transaction_does_not_import_pymilter():
    """transaction.py is the pure half: routing is tested and benchmarked without libmilter."""
    import subprocess
    import sys

    code = "import sys, routemilter.transaction; print(sorted(m for m in sys.modules if m.lower() == 'milter'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
