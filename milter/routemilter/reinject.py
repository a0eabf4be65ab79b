"""Re-injection: hand messages back to the MTA over SMTP, through a listener without the milter.

Used for what the bounce planner (bounces.py) and the deferral listener
(deferrals.py) send on, and for notices (notify.py). `bounces.reinject` names the
listener: `unix:/var/spool/postfix/public/NAME` (a Postfix smtpd as a master.cf
`unix` service) or a loopback HOST:PORT.
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import sockets

if TYPE_CHECKING:
    from _socket import _Address

    from _typeshed import ReadableBuffer


@dataclass
class Submission:
    """One message to hand back to the MTA."""

    mail_from: str
    rcpt: str
    data: bytes
    kind: str  # "fallback", "final-bounce", "reverse", "notice"


#: submit(), or a stand-in: (bounces.reinject, submissions) -> the MTA's replies to DATA
Submitter = Callable[[str, list[Submission]], list[str] | None]


class _SMTP(smtplib.SMTP):
    """smtplib.SMTP keeping the reply to DATA, which names the new queue id."""

    data_replies: list[str]

    def data(self, msg: ReadableBuffer | str) -> tuple[int, bytes]:
        code, reply = super().data(msg)
        self.data_replies.append(reply.decode("utf-8", "replace"))
        return code, reply


class _UnixSMTP(_SMTP):
    """SMTP over a unix socket (Postfix's smtpd as a master.cf `unix` service), the way
    smtplib.LMTP connects to a path."""

    def connect(self, host: str = "localhost", port: int = 0,
                source_address: _Address | None = None) -> tuple[int, bytes]:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(host)
        except OSError:
            self.sock.close()
            self.sock = None
            raise
        code, msg = self.getreply()
        return code, msg


def submit(hostport: str, submissions: list[Submission], timeout: float = 60) -> list[str]:
    """Hand every submission to the MTA's re-injection listener over SMTP.

    Raises on any failure (the caller answers 451 and the MTA retries the
    bounce). Postfix has queued each message once this returns. Returns the
    MTA's reply to each DATA ("2.0.0 Ok: queued as ID").
    """
    if not submissions:
        return []
    client: _SMTP
    address = sockets.parse(hostport)
    if address.unix:
        client = _UnixSMTP(address.path, timeout=timeout, local_hostname="routemilter.bounces")
    else:
        client = _SMTP(address.host, address.port, timeout=timeout, local_hostname="routemilter.bounces")
    with client as smtp:
        smtp.data_replies = []
        smtp.ehlo()
        for sub in submissions:
            options = []
            if any(b > 127 for b in sub.data) and smtp.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if not (sub.mail_from + sub.rcpt).isascii():
                options.append("SMTPUTF8")
            smtp.sendmail(sub.mail_from, [sub.rcpt], sub.data, mail_options=options)
        return smtp.data_replies
