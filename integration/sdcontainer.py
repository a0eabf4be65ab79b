"""A Debian 12 container that boots systemd as PID 1 (for the package test).

Built once with debootstrap and `podman import`, cached under IMAGE like the
Postfix image (pfcontainer.py). Everything the installed package needs at run
time is in the image: no Python package or Debian package is fetched while a
test runs (containers here have no route to a registry).

Booted as ../shared/ENVIRONMENT.md says: runc, cgroupfs, SYS_ADMIN (without it
systemd silently skips the units' mount sandboxing), the default bridge network
(not the host's: its Postfix would take the host's port 25).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time

import pfcontainer

# Bump the tag when the recipe changes, so caches rebuild.
IMAGE = os.environ.get("ROUTEMILTER_SD_IMAGE", "localhost/routemilter-it-systemd:bookworm-1")
PACKAGES = ("systemd,systemd-sysv,dbus,postfix,libmilter1.0.1,python3,python3-venv,"
            "ca-certificates,procps")
LOCK = "/var/tmp/routemilter-sd-image.lock"


def usable() -> str | None:
    """None when the test can run here, else the reason it cannot."""
    if not (shutil.which("podman") and shutil.which("runc")):
        return "podman and runc are needed to boot systemd in a container"
    if not pfcontainer.works():
        return "podman cannot run containers on this machine (podman info failed)"
    if not pfcontainer.image_exists(IMAGE) and not shutil.which("debootstrap"):
        return f"image {IMAGE} is missing and debootstrap is not installed to build it"
    return None


def ensure_image(log=print) -> float:
    """Build the image unless it exists. Returns build seconds (0 if cached)."""
    if pfcontainer.image_exists(IMAGE):
        return 0.0
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if pfcontainer.image_exists(IMAGE):
            return 0.0
        t0 = time.monotonic()
        rootfs = tempfile.mkdtemp(prefix="rmsd-rootfs-", dir="/var/tmp")
        try:
            log(f"building {IMAGE} with debootstrap (once; 1-3 minutes)")
            # Postfix asks what kind of site it is; "No configuration" leaves main.cf to us.
            subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}",
                            "bookworm", rootfs, pfcontainer.debian_mirror()],
                           capture_output=True, text=True, timeout=1800, check=True)
            # debootstrap wrote the build machine's name into main.cf: let Postfix
            # use the container's own hostname.
            main_cf = os.path.join(rootfs, "etc/postfix/main.cf")
            if os.path.exists(main_cf):
                with open(main_cf) as f:
                    lines = [x for x in f if not x.startswith("myhostname")]
                with open(main_cf, "w") as f:
                    f.writelines(lines)
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(pfcontainer.cmd("import", "-", IMAGE), stdin=tar.stdout,
                           capture_output=True, timeout=600, check=True)
            tar.stdout.close()
            if tar.wait(timeout=60) != 0:
                raise RuntimeError("tar of the debootstrap rootfs failed")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"image build failed: {e.cmd}\n{e.stdout}\n{e.stderr}") from e
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        return time.monotonic() - t0


class Machine:
    """One booted container: `sh()` runs a shell script in it as root."""

    def __init__(self, name: str):
        self.name = name

    def boot(self, timeout: float = 90) -> float:
        pfcontainer.run("rm", "-f", "--ignore", self.name, check=False)
        t0 = time.monotonic()
        pfcontainer.run("run", "-d", "--name", self.name, "--hostname", "mx.routemilter.test",
                        "--systemd=always", "--cap-add", "SYS_ADMIN",
                        "--label", f"routemilter-it.pid={os.getpid()}", IMAGE, "/sbin/init")
        return self._wait_running(t0, timeout)

    def reboot(self, timeout: float = 90) -> float:
        t0 = time.monotonic()
        pfcontainer.run("restart", "-t", "10", self.name, timeout=120)
        return self._wait_running(t0, timeout)

    def _wait_running(self, t0: float, timeout: float) -> float:
        deadline = t0 + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return time.monotonic() - t0
            time.sleep(0.3)
        raise RuntimeError(f"systemd did not come up in {timeout}s (state {state!r})")

    def sh(self, script: str, check: bool = True, timeout: float = 120,
           answer: str | None = None) -> subprocess.CompletedProcess:
        """`answer`: what the admin types at the command's prompts (stdin)."""
        interactive = ["-i"] if answer is not None else []
        r = subprocess.run(pfcontainer.cmd("exec", *interactive, self.name, "sh", "-c", script),
                           input=answer, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"in {self.name}: {script!r} exited {r.returncode}\n"
                                 f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
        return r

    def copy_in(self, src: str, dest: str) -> None:
        pfcontainer.run("cp", src, f"{self.name}:{dest}")

    def remove(self) -> None:
        pfcontainer.run("rm", "-f", "-t", "5", "--ignore", self.name, timeout=120, check=False)
