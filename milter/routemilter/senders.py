"""Our own users' outgoing mail: who may send as which address, and what gets signed.

One policy for both directions: an address is owned by the logins listed in
`senders:` of the rule that *receives* its mail (the router's own decision:
exact address, plus-address, subdomain address, pattern, catch-all), so
`alice+shop@family.example` is Alice's to send from exactly when its mail
reaches Alice.

* `Senders.may_send(login, address)` answers `explain --sender` and the
  From: header check at end of message.
* `SocketmapServer` serves the same answer to Postfix as the
  `smtpd_sender_login_maps` table (socketmap protocol: netstring requests
  `NAME KEY`, replies `OK owner,owner` or `NOTFOUND `), so
  `reject_sender_login_mismatch` refuses a login that does not own the
  MAIL FROM address with 553 5.7.1. A socketmap rather than a generated table:
  a hash table cannot express patterns, subdomain addressing or catch-alls the
  way the router matches them, and the daemon's answer follows a reload at once.
* `outbound_domain()` decides whether a message from a login or a trusted
  network is signed for its From: domain (session.py applies it).
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import socket
import socketserver
import threading
from dataclasses import dataclass
from email.utils import getaddresses
from typing import TYPE_CHECKING, cast

from . import sockets
from .addresses import AddressError, parse
from .config import Config, Reply, SubmissionSettings, managed_domain
from .rules import Router

if TYPE_CHECKING:
    from .policy import PolicyHolder  # policy.py imports this module

log = logging.getLogger("routemilter.senders")
MAX_REQUEST = 2048  # a map name and one address: Postfix never sends more
IDLE_TIMEOUT = 600  # seconds an idle Postfix connection is kept


@dataclass(frozen=True, slots=True)
class Ownership:
    address: str
    owners: tuple[str, ...]  # the logins that may send as it; () if none
    reason: str  # which rule decided, and why


class Senders:
    """Immutable, built once per config (part of the Policy)."""

    def __init__(self, config: Config, router: Router):
        self.config = config
        self.router = router
        self.networks = config.submission.trusted_networks if config.submission else ()

    def owners(self, address: str) -> Ownership:
        decision = self.router.decide(address)
        if decision.rule is None:
            # not managed, no rule and no catch-all, or malformed: nobody here owns it
            return Ownership(decision.address, (), decision.reason)
        rule = decision.rule
        who = ", ".join(rule.senders) if rule.senders else "no senders"
        return Ownership(decision.address, rule.senders, f"{decision.reason}; the rule lists {who}")

    def may_send(self, login: str, address: str) -> tuple[bool, str]:
        """Whether `login` may use `address` (MAIL FROM or From:), and a sentence saying why."""
        ownership = self.owners(address)
        allowed = login.lower() in (owner.lower() for owner in ownership.owners)
        verb = "may" if allowed else "may not"
        return allowed, f"{login} {verb} send as {ownership.address}: {ownership.reason}"

    def trusted(self, ip: str | None) -> bool:
        """Whether the client address is in submission.trusted_networks."""
        if not ip or not self.networks:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.networks)


# ------------------------------------------------- outbound signing decision


NOT_YOURS = "From: address rejected: not owned by user"


def from_address(values: list[str]) -> str | None:
    """The one address of the message's From: header field(s), or None when there
    is not exactly one (RFC 5322 allows a list; DKIM signs for one author)."""
    pairs = getaddresses(values)
    addresses = [address for _, address in pairs if address]
    if len(values) != 1 or len(addresses) != 1:
        return None
    return addresses[0]


def outbound_domain(senders: Senders, config: Config, login: str | None,
                    from_values: list[str]) -> tuple[str | None, Reply | None, str]:
    """For mail of a login (or a trusted network when `login` is None): the managed
    domain to sign for (d=), a refusal, and a note for the log line.

    Signed only when the From: address is in a managed domain, and, for a login,
    owned by that login: a login may not put another person's address into From:
    (Postfix checked only the envelope sender) and have us sign it.
    """
    address = from_address(from_values)
    if address is None:
        return None, None, "outbound=unsigned:no-single-from"
    try:
        parsed = parse(address)
    except AddressError:
        return None, None, "outbound=unsigned:bad-from"
    domain = managed_domain(config.domains, parsed.domain)
    if domain is None:
        return None, None, "outbound=unsigned:from-not-managed"
    if login is not None:
        allowed, _ = senders.may_send(login, str(parsed))
        if not allowed:
            text = f"<{parsed}>: {NOT_YOURS} {login}".replace("%", "?")
            return None, Reply(553, "5.7.1", (text,)), "outbound=refused:from-not-owned"
    return domain, None, f"outbound=sign:{domain}"


# ------------------------------------------------------ the socketmap server


def _read_netstring(stream: io.BufferedIOBase) -> bytes | None:
    """One netstring from a file object; None at a clean end of stream."""
    digits = b""
    while True:
        ch = stream.read(1)
        if not ch:
            if digits:
                raise ValueError("connection closed inside a netstring")
            return None
        if ch == b":":
            break
        if not ch.isdigit() or len(digits) >= 5:
            raise ValueError("bad netstring length")
        digits += ch
    if not digits:
        raise ValueError("empty netstring length")
    size = int(digits)
    if size > MAX_REQUEST:
        raise ValueError(f"request of {size} bytes")
    data = stream.read(size)
    if len(data) != size or stream.read(1) != b",":
        raise ValueError("truncated netstring")
    return data


def netstring(data: bytes) -> bytes:
    return str(len(data)).encode() + b":" + data + b","


def answer(senders: Senders | None, request: bytes) -> bytes:
    """The socketmap reply (without netstring framing) to one request `NAME KEY`."""
    _, _, key = request.partition(b" ")
    if senders is None:
        return b"TEMP routemilter: submission is not configured"
    try:
        address = key.decode("utf-8")
    except UnicodeDecodeError:
        return b"NOTFOUND "
    if "@" not in address or address.startswith("@"):
        return b"NOTFOUND "  # Postfix's fallback keys (@domain, user): the full address answered already
    owners = senders.owners(address).owners
    if not owners:
        return b"NOTFOUND "
    return b"OK " + ",".join(owners).encode("utf-8")


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.connection.settimeout(IDLE_TIMEOUT)
        if self.connection.family != socket.AF_UNIX:  # small replies: no Nagle delay
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        holder = cast("_UnixServer | _TCPServer", self.server).holder  # the servers below, given it at start
        while True:
            try:
                request = _read_netstring(self.rfile)
            except (ValueError, OSError) as exc:
                log.warning("socketmap: closing a connection: %s", exc)
                return
            if request is None:
                return
            try:
                reply = answer(holder.current.senders, request)
            except Exception:
                log.exception("socketmap: error answering %r", request[:200])
                reply = b"TEMP routemilter: internal error"
            try:
                self.wfile.write(netstring(reply))
                self.wfile.flush()
            except OSError:
                return


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    holder: PolicyHolder


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    holder: PolicyHolder


class SocketmapServer:
    """The sender login map (submission.socket) served by the daemon; it reads
    the current Policy per request, so a reload applies at once."""

    def __init__(self, holder: PolicyHolder, settings: SubmissionSettings, mode: int = 0o660,
                 group: str | None = None) -> None:
        self.holder = holder
        self.settings = settings
        self.mode = mode
        self.group = group
        self.server: _UnixServer | _TCPServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> SocketmapServer:
        address = sockets.parse(self.settings.socket)
        where = address.path
        if address.unix:
            sockets.prepare(where)
            with sockets.umask_for(self.mode):  # the mode is set at bind, not by name after
                self.server = _UnixServer(where, _Handler)
            try:
                sockets.finish(where, self.mode, self.group)
            except Exception:
                self.server.server_close()
                raise
        else:
            self.server = _TCPServer((address.host or "127.0.0.1", address.port), _Handler)
        self.server.holder = self.holder
        self.thread = threading.Thread(target=self.server.serve_forever, name="socketmap", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        address = sockets.parse(self.settings.socket)
        if address.unix:
            try:
                os.unlink(address.path)
            except FileNotFoundError:
                pass
        self.server = None
