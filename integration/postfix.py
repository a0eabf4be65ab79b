"""A real Postfix 3.7 for integration tests, in a podman container or on the host.

Both modes share one layout under `workdir` (which the container sees at the
same path, so every path in main.cf is valid in both):
    conf/       main.cf, master.cf, maps        (postfix -c conf)
    maillog     Postfix's log (maillog_file on the host, container stdout)
    queue/ data/  queue and data directories (host mode only)

Mode: ROUTEMILTER_IT_MODE=container|host; default container when podman works.
"""
import atexit
import fcntl
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid

import pfcontainer
from mtabase import MTAInstance

MODES = ("container", "host")
DEFAULT_MAIN_CF = "/etc/postfix/main.cf"
MAIN_CF_LOCK = "/var/tmp/routemilter-it-main-cf.lock"
# Map names with a well-known main.cf parameter; other maps are only postmap'd.
MAP_PARAMS = {"transport": "transport_maps", "virtual": "virtual_alias_maps",
              "canonical": "canonical_maps", "relocated": "relocated_maps",
              "generic": "smtp_generic_maps",
              "sender_canonical": "sender_canonical_maps",
              "recipient_canonical": "recipient_canonical_maps"}

# chroot column is n everywhere: a chrooted cleanup cannot reach a milter
# socket outside the queue directory (see MAIL-FACTS.md).
MASTER_CF = """\
{smtpd_listen} inet n - n - - smtpd
pickup    unix  n - n 60   1 pickup
cleanup   unix  n - n -    0 cleanup
qmgr      unix  n - n 300  1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -    - trivial-rewrite
bounce    unix  - - n -    0 bounce
defer     unix  - - n -    0 bounce
trace     unix  - - n -    0 bounce
verify    unix  - - n -    1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -    - proxymap
proxywrite unix - - n -    1 proxymap
smtp      unix  - - n -    - smtp
relay     unix  - - n -    - smtp
  -o syslog_name=postfix/$service_name
showq     unix  n - n -    - showq
error     unix  - - n -    - error
retry     unix  - - n -    - error
discard   unix  - - n -    - discard
local     unix  - n n -    - local
virtual   unix  - n n -    - virtual
lmtp      unix  - - n -    - lmtp
anvil     unix  - - n -    1 anvil
scache    unix  - - n -    1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def default_mode() -> str:
    mode = os.environ.get("ROUTEMILTER_IT_MODE", "").strip()
    if mode:
        if mode not in MODES:
            raise ValueError(f"ROUTEMILTER_IT_MODE={mode!r}; expected one of {MODES}")
        return mode
    return "container" if pfcontainer.works() else "host"


def nexthop(target) -> str:
    """smtp:[host]:port for a FakeMX or a "host:port" string."""
    if hasattr(target, "host"):
        return f"smtp:[{target.host}]:{target.port}"
    host, port = target.rsplit(":", 1)
    return f"smtp:[{host}]:{port}"


def _run(args, timeout=60, check=True, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          check=check, **kw)


def _check_traversable(path):
    # Postfix daemons run as the postfix user; every ancestor needs o+x
    # (pytest's tmp_path lives under a 0700 folder and cannot be used).
    p = os.path.abspath(path)
    while p != "/":
        if not os.stat(p).st_mode & 0o001:
            raise ValueError(f"{p} is not searchable by the postfix user; put the "
                             f"workdir under a world-searchable folder (e.g. /var/tmp)")
        p = os.path.dirname(p)


class Postfix(MTAInstance):
    name = "Postfix"

    def __init__(self, workdir, smtpd_port: int, milter_socket: str | None = None,
                 non_smtpd_milter: bool = True, main_extra: dict | None = None,
                 master_extra: str = "", maps: dict[str, str] | None = None,
                 routes: dict | None = None, relayhost: str | None = None,
                 mode: str | None = None, hostname: str = "mta.routemilter.test",
                 public_dir: str | None = None):
        """routes: {domain: FakeMX or "host:port"} become transport map entries;
        maps: {name: text}, written to conf/name and postmap'd (entries of
        maps["transport"] are added after the routes); main_extra overrides any
        main.cf key (None removes a key); master_extra is appended to master.cf;
        public_dir: a host folder that is Postfix's public/ (container: bind-mounted; host:
        the queue's public/ links to it), so master.cf `unix` services with the private
        column n (routemilter's re-injection smtpd) are reachable from the host. Postfix's
        own permissions apply: postfix:postdrop, mode 2710."""
        self.mode = mode or default_mode()
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}; expected one of {MODES}")
        self.workdir = os.path.abspath(str(workdir))
        self.port = smtpd_port
        self.milter_socket = milter_socket
        self.conf = os.path.join(self.workdir, "conf")
        self.maillog = os.path.join(self.workdir, "maillog")
        self.master_extra = master_extra
        self.maps = dict(maps or {})
        if routes:
            lines = "".join(f"{d} {nexthop(t)}\n" for d, t in routes.items())
            self.maps["transport"] = lines + self.maps.get("transport", "")
        self.main = self._base_main(hostname, relayhost, non_smtpd_milter)
        for k, v in (main_extra or {}).items():
            if v is None:
                self.main.pop(k, None)
            else:
                self.main[k] = v
        self.public_dir = public_dir
        self.container = None          # container name while running
        self._proc = None              # `podman run` process (container mode)
        self.image_build_seconds = 0.0
        self.start_seconds = None

    # --- configuration -------------------------------------------------
    def _base_main(self, hostname, relayhost, non_smtpd_milter) -> dict:
        host = self.mode == "host"
        m = {
            "compatibility_level": "3.6",
            "queue_directory": f"{self.workdir}/queue" if host else "/var/spool/postfix",
            "data_directory": f"{self.workdir}/data" if host else "/var/lib/postfix",
            "maillog_file": self.maillog if host else "/dev/stdout",
            "maillog_file_prefixes": self.workdir if host else "/dev/stdout",
            "myhostname": hostname, "mydomain": "routemilter.test",
            "myorigin": "$myhostname", "mail_name": "Postfix-routemilter-it",
            "mydestination": "", "local_recipient_maps": "", "alias_maps": "",
            "alias_database": "", "relay_domains": "",
            "mynetworks": "127.0.0.0/8", "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            # No DNS: every next hop is an explicit [127.0.0.x]:port.
            "smtp_dns_support_level": "disabled",
            "default_transport": "smtp" if relayhost
                                 else "error:5.1.2 no test route for this domain",
            "relayhost": relayhost or "",
            "milter_default_action": "tempfail", "milter_protocol": "6",
            "internal_mail_filter_classes": "bounce",
            "milter_connect_timeout": "10s",
            # Fast retries so deferred mail is retried within a test.
            "queue_run_delay": "1s", "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s", "maximal_queue_lifetime": "60s",
            "bounce_queue_lifetime": "60s",
            "smtp_connect_timeout": "2s", "smtp_helo_timeout": "5s",
            "smtp_mail_timeout": "5s", "smtp_rcpt_timeout": "5s",
            "smtp_data_init_timeout": "5s", "smtp_data_xfer_timeout": "30s",
            "smtp_data_done_timeout": "30s", "smtp_quit_timeout": "5s",
            "smtpd_error_sleep_time": "0", "in_flow_delay": "0",
            "smtp_tls_security_level": "none", "smtpd_tls_security_level": "none",
            "smtputf8_enable": "yes", "message_size_limit": "104857600",
            "biff": "no", "append_dot_mydomain": "no",
        }
        if self.milter_socket:
            m["smtpd_milters"] = f"unix:{self.milter_socket}"
            if non_smtpd_milter:
                m["non_smtpd_milters"] = f"unix:{self.milter_socket}"
        return m

    def map_ref(self, name) -> str:
        return f"hash:{self.conf}/{name}"

    def write_config(self):
        os.makedirs(self.conf, exist_ok=True)
        main = dict(self.main)
        for name in self.maps:
            if name in MAP_PARAMS and MAP_PARAMS[name] not in main:
                main[MAP_PARAMS[name]] = self.map_ref(name)
        _write(f"{self.conf}/main.cf", "".join(f"{k} = {v}\n" for k, v in main.items()))
        _write(f"{self.conf}/master.cf",
               MASTER_CF.format(smtpd_listen=f"127.0.0.1:{self.port}")
               + self.master_extra + "\n")
        for name, text in self.maps.items():
            self.set_map(name, text, reload=False)

    def set_map(self, name, text, reload=True):
        """(Re)write and postmap conf/name; reload a running Postfix if asked."""
        self.maps[name] = text
        _write(f"{self.conf}/{name}", text)
        # Host postmap is fine for the container too: both are bookworm's libdb5.3.
        _run(["postmap", "-c", self.conf, self.map_ref(name)])
        if reload and self.running:
            self.reload()

    def set_main(self, reload=True, **params):
        """Change main.cf keys (None removes) and reload a running Postfix."""
        for k, v in params.items():
            if v is None:
                self.main.pop(k, None)
            else:
                self.main[k] = v
        self.write_config()
        if reload and self.running:
            self.reload()

    # --- lifecycle -------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.start_seconds is not None

    def start(self, timeout=60.0):
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        _check_traversable(self.workdir)
        if self.milter_socket:
            _check_traversable(os.path.dirname(self.milter_socket))
        self.write_config()
        open(self.maillog, "a").close()
        t0 = time.monotonic()
        atexit.register(self.stop)
        try:
            if self.mode == "host":
                self._start_host()
            else:
                self._start_container()
            self._wait_banner(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _start_host(self):
        q, d = f"{self.workdir}/queue", f"{self.workdir}/data"
        os.makedirs(q, exist_ok=True)
        os.makedirs(d, exist_ok=True)
        if self.public_dir:
            os.makedirs(self.public_dir, exist_ok=True)
            shutil.chown(self.public_dir, "postfix", "postdrop")
            os.chmod(self.public_dir, 0o2710)
            if not os.path.lexists(f"{q}/public"):
                os.symlink(self.public_dir, f"{q}/public")
        shutil.chown(d, "postfix", "postfix")
        os.chmod(d, 0o700)
        _alternate_config_dir(self.conf, add=True)
        # `postfix start` prints its fatal errors only to a tty (or syslog).
        r = _run(["script", "-qec", f"postfix -c {shlex.quote(self.conf)} start",
                  "/dev/null"], timeout=60, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed ({r.returncode}):\n{r.stdout}"
                               f"{r.stderr}\n{self.log_tail()}")

    def _start_container(self):
        if not pfcontainer.works():
            raise RuntimeError("container mode requested but podman does not work here")
        self.image_build_seconds = pfcontainer.ensure_image()
        _remove_stale_containers()
        # The container's own /etc/postfix/main.cf only authorizes `-c conf`.
        default_cf = f"{self.workdir}/default-main.cf"
        _write(default_cf, f"compatibility_level = 3.6\n"
                           f"alternate_config_directories = {self.conf}\n")
        mounts = ["-v", f"{self.workdir}:{self.workdir}",
                  "-v", f"{default_cf}:{DEFAULT_MAIN_CF}:ro"]
        if self.milter_socket:
            sockdir = os.path.dirname(os.path.abspath(self.milter_socket))
            if not (sockdir + "/").startswith(self.workdir + "/"):
                mounts += ["-v", f"{sockdir}:{sockdir}"]
        command = ["postfix", "-c", self.conf, "start-fg"]
        if self.public_dir:
            os.makedirs(self.public_dir, exist_ok=True)
            mounts += ["-v", f"{self.public_dir}:/var/spool/postfix/public"]
            # The container's postfix and postdrop ids, as Postfix's own set-permissions would.
            command = ["sh", "-c", "chown postfix:postdrop /var/spool/postfix/public && "
                       "chmod 2710 /var/spool/postfix/public && exec " + shlex.join(command)]
        self.container = f"routemilter-it-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(self.maillog, "ab") as log:  # the container keeps its own copy of the descriptor
            self._proc = subprocess.Popen(
                pfcontainer.cmd("run", "--rm", "--name", self.container, "--network=host",
                                "--label", f"routemilter-it.pid={os.getpid()}", *mounts,
                                pfcontainer.IMAGE, *command),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self):
        """Stop Postfix and remove what start() created. Safe to call repeatedly."""
        atexit.unregister(self.stop)
        try:
            if self.mode == "host":
                self._stop_host()
            else:
                self._stop_container()
        finally:
            self.start_seconds = None

    def _stop_host(self):
        pid = self._master_pid()
        if pid:
            # `postfix stop` waits up to 5 s, then kills the process group.
            _run(["postfix", "-c", self.conf, "stop"], timeout=30, check=False)
            if _alive(pid):
                os.kill(pid, 9)
        if os.path.exists(self.conf):
            _alternate_config_dir(self.conf, add=False)

    def _master_pid(self):
        try:
            with open(f"{self.workdir}/queue/pid/master.pid") as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _stop_container(self):
        if self.container:
            pfcontainer.run("stop", "-t", "5", self.container, timeout=60, check=False)
            pfcontainer.run("rm", "-f", "--ignore", self.container, timeout=60, check=False)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self.container = self._proc = None

    # --- running commands in the right place --------------------------------
    def exec(self, *args, timeout=60, check=True, input=None) -> subprocess.CompletedProcess:
        """Run a Postfix command against this instance (inside the container in
        container mode), e.g. exec("postqueue", "-p"); `-c conf` is added."""
        # sendmail spells the config option -C; the other commands -c.
        args = [args[0], "-C" if args[0] == "sendmail" else "-c", self.conf, *args[1:]]
        if self.mode == "container" and self.container:
            args = pfcontainer.cmd("exec", "-i", self.container, *args)
        return subprocess.run(args, capture_output=True, timeout=timeout, check=check,
                              input=input, text=not isinstance(input, bytes))

    def postconf(self, *args) -> str:
        """postconf -c conf ARGS; e.g. postconf("-h", "smtpd_milters")."""
        return self.exec("postconf", *args).stdout

    def reload(self):
        self.exec("postfix", "reload")

    def flush(self):
        """Ask Postfix to retry deferred mail now."""
        self.exec("postqueue", "-f")

    def queue(self) -> str:
        return self.exec("postqueue", "-p", check=False).stdout

    def wait_queue_empty(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            out = self.queue()
            if "Mail queue is empty" in out:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not empty after {timeout}s:\n{out}\n"
                                   f"{self.log_tail()}")
            time.sleep(0.3)

    # --- SMTP and log ------------------------------------------------------
    def sendmail(self, mail_from, rcpt_tos, data: bytes) -> subprocess.CompletedProcess:
        """Submit through sendmail/pickup: the non-SMTP path (non_smtpd_milters)."""
        return self.exec("sendmail", "-i", "-f", mail_from, "--", *rcpt_tos, input=data)

    def queue_ids_from_log(self) -> list[str]:
        """Queue ids in order of first appearance."""
        ids = re.findall(r"postfix/\S+\[\d+\]: ([0-9A-F]{6,}|[0-9A-Za-z]{12,}): ",
                         self.log_text())
        return list(dict.fromkeys(ids))

    def deliveries(self) -> list[dict]:
        """Parsed `to=<..>, relay=.., status=..` log lines, in order."""
        pat = re.compile(r": (?P<qid>\w+): to=<(?P<to>[^>]*)>,(?: orig_to=<(?P<orig_to>[^>]*)>,)?"
                         r" relay=(?P<relay>[^,]+),.* status=(?P<status>\w+) (?P<text>.*)")
        return [m.groupdict() for m in pat.finditer(self.log_text())]


def _write(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _alternate_config_dir(confdir, add: bool):
    """Add/remove confdir in the host's alternate_config_directories, which
    `postfix -c` requires. Locked: parallel sessions share that file."""
    with open(MAIN_CF_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(DEFAULT_MAIN_CF):
            shutil.copy("/etc/postfix/main.cf.proto", DEFAULT_MAIN_CF)
        cur = _run(["postconf", "-h", "alternate_config_directories"]).stdout
        dirs = [d for d in re.split(r"[\s,]+", cur) if d and d != confdir]
        if add:
            dirs.append(confdir)
        _run(["postconf", "-e", f"alternate_config_directories = {' '.join(dirs)}"])


def _remove_stale_containers():
    """Remove harness containers whose creating process is gone (e.g. killed run)."""
    r = pfcontainer.run("ps", "-a", "--filter", "label=routemilter-it.pid",
                        "--format", '{{.Names}} {{index .Labels "routemilter-it.pid"}}',
                        check=False)
    for line in r.stdout.splitlines():
        name, _, pid = line.partition(" ")
        if pid.isdigit() and not _alive(int(pid)):
            pfcontainer.run("rm", "-f", "--ignore", name, check=False)
