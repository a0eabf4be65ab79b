"""YAML with line numbers, and the collector of config problems.

Every mapping and list the loader builds remembers its line and the line of each
key, so a problem anywhere can be reported as 'file:line: reason'. The Checker
collects those problems instead of raising, so `routemilter check` lists
everything wrong at once; its helpers check the value kinds every section uses.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from ..addresses import AddressError, parse_domain
from .model import DEFAULT_FALLBACK_AFTER, MAX_FALLBACK_AFTER, ConfigError

_DURATION = re.compile(r"^(\d{1,7})([smhd]?)$")


class _Node:
    """Mixin recording where a YAML mapping or sequence started."""

    line: int
    key_lines: dict[Any, int]


class Map(dict[Any, Any], _Node):
    pass


class Seq(list[Any], _Node):
    pass


_LIBYAML = hasattr(yaml, "CSafeLoader")
_Base: type[yaml.SafeLoader] = yaml.CSafeLoader if _LIBYAML else yaml.SafeLoader  # type: ignore[assignment]


class _Loader(_Base):  # type: ignore[valid-type,misc]
    """libyaml's parser when PyYAML has it (several times faster on big alias
    tables), the pure-Python one otherwise; the same nodes and marks either way."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Map:
    result = Map()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.MarkedYAMLError(problem="unhashable key", problem_mark=key_node.start_mark)
        if key in result:
            raise yaml.MarkedYAMLError(
                problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> Seq:
    result = Seq(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.key_lines = {i: child.start_mark.line + 1 for i, child in enumerate(node.value)}
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def parse_yaml(text: str, path: str) -> Any:
    """The YAML document of `text`, with line numbers; ConfigError on a syntax error."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else 0
        reason = f"{exc.context}: {exc.problem}" if exc.context else exc.problem
        raise ConfigError([f"{path}:{line}: YAML syntax: {reason}"]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML refuses; carries a position, not a mark
        # libyaml counts the position in UTF-8 bytes, the pure-Python reader in characters
        if _LIBYAML:
            line = text.encode("utf-8", "surrogatepass")[:exc.position].count(b"\n") + 1
        else:
            line = text[:exc.position].count("\n") + 1
        raise ConfigError([f"{path}:{line}: YAML syntax: {str(exc).splitlines()[0]}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML syntax: {exc}"]) from None
    except UnicodeEncodeError as exc:  # a lone surrogate: libyaml takes UTF-8 only
        line = text.count("\n", 0, exc.start) + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text: {exc.reason}"]) from None


class Checker:
    """Walks the parsed YAML, collecting problems as 'file:line: reason'."""

    def __init__(self, path: str, read_secrets: bool = True):
        self.path = path
        self.problems: list[str] = []
        self.read_secrets = read_secrets
        self.srs_domain_line = 1
        self.files: list[tuple[str, str]] = []  # files read besides the config, for Config.files
        self.inline_secrets = False

    def error(self, line: int, reason: str, path: str | None = None) -> None:
        self.problems.append(f"{path or self.path}:{line}: {reason}")

    @staticmethod
    def line_of(container: Any, key: Any = None) -> int:
        if isinstance(container, _Node):
            if key is not None and key in container.key_lines:
                return container.key_lines[key]
            return container.line
        return 0

    def mapping(self, value: Any, where: str, line: int, allowed: set[str]) -> Map:
        if value is None:
            return _empty(line)
        if not isinstance(value, dict):
            self.error(line, f"{where} must be a mapping")
            return _empty(line)
        for key in value:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.error(self.line_of(value, key), f"unknown key {key!r} in {where} (known: {hint})")
        return value if isinstance(value, Map) else _empty(line, value)

    def string_list(self, value: Any, where: str, line: int) -> list[tuple[str, int]]:
        """A string or a list of strings, each with its own line."""
        if value is None:
            return []
        if isinstance(value, str):
            return [(value, line)]
        if isinstance(value, list):
            out = []
            for i, item in enumerate(value):
                item_line = self.line_of(value, i)
                if isinstance(item, str):
                    out.append((item, item_line))
                else:
                    self.error(item_line, f"{where} entries must be strings")
            return out
        self.error(line, f"{where} must be a string or a list of strings")
        return []

    def positive_int(self, m: Map, key: str, default: int, low: int = 1, high: int = 10**6) -> int:
        value = m.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.error(self.line_of(m, key), f"{key} must be a whole number from {low} to {high}")
            return default
        return value

    def duration(self, value: Any, line: int, where: str) -> int | None:
        """`0`, `90s`, `20m`, `2h`, `1d` (a bare number: seconds) or `never` (None)."""
        if value == "never":
            return None
        text = str(value).strip().lower() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
        m = _DURATION.fullmatch(text)
        if m is None:
            self.error(line, f"{where} must be a duration like 0, 90s, 20m, 2h or 1d, or never; found {value!r}")
            return DEFAULT_FALLBACK_AFTER
        seconds = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        if seconds > MAX_FALLBACK_AFTER:
            self.error(line, f"{where} is longer than 30 days (Postfix bounces deferred mail after "
                             f"maximal_queue_lifetime, 5 days by default): use never")
            return DEFAULT_FALLBACK_AFTER
        return seconds

    def domain_name(self, raw: Any, line: int, where: str) -> str | None:
        if not isinstance(raw, str):
            self.error(line, f"{where} must be a domain name")
            return None
        try:
            return parse_domain(raw)
        except AddressError as exc:
            self.error(line, f"{where}: {exc}")
            return None


def _empty(line: int, items: dict[Any, Any] | None = None) -> Map:
    result = Map(items or {})
    result.line, result.key_lines = line, {}
    return result


def relative(path: str, config_path: str) -> str:
    """A path named in the config, relative to the config's folder unless absolute."""
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(config_path) or ".", path)
