"""Test helpers: run `routemilter run` for real and talk to it as an MTA would.

The MTA side of the milter protocol is PyPI's `miltertest` package; this file
adds what a test needs on top of it: honouring the no-reply bits the milter
negotiated, and collecting a message's outcome in one object.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from miltertest import MilterConnection, codec
from miltertest import constants as mc

# miltertest 1.0.0 cannot decode a CHGFROM without ESMTP arguments (it insists
# on at least one string): accept an empty list.
codec.codectypes["strs0"] = (codec.encode_strs, lambda data: codec.decode_strs(data, empty_ok=True))
codec.codec[mc.SMFIR_CHGFROM] = (("from", "str"), ("args", "strs0"))
# The milter's OPTNEG reply may end with the macro lists it asks for (smfi_setsymlist);
# miltertest expects exactly three words: keep the rest as raw bytes ("macros").
codec.codectypes["rest"] = (bytes, lambda data: (bytes(data), b""))
codec.codec[mc.SMFIC_OPTNEG] = (("version", "u32"), ("actions", "u32"), ("protocol", "u32"), ("macros", "rest"))
codec.encode_optneg = lambda actions, protocol, is_milter=False: codec.encode_msg(
    mc.SMFIC_OPTNEG, version=mc.MILTER_VERSION, actions=actions & mc.SMFI_V6_ACTS,
    protocol=protocol if is_milter else protocol & mc.SMFI_V6_PROT, macros=b"")

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    rcpt_replies: dict[str, tuple[str, str]] = field(default_factory=dict)  # rcpt -> (cmd, text)
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    new_sender: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)  # (name, value) as inserted
    final: str | None = None  # 'c' continue, 'd' discard, 'y' reply, 't' tempfail, 'r' reject
    final_text: str = ""


class MTA:
    """One milter connection, speaking as Postfix would."""

    def __init__(self, socket_path: str, timeout: float = 10):
        """socket_path: a unix socket path, or ("127.0.0.1", port) for inet."""
        family = socket.AF_INET if isinstance(socket_path, tuple) else socket.AF_UNIX
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(socket_path)
        self.conn = MilterConnection(self.sock)
        self.actions, self.protocol = self.conn.optneg_mta()

    def close(self) -> None:
        try:
            self.conn._send(mc.SMFIC_QUIT)
        except OSError:
            pass
        self.sock.close()

    def _maybe_send(self, noreply_bit: int, no_bit: int, cmd: str, **args):
        if self.protocol & no_bit:
            return None
        if self.protocol & noreply_bit:
            self.conn._send(cmd, **args)
            return None
        return self.conn.send_ar(cmd, **args)

    def message(self, sender: str, rcpts: list[str], headers: list[tuple[str, str]], body: bytes | str,
                queue_id: str = "TESTQID") -> Outcome:
        out = Outcome()
        c = self.conn
        if not getattr(self, "_greeted", False):  # like an MTA: once per connection, not per message
            self._greeted = True
            self._maybe_send(mc.SMFIP_NR_CONN, mc.SMFIP_NOCONNECT, mc.SMFIC_CONNECT,
                             hostname="client.example", family=mc.SMFIA_INET, port=25000, address="127.0.0.9")
            self._maybe_send(mc.SMFIP_NR_HELO, mc.SMFIP_NOHELO, mc.SMFIC_HELO, helo="client.example")
        reply = self._maybe_send(mc.SMFIP_NR_MAIL, mc.SMFIP_NOMAIL, mc.SMFIC_MAIL, args=[sender])
        assert reply is None or reply[0] == mc.SMFIR_CONTINUE, f"MAIL FROM refused: {reply}"
        for rcpt in rcpts:
            reply = c.send_ar(mc.SMFIC_RCPT, args=[rcpt])
            out.rcpt_replies[rcpt] = (reply[0], _reply_text(reply))
        if not any(r[0] == mc.SMFIR_CONTINUE for r in out.rcpt_replies.values()):
            c._send(mc.SMFIC_ABORT)
            return out
        c.send_macro(mc.SMFIC_DATA, i=queue_id)
        self._maybe_send(mc.SMFIP_NR_DATA, mc.SMFIP_NODATA, mc.SMFIC_DATA)
        for name, value in headers:
            self._maybe_send(mc.SMFIP_NR_HDR, mc.SMFIP_NOHDRS, mc.SMFIC_HEADER, name=name, value=value)
        self._maybe_send(mc.SMFIP_NR_EOH, mc.SMFIP_NOEOH, mc.SMFIC_EOH)
        if isinstance(body, bytes):
            body = body.decode("latin-1")  # miltertest wants str; latin-1 maps bytes 1:1
        if not self.protocol & mc.SMFIP_NOBODY:
            for start in range(0, len(body), mc.MILTER_CHUNK_SIZE):
                self._maybe_send(mc.SMFIP_NR_BODY, mc.SMFIP_NOBODY, mc.SMFIC_BODY,
                                 buf=body[start:start + mc.MILTER_CHUNK_SIZE])
        c.send_macro(mc.SMFIC_BODYEOB, i=queue_id)
        for cmd, args in c.send_eom():
            if cmd == mc.SMFIR_ADDRCPT:
                out.added.append(args["rcpt"])
            elif cmd == mc.SMFIR_DELRCPT:
                out.deleted.append(args["rcpt"])
            elif cmd == mc.SMFIR_CHGFROM:
                out.new_sender = args["from"]
            elif cmd == mc.SMFIR_INSHEADER:
                out.headers.insert(min(args["index"], len(out.headers)), (args["name"], args["value"]))
            elif cmd == mc.SMFIR_ADDHEADER:
                out.headers.append((args["name"], args["value"]))
            else:
                out.final = cmd
                out.final_text = _reply_text((cmd, args))
        return out


def _reply_text(reply) -> str:
    """The SMTP reply as the client would see it, e.g. '550 5.1.1 text'."""
    cmd, args = reply
    if cmd != mc.SMFIR_REPLYCODE:
        return ""
    return f"{args['smtpcode']}{args['space']}{args['text']}"


class Daemon:
    """`routemilter run` in a subprocess, on a unix socket in a temp dir."""

    def __init__(self, config_path: Path, socket_path: Path, run_args: tuple[str, ...] = ()):
        self.config_path = config_path
        self.socket_path = socket_path
        self.run_args = tuple(run_args)  # e.g. ("--user", "nobody")
        self.log_path = config_path.parent / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15) -> Daemon:
        os.chmod(self.config_path, 0o600)  # it may hold SRS secrets: `run` refuses it readable by others
        if not str(self.socket_path).startswith("inet:") and self.socket_path.exists():
            self.socket_path.unlink()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:  # the daemon keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "routemilter", "-c", str(self.config_path), "run", *self.run_args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"routemilter exited {self.proc.returncode}:\n{self.log_text()}")
            inet = str(self.socket_path).startswith("inet:")
            if b"listening on" in self.log_path.read_bytes() and (inet or self.socket_path.exists()):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"routemilter did not open its socket in {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_log(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log_text()}")

    def stop(self, timeout: float = 15) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"routemilter ignored SIGTERM for {timeout}s") from None
        return stopped_cleanly(code)


def stopped_cleanly(code: int) -> int:
    """The exit status of a daemon stopped with SIGTERM, as systemd judges it: 75 means
    libmilter's own signal thread took the SIGTERM and stopped the milter, which the
    unit lists in SuccessExitStatus (see daemon.py); anything else is returned as is."""
    return 0 if code == 75 else code
