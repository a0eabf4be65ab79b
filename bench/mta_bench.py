#!/usr/bin/env python3
"""End-to-end benchmark: the same load through a real Postfix in several setups.

Load: Postfix's own `smtp-source` (S parallel SMTP sessions, N messages of
about 4 KiB, each to family@mydomain.net, which fans out to two addresses)
into a private host Postfix instance (integration/postfix.py, host mode) that
relays everything to an `smtp-sink` on loopback (one per setup). Setups:

  baseline    Postfix alone; the fan-out is virtual_alias_maps
  opendkim    Postfix + OpenDKIM (C milter) signing RSA-2048 + virtual_alias_maps
  postsrsd    the stock stack without routemilter: virtual_alias_maps + postsrsd (SRS through
              sender_canonical_maps / recipient_canonical_maps = tcp:..., as its README says)
  postsrsd-opendkim  the same + OpenDKIM signing RSA-2048
  pymilter-floor  Postfix + the smallest pymilter milter doing the fan-out (RCPT and EOM
              callbacks only): what pymilter/libmilter cost before any routemilter code
  asyncio-floor   the same conversation from a minimal single-threaded asyncio milter
              (bench/asyncio_milter.py, no libmilter): a measurement of the milter layer
  c-trivial   the same conversation from the same milter in plain C on libmilter
              (bench/c_milter/trivial_milter.c, compiled at start): libmilter without Python
  c-rmconv    routemilter's routing + SRS conversation (same negotiation, same packets) from
              that C milter (-r): the floor of a compiled layer on libmilter, before any Python
  rm-srs      Postfix + routemilter: routing + SRS
  rm-rsa      Postfix + routemilter: routing + SRS + DKIM RSA-2048
  rm-rsa-ed   Postfix + routemilter: routing + SRS + DKIM RSA-2048 + ed25519

Every setup runs at the same time, each with its own Postfix (idle when it is
not its turn); repetitions are interleaved (setup order rotates every round)
so machine noise hits all setups alike. Per run:
  wall     smtp-source start -> every copy delivered (the queue is empty)
  CPU      all CPU time of the setup's processes (Postfix's and the filter's),
           from a cpuacct cgroup per setup (dead processes included)
  memory   peak of the summed PSS of the setup's processes (sampled every 50 ms),
           and the filter process's own peak RSS (VmHWM, reset before each run)
Every run is checked: all 2N copies logged status=sent, nothing else; the sink
(smtp-sink -d, one per setup, a file per message) received 2N copies, each with the envelope
sender the setup must produce (SRS0=...@fwd.bench.test where it does SRS, the
original sender elsewhere); in setups that sign, a sample of the received
messages has every DKIM signature verified (dkimpy, against the setup's keys).

    .venv/bin/python bench/mta_bench.py [--messages 2000] [--sessions 10] [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import re
import shutil
import socket as socket_module
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "integration"))
sys.path.insert(0, str(REPO / "tests"))

from fakemx import free_port  # noqa: E402
from mtaclient import Daemon  # noqa: E402
from postfix import Postfix  # noqa: E402
from results import write_section  # noqa: E402
from routemilter.signing import generate_key  # noqa: E402

FAILED: list[str] = []  # targets missed in the last run (bench/run.py reports them)

SENDER = "sender@src.test"
RCPT = "family@mydomain.net"
DESTS = ("email1@gmail.com", "email2@gmail.com")
SRS_DOMAIN = "fwd.bench.test"
C_SRS_SENDER = f"<SRS0=vehU2wly=JQ=src.test=sender@{SRS_DOMAIN}>"  # c-rmconv's fixed new sender (packets only)
CGROOT = "/sys/fs/cgroup/cpuacct"
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ measuring


class CpuGroup:
    """A cpuacct cgroup (v1) for one setup: CPU of all its processes, dead ones too."""

    def __init__(self, name: str):
        self.path = None
        if os.path.isdir(CGROOT):
            path = f"{CGROOT}/rmbench-{os.getpid()}-{name}"
            try:
                os.mkdir(path)
                self.path = path
            except OSError:
                pass

    def __enter__(self):
        """Processes started inside the block belong to the group."""
        if self.path:
            Path(self.path, "cgroup.procs").write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        if self.path:
            Path(CGROOT, "cgroup.procs").write_text(str(os.getpid()))

    def usage(self) -> float | None:
        if not self.path:
            return None
        return int(Path(self.path, "cpuacct.usage").read_text()) / 1e9

    def pids(self) -> list[int]:
        if not self.path:
            return []
        return [int(p) for p in Path(self.path, "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        if not self.path:
            return
        for pid in self.pids():  # stragglers back to the root group, then rmdir
            try:
                Path(CGROOT, "cgroup.procs").write_text(str(pid))
            except OSError:
                pass
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


def pss(pid: int) -> int:
    """Proportional set size: shared pages split among their users, so a sum means something."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def proc_cpu(pid: int | None) -> float | None:
    """user + system CPU seconds of one live process (all its threads)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def reset_hwm(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS
    except OSError:
        pass


class RssSampler(threading.Thread):
    """Peak of the summed PSS of a cgroup's processes, sampled."""

    def __init__(self, group: CpuGroup, interval: float = 0.05):
        super().__init__(daemon=True)
        self.group, self.interval = group, interval
        self.peak = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, sum(pss(p) for p in self.group.pids()))
            self.done.wait(self.interval)

    def stop(self) -> int:
        self.done.set()
        self.join(5)
        return self.peak


# ------------------------------------------------------------------- setups


@dataclass
class Setup:
    key: str
    title: str
    filter: str | None = None  # None, "opendkim", "trivial", "routemilter", "asyncio", "c"
    virtual: bool = False
    postsrsd: bool = False  # SRS by postsrsd through Postfix's canonical maps
    dkim: tuple[str, ...] = ()  # routemilter keys: "rsa", "ed25519"
    main_extra: dict = field(default_factory=dict)  # more main.cf settings (experiments)
    pythonpath: str | None = None  # run the daemon from other code (before/after comparisons)
    c_srs: bool = False  # the C milter speaks routemilter's routing + SRS conversation (-r)
    # filled in at start
    group: CpuGroup | None = None
    postfix: Postfix | None = None
    filter_pid: int | None = None
    stop_filter: object = None
    runs: list[dict] = field(default_factory=list)
    sink: object = None  # this setup's smtp-sink (Popen) and its dump file
    dump: Path | None = None
    dkim_keys: dict = field(default_factory=dict)  # (selector, domain) -> TXT value, for checking signatures
    proxy: object = None  # milterproxy.CountingProxy when counting packets

    @property
    def srs(self) -> bool:
        return self.postsrsd or self.filter == "routemilter" or self.c_srs

    @property
    def signs(self) -> bool:
        return self.filter == "opendkim" or bool(self.dkim)


SETUPS = [
    Setup("baseline", "Postfix alone (virtual_alias_maps fan-out)", virtual=True),
    Setup("opendkim", "Postfix + OpenDKIM RSA-2048 (+ virtual_alias_maps)", "opendkim", virtual=True),
    Setup("postsrsd", "Postfix + postsrsd (virtual_alias_maps fan-out, SRS by canonical maps)", virtual=True,
          postsrsd=True),
    Setup("postsrsd-opendkim", "Postfix + postsrsd + OpenDKIM RSA-2048 (+ virtual_alias_maps)", "opendkim",
          virtual=True, postsrsd=True),
    Setup("pymilter-floor", "Postfix + a trivial pymilter milter (fan-out at RCPT/EOM only: the floor)",
          "trivial"),
    Setup("asyncio-floor", "Postfix + a trivial asyncio milter (the floor's conversation, no libmilter)", "asyncio"),
    Setup("c-trivial", "Postfix + the trivial milter in C on libmilter (the floor's conversation, no Python)", "c"),
    Setup("c-rmconv", "Postfix + a C libmilter milter speaking routemilter's routing + SRS conversation (no Python)",
          "c", c_srs=True),
    Setup("rm-srs", "Postfix + routemilter: routing + SRS", "routemilter"),
    Setup("rm-rsa", "Postfix + routemilter: routing + SRS + DKIM RSA-2048", "routemilter", dkim=("rsa",)),
    Setup("rm-rsa-ed", "Postfix + routemilter: routing + SRS + DKIM RSA-2048 + ed25519", "routemilter",
          dkim=("rsa", "ed25519")),
]

# Not in the default run: what-if setups for measuring one change at a time.
EXTRA_SETUPS = [
    Setup("rm-srs-fewmacros", "Postfix (only macro i sent) + routemilter: routing + SRS", "routemilter",
          main_extra={"milter_connect_macros": "", "milter_helo_macros": "", "milter_mail_macros": "i",
                      "milter_rcpt_macros": "", "milter_data_macros": "", "milter_end_of_header_macros": "",
                      "milter_end_of_data_macros": "i", "milter_unknown_command_macros": ""}),
]

ROUTEMILTER_YAML = """\
server_name: mx.bench.test
milter:
  socket: unix:{socket}
  socket_mode: "0666"
srs:
  domain: {srs_domain}
  secrets: ["bench-secret-0123456789abcdef"]
{dkim}domains:
  mydomain.net: {{}}
rules:
  - name: family
    addresses: [{rcpt}]
    to: [{dests}]
"""

OPENDKIM_CONF = """\
Syslog no
Mode s
Domain src.test
Selector bench
KeyFile {key}
Socket local:{socket}
UMask 000
Canonicalization relaxed/relaxed
RequireSafeKeys no
"""


def message_file(path: Path, size: int) -> None:
    """A plain 4 KiB-ish text message (smtp-source adds CR to each line)."""
    head = (f"From: Sender <{SENDER}>\nTo: Family <{RCPT}>\nSubject: benchmark message\n"
            "Date: Mon, 23 Nov 2026 12:00:00 +0000\nMessage-ID: <bench.1@src.test>\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n")
    line = "The quick brown fox jumps over the lazy dog, again and again and again.\n"
    body = line * max(1, (size - len(head)) // len(line))
    path.write_text(head + body)


SINK_MARK = "@@rmbench-message@@"


def start_sink(setup: Setup, d: Path) -> str:
    """This setup's own smtp-sink, dumping every message (with the envelope) to a file of
    its own (-d; with -D concurrent transactions interleave in one file), so each run can
    be checked. Not in the setup's cgroup: the sink is the outside world."""
    port = free_port()
    setup.dump = d / "sink"  # smtp-sink appends a random suffix to the template's file name
    setup.dump.mkdir()
    os.chmod(setup.dump, 0o777)  # smtp-sink writes as nobody
    with open(d / "sink.log", "wb") as log:
        setup.sink = subprocess.Popen(["smtp-sink", "-4", "-u", "nobody", "-d", f"{setup.dump}/msg.",
                                       "-S", SINK_MARK + "\\n", f"127.0.0.1:{port}", "1024"],
                                      stdout=log, stderr=subprocess.STDOUT)
    return f"127.0.0.1:{port}"


def install_postsrsd() -> None:
    """Only this benchmark uses postsrsd, so `make deps` does not install it (Debian's
    package also enables a postsrsd service of its own, which the benchmark does not use)."""
    apt_install("postsrsd", "the stock-stack setups need it")
    if not shutil.which("postsrsd"):
        raise SystemExit("could not install postsrsd (Debian package postsrsd 1.10); install it and run again")


def apt_install(package: str, why: str) -> None:
    command = ["apt-get", "install", "-y", "-qq", package]
    if os.geteuid() != 0:
        command.insert(0, "sudo")
    print(f"{package} not installed: {why}; running {' '.join(command)}", file=sys.stderr, flush=True)
    if subprocess.run(command, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive")).returncode != 0:
        raise SystemExit(f"could not install {package}; install it and run again")


def build_c_milter(d: Path) -> Path:
    """bench/c_milter/trivial_milter.c compiled into d (gcc, Debian's libmilter-dev; both
    installed on demand: only this benchmark needs them)."""
    if not shutil.which("gcc"):
        apt_install("gcc", "the C milter setup compiles bench/c_milter/trivial_milter.c")
    if not os.path.exists("/usr/include/libmilter/mfapi.h"):
        apt_install("libmilter-dev", "the C milter setup links against libmilter")
    binary = d / "trivial_milter"
    cc = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(HERE / "c_milter" / "trivial_milter.c"),
                         "-lmilter", "-lpthread"], capture_output=True, text=True)
    if cc.returncode != 0:
        raise RuntimeError(f"could not compile the C milter:\n{cc.stdout}{cc.stderr}")
    return binary


def start_postsrsd(d: Path) -> tuple[subprocess.Popen, dict]:
    """postsrsd 1.x (Debian's package) on two loopback ports; the main.cf lines its README gives."""
    if not shutil.which("postsrsd"):
        install_postsrsd()
    secret = d / "postsrsd.secret"
    secret.write_text(os.urandom(24).hex() + "\n")
    forward, reverse = free_port(), free_port()
    with open(d / "postsrsd.log", "ab") as log:
        proc = subprocess.Popen(["postsrsd", "-s", str(secret), "-d", SRS_DOMAIN, "-l", "127.0.0.1", "-4",
                                 "-f", str(forward), "-r", str(reverse)], stdout=log, stderr=log)

    def listening(port):
        try:
            socket_module.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return proc.poll() is not None

    for port in (forward, reverse):
        wait_for(lambda port=port: listening(port), 15, "postsrsd ports")
    if proc.poll() is not None:
        raise RuntimeError(f"postsrsd exited {proc.returncode}: {(d / 'postsrsd.log').read_text()}")
    return proc, {
        "sender_canonical_maps": f"tcp:127.0.0.1:{forward}",
        "sender_canonical_classes": "envelope_sender",
        "recipient_canonical_maps": f"tcp:127.0.0.1:{reverse}",
        "recipient_canonical_classes": "envelope_recipient,header_recipient",
    }


def start_setup(setup: Setup, work: Path, proxy: bool = False) -> None:
    """proxy: put a milterproxy.CountingProxy between Postfix and the milter (packet counts)."""
    d = work / setup.key
    d.mkdir(mode=0o755)
    setup.dkim_keys = {}  # its own (dataclasses.replace copies share the dict)
    sink = start_sink(setup, d)
    setup.group = CpuGroup(setup.key)
    maps = {}
    if setup.virtual:
        maps["virtual"] = f"{RCPT} {', '.join(DESTS)}\n"
    socket = None
    srs_main = {}
    stops = []
    with setup.group:  # everything started here is accounted to the setup
        if setup.postsrsd:
            srsd, srs_main = start_postsrsd(d)
            stops.append(functools.partial(terminate, srsd))
        if setup.filter == "opendkim":
            socket = str(d / "odk.sock")
            key_dir = d / "keys"
            key_dir.mkdir()
            subprocess.run(["opendkim-genkey", "-b", "2048", "-d", "src.test", "-s", "bench", "-D", str(key_dir)],
                           check=True, capture_output=True, timeout=60)
            conf = d / "opendkim.conf"
            conf.write_text(OPENDKIM_CONF.format(key=key_dir / "bench.private", socket=socket))
            # bench.txt: the zone-file record; its quoted strings joined are the TXT value.
            setup.dkim_keys[("bench", "src.test")] = "".join(
                re.findall(r'"([^"]*)"', (key_dir / "bench.txt").read_text()))
            with open(d / "opendkim.log", "ab") as log:
                proc = subprocess.Popen(["opendkim", "-f", "-x", str(conf)], stdout=log, stderr=log)
            wait_for(lambda: os.path.exists(socket) or proc.poll() is not None, 15, "opendkim socket")
            if proc.poll() is not None:
                raise RuntimeError(f"opendkim exited {proc.returncode}: {(d / 'opendkim.log').read_text()}")
            setup.filter_pid = proc.pid
            stops.append(functools.partial(terminate, proc))
        elif setup.filter == "trivial":
            # integration/test_harness.py's sample milter: negotiates away everything but RCPT and
            # EOM, deletes the recipient and adds the two destinations. No headers, no SRS, no log.
            socket = str(d / "trivial.sock")
            proc = start_milter([sys.executable, str(REPO / "integration" / "test_harness.py"), "milter", socket,
                                 *(f"<{a}>" for a in DESTS)], socket, "trivial milter")
            setup.filter_pid = proc.pid
            stops.append(functools.partial(kill, proc))  # pymilter's loop ignores SIGTERM with live connections
        elif setup.filter == "asyncio":
            # The same conversation as the trivial pymilter milter, from a single-threaded
            # asyncio loop without libmilter (bench/asyncio_milter.py): the milter layer's cost.
            socket = str(d / "asyncio.sock")
            proc = start_milter([sys.executable, str(HERE / "asyncio_milter.py"), socket,
                                 *(f"<{a}>" for a in DESTS)], socket, "asyncio milter")
            setup.filter_pid = proc.pid
            stops.append(functools.partial(kill, proc))
        elif setup.filter == "c":
            # The same milter again, in C on libmilter: what libmilter's conversation costs
            # with no Python at all (bench/c_milter/trivial_milter.c).
            socket = str(d / "c.sock")
            binary = build_c_milter(d)
            srs = ["-r", C_SRS_SENDER] if setup.c_srs else []
            proc = start_milter([str(binary), *srs, socket, *(f"<{a}>" for a in DESTS)], socket, "C milter")
            setup.filter_pid = proc.pid
            stops.append(functools.partial(kill, proc))  # libmilter's loop waits for live connections on SIGTERM
        elif setup.filter == "routemilter":
            socket = str(d / "rm.sock")
            keys = []
            for algorithm in setup.dkim:
                selector = "rsa" if algorithm == "rsa" else "ed"
                path = d / f"{selector}.key"
                setup.dkim_keys[(selector, "mydomain.net")] = generate_key(algorithm, str(path))
                keys.append(f"    - selector: {selector}\n      key: {path}\n")
            dkim = f"dkim:\n  domain: mydomain.net\n  keys:\n{''.join(keys)}" if keys else ""
            config = d / "routemilter.yaml"
            config.write_text(ROUTEMILTER_YAML.format(socket=socket, srs_domain=SRS_DOMAIN, dkim=dkim, rcpt=RCPT,
                                                      dests=", ".join(DESTS)))
            saved = os.environ.get("PYTHONPATH")
            if setup.pythonpath:
                os.environ["PYTHONPATH"] = setup.pythonpath
            try:
                daemon = Daemon(config, Path(socket)).start()
            finally:
                if saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
            setup.filter_pid = daemon.proc.pid
            stops.append(daemon.stop)
        setup.stop_filter = lambda: [stop() for stop in reversed(stops)]
        if socket and proxy:
            from milterproxy import CountingProxy

            setup.proxy = CountingProxy(str(d / "proxy.sock"), socket)
            socket = setup.proxy.listen
        setup.postfix = Postfix(
            d / "pf", free_port(), milter_socket=socket, non_smtpd_milter=False, mode="host",
            routes={"gmail.com": sink}, maps=maps,
            main_extra={"relay_domains": f"mydomain.net, {SRS_DOMAIN}",
                        "disable_mime_output_conversion": "yes",
                        "smtpd_milters": f"{{ unix:{socket}, command_timeout=30s }}" if socket else None,
                        **srs_main,
                        **setup.main_extra},
        )
        setup.postfix.start()


def start_milter(command: list[str], socket: str, what: str) -> subprocess.Popen[bytes]:
    """Start a benchmark milter and wait until its socket is there."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(socket) or proc.poll() is not None, 15, f"{what} socket")
    if proc.poll() is not None:
        raise RuntimeError(f"the {what} exited {proc.returncode}")
    return proc


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(10)


def stop_setup(setup: Setup) -> None:
    """Stop what start_setup started; safe to call twice."""
    postfix, setup.postfix = setup.postfix, None
    proxy, setup.proxy = setup.proxy, None
    sink, setup.sink = setup.sink, None
    stop_filter, setup.stop_filter = setup.stop_filter, None
    group, setup.group = setup.group, None
    if postfix:
        postfix.stop()
    if proxy:
        proxy.close()
    if sink:
        sink.terminate()
        try:
            sink.wait(10)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait(5)
    if stop_filter:
        try:
            stop_filter()
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning up
            print(f"  {setup.key}: filter stop: {exc}", file=sys.stderr)
    if group:
        group.remove()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold")


def queue_empty(queue: str) -> bool:
    for name in QUEUE_DIRS:
        for _, _, files in os.walk(f"{queue}/{name}"):
            if files:
                return False
    return True


SENT = re.compile(r" status=(\w+)")


def run_load(setup: Setup, messages: int, sessions: int, msgfile: Path, record: bool = True) -> dict:
    pf = setup.postfix
    log_offset = os.path.getsize(pf.maillog)
    if setup.filter_pid:
        reset_hwm(setup.filter_pid)
    sampler = RssSampler(setup.group)
    sampler.start()
    fcpu0 = proc_cpu(setup.filter_pid)
    cpu0, t0 = setup.group.usage(), time.monotonic()
    src = subprocess.run(["smtp-source", "-4", "-s", str(sessions), "-m", str(messages), "-F", str(msgfile),
                          "-f", SENDER, "-t", RCPT, "-M", "client.bench.test", f"127.0.0.1:{pf.port}"],
                         capture_output=True, text=True, timeout=600)
    if src.returncode != 0:
        sampler.stop()
        raise RuntimeError(f"{setup.key}: smtp-source failed ({src.returncode}): {src.stdout}{src.stderr}\n"
                           f"{pf.log_tail()}")
    queue = f"{pf.workdir}/queue"
    wait_for(lambda: queue_empty(queue), 600, f"{setup.key}: queue empty", 0.01)
    t1, cpu1 = time.monotonic(), setup.group.usage()
    fcpu1 = proc_cpu(setup.filter_pid)
    peak = sampler.stop()
    # Check: every copy delivered, nothing else (the log may lag a little).
    want = messages * len(DESTS)

    def statuses():
        with open(pf.maillog, "rb") as f:
            f.seek(log_offset)
            return SENT.findall(f.read().decode("utf-8", "replace"))

    try:
        wait_for(lambda: len(statuses()) >= want, 30, "delivery log lines", 0.2)
    except TimeoutError:
        pass
    found = statuses()
    if found.count("sent") != want or len(found) != want:
        raise RuntimeError(f"{setup.key}: expected {want} status=sent, got {len(found)} statuses "
                           f"({found.count('sent')} sent)\n{pf.log_tail()}")
    check_sink(setup, messages)
    run = {
        "wall": t1 - t0,
        "cpu": None if cpu0 is None else cpu1 - cpu0,
        "filter_cpu": None if fcpu0 is None or fcpu1 is None else fcpu1 - fcpu0,
        "rss": peak,
        "filter_rss": vm_hwm(setup.filter_pid) if setup.filter_pid else None,
    }
    if record:
        setup.runs.append(run)
    return run


SINK_HEADERS = re.compile(r"\A(?:X-[\w-]+: .*\n)*Received: .*\n(?:[ \t].*\n)*")
SRS0 = re.compile(r"SRS0=[^=@]+=[^=@]+=src\.test=sender@" + re.escape(SRS_DOMAIN), re.I)
DKIM_SAMPLE = 3  # messages per run whose signatures are verified (first, middle, last)


def check_sink(setup: Setup, messages: int) -> None:
    """What the sink received in this run: 2N copies, each with the envelope sender the
    setup must produce; in setups that sign, every signature of a sample verifies.
    Empties the dump for the next run."""
    want = messages * len(DESTS)
    text = ""
    deadline = time.monotonic() + 30
    while True:  # the last transactions may still be on their way to the file
        files = list(setup.dump.iterdir())
        text = "".join(f.read_text(errors="replace") for f in files)
        chunks = [c for c in text.split(SINK_MARK + "\n") if c.strip()]
        rcpts = sum(len(re.findall(r"^X-Rcpt-Args: ", c, re.M)) for c in chunks)
        if rcpts >= want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for f in files:
        f.unlink()
    if rcpts != want:
        raise RuntimeError(f"{setup.key}: the sink got {rcpts} recipients, expected {want}")
    bad = []
    for c in chunks:
        m = re.search(r"^X-Mail-Args: <([^>]*)>", c, re.M)
        sender = m.group(1) if m else None
        if (setup.srs and not (sender and SRS0.fullmatch(sender))) or (not setup.srs and sender != SENDER):
            bad.append(sender)
    if bad:
        raise RuntimeError(f"{setup.key}: {len(bad)} of {len(chunks)} messages arrived with a wrong envelope "
                           f"sender (SRS expected: {setup.srs}), e.g. {bad[0]!r}:\n{chunks[0][:400]}")
    if setup.signs:
        import dkim

        def dnsfunc(name, timeout=5):
            name = name.decode() if isinstance(name, bytes) else name
            selector, _, domain = name.rstrip(".").partition("._domainkey.")
            return setup.dkim_keys.get((selector, domain), "").encode()

        expected = 1 if setup.filter == "opendkim" else len(setup.dkim)
        for c in {0: chunks[0], 1: chunks[len(chunks) // 2], 2: chunks[-1]}.values():
            message = SINK_HEADERS.sub("", c, count=1).replace("\n", "\r\n").encode()
            d = dkim.DKIM(message)
            count = sum(1 for line in message.split(b"\r\n") if line.lower().startswith(b"dkim-signature:"))
            if count != expected:
                raise RuntimeError(f"{setup.key}: {count} DKIM signatures in a delivered message, expected {expected}")
            for i in range(count):
                if not d.verify(idx=i, dnsfunc=dnsfunc):
                    if os.environ.get("RMBENCH_KEEP"):
                        Path(setup.dump.parent, "unverified.eml").write_bytes(message)
                    raise RuntimeError(f"{setup.key}: DKIM signature {i + 1} of a delivered message does not verify")
        setup.verified = getattr(setup, "verified", 0) + DKIM_SAMPLE
    setup.checked = getattr(setup, "checked", 0) + len(chunks)


# ------------------------------------------------------------------- report


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def mib(value):
    return "-" if value is None else f"{value / 2**20:.0f}"


def versions() -> dict[str, str]:
    def first_line(args):
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    import cryptography
    import dkim

    try:
        from importlib.metadata import version
        pymilter = version("pymilter")
    except Exception:  # noqa: BLE001
        pymilter = "?"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "machine": f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        "postfix": first_line(["postconf", "-h", "mail_version"]),
        "opendkim": first_line(["opendkim", "-V"]),
        "python": platform.python_version(),
        "pymilter / dkimpy / cryptography":
            f"{pymilter} / {getattr(dkim, '__version__', None) or version('dkimpy')} / {cryptography.__version__}",
    }


def report(setups: list[Setup], args, elapsed: float) -> str:
    base = setups[0]
    bwall, bcpu = med(r["wall"] for r in base.runs), med(r["cpu"] for r in base.runs)
    lines = [
        f"Load: `smtp-source -s {args.sessions} -m {args.messages}`, messages of {args.size} bytes to "
        f"{RCPT}, fanned out to {len(DESTS)} addresses ({args.messages * len(DESTS)} deliveries to "
        f"smtp-sink per run); {args.reps} interleaved runs per setup, medians. Private host Postfix "
        f"instance per setup (no container); milters on unix sockets.",
        "",
        "| setup | wall s | msgs/s | CPU s | wall vs baseline | paired wall vs baseline | CPU vs baseline "
        "| filter CPU ms/msg | peak PSS setup MiB | peak RSS filter MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in setups:
        wall = med(r["wall"] for r in s.runs)
        cpu = med(r["cpu"] for r in s.runs)
        walls = sorted(r["wall"] for r in s.runs)
        fc = med(r["filter_cpu"] for r in s.runs)
        fcpu = "-" if fc is None else f"{fc * 1000 / args.messages:.2f}"
        lines.append(
            f"| {s.title} | {wall:.2f} ({walls[0]:.2f}-{walls[-1]:.2f}) | {args.messages / wall:.0f} "
            f"| {'-' if cpu is None else f'{cpu:.2f}'} | {wall / bwall:.2f}x | {paired(s, base):.2f}x "
            f"| {'-' if cpu is None or not bcpu else f'{cpu / bcpu:.2f}x'} | {fcpu} "
            f"| {mib(max(r['rss'] for r in s.runs))} | {mib(med(r['filter_rss'] for r in s.runs))} |")
    lines += ["", "wall: smtp-source start until every copy is delivered (queue empty); range in brackets. "
              "CPU: all processes of the setup (Postfix and the filter; not smtp-source/smtp-sink). "
              "Peak PSS setup: summed proportional set size of those processes, sampled every 50 ms. "
              "Peak RSS filter: the milter process's VmHWM (reset before each run), median. "
              f"Run time of this benchmark: {elapsed:.0f} s.", ""]
    checked = sum(getattr(s, "checked", 0) for s in setups)
    verified = sum(getattr(s, "verified", 0) for s in setups)
    lines += [f"Checked in every run (warm-ups too): the sink received every copy, each with the right envelope "
              f"sender (SRS0=...@{SRS_DOMAIN} in the setups doing SRS, the original sender elsewhere): "
              f"{checked} messages in all; {verified} delivered messages sampled in the signing setups "
              f"had every DKIM signature verified.", ""]
    for k, v in versions().items():
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


# (ours, theirs, what; target for the paired median wall ratio or None)
HEAD_TO_HEAD = [
    ("rm-srs", "postsrsd", "routemilter routing + SRS / Postfix + postsrsd", 1.0),
    ("rm-rsa", "postsrsd-opendkim", "routemilter routing + SRS + DKIM RSA / Postfix + postsrsd + OpenDKIM", 0.8),
    ("rm-srs", "pymilter-floor", "routemilter routing + SRS / trivial pymilter milter (the floor)", None),
    ("postsrsd", "baseline", "Postfix + postsrsd / Postfix alone", None),
    ("pymilter-floor", "baseline", "trivial pymilter milter / Postfix alone", None),
    ("asyncio-floor", "pymilter-floor", "trivial asyncio milter / trivial pymilter milter", None),
    ("c-trivial", "postsrsd", "trivial C (libmilter) milter / Postfix + postsrsd", None),
    ("pymilter-floor", "postsrsd", "trivial pymilter milter / Postfix + postsrsd", None),
    ("c-trivial", "baseline", "trivial C (libmilter) milter / Postfix alone", None),
    ("c-trivial", "pymilter-floor", "trivial C (libmilter) milter / trivial pymilter milter", None),
    ("c-rmconv", "postsrsd", "C (libmilter) milter, routemilter's conversation / Postfix + postsrsd", None),
    ("rm-srs", "c-rmconv", "routemilter routing + SRS / C milter with its conversation", None),
    ("rm-srs", "rm-srs@before", "routemilter routing + SRS: this code / the --before code", None),
    ("rm-rsa", "rm-rsa@before", "routemilter routing + SRS + DKIM RSA: this code / the --before code", None),
]


def paired_stats(ours: Setup, theirs: Setup, key: str) -> tuple[float, float, float] | None:
    """Median, min and max over rounds of ours/theirs for one measure (wall or cpu)."""
    r = [a[key] / b[key] for a, b in zip(ours.runs, theirs.runs, strict=True) if a[key] and b[key]]
    return (statistics.median(r), min(r), max(r)) if r else None


def head_to_head(setups: list[Setup], messages: int) -> str:
    by = {s.key: s for s in setups}
    lines = ["Head to head, paired per round (each ratio from the two setups' runs in the same round; "
             "median over rounds, range in brackets):", "",
             "| comparison | wall | CPU |", "|---|---:|---:|"]
    for ours, theirs, what, _ in HEAD_TO_HEAD:
        if ours in by and theirs in by:
            cells = []
            for key in ("wall", "cpu"):
                st = paired_stats(by[ours], by[theirs], key)
                cells.append("-" if st is None else f"{st[0]:.2f}x ({st[1]:.2f}-{st[2]:.2f})")
            lines.append(f"| {what} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n" + floor_budget(by, messages)


def floor_budget(by: dict[str, Setup], messages: int) -> str:
    """What a compiled milter layer on libmilter leaves for everything else (routemilter's
    Python, the calls into it) before the setup costs what Postfix + postsrsd does: CPU per
    message of Postfix + postsrsd minus Postfix + the C milter, paired per round."""
    if "postsrsd" not in by:
        return ""
    lines = []
    for key, what in (("c-trivial", "the trivial conversation"), ("c-rmconv", "routemilter's conversation")):
        if key not in by:
            continue
        pairs = zip(by[key].runs, by["postsrsd"].runs, strict=True)
        diffs = sorted((b["cpu"] - a["cpu"]) * 1000 / messages for a, b in pairs if a["cpu"] and b["cpu"])
        if diffs:
            lines.append(f"- C libmilter milter with {what}: {statistics.median(diffs):.3f} ms "
                         f"({diffs[0]:.3f} to {diffs[-1]:.3f})")
    if not lines:
        return ""
    own = {k: med(r["filter_cpu"] for r in s.runs) for k, s in by.items() if s.filter}
    owns = ", ".join(f"{k} {v * 1000 / messages:.3f}" for k, v in own.items() if v is not None)
    return ("\nCPU per message left under a compiled milter layer for routemilter's Python before the setup "
            "costs what Postfix + postsrsd does (Postfix + postsrsd minus Postfix + the C milter, paired per "
            "round; median, range):\n\n" + "\n".join(lines) +
            f"\n\nMilter daemons' own CPU ms per message (medians): {owns}.\n")


def paired(setup: Setup, base: Setup) -> float:
    """Median over rounds of this setup's wall time / the baseline's in the same round:
    a round's runs are close in time, so slow drifts in the machine's load cancel out."""
    return statistics.median(r["wall"] / b["wall"] for r, b in zip(setup.runs, base.runs, strict=True))


def ratios(setups: list[Setup]) -> dict[str, float]:
    by = {s.key: med(r["wall"] for r in s.runs) for s in setups}
    return {k: v / by["baseline"] for k, v in by.items()}


def paired_ratios(setups: list[Setup]) -> dict[str, float]:
    return {s.key: paired(s, setups[0]) for s in setups}


def targets(setups: list[Setup]) -> str:
    r, rp = ratios(setups), paired_ratios(setups)
    by = {s.key: s for s in setups}
    cpus = {s.key: med(x["cpu"] for x in s.runs) for s in setups}
    out = []
    if "rm-srs" in r:
        srs = max(r["rm-srs"], rp["rm-srs"])  # met only if both ways of comparing say so
        verdict = "met" if srs <= 1.25 else f"NOT met, by {(srs / 1.25 - 1) * 100:.0f}%"
        cpu = (f"; its CPU is {cpus['rm-srs'] / cpus['baseline']:.2f}x the baseline's"
               if cpus.get("rm-srs") and cpus.get("baseline") else "")
        out.append(f"- routing + SRS: {r['rm-srs']:.2f}x baseline wall time (median of the rounds' ratios "
                   f"{rp['rm-srs']:.2f}x; target <= 1.25x): {verdict}{cpu}")
    if "rm-rsa" in r and "opendkim" in r:
        ours, theirs = r["rm-rsa"], r["opendkim"]
        worst = max(ours / theirs, rp["rm-rsa"] / rp["opendkim"])  # met only if both ways say so
        verdict = "met" if worst <= 1 else f"NOT met, by {(worst - 1) * 100:.0f}%"
        cpu = {k: med(x["cpu"] for x in by[k].runs) for k in ("rm-rsa", "opendkim")}
        fcpu = {k: med(x["filter_cpu"] for x in by[k].runs) for k in ("rm-rsa", "opendkim")}
        extra = ""
        if None not in cpu.values() and None not in fcpu.values():
            extra = (f"; CPU of the whole setup {cpu['rm-rsa'] / cpu['opendkim']:.2f}x OpenDKIM's, "
                     f"the filter process alone {fcpu['rm-rsa'] / fcpu['opendkim']:.2f}x")
        out.append(f"- routing + SRS + DKIM RSA-2048: {ours:.2f}x vs OpenDKIM {theirs:.2f}x wall (rounds' "
                   f"ratios: {rp['rm-rsa']:.2f}x vs {rp['opendkim']:.2f}x; target: no slower than OpenDKIM): "
                   f"{verdict}{extra}")
    for ours, theirs, what, target in HEAD_TO_HEAD:
        if target is None or ours not in by or theirs not in by:
            continue
        st = paired_stats(by[ours], by[theirs], "wall")
        cpu = paired_stats(by[ours], by[theirs], "cpu")
        verdict = "met" if st[0] <= target else f"NOT met, by {(st[0] / target - 1) * 100:.0f}%"
        out.append(f"- {what}: {st[0]:.2f}x wall, paired median ({st[1]:.2f}-{st[2]:.2f}; target <= "
                   f"{target:.1f}x): {verdict}" + (f"; CPU {cpu[0]:.2f}x" if cpu else ""))
    peaks = [max((x["filter_rss"] or 0) for x in s.runs) for s in setups if s.filter == "routemilter"]
    if peaks:
        out.append(f"- routemilter daemon peak RSS under this load: {max(peaks) / 2**20:.0f} MiB "
                   f"(target < 150 MB): {'met' if max(peaks) < 150e6 else 'NOT met'}")
    return "\n".join(out) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--quick", action="store_true", default=bool(os.environ.get("BENCH_QUICK")),
                   help="500 messages, 3 runs (also: environment BENCH_QUICK=1)")
    p.add_argument("--no-write", action="store_true", help="do not update bench/results.md")
    p.add_argument("--setups", default=",".join(s.key for s in SETUPS))
    p.add_argument("--before", metavar="DIR", help="also run each routemilter setup from the package source in "
                   "DIR (e.g. an older `git archive COMMIT milter` extracted), interleaved, for before/after")
    p.add_argument("--before-setups", metavar="KEYS", help="with --before: only these routemilter setups "
                   "(comma-separated keys; default all)")
    p.add_argument("--pyspy", metavar="DIR", help="profile each routemilter daemon with py-spy during the "
                   "measured runs; collapsed stacks to DIR/KEY.txt (py-spy options from $RMBENCH_PYSPY, default "
                   "'--rate 250 --gil': only the thread holding the GIL; summarize with bench/pyspy_top.py)")
    args = p.parse_args(argv)
    if args.quick:
        args.messages, args.reps = min(args.messages, 500), min(args.reps, 3)
    for tool in ("postfix", "smtp-source", "smtp-sink"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (install Debian's postfix package)")
    wanted = args.setups.split(",")
    setups = [s for s in SETUPS + EXTRA_SETUPS if s.key in wanted]
    if args.before:  # the same routemilter setups once more, run from the code in args.before
        for s in list(setups):
            if s.filter == "routemilter" and s.key in wanted and (
                    not args.before_setups or s.key in args.before_setups.split(",")):
                setups.append(dataclasses.replace(s, key=s.key + "@before", title=s.title + " [before]",
                                                  pythonpath=args.before, runs=[]))
    if setups[0].key != "baseline":
        raise SystemExit("the baseline setup is required")
    if not shutil.which("opendkim"):
        print("opendkim not installed: skipping that setup (apt-get install opendkim)", file=sys.stderr)
        setups = [s for s in setups if s.filter != "opendkim"]

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="rmbench-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    msgfile = work / "message.txt"
    message_file(msgfile, args.size)
    try:
        for s in setups:
            print(f"starting {s.key} ...", file=sys.stderr, flush=True)
            start_setup(s, work)
        for s in setups:  # warm-up: spawn Postfix's processes, load the milters
            run_load(s, min(200, args.messages), args.sessions, msgfile, record=False)
        spies = []
        if args.pyspy:
            os.makedirs(args.pyspy, exist_ok=True)
            for s in setups:
                if s.filter == "routemilter":
                    spies.append(subprocess.Popen(
                        [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(s.filter_pid),
                         "--format", "raw", *os.environ.get("RMBENCH_PYSPY", "--rate 250 --gil").split(),
                         *([] if "--native" in os.environ.get("RMBENCH_PYSPY", "") else ["--nonblocking"]),
                         "-o", f"{args.pyspy}/{s.key}.txt"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)
        for rep in range(args.reps):
            order = setups[rep % len(setups):] + setups[:rep % len(setups)]
            for s in order:
                run = run_load(s, args.messages, args.sessions, msgfile)
                print(f"  run {rep + 1}/{args.reps} {s.key:10s} wall {run['wall']:6.2f}s "
                      f"cpu {run['cpu'] or 0:6.2f}s filter cpu {run['filter_cpu'] or 0:6.2f}s",
                      file=sys.stderr, flush=True)
        for spy in spies:
            spy.send_signal(2)
            spy.wait(30)
    finally:
        for s in setups:
            stop_setup(s)
        if not os.environ.get("RMBENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    text = report(setups, args, time.monotonic() - started)
    text += "\n" + head_to_head(setups, args.messages)
    text += "\nTargets:\n\n" + targets(setups)
    FAILED[:] = [line[2:] for line in targets(setups).splitlines() if "NOT met" in line]
    if not args.no_write:
        write_section("mta_bench", "Postfix end to end: baseline, OpenDKIM, routemilter", text)
    return text


if __name__ == "__main__":
    print(main())
