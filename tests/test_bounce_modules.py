"""The bounce code's modules: one job each, and the milter's RCPT path loads only the token codec."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import routemilter

PACKAGE = pathlib.Path(routemilter.__file__).parent
BOUNCE_MODULES = {"tokens", "stamps", "dsn", "reinject", "bounces", "bounceserver", "deferrals"}


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after `statement`."""
    code = f"{statement}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_the_milter_checks_tokens_without_the_bounce_server():
    loaded = loaded_after("import routemilter.session")  # the pymilter glue and transaction.py
    assert "routemilter.transaction" in loaded
    assert "routemilter.tokens" in loaded  # what RCPT needs to check a bounce token
    assert "routemilter.stamps" in loaded  # what the forward needs to stamp its trace header
    heavy = {"aiosmtpd", "smtplib", "routemilter.bounces", "routemilter.bounceserver", "routemilter.dsn",
             "routemilter.reinject", "routemilter.deferrals"}
    assert heavy & loaded == set()


def test_the_bounce_server_loads_what_it_serves_with():
    loaded = loaded_after("import routemilter.bounceserver")
    assert {"aiosmtpd", "routemilter.bounces", "routemilter.dsn", "routemilter.reinject"} <= loaded


def _sources(module: str) -> list[pathlib.Path]:
    """A top-level module of the package: a file, or every file of a subpackage (one node)."""
    path = PACKAGE / f"{module}.py"
    return [path] if path.exists() else sorted((PACKAGE / module).glob("*.py"))


def _imports(module: str) -> set[str]:
    """The package modules `module` imports when it is loaded (not under TYPE_CHECKING, not in a function)."""
    found: set[str] = set()
    for source in _sources(module):
        top = 1 if source.parent == PACKAGE else 2  # the level of `from . import` that names the package
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == top:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
    return {name for name in found if _sources(name)} - {module}


def test_no_import_cycle_through_the_bounce_modules():
    modules = [p.stem for p in PACKAGE.glob("*.py")] + [p.parent.name for p in PACKAGE.glob("*/__init__.py")]
    graph = {name: _imports(name) for name in modules}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            here = todo.pop()
            for nxt in graph.get(here, ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    assert [m for m in sorted(BOUNCE_MODULES) if reaches(m, m)] == []
    assert not reaches("tokens", "bounces") and not reaches("stamps", "deferrals")
