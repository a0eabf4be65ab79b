"""A tiny authoritative DNS server on loopback for tests (dnslib wire format).

Serves TXT, A, AAAA, MX records from a dict; `mode` switches between answering,
dropping every query (a DNS outage: clients time out) and SERVFAIL. UDP and TCP
(TCP for answers too large for UDP, e.g. long TXT). Never forwards anywhere.
"""

from __future__ import annotations

import socketserver
import struct
import threading

from dnslib import AAAA, MX, QTYPE, RCODE, RR, TXT, A, DNSRecord


class DNSServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.records: dict[tuple[str, str], list] = {}
        self.mode = "answer"  # or "drop", "servfail"
        self.queries: list[tuple[str, str]] = []
        server = self

        class UDP(socketserver.BaseRequestHandler):
            def handle(self):
                data, sock = self.request
                reply = server.answer(data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class TCP(socketserver.StreamRequestHandler):
            def handle(self):
                try:
                    (length,) = struct.unpack("!H", self.rfile.read(2))
                    reply = server.answer(self.rfile.read(length))
                except (struct.error, OSError):
                    return
                if reply is not None:
                    self.wfile.write(struct.pack("!H", len(reply)) + reply)

        socketserver.UDPServer.allow_reuse_address = True
        socketserver.TCPServer.allow_reuse_address = True
        for attempt in range(20):  # UDP and TCP on the same port number: retry if TCP's is taken
            self.udp = socketserver.ThreadingUDPServer((host, port), UDP)
            self.host, self.port = self.udp.server_address[:2]
            try:
                self.tcp = socketserver.ThreadingTCPServer((host, self.port), TCP)
                break
            except OSError:
                self.udp.server_close()
                if port or attempt == 19:
                    raise
        self.tcp.daemon_threads = self.udp.daemon_threads = True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def add(self, name: str, qtype: str, value) -> None:
        self.records.setdefault((name.lower().rstrip("."), qtype), []).append(value)

    def txt(self, name: str, text: str) -> None:
        self.add(name, "TXT", text)

    def answer(self, data: bytes) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001
            return None
        qname = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        self.queries.append((qname, qtype))
        if self.mode == "drop":
            return None
        reply = request.reply()
        if self.mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()
        values = self.records.get((qname, qtype), [])
        for value in values:
            if qtype == "TXT":
                chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(chunks), ttl=60))
            elif qtype == "A":
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(value), ttl=60))
            elif qtype == "AAAA":
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(value), ttl=60))
            elif qtype == "MX":
                reply.add_answer(RR(request.q.qname, QTYPE.MX, rdata=MX(value[1], value[0]), ttl=60))
        if not values and not any(name == qname for name, _ in self.records):
            reply.header.rcode = RCODE.NXDOMAIN
        return reply.pack()

    def start(self) -> DNSServer:
        for srv in (self.udp, self.tcp):
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
        return self

    def stop(self) -> None:
        for srv in (self.udp, self.tcp):
            srv.shutdown()
            srv.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":  # python dnsserver.py: a manual check
    import sys

    with DNSServer(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0) as s:
        s.txt("example.test", "v=spf1 -all")
        print("serving on", s.address)
        threading.Event().wait()
