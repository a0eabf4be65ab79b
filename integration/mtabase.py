"""What the Postfix and Sendmail test harnesses share: SMTP in, log out."""
import re
import socket
import time

from smtpsend import SendResult
from smtpsend import send as smtp_send


class MTAInstance:
    """Base of postfix.Postfix and sendmail.Sendmail.

    A subclass sets `name`, `port`, `mode`, `maillog` and `_proc` (the process
    that runs the MTA, or None), and may add to `failure_context()`.
    """

    name = "MTA"

    def failure_context(self) -> str:
        """What to show when the MTA fails to start: the log's tail."""
        return self.log_tail()

    def _wait_banner(self, timeout):
        """Wait for the 220 greeting on 127.0.0.1:port, or say why not."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} ({self.mode}) exited ({self._proc.returncode}):\n"
                                   f"{self.failure_context()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(5)
                    banner = s.recv(512)
                    if banner.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
                    last = banner
            except OSError as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} ({self.mode}) did not greet on 127.0.0.1:{self.port} "
                           f"within {timeout}s (last: {last!r}):\n{self.failure_context()}")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def send(self, mail_from, rcpt_tos, data: bytes, **kw) -> SendResult:
        """One SMTP transaction to this MTA; see smtpsend.send."""
        return smtp_send("127.0.0.1", self.port, mail_from, list(rcpt_tos), data, **kw)

    def log_text(self) -> str:
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=40) -> str:
        return "--- maillog tail ---\n" + "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, pattern, timeout=20.0) -> re.Match:
        """Wait until the log matches the regex pattern."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log_text())
            if m:
                return m
            time.sleep(0.2)
        raise TimeoutError(f"log did not match {pattern!r} in {timeout}s\n{self.log_tail()}")
