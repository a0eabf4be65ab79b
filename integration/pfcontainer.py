"""Podman plumbing for the containerized Postfix: host settings, image cache.

No registry is reachable on the CI machines, so the image is built once with
debootstrap from the Debian mirror apt already uses, then `podman import`ed.
With a registry, `podman build -f integration/Containerfile -t IMAGE .` makes an
equivalent image; set ROUTEMILTER_IT_IMAGE to use it.
"""
import fcntl
import os
import shutil
import subprocess
import tempfile
import time

# Bump the tag when the recipe below changes, so caches rebuild.
# dovecot-core: its auth service gives the SASL tests (test_sendas.py) real logins.
IMAGE = os.environ.get("ROUTEMILTER_IT_IMAGE", "localhost/routemilter-it-postfix:bookworm-2")
CONTAINERS_CONF = "/etc/containers/containers.conf"
# crun fails on this host's hybrid cgroups; systemd cgroup manager is absent.
GLOBAL_ARGS = ["--runtime", "runc", "--cgroup-manager=cgroupfs"]
LOCK = "/var/tmp/routemilter-it-image.lock"


def cmd(*args):
    return ["podman", *GLOBAL_ARGS, *args]


def run(*args, timeout=120, check=True):
    return subprocess.run(cmd(*args), capture_output=True, text=True,
                          timeout=timeout, check=check)


def ensure_containers_conf():
    # Without this, podman's default ulimits make runc's setrlimit fail here.
    if not os.path.exists(CONTAINERS_CONF):
        os.makedirs(os.path.dirname(CONTAINERS_CONF), exist_ok=True)
        with open(CONTAINERS_CONF, "w") as f:
            f.write("[containers]\ndefault_ulimits = []\n")


_works = None


def works():
    """True when podman can run containers here (cached per process)."""
    global _works
    if _works is None:
        _works = False
        if shutil.which("podman") and shutil.which("runc"):
            ensure_containers_conf()
            try:
                _works = run("info", timeout=60, check=False).returncode == 0
            except subprocess.TimeoutExpired:
                pass
        if _works and not image_exists() and not shutil.which("debootstrap"):
            _works = False
    return _works


def image_exists(image=IMAGE):
    return run("image", "exists", image, check=False).returncode == 0


def debian_mirror():
    with open("/etc/apt/sources.list.d/debian.sources") as f:
        for line in f:
            if line.startswith("URIs:"):
                return line.split()[1]
    raise RuntimeError("no URIs: line in /etc/apt/sources.list.d/debian.sources")


def ensure_image(image=IMAGE, log=print):
    """Build the Postfix image unless it exists. Returns build seconds (0 if cached)."""
    if image_exists(image):
        return 0.0
    # Serialize concurrent builds (parallel test sessions on one machine).
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image_exists(image):
            return 0.0
        t0 = time.monotonic()
        rootfs = tempfile.mkdtemp(prefix="rmit-rootfs-", dir="/var/tmp")
        try:
            log(f"building {image} with debootstrap (once; ~40 s)")
            subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=postfix,ca-certificates,dovecot-core",
                 "bookworm", rootfs, debian_mirror()],
                capture_output=True, text=True, timeout=900, check=True)
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(cmd("import", "-", image), stdin=tar.stdout,
                           capture_output=True, timeout=600, check=True)
            tar.stdout.close()
            if tar.wait(timeout=60) != 0:
                raise RuntimeError("tar of the debootstrap rootfs failed")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"image build failed: {e.cmd}\n{e.stdout}\n{e.stderr}") from e
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        return time.monotonic() - t0
