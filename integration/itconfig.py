"""YAML pieces the integration tests and the demo share, so each file states only what differs.

stack.header_sections() writes server_name, milter, srs and dkim; these write the rest:
the bounces: block (where the LMTP listener is, where fallbacks are re-injected) and the
family.test rules with their fallback chains. They return plain YAML text, not templates.
"""

from __future__ import annotations

from fakemx import free_port


def bounces(workdir: str, reinject: str | None = None, deferral_listen: str | None = None) -> str:
    """The bounces: block: the LMTP socket in workdir; re-injection by default on a free
    loopback port (Postfix's reinject service there), or `reinject` as given."""
    text = f"bounces:\n  socket: unix:{workdir}/bounce.sock\n  reinject: {reinject or f'127.0.0.1:{free_port()}'}\n"
    return text + (f"  deferral_listen: {deferral_listen}\n" if deferral_listen else "")


def reinject_unix(workdir: str) -> str:
    """Re-injection through the unix socket Postfix serves in its public folder (the default layout)."""
    return f"unix:{workdir}/public/rm_reinject"


def family(*rules: str, domain: str = "family.test: {}") -> str:
    """domains: family.test (or `domain`, a YAML line) and the rules given."""
    return f"domains:\n  {domain}\nrules:\n" + "".join(rules)


def fallback_rule(name: str, address: str, primary: str, *backups: str) -> str:
    """A rule forwarding `address` to `primary`, then to each of `backups` in turn when it bounces."""
    return (f"  - name: {name}\n    addresses: [{address}]\n    to:\n      - address: {primary}\n"
            f"        fallback: [{', '.join(backups)}]\n")


def fanout_rule(name: str, address: str, *to: str) -> str:
    """A rule forwarding `address` to every one of `to`, without fallbacks."""
    return f"  - name: {name}\n    addresses: [{address}]\n    to: [{', '.join(to)}]\n"
