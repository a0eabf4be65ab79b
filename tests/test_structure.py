"""The package's shape: no import cycle, and the auth: libraries loaded only with auth:
(checked on the real daemon process), or named clearly when the `auth` extra is missing."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mtaclient import REPO, stopped_cleanly
from routemilter.signing import generate_key
from testkit import ROUTE_ME

PACKAGE = REPO / "milter" / "routemilter"
ROUTEMILTER = [sys.executable, "-m", "routemilter"]
# authres is not among them: dkimpy imports it itself whenever it is installed (its ARC
# code needs it, so the `auth` extra installs it), whether or not we use ARC.
AUTH_ONLY = {"spf", "dmarc", "routemilter.authcheck", "routemilter.authresults", "routemilter.dnsresolve",
             "routemilter.arc"}


# ------------------------------------------------------------ import graph


def _type_checking_block(node: ast.stmt) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.ImportFrom]:
    """Relative imports run when the module loads: top level, and inside module-level
    if/try blocks, but not under `if TYPE_CHECKING:` nor inside functions or classes."""
    found: list[ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append(node)
        elif isinstance(node, ast.If) and not _type_checking_block(node):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, ast.With):
            pending += node.body
    return found


def _module_name(path: Path) -> str:
    """`signing`, `config` (config/__init__.py), `config.model`."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports when it loads (importing `config.model`
    loads the package `config` first, so that counts as an import of both)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            base = package.split(".") if package else []
            base = base[:len(base) - (node.level - 1)]
            assert node.level - 1 <= len(package.split(".") if package else []), \
                f"{path}: import from outside the package: {ast.unparse(node)}"
            target = ".".join(base + (node.module.split(".") if node.module else []))
            targets = {f"{target}.{alias.name}".lstrip(".") for alias in node.names} & modules
            if target:
                targets.add(target)
            for found in targets:  # a submodule loads its packages first
                parts = found.split(".")
                edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        # A submodule's own packages are loaded before it, whatever it imports: not a cycle.
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        graph[name] = (edges & modules) - own
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_module_level_imports_only():
    tree = ast.parse("from . import a, b\nfrom .c import x\nif TYPE_CHECKING:\n    from .d import y\n"
                     "try:\n    from .e import z\nexcept ImportError:\n    pass\ndef f():\n    from .g import w\n")
    assert sorted(ast.unparse(n) for n in _module_level_imports(tree)) == [
        "from . import a, b", "from .c import x", "from .e import z"]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert graph["session"] and graph["authcheck"]  # the graph is not empty by mistake
    assert "authconfig" in graph["config"] and "config.model" in graph["config"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


# -------------------------------------------------- what the daemon loads

CONFIG = """
milter:
  socket: unix:{dir}/rm.sock
server_name: mx.family.test
{dkim}
{auth}
""" + ROUTE_ME.replace("{", "{{").replace("}", "}}")
DKIM = "dkim:\n  domain: family.test\n  keys:\n    - selector: s1\n      key: {dir}/s1.key"
AUTH = "auth:\n  dns_server: 127.0.0.1:53\n  arc: true"


def config(tmp_path: Path, dkim: bool, auth: bool) -> Path:
    if dkim and not (tmp_path / "s1.key").exists():
        generate_key("rsa", str(tmp_path / "s1.key"))
    path = tmp_path / "rm.yaml"
    path.write_text(CONFIG.format(dir=tmp_path, dkim=DKIM.format(dir=tmp_path) if dkim else "",
                                  auth=AUTH if auth else ""))
    return path


def daemon_imports(tmp_path: Path, cfg: Path) -> set[str]:
    """The modules the real daemon has imported once it is up (READY=1 to systemd)."""
    notify_path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(60)
    errors = tmp_path / "stderr"
    with open(errors, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "routemilter", "-c", str(cfg), "run"],
                                cwd=REPO, env=dict(os.environ, NOTIFY_SOCKET=notify_path),
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        assert "READY=1" in listener.recv(4096).decode()
        proc.terminate()
        assert stopped_cleanly(proc.wait(30)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        listener.close()
    imported = set()
    for line in errors.read_text().splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            imported.add(line.rsplit("|", 1)[1].strip())
    assert {"routemilter.policy", "routemilter.session"} <= imported, errors.read_text()[-2000:]
    return imported


def test_daemon_without_auth_loads_no_auth_library(tmp_path):
    imported = daemon_imports(tmp_path, config(tmp_path, dkim=True, auth=False))
    assert "routemilter.signing" in imported and "dkim" in imported
    assert not imported & AUTH_ONLY, imported & AUTH_ONLY
    # The Public Suffix List is DKIM's too: signpolicy.py asks it whether a From is aligned.
    assert "publicsuffixlist" in imported


def test_daemon_without_auth_or_dkim_loads_no_public_suffix_list(tmp_path):
    imported = daemon_imports(tmp_path, config(tmp_path, dkim=False, auth=False))
    assert not imported & (AUTH_ONLY | {"publicsuffixlist"}), imported & (AUTH_ONLY | {"publicsuffixlist"})


def test_daemon_with_auth_loads_its_libraries(tmp_path):
    imported = daemon_imports(tmp_path, config(tmp_path, dkim=True, auth=True))
    assert AUTH_ONLY | {"publicsuffixlist", "authres"} <= imported, AUTH_ONLY - imported


# ------------------------------------------------- the auth extra missing

WITHOUT_SPF = "import runpy, sys; sys.modules['spf'] = None; runpy.run_module('routemilter', run_name='__main__')"


@pytest.mark.parametrize("command", ["check", "run"])
def test_auth_without_the_extra_is_one_clear_error(tmp_path, command):
    cfg = config(tmp_path, dkim=True, auth=True)
    line = cfg.read_text().splitlines().index("auth:") + 1
    result = subprocess.run([sys.executable, "-c", WITHOUT_SPF, "-c", str(cfg), command], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    named = [text for text in result.stderr.splitlines() if "'auth' extra" in text]
    assert len(named) == 1, result.stderr
    assert f"{cfg}:{line}:" in named[0] and "no module spf" in named[0] and "routemilter[auth]" in named[0]
    assert not (tmp_path / "rm.sock").exists()


#: The DKIM, ARC and auth: modules (issue #14 gave their glue one module, dkimcore.py).
SIGNING_AND_AUTH = {"dkimcore", "signing", "arc", "authcheck", "authresults", "authreplies", "dnsresolve",
                    "authconfig", "signpolicy", "fromrewrite", "headers"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_names_used_across_modules() -> list[str]:
    """`from .x import _name` and `x._name` (x a package module), where either side is one of
    SIGNING_AND_AUTH (other modules are being split by others at the same time)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        local_modules = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                for alias in node.names:
                    if node.module is None and alias.name in modules:
                        local_modules[alias.asname or alias.name] = alias.name
                    elif _private(alias.name) and {path.stem, node.module} & SIGNING_AND_AUTH:
                        found.append(f"{path.name}:{node.lineno}: from .{node.module} import {alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in local_modules and _private(node.attr)
                    and {path.stem, local_modules[node.value.id]} & SIGNING_AND_AUTH):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    assert private_names_used_across_modules() == []


def test_the_dkimpy_glue_never_imports_the_auth_checks():
    """Not even inside a function: arc.py and authcheck.py once imported each other that way."""
    for name in ("dkimcore", "signing", "arc", "headers"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
        assert not imported & {"authcheck", "authresults"}, name
