"""Submit one message over SMTP and record every reply, never raising on SMTP codes.

Tests assert on where a transaction failed (a 550 at RCPT, a 451 at DATA), so
each stage's (code, text) is kept instead of smtplib's all-or-nothing sendmail().
"""
import re
import smtplib
from dataclasses import dataclass, field

Reply = tuple[int, str]


@dataclass
class SendResult:
    greeting: Reply | None = None
    ehlo: Reply | None = None
    mail: Reply | None = None
    rcpt: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None
    error: str | None = None        # connection-level failure, if any

    @property
    def accepted(self) -> bool:
        """True when the server took responsibility for the message."""
        return self.data is not None and 200 <= self.data[0] < 300

    @property
    def accepted_rcpts(self) -> list[str]:
        return [r for r, (code, _) in self.rcpt.items() if 200 <= code < 300]

    @property
    def queue_id(self) -> str | None:
        m = self.data and re.search(r"queued as (\S+)", self.data[1])
        return m.group(1) if m else None

    def codes(self) -> list[int]:
        """Every reply code, in order (greeting, EHLO, MAIL, RCPTs, DATA)."""
        out = [r[0] for r in (self.greeting, self.ehlo, self.mail) if r]
        out += [c for c, _ in self.rcpt.values()]
        return out + ([self.data[0]] if self.data else [])

    def first_failure(self) -> tuple[str, int, str] | None:
        """(stage, code, text) of the first 4xx/5xx reply, or None."""
        stages = [("greeting", self.greeting), ("ehlo", self.ehlo), ("mail", self.mail)]
        stages += [(f"rcpt {r}", v) for r, v in self.rcpt.items()] + [("data", self.data)]
        for stage, reply in stages:
            if reply and reply[0] >= 400:
                return stage, reply[0], reply[1]
        return None


def _text(resp) -> str:
    return resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)


def send(host, port, mail_from, rcpt_tos, data: bytes, *, timeout=30.0,
         mail_options=None, helo="client.routemilter.test") -> SendResult:
    """One SMTP transaction. `data` must already use CRLF line ends."""
    res = SendResult()
    if mail_options is None:
        # Ask for what the content needs; Postfix offers both.
        mail_options = []
        if not all(a.isascii() for a in [mail_from, *rcpt_tos]):
            mail_options.append("SMTPUTF8")
        if any(b > 127 for b in data):
            mail_options.append("BODY=8BITMIME")
    s = smtplib.SMTP(timeout=timeout)
    try:
        code, msg = s.connect(host, port)
        res.greeting = (code, _text(msg))
        if code != 220:
            return res
        res.ehlo = tuple_reply(s.ehlo(helo))
        res.mail = tuple_reply(s.mail(mail_from, mail_options))
        if res.mail[0] >= 400:
            return res
        for r in rcpt_tos:
            res.rcpt[r] = tuple_reply(s.rcpt(r))
        if not res.accepted_rcpts:
            return res
        try:
            res.data = tuple_reply(s.data(data))
        except smtplib.SMTPResponseException as e:   # DATA command itself refused
            res.data = (e.smtp_code, _text(e.smtp_error))
        s.quit()
    except smtplib.SMTPConnectError as e:
        res.greeting = (e.smtp_code, _text(e.smtp_error))
    except (smtplib.SMTPException, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        s.close()
    return res


def tuple_reply(r) -> Reply:
    return (r[0], _text(r[1]))
