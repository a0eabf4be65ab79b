"""Load and validate routemilter.yaml into immutable objects.

Every error names the file, the line and the reason, and all errors are
collected before failing, so `routemilter check` lists everything wrong at
once. Nothing here touches the network or the MTA; key files are only
checked for existence and permissions (see signing.py for loading them).

The modules, by job: model.py (the dataclasses and their defaults),
yamlcheck.py (YAML with line numbers, the problem collector), sections.py
(milter, srs, bounces, submission, dkim, routes), rulebuilder.py (domains,
rules, alias files), checks.py (checks across sections), filemodes.py (who
else may read or write the files read). This module reads the file and puts
the sections together; the names callers use are re-exported here, so
`from routemilter.config import load, Config` works.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .. import authconfig, state, visconfig
from . import sections
from .checks import cross_checks
from .filemodes import file_mode_problems
from .model import (
    DEFAULT_FALLBACK_AFTER,
    DEFAULT_PATH,
    DIRECT,
    MAX_FALLBACK_AFTER,
    BounceSettings,
    Config,
    ConfigError,
    Destination,
    DKIMKey,
    DKIMSettings,
    Domain,
    MilterSettings,
    Reply,
    Route,
    Rule,
    SRSSettings,
    SubmissionSettings,
    Target,
    default,
    format_duration,
    is_managed,
    managed_domain,
)
from .rulebuilder import RuleBuilder, alias_file, domains, pattern_problem, rules
from .yamlcheck import Checker, parse_yaml, relative

__all__ = [
    "DEFAULT_FALLBACK_AFTER",
    "DEFAULT_PATH",
    "DIRECT",
    "MAX_FALLBACK_AFTER",
    "BounceSettings",
    "Checker",
    "Config",
    "ConfigError",
    "DKIMKey",
    "DKIMSettings",
    "Destination",
    "Domain",
    "MilterSettings",
    "Reply",
    "Route",
    "Rule",
    "SRSSettings",
    "SubmissionSettings",
    "Target",
    "file_mode_problems",
    "format_duration",
    "is_managed",
    "load",
    "loads",
    "managed_domain",
    "pattern_problem",
]


def load(path: str | os.PathLike[str] = DEFAULT_PATH, read_secrets: bool = True) -> Config:
    """Read, parse and validate a config file; raise ConfigError on any problem.

    `read_secrets=False` skips the SRS secrets file, so `explain` works for a
    user who may read the rules but not the secrets.
    """
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc.reason}"]) from None
    return loads(text, path, read_secrets)


def loads(text: str, path: str = "<string>", read_secrets: bool = True) -> Config:
    data = parse_yaml(text, path)
    checker = Checker(path, read_secrets)
    config = _build(checker, data, path)
    if checker.problems:
        raise ConfigError(checker.problems)
    return config


_TOP_KEYS = {"milter", "srs", "dkim", "routes", "default_route", "domains", "rules", "server_name", "auth",
             "bounces", "alias_files", "metrics", "notify", "mta_log", "fallback_after",
             "submission", "state"}


def _build(c: Checker, data: Any, path: str) -> Config:
    if data is None:
        data = {}
    top = c.mapping(data, "the top level", 1, _TOP_KEYS)
    milter = sections.milter(c, top.get("milter"), c.line_of(top, "milter"))
    srs = sections.srs(c, top.get("srs"), c.line_of(top, "srs"), path)
    dkim = sections.dkim(c, top.get("dkim"), c.line_of(top, "dkim"), path)
    routes = sections.routes(c, top.get("routes"), c.line_of(top, "routes"))
    default_route = top.get("default_route", DIRECT if DIRECT in routes else None)
    if default_route is None:
        default_route = DIRECT
    if not isinstance(default_route, str) or default_route not in routes:
        c.error(c.line_of(top, "default_route"), f"default_route {default_route!r} is not a route")
    server_name = top.get("server_name", default(Config, "server_name"))
    if not isinstance(server_name, str) or not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", server_name):
        c.error(c.line_of(top, "server_name"), "server_name must be a host name")
        server_name = default(Config, "server_name")

    fallback_after = default(Config, "fallback_after")
    if "fallback_after" in top:
        fallback_after = c.duration(top["fallback_after"], c.line_of(top, "fallback_after"), "fallback_after")
    rules_builder = RuleBuilder(c, routes, default_route, fallback_after)
    managed = domains(c, top.get("domains"), c.line_of(top, "domains"), rules_builder)
    all_rules = rules(c, top.get("rules"), c.line_of(top, "rules"), rules_builder)
    for name, fline in c.string_list(top.get("alias_files"), "alias_files", c.line_of(top, "alias_files")):
        c.files.append((relative(name, path), "aliases"))
        all_rules += alias_file(c, relative(name, path), fline, managed, default_route,
                                srs.domain if srs else None, fallback_after)
    store = state.parse_state(c, top.get("state"), c.line_of(top, "state"), path)  # before files= below
    auth = authconfig.parse_auth(c, top.get("auth"), c.line_of(top, "auth"), server_name)
    bounces = sections.bounces(c, top.get("bounces"), c.line_of(top, "bounces"), srs)
    notify = visconfig.parse_notify(c, top.get("notify"), c.line_of(top, "notify"), bounces is not None)
    config = Config(path, milter, srs, dkim, routes, default_route, managed, tuple(all_rules), server_name, auth,
                    bounces=bounces, notify=notify, fallback_after=fallback_after,
                    metrics=visconfig.parse_metrics(c, top.get("metrics"), c.line_of(top, "metrics")),
                    mta_log=visconfig.parse_mta_log(c, top.get("mta_log"), c.line_of(top, "mta_log")),
                    submission=sections.submission(c, top.get("submission"), c.line_of(top, "submission")),
                    files=tuple([(path, "secrets" if c.inline_secrets else "config")] + c.files),
                    state=store)
    visconfig.check_notify_names(c, notify, config, c.line_of(top, "notify"))
    cross_checks(c, config, rules_builder.target_lines)
    authconfig.check_references(c, auth, config, c.line_of(top, "auth"))
    return config
