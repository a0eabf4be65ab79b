#!/usr/bin/env python3
"""A minimal milter in pure Python (asyncio, no libmilter, no threads): for measuring.

It answers exactly the conversation of the trivial pymilter milter the MTA
benchmark calls the floor (integration/test_harness.py's `milter` mode):
negotiates away every step but RCPT and end of message, and at end of message
deletes each recipient and adds the given addresses. The difference between
the two in bench/mta_bench.py is what pymilter + libmilter's thread per
connection cost over a single-threaded event loop speaking the same protocol.
Not a replacement for the milter layer: no timeouts, no macro handling, no
error replies, nothing but this one conversation.

    python bench/asyncio_milter.py SOCKET ADDR...
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys

# libmilter's mfdef.h / mfapi.h
SMFIF_ADDRCPT, SMFIF_DELRCPT = 0x04, 0x08
# NOCONNECT NOHELO NOMAIL NODATA NOUNKNOWN NOHDRS NOEOH NOBODY
SKIPPED = (0x01 | 0x02 | 0x04 | 0x200 | 0x100 | 0x20 | 0x40 | 0x10)
SMFIP_SKIP = 0x400


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, adds: list[bytes]) -> None:
    rcpts: list[bytes] = []
    try:
        while True:
            (length,) = struct.unpack(">I", await reader.readexactly(4))
            data = await reader.readexactly(length)
            cmd, body = data[:1], data[1:]
            if cmd == b"O":
                _version, actions, protocol = struct.unpack(">III", body[:12])
                writer.write(packet(b"O", struct.pack(">III", 6, actions & (SMFIF_ADDRCPT | SMFIF_DELRCPT),
                                                      protocol & (SKIPPED | SMFIP_SKIP))))
            elif cmd == b"R":
                rcpts.append(body.split(b"\0", 1)[0])
                writer.write(packet(b"c"))
            elif cmd == b"E":
                out = [packet(b"-", r + b"\0") for r in rcpts]
                out += [packet(b"+", a + b"\0") for a in adds]
                out.append(packet(b"a"))
                writer.write(b"".join(out))
                rcpts = []
            elif cmd in (b"A", b"K"):  # abort, quit-new-connection: no reply
                rcpts = []
            elif cmd == b"Q":
                break
            elif cmd in (b"D", b"L", b"B", b"N", b"M", b"T", b"U", b"H", b"C"):
                continue  # macros, and steps negotiated away (never sent): no reply
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(path: str, adds: list[str]) -> None:
    if os.path.exists(path):
        os.unlink(path)
    encoded = [a.encode() for a in adds]
    server = await asyncio.start_unix_server(lambda r, w: serve(r, w, encoded), path=path, backlog=128)
    os.chmod(path, 0o666)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
