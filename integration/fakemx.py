"""A scriptable SMTP server standing in for a remote MX host or relay.

Each FakeMX binds its own loopback address (127.0.0.2, 127.0.0.3, ...), so a
Postfix transport map can name it like a separate host: `smtp:[127.0.0.2]:PORT`.
Only loopback addresses are accepted: tests must never reach another host.
"""
import asyncio
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

# Replies real providers send; tests use them verbatim.
RATE_LIMITED = ("451 4.7.650 The mail server [127.0.0.1] has been temporarily "
                "rate limited due to IP reputation.")
USER_UNKNOWN = "550 5.1.1 <{rcpt}> User unknown"

MODES = ("normal", "hang", "reset")


def check_loopback(host):
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address; tests stay on this machine")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on host a moment ago."""
    check_loopback(host)
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Message:
    mail_from: str
    rcpt_tos: list
    data: bytes          # exactly as received, CRLF line ends, dot-unstuffed
    peer: tuple
    mail_options: list
    received_at: float


class _Handler:
    def __init__(self, mx):
        self.mx = mx

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802 - the name aiosmtpd calls
        reply = self.mx.reply_for(address)
        with self.mx._lock:
            self.mx.rcpt_log.append((address, reply))
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - the name aiosmtpd calls
        reply = self.mx.data_reply
        if reply.startswith("2"):
            msg = Message(envelope.mail_from, list(envelope.rcpt_tos),
                          bytes(envelope.original_content or envelope.content),
                          session.peer, list(envelope.mail_options), time.time())
            with self.mx._lock:
                self.mx.messages.append(msg)
                self.mx._cond.notify_all()
        return reply


class _FaultySMTP(SMTP):
    """aiosmtpd's SMTP, plus connection-level faults chosen at accept time.

    Lines of any length are accepted, as Postfix and the big mailbox providers do
    (aiosmtpd alone answers 500 to a line over 1,001 bytes)."""

    line_length_limit = 64 * 1024 * 1024

    def __init__(self, mx, *args, **kw):
        super().__init__(*args, **kw)
        self._mx = mx

    async def _handle_client(self):
        mode = self._mx.mode
        if mode == "reset":
            # SO_LINGER 0 turns close() into a TCP RST, like a crashed peer.
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
            return
        if mode == "hang":
            # Accept, never greet; bounded so nothing outlives the test.
            await asyncio.sleep(self._mx.hang_seconds)
            self.transport.close()
            return
        await super()._handle_client()


class _Controller(Controller):
    def __init__(self, mx, *args, **kw):
        super().__init__(*args, **kw)
        self.mx = mx

    def factory(self):
        return _FaultySMTP(
            self.mx, self.handler, hostname=f"{self.mx.name}.fakemx.test",
            enable_SMTPUTF8=True, decode_data=False,
            data_size_limit=200 * 1024 * 1024, timeout=60)


class FakeMX:
    """SMTP server on (host, port). Configure replies per recipient at runtime."""

    def __init__(self, host: str, port: int, name: str, hang_seconds: float = 30.0):
        check_loopback(host)
        self.host, self.port, self.name = host, port, name
        self.hang_seconds = hang_seconds
        self.mode = "normal"
        self.data_reply = "250 2.0.0 OK queued"
        self.messages: list[Message] = []
        self.rcpt_log: list[tuple[str, str]] = []
        self._replies = {"*": "250 2.1.5 OK"}
        self._sequences: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._controller = _Controller(self, _Handler(self), hostname=host, port=port,
                                       ready_timeout=10)

    # --- configuration -------------------------------------------------
    def set_reply(self, recipient: str, reply: str):
        """Reply for RCPT TO:<recipient> (or "*" for any other recipient).

        `{rcpt}` in the reply is replaced by the address."""
        self._replies[recipient.lower()] = reply

    def set_replies(self, recipient: str, replies: list[str]):
        """Replies for successive RCPT TO:<recipient>, in order; the last one then stays
        (e.g. greylisting: ["450 4.2.0 greylisted", "250 2.1.5 OK"])."""
        with self._lock:
            self._sequences[recipient.lower()] = list(replies)

    def set_mode(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode

    def reply_for(self, address: str) -> str:
        with self._lock:
            sequence = self._sequences.get(address.lower())
            if sequence:
                reply = sequence.pop(0) if len(sequence) > 1 else sequence[0]
                return reply.replace("{rcpt}", address)
        reply = self._replies.get(address.lower(), self._replies["*"])
        return reply.replace("{rcpt}", address)

    # --- results ---------------------------------------------------------
    def wait_for(self, n: int, timeout: float = 20.0) -> list[Message]:
        """Block until at least n messages arrived; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"FakeMX {self.name} ({self.host}:{self.port}) got "
                        f"{len(self.messages)} message(s), expected {n} within {timeout}s; "
                        f"RCPT log: {self.rcpt_log}")
                self._cond.wait(left)
            return list(self.messages)

    def recipients(self) -> list[str]:
        """Every recipient of every accepted message, in arrival order."""
        return [r for m in list(self.messages) for r in m.rcpt_tos]

    # --- lifecycle -------------------------------------------------------
    def start(self):
        self._controller.start()
        return self

    def stop(self):
        self._controller.stop(no_assert=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"FakeMX({self.name!r}, {self.host}:{self.port}, mode={self.mode})"


def start_hosts(domains: Iterable[str], first_host: int, **kw: object) -> dict[str, FakeMX]:
    """A started FakeMX for each domain, on 127.0.0.<first_host>, <first_host + 1>, ...
    each on a free port; `kw` goes to every FakeMX (e.g. hang_seconds)."""
    hosts = {}
    for i, domain in enumerate(domains):
        host = f"127.0.0.{first_host + i}"
        hosts[domain] = FakeMX(host, free_port(host), domain, **kw).start()
    return hosts
