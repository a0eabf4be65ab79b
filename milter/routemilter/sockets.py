"""Socket addresses as the config writes them, and the unix sockets the daemon listens
on (the milter socket, the bounce LMTP socket, the sender map), created so that nobody
else can swap what they point to.

* One parser (`parse`) reads every spelling the config uses: libmilter's `unix:/path`,
  `local:/path` and `inet:PORT@HOST` (`inet6:` too), and `HOST:PORT` or `[HOST]:PORT`
  for SMTP listeners and peers.

* The folder must be one other users cannot write to (or sticky, like /tmp, where
  they cannot remove or rename our file): otherwise whoever can write there could
  replace the socket between our bind and the MTA's connect.
* The mode comes from the umask at bind time, never from a chmod by name afterwards
  (a chmod by name follows a symlink planted in place of the socket); the group is
  set with lchown, which never follows one; then lstat checks that the path is still
  our socket with the mode asked for.
"""

from __future__ import annotations

import grp
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal


class SocketError(Exception):
    """A socket folder or file that others could tamper with."""


_HOST = re.compile(r"[A-Za-z0-9.:-]+")


@dataclass(frozen=True, slots=True)
class SocketAddress:
    """Where to listen or connect: a unix socket's path, or a host and port."""

    kind: Literal["unix", "inet", "inet6"]
    path: str = ""  # unix
    host: str = ""  # inet: without brackets; "" when inet:PORT names none (libmilter: all addresses)
    port: int = 0  # inet
    hostport: bool = False  # written HOST:PORT rather than libmilter's inet:PORT@HOST

    @property
    def unix(self) -> bool:
        return self.kind == "unix"


def parse(text: str) -> SocketAddress:
    """`unix:/path` or `local:/path`, `inet:PORT[@HOST]` or `inet6:PORT[@HOST]`, or
    `HOST:PORT` (`[HOST]:PORT` for IPv6); ValueError with the reason otherwise."""
    kind, sep, rest = text.partition(":")
    if sep and kind in ("unix", "local"):
        if not rest.startswith("/") or len(rest) < 2 or "\0" in rest:
            raise ValueError(f"{text!r}: a unix socket needs an absolute path")
        return SocketAddress("unix", path=rest)
    if sep and kind in ("inet", "inet6"):
        port, at, host = rest.partition("@")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if at and not _HOST.fullmatch(host):
            raise ValueError(f"{text!r}: {host!r} is not a host name or address")
        return SocketAddress("inet6" if kind == "inet6" else "inet", host=host, port=_port(port, text))
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not _HOST.fullmatch(host):
        raise ValueError(f"{text!r} is not unix:/PATH, inet:PORT@HOST or HOST:PORT")
    return SocketAddress("inet", host=host, port=_port(port, text), hostport=True)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535 or len(text) > 5:
        raise ValueError(f"{whole!r}: the port must be a number from 1 to 65535")
    return int(text)


def prepare(path: str, remove_stale: bool = True) -> None:
    """Before binding a unix socket: create its folder, refuse one others could swap the
    socket in (check_folder), and remove a stale socket file left by an earlier run."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    check_folder(path)
    if remove_stale and os.path.lexists(path):
        os.unlink(path)


def check_folder(path: str) -> None:
    """Refuse a socket path whose folder others can write to (without the sticky bit)
    or that belongs to another user than root or us."""
    folder = os.path.dirname(os.path.abspath(path)) or "/"
    try:
        info = os.lstat(folder)
    except OSError as exc:
        raise SocketError(f"{folder}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SocketError(f"{folder}: the socket's folder is not a folder (a symlink?)")
    if info.st_uid not in (0, os.geteuid()):
        raise SocketError(f"{folder}: owned by uid {info.st_uid}, neither root nor us: "
                          f"that user could replace {os.path.basename(path)}")
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise SocketError(f"{folder}: mode {stat.S_IMODE(info.st_mode):04o}: group or others can write "
                          f"to the socket's folder and replace the socket (chmod go-w, or a folder of its own)")


@contextmanager
def umask_for(mode: int) -> Iterator[None]:
    """Create (bind) inside this block: the socket gets exactly `mode`."""
    old = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(old)


def finish(path: str, mode: int, group: str | None) -> None:
    """After bind: give the socket its group without following a symlink, and check that
    the path is still our socket with `mode`."""
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid, follow_symlinks=False)
    info = os.lstat(path)
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketError(f"{path}: not our socket any more (replaced after bind)")
    if stat.S_IMODE(info.st_mode) != mode & 0o777:
        raise SocketError(f"{path}: mode {stat.S_IMODE(info.st_mode):04o}, expected {mode & 0o777:04o}")
