"""`routemilter run`: the long-running milter process.

Start-up order (as dkimpy-milter does): load and validate the config and read
the keys first, then open the socket, then tell systemd we are ready.

libmilter's own loop runs in a worker thread; the main thread keeps Python's
signal handling, so SIGUSR1 (or SIGHUP) reloads and SIGTERM/SIGINT stop promptly even
while the MTA holds connections open (libmilter alone waits for them forever).

libmilter also runs a thread of its own that waits for SIGHUP, SIGTERM and SIGINT and
stops the milter on any of them; now and then the kernel hands it a signal meant for us.
So systemd reloads with SIGUSR1, which that thread does not wait for (OpenDKIM reloads
on SIGUSR1 too), and when libmilter stops without being asked the daemon exits with
EXIT_LIBMILTER_STOPPED, which the unit restarts (RestartForceExitStatus).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Protocol

import Milter
import milter as libmilter

from . import events, sockets
from .config import ConfigError, file_mode_problems, load
from .journal import JournalFormatter, stderr_is_journal
from .policy import Policy, PolicyHolder
from .session import ACTIONS, Session
from .signing import SigningError
from .state import Store, StoreError, open_store

EXIT_LIBMILTER_STOPPED = 75  # EX_TEMPFAIL; the unit: RestartForceExitStatus=75, SuccessExitStatus=75
log = logging.getLogger("routemilter")
STOP_GRACE_SECONDS = 5  # how long running transactions get before we exit anyway
# libmilter's largest accepted packet. Its default, 64 KiB, is below what Postfix sends
# in one packet for one header field (header_size_limit, 100 KiB by default): with it, a
# message carrying a long header line made libmilter drop the connection, and the MTA
# tempfailed that message on every retry.
MAX_PACKET = 1 << 20


def setup_logging(level: str = "INFO") -> None:
    """Plain lines on stderr: journald adds the timestamp and the unit name, and
    reads each line's priority from its "<N>" prefix (journal.py)."""
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(JournalFormatter(fmt) if stderr_is_journal() else logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd (the bounce listener) logs about a dozen INFO lines per bounce under
    # "mail.log", some untrue for us ("Available AUTH mechanisms" though AUTH is not
    # offered); its warnings and errors still come through.
    for name in ("mail.log", "mail.debug"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # The format above uses none of these; skipping them makes each log record
    # (one per message) cheaper: no caller lookup through the stack, no thread or
    # process names (the Python logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


class Notifier:
    """sd_notify when running under systemd (Type=notify), silent otherwise."""

    def __init__(self) -> None:
        self._notifier: _SystemdNotifier | None = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify  # noqa: PLC0415 (only under systemd)

            self._notifier = sdnotify.SystemdNotifier()

    def __call__(self, state: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(state)


class _SystemdNotifier(Protocol):  # sdnotify's, which has no type information
    def notify(self, state: str) -> None: ...


class Listener(Protocol):
    """A side listener the daemon runs next to the milter (bounces, deferrals, sender map, metrics)."""

    def stop(self) -> None: ...


def load_policy(path: str, store: Store) -> Policy:
    """The Policy of the config at `path`, over the daemon's state store; ConfigError also
    when a file other local users could read secrets from, or change the routing with, is
    among its files (config.py)."""
    return checked(Policy.load(path, store))


def checked(policy: Policy) -> Policy:
    """`policy`, unless its files' modes refuse it (ConfigError); warnings logged."""
    problems = file_mode_problems(policy.config)
    for warning in (p for p in problems if p.startswith("warning:")):
        log.warning("%s", warning)
    fatal = [p for p in problems if not p.startswith("warning:")]
    if fatal:
        raise ConfigError(fatal)
    return policy


class PrivilegeError(Exception):
    """--user cannot be honoured."""


def drop_privileges(user: str) -> None:
    """Become `user` (its group and supplementary groups, such as postdrop for the
    re-injection socket) for good, as OpenDKIM's UserID does: called once the sockets
    are open and the keys read. Raises PrivilegeError if that is impossible."""
    import pwd  # noqa: PLC0415 (only with --user)

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"--user {user}: no such user") from None
    if os.geteuid() != 0:
        if os.geteuid() == entry.pw_uid:
            return
        raise PrivilegeError(f"--user {user}: running as uid {os.geteuid()}, not root: cannot switch")
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)  # glibc applies it to every thread (the bounce listener's too)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError(f"--user {user}: root could be regained after dropping privileges")


class Daemon:
    def __init__(self, config_path: str, user: str | None = None) -> None:
        self.config_path = config_path
        self.user = user
        config = load(config_path)
        store = open_store(config.state)  # for the daemon's lifetime (see reload)
        self.holder = PolicyHolder(checked(Policy.from_config(config, store)), store)
        self.notify = Notifier()
        self.stopping = threading.Event()
        self.stop_requested = False  # by SIGTERM/SIGINT; libmilter stopping by itself is a failure
        self.error: BaseException | None = None

    def reload(self) -> bool:
        """Swap in a new Policy; a bad config or key keeps the old one."""
        self.notify("RELOADING=1")
        try:
            policy = load_policy(self.config_path, self.holder.store)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", "; ".join(exc.problems))
            self.notify("READY=1\nSTATUS=reload refused: config has errors, old config kept")
            events.reload(False)
            return False
        except SigningError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.notify("READY=1\nSTATUS=reload refused: DKIM key error, old config kept")
            events.reload(False)
            return False
        except Exception as exc:
            log.exception("reload refused, keeping the running config: unexpected error: %r", exc)
            self.notify("READY=1\nSTATUS=reload refused: unexpected error, old config kept")
            events.reload(False)
            return False
        if policy.config.milter.socket != self.holder.current.config.milter.socket:
            log.warning("milter.socket changed; the new socket takes effect only after a restart")
        before, after = self.holder.current.config.submission, policy.config.submission
        if (before and before.socket) != (after and after.socket):
            log.warning("submission: added, removed or its socket changed; the sender login map "
                        "follows only after a restart")
        if policy.config.state != self.holder.current.config.state:
            # Claims and windows live in the store: switching it here would forget them
            # (a claimed bounce token could be used again). The running store is kept.
            log.warning("state: changed; the running state store is kept until a restart")
        self.holder.replace(policy)
        log.info("reloaded %s", self.config_path)
        self.describe(policy)
        self.notify("READY=1\nSTATUS=running, config reloaded")
        events.reload(True)
        return True

    def open_socket(self) -> None:
        settings = self.holder.current.config.milter
        socket = settings.socket
        address = sockets.parse(socket)
        path = address.path
        if address.unix:
            sockets.prepare(path, remove_stale=False)  # libmilter's opensocket(True) removes it
        Milter.factory = lambda: Session(self.holder)
        libmilter.set_flags(ACTIONS)
        libmilter.set_exception_policy(Milter.TEMPFAIL)  # belt and braces: see session.guarded
        raise_packet_limit(MAX_PACKET)
        register_callbacks(socket, settings.timeout)
        with sockets.umask_for(settings.socket_mode):  # the mode is set at bind, not by name after
            libmilter.opensocket(True)  # True: remove a stale socket file first
        if address.unix:
            sockets.finish(path, settings.socket_mode, settings.socket_group)

    def describe(self, policy: Policy) -> None:
        """Say at start and reload what will sign and how."""
        dkim = policy.config.dkim
        if policy.signer is not None and dkim is not None:
            log.info("dkim: domain=%s selectors=%s rsa=%s", dkim.domain,
                     ",".join(k.selector for k in dkim.keys), policy.signer.rsa_backend)
            for warning in policy.signer.warnings:
                log.warning("dkim: %s", warning)
        if policy.srs is None:
            log.warning("srs: not configured; forwards keep the original sender (SPF will fail)")

    def check_store(self) -> None:
        """Say at start whether a shared store answers; mail flows either way."""
        settings = self.holder.current.config.state
        if settings is None or settings.backend == "memory":
            log.info("state: in memory (this host only)")
            return
        try:
            self.holder.store.ping()
            log.info("state: redis at %s, key prefix %s", settings.where, settings.key_prefix)
        except StoreError as exc:
            log.error("state: %s; starting anyway (see docs/multi-host.md for what each feature does)", exc)

    def serve(self) -> int:
        # Handlers first: a reload signal right after READY must reload, not kill us.
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGUSR1, lambda *_: self.reload())
        signal.signal(signal.SIGHUP, lambda *_: self.reload())
        self.describe(self.holder.current)
        self.check_store()
        self.open_socket()
        bounces: Listener | None = None
        deferrals: Listener | None = None
        sender_map: Listener | None = None
        visibility: Listener | None = None
        try:
            bounces = self.start_bounces()
            deferrals = self.start_deferrals()
            sender_map = self.start_sender_map()
            visibility = self.start_visibility()
            if self.user:
                drop_privileges(self.user)  # sockets open, keys read: root is not needed any more
                log.info("running as %s (uid %d)", self.user, os.getuid())
            elif os.geteuid() == 0:
                log.warning("running as root: start with --user (or systemd User=) to drop privileges")
        except BaseException:
            for listener in (bounces, deferrals, sender_map, visibility):
                if listener is not None:
                    listener.stop()
            self._remove_socket()
            raise
        worker = threading.Thread(target=self._milter_main, name="libmilter", daemon=True)
        worker.start()
        log.info("listening on %s", self.holder.current.config.milter.socket)
        self.notify("READY=1\nSTATUS=running")
        while not self.stopping.is_set() and worker.is_alive():
            self.stopping.wait(1)
        for listener in (bounces, deferrals, sender_map, visibility):
            if listener is not None:
                listener.stop()
        if self.error is not None:
            log.error("libmilter stopped: %s", self.error)
            return 1
        if not self.stop_requested:
            # libmilter's signal thread took a SIGHUP/SIGTERM/SIGINT meant for us (see the
            # module docstring). Which one is unknown: exit with the code the unit restarts
            # unless a stop was asked for. The MTA tempfails meanwhile.
            log.error("libmilter stopped by itself (its signal thread took a signal meant for routemilter); "
                      "exiting with status %d so the service manager restarts routemilter",
                      EXIT_LIBMILTER_STOPPED)
            self._remove_socket()
            return EXIT_LIBMILTER_STOPPED
        self.notify("STOPPING=1")
        log.info("stopping")
        libmilter.stop()
        worker.join(STOP_GRACE_SECONDS)
        if worker.is_alive():
            # Open transactions are tempfailed by the MTA (milter_default_action).
            log.info("connections still open after %ss; exiting anyway", STOP_GRACE_SECONDS)
        self._remove_socket()
        return 0

    def start_bounces(self) -> Listener | None:
        """The LMTP listener for bounces to the SRS domain (bounces.py), if configured.
        It reads the current Policy per message; a changed socket needs a restart."""
        config = self.holder.current.config
        if config.bounces is None:
            return None
        from .bounceserver import BounceServer  # noqa: PLC0415 (the LMTP server only with `bounces:`)

        server = BounceServer(self.holder, config.bounces, config.milter.socket_mode,
                              config.milter.socket_group).start()
        log.info("bounces: LMTP on %s, re-injecting through %s", config.bounces.socket,
                 config.bounces.reinject)
        return server

    def start_visibility(self) -> Listener:
        """Metrics endpoint, notices, MTA log follower (visibility.py), as configured;
        their settings take effect at start (a reload keeps the running ones)."""
        from .visibility import Visibility  # noqa: PLC0415 (its parts only as configured)

        return Visibility(self.holder).start()

    def start_deferrals(self) -> Listener | None:
        """The SMTP listener for deferred copies (deferrals.py): the last smtp_fallback_relay
        of the deferral transports postfix-config writes. Loopback only (config.py checks)."""
        config = self.holder.current.config
        from .mtaconfig import deferral_routes  # noqa: PLC0415 (the MTA config writer: only here)

        settings = config.bounces
        if settings is None or not deferral_routes(config):
            return None
        from .deferrals import DeferralServer  # noqa: PLC0415 (the SMTP server only with deferral routes)

        try:
            server = DeferralServer(self.holder, settings.deferral_listen, settings.max_size).start()
        except (OSError, RuntimeError) as exc:
            # Milter and bounces keep working: Postfix finds the listener unreachable and keeps
            # every deferred copy queued at its primary (as with fallback_after: never).
            log.error("deferrals: cannot listen on %s (%s); deferred mail stays queued at its primary "
                      "address until this is fixed and routemilter restarted", settings.deferral_listen, exc)
            return None
        log.info("deferrals: SMTP on %s, re-injecting through %s", settings.deferral_listen, settings.reinject)
        return server

    def start_sender_map(self) -> Listener | None:
        """The socketmap Postfix asks who may send as an address (senders.py), if
        `submission:` is configured. A changed socket needs a restart."""
        config = self.holder.current.config
        if config.submission is None:
            return None
        from .senders import SocketmapServer  # noqa: PLC0415 (only with `submission:`)

        server = SocketmapServer(self.holder, config.submission, config.milter.socket_mode,
                                 config.milter.socket_group).start()
        log.info("submission: sender login map on %s", config.submission.socket)
        return server

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        self.stopping.set()

    def _milter_main(self) -> None:
        try:
            libmilter.main()
        except Exception as exc:  # noqa: BLE001 - reported by serve()
            self.error = exc
        finally:
            self.stopping.set()

    def _remove_socket(self) -> None:
        address = sockets.parse(self.holder.current.config.milter.socket)
        if address.unix:
            try:
                os.unlink(address.path)
            except OSError:  # gone, or no right any more after dropping privileges
                pass


def raise_packet_limit(size: int) -> int | None:
    """smfi_setmaxdatasize, which pymilter does not wrap, called through ctypes on the
    libmilter the extension module is linked with. Returns the limit now in force."""
    try:
        setmax = ctypes.CDLL(libmilter.__file__).smfi_setmaxdatasize
    except (OSError, AttributeError) as exc:
        log.warning("cannot raise libmilter's packet limit (headers over 64 KiB will tempfail): %s", exc)
        return None
    setmax.restype, setmax.argtypes = ctypes.c_size_t, [ctypes.c_size_t]
    setmax(size)
    return int(setmax(size))


def register_callbacks(socket: str, timeout: int) -> None:
    """Register our callbacks with libmilter, the way Milter.runmilter does,
    without its blocking main loop (which we run in a thread)."""
    libmilter.set_connect_callback(Milter.connect_callback)
    libmilter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    libmilter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    libmilter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    libmilter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    libmilter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    libmilter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    libmilter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    # No abort callback: Postfix sends ABORT twice per message, after end of message too,
    # and each call into Python costs a GIL hand-over. An open transaction is logged as
    # aborted at the next MAIL FROM or at close instead (Session.envfrom, Session.close).
    libmilter.set_abort_callback(None)
    libmilter.set_close_callback(Milter.close_callback)
    libmilter.setconn(socket)
    libmilter.settimeout(timeout)
    libmilter.register(
        "routemilter",
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging(os.environ.get("ROUTEMILTER_LOG_LEVEL", "INFO"))
    try:
        daemon = Daemon(args.config, getattr(args, "user", None))
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        log.error("not started: the config has %d problem(s)", len(exc.problems))
        return 1
    except SigningError as exc:
        log.error("not started: %s", exc)
        return 1
    try:
        return daemon.serve()
    except (sockets.SocketError, PrivilegeError) as exc:
        log.error("not started: %s", exc)
        return 1
