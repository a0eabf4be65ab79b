"""Delivery status notifications (RFC 3464): reading the ones that come back, writing the final one.

`parse_dsn` reads a bounce without trusting it (never raises, bounded depth and
size); `final_report` writes the one DSN the original sender gets when every
address of a chain has failed. The bounce planner (bounces.py) decides what is
in it and signs it; nothing here does I/O.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import email.utils
import os
import quopri
import re
from dataclasses import dataclass, field
from email.message import Message

from . import addresses, headers


@dataclass
class RecipientStatus:
    """One per-recipient block of a delivery-status report."""

    final_recipient: str = ""
    original_recipient: str = ""
    action: str = ""
    status: str = ""
    diagnostic: str = ""
    remote_mta: str = ""

    @property
    def reason(self) -> str:
        text = self.diagnostic or (f"status {self.status}" if self.status else "no reason given")
        if self.remote_mta and self.remote_mta not in text:
            text = f"{text} (from {self.remote_mta})"
        return text


@dataclass
class Report:
    is_dsn: bool = False
    reporting_mta: str = ""
    recipients: list[RecipientStatus] = field(default_factory=list)
    returned: bytes | None = None  # the returned message (message/rfc822), CRLF
    returned_headers: bytes | None = None  # text/rfc822-headers, when only headers came back
    human: str = ""

    @property
    def failed(self) -> list[RecipientStatus]:
        return [r for r in self.recipients if r.action == "failed"]


_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_MAX_DEPTH = 4
_MAX_GROUPS = 1000


def crlf(data: bytes) -> bytes:
    """`data` with CRLF line ends (MTAs hand over LF or CRLF; DKIM and SMTP want CRLF)."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def split_message(entity: bytes) -> tuple[bytes, bytes]:
    """Header block (with its final CRLF) and body of a CRLF message or MIME entity."""
    if entity.startswith(b"\r\n"):
        return b"", entity[2:]
    head, sep, body = entity.partition(b"\r\n\r\n")
    if not sep:
        return entity, b""
    return head + b"\r\n", body


def _headers(block: bytes) -> Message:
    return _HEADER_PARSER.parsebytes(block + b"\r\n")


def _ctype(msg: Message) -> tuple[str, dict[str, str]]:
    try:
        ctype = (msg.get_content_type() or "text/plain").lower()
        params = {k.lower(): v for k, v in (msg.get_params() or [])[1:]}
    except Exception:  # noqa: BLE001 - a header the email package cannot read is junk
        return "text/plain", {}
    return ctype, params


def _multipart_parts(body: bytes, boundary: str) -> list[bytes]:
    try:
        b = boundary.encode("ascii")
    except UnicodeEncodeError:
        return []
    if not b or len(b) > 200:
        return []
    delim = re.compile(rb"(?:^|\r\n)--" + re.escape(b) + rb"(--)?[ \t]*(?=\r\n|$)")
    parts: list[bytes] = []
    start: int | None = None
    for m in delim.finditer(body):
        if start is not None:
            parts.append(body[start:m.start()])
        if m.group(1):
            start = None
            break
        start = m.end() + 2 if body[m.end():m.end() + 2] == b"\r\n" else m.end()
        if len(parts) > 100:
            break
    if start is not None:  # no closing delimiter: take the rest
        parts.append(body[start:])
    return parts


def _decode(body: bytes, cte: str) -> bytes:
    cte = (cte or "").strip().lower()
    try:
        if cte == "base64":
            return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body) + b"==", validate=False)
        if cte == "quoted-printable":
            return quopri.decodestring(body)
    except (ValueError, TypeError):
        return b""
    return body


def _field_value(value: object) -> str:
    text = str(value or "")
    text = re.sub(r"\r?\n[ \t]+", " ", text).strip()
    return "".join(c if c.isprintable() else " " for c in text)


def _typed(value: object) -> str:
    """'rfc822; a@b' -> 'a@b' (the address type is dropped)."""
    text = _field_value(value)
    _kind, sep, rest = text.partition(";")
    return rest.strip() if sep else text


def _parse_status(body: bytes, report: Report) -> None:
    groups = [g for g in re.split(rb"\r\n(?:[ \t]*\r\n)+", body.strip(b"\r\n")) if g.strip()]
    for n, group in enumerate(groups[:_MAX_GROUPS]):
        fields = _headers(group + b"\r\n")
        if n == 0 and ("Reporting-MTA" in fields or "Final-Recipient" not in fields):
            report.reporting_mta = _typed(fields.get("Reporting-MTA"))
            if "Final-Recipient" not in fields:
                continue
        if "Final-Recipient" not in fields and "Original-Recipient" not in fields:
            continue
        report.recipients.append(RecipientStatus(
            final_recipient=_typed(fields.get("Final-Recipient")),
            original_recipient=_typed(fields.get("Original-Recipient")),
            action=_field_value(fields.get("Action")).lower(),
            status=_field_value(fields.get("Status")).split(" ")[0],
            diagnostic=_typed(fields.get("Diagnostic-Code")),
            remote_mta=_typed(fields.get("Remote-MTA")),
        ))


def _walk(entity: bytes, report: Report, depth: int) -> None:
    head, body = split_message(entity)
    msg = _headers(head)
    ctype, params = _ctype(msg)
    cte = str(msg.get("Content-Transfer-Encoding") or "")
    if ctype.startswith("multipart/"):
        if depth >= _MAX_DEPTH:
            return
        if ctype == "multipart/report" and params.get("report-type", "").lower() in (
                "delivery-status", "global-delivery-status"):
            report.is_dsn = True
        for part in _multipart_parts(body, str(params.get("boundary") or "")):
            _walk(part, report, depth + 1)
    elif ctype in ("message/delivery-status", "message/global-delivery-status"):
        _parse_status(_decode(body, cte), report)
    elif ctype in ("message/rfc822", "message/global") and report.returned is None:
        report.returned = _decode(body, cte)
    elif ctype in ("text/rfc822-headers", "message/global-headers") and report.returned_headers is None:
        report.returned_headers = _decode(body, cte)
    elif ctype == "text/plain" and not report.human and depth > 0:
        report.human = _decode(body, cte)[:4000].decode("utf-8", "replace")


def parse_dsn(data: bytes) -> Report:
    """Read a delivery status notification; never raises on malformed input.

    `is_dsn` is true for a multipart/report of type delivery-status; the
    returned message is kept byte for byte (CRLF line ends), so our own DKIM
    signature on it can be verified.
    """
    report = Report()
    _walk(crlf(bytes(data)), report, 0)
    if not report.recipients:
        report.is_dsn = False
    return report


# ------------------------------------------------------------ the final DSN


@dataclass
class Failure:
    """A destination tried, and why it failed: a fallback copy's notes, a line of the final DSN."""

    address: str  # the destination that failed
    reason: str
    status: str = ""


def status_code(status: str) -> str:
    """`status` if it is an RFC 3463 code (2.x.x, 4.x.x, 5.x.x), else 5.0.0."""
    return status if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status or "") else "5.0.0"


def printable(text: str, limit: int = 400) -> str:
    """Text from a report, a remote server or an envelope, fit for a header field or a
    log line: what is not printable becomes a space; at most `limit` characters."""
    text = "".join(c if c.isprintable() else " " for c in text)
    return text[:limit]


def normal_address(address: str) -> str:
    """An address a DSN names, in the form the rules use (lower case if it does not parse)."""
    try:
        return str(addresses.parse(address))
    except addresses.AddressError:
        return address.strip().strip("<>").lower()


def final_report(server: str, mailer_domain: str, sender: str, failures: list[Failure], when: float,
                 attached: list[bytes] | None) -> bytes:
    """One DSN (RFC 3464) to the original `sender` listing every destination tried, unsigned.

    It holds only text we wrote or verified: the human part names the addresses
    and status codes; the remote servers' replies are quoted only as the
    Diagnostic-Code fields of the machine-readable delivery-status part (data, as
    in any DSN). `attached`: the returned copy's header lines our signature
    covered (no final CRLF), else None (anyone could have written them)."""
    boundary = f"rm-{os.urandom(8).hex()}"
    now = email.utils.formatdate(when, localtime=False)
    subject = ""
    for line in attached or []:
        if headers.field_name(line) == "subject":
            subject = printable(line.split(b":", 1)[1].decode("utf-8", "replace").strip(), 200)
    lines = [
        "This is the mail system at " + server + ".",
        "",
        "Your message" + (f' "{subject}"' if subject else "") + " could not be delivered.",
        "Every destination it was routed to was tried, in order, and failed:",
        "",
    ]
    lines += [f"  <{printable(f.address, 300)}>: status {status_code(f.status)}" for f in failures]
    lines += ["", "What each receiving server answered is quoted, as it sent it, in the",
              "attached delivery report (Diagnostic-Code); it is their text, not ours."]
    if attached is not None:
        lines += ["The headers of your message are attached."]
    else:
        lines += ["The returned copy could not be verified as the message we forwarded,",
                  "so its headers are not attached."]
    human = "\r\n".join(lines) + "\r\n"
    per_message = f"Reporting-MTA: dns; {server}\r\n"
    per_rcpt = []
    for f in failures:
        status = status_code(f.status) if (f.status or "").startswith("5") else "5.0.0"
        per_rcpt.append(f"Final-Recipient: rfc822; {printable(f.address, 300)}\r\n"
                        f"Action: failed\r\n"
                        f"Status: {status}\r\n"
                        f"Diagnostic-Code: smtp; {printable(f.reason, 900)}\r\n")
    status_part = per_message + "\r\n" + "\r\n".join(per_rcpt)
    head_text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{mailer_domain}>\r\n"
        f"To: <{sender}>\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {now}\r\n"
        f"Message-ID: <{os.urandom(12).hex()}@{server}>\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f"\tboundary=\"{boundary}\"\r\n"
    )
    body = (
        f"This is a MIME-encapsulated message.\r\n\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Notification\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{human}\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Delivery report\r\n"
        f"Content-Type: message/delivery-status\r\n\r\n"
        f"{status_part}"
    ).encode()
    if attached is not None:
        body += (f"\r\n--{boundary}\r\n"
                 f"Content-Description: Undelivered Message Headers\r\n"
                 f"Content-Type: text/rfc822-headers\r\n\r\n").encode("ascii")
        body += b"\r\n".join(attached) + b"\r\n"
    body += f"\r\n--{boundary}--\r\n".encode("ascii")
    return head_text.encode("utf-8") + b"\r\n" + body
