"""A counting relay on the milter socket: Postfix <-> proxy <-> milter.

Every milter packet is a 4-byte big-endian length, one command byte and the
data; the relay forwards the bytes unchanged and counts packets per direction
and command, so a benchmark can say how long the conversation is on the MTA's
side (what Postfix sends) and on the milter's side (what the milter answers).
Only for measuring: it adds a hop, so timing runs do not use it.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import threading

# Command bytes (libmilter's mfdef.h): what the MTA sends ...
MTA_COMMANDS = {
    b"O": "optneg", b"D": "macro", b"C": "connect", b"H": "helo", b"M": "mail", b"R": "rcpt",
    b"T": "data", b"L": "header", b"N": "eoh", b"B": "body", b"E": "eom", b"A": "abort",
    b"Q": "quit", b"K": "quit-nc", b"U": "unknown",
}
# ... and what the milter answers.
MILTER_REPLIES = {
    b"O": "optneg", b"c": "continue", b"a": "accept", b"r": "reject", b"t": "tempfail", b"d": "discard",
    b"y": "replycode", b"s": "skip", b"p": "progress", b"h": "addheader", b"i": "insheader",
    b"m": "chgheader", b"+": "addrcpt", b"2": "addrcpt_par", b"-": "delrcpt", b"e": "chgfrom",
    b"b": "replbody", b"q": "quarantine",
}
MODIFICATIONS = {"addheader", "insheader", "chgheader", "addrcpt", "addrcpt_par", "delrcpt", "chgfrom",
                 "replbody"}


class CountingProxy:
    def __init__(self, listen: str, upstream: str):
        self.listen, self.upstream = listen, upstream
        self.counts: collections.Counter = collections.Counter()  # (direction, name) -> packets
        self.bytes: collections.Counter = collections.Counter()  # direction -> bytes incl. framing
        self.optneg: list[tuple[int, int, int]] = []  # (version, actions, protocol) the milter answered
        self.samples: dict[tuple[str, str], bytes] = {}  # (direction, name) -> the first such packet
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(listen):
            os.unlink(listen)
        self._server.bind(listen)
        os.chmod(listen, 0o666)
        self._server.listen(128)
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.bytes.clear()
            self.optneg.clear()
            self.samples.clear()

    def close(self) -> None:
        self._closing = True
        self._server.close()
        try:
            os.unlink(self.listen)
        except OSError:
            pass

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            milter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                milter.connect(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, milter, "mta", MTA_COMMANDS), daemon=True).start()
            threading.Thread(target=self._pump, args=(milter, client, "milter", MILTER_REPLIES), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, names: dict) -> None:
        buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                buf += data
                while len(buf) >= 5:
                    (length,) = struct.unpack(">I", buf[:4])
                    if len(buf) < 4 + length:
                        break
                    packet, buf = buf[4:4 + length], buf[4 + length:]
                    self._count(direction, names, packet)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()

    def _count(self, direction: str, names: dict, packet: bytes) -> None:
        cmd = packet[:1]
        name = names.get(cmd, f"?{cmd!r}")
        if direction == "mta" and cmd == b"D":
            # A macro packet names the command it precedes: count them per stage.
            name = f"macro:{MTA_COMMANDS.get(packet[1:2], '?')}"
        with self._lock:
            self.counts[(direction, name)] += 1
            self.bytes[direction] += 4 + len(packet)
            self.samples.setdefault((direction, name), packet)
            if direction == "milter" and cmd == b"O" and len(packet) >= 13:
                self.optneg.append(struct.unpack(">III", packet[1:13]))
