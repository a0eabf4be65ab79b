"""A real redis-server for tests: on a unix socket or a free 127.0.0.1 port,
no persistence, stopped (or killed, or frozen) by the test itself.

Debian package `redis-server` (scripts/install-deps.sh installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time


def available() -> bool:
    return shutil.which("redis-server") is not None


class RedisServer:
    def __init__(self, workdir: str, unix: bool = True, password: str | None = None, port: int | None = None):
        self.workdir = workdir
        self.unix = unix
        self.password = password
        self.socket = os.path.join(workdir, "redis.sock") if unix else None
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket}" if self.unix else f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> RedisServer:
        if self.port is None and not self.unix:
            self.port = _free_port()
        args = ["redis-server", "--save", "", "--appendonly", "no", "--dir", self.workdir,
                "--port", "0" if self.unix else str(self.port), "--bind", "127.0.0.1",
                "--logfile", os.path.join(self.workdir, "redis.log")]
        if self.unix:
            args += ["--unixsocket", self.socket, "--unixsocketperm", "777"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer in {timeout}s: {self.log()[-2000:]}")
            time.sleep(0.05)
        return self

    def answers(self) -> bool:
        """A PING gets an answer (PONG, or NOAUTH with a password)."""
        try:
            if self.unix:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(1)
                s.connect(self.socket)
            else:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=1)
            with s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def log(self) -> str:
        try:
            with open(os.path.join(self.workdir, "redis.log"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed, nothing saved (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.socket and os.path.exists(self.socket):
            os.unlink(self.socket)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
