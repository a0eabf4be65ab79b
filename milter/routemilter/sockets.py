"""Unix sockets the daemon listens on (the milter socket, the bounce LMTP socket),
created so that nobody else can swap what they point to.

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
import stat
from contextlib import contextmanager


class SocketError(Exception):
    """A socket folder or file that others could tamper with."""


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
def umask_for(mode: int):
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
