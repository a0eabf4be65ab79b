"""Who else could read or change the files a config was loaded from."""

from __future__ import annotations

import os
import stat

from .model import Config


def file_mode_problems(config: Config) -> list[str]:
    """Files of `config` that other local users could read secrets from or change routing
    with; what `check` and `run` refuse (entries starting with "warning:" do not stop them).

    Secrets (srs.secrets_file, or the config when it holds srs.secrets inline;
    state.password_file): nothing for
    others, no group write (group read is for the service's own group: 0640 root:routemilter).
    Config and alias files: no group or others write (anyone who can write them routes the
    mail); readable by all is fine when they hold no secret (`explain` for admins).
    """
    problems = []
    uid = os.geteuid()
    for path, kind in config.files:
        if path.startswith("<"):  # loads() of a string: no file
            continue
        try:
            info = os.stat(path)
        except OSError as exc:
            problems.append(f"{path}: cannot check permissions: {exc.strerror or exc}")
            continue
        mode = stat.S_IMODE(info.st_mode)
        what = {"secrets": "holds SRS secrets", "password": "holds the state store's password",
                "config": "sets the routing", "aliases": "sets the routing"}[kind]
        kind = "secrets" if kind == "password" else kind
        bad = mode & (0o027 if kind == "secrets" else 0o022)
        if bad:
            who = []
            if mode & 0o020:
                who.append("group can write")
            if mode & 0o007 and kind == "secrets":
                rights = (("read", 4), ("write", 2), ("execute", 1))
                who.append("others can " + "/".join(v for v, b in rights if mode & b))
            elif mode & 0o002:
                who.append("others can write")
            fix = "640" if kind == "secrets" else "644"
            problems.append(f"{path}: mode {mode:04o}: {', '.join(who)}; it {what} (chmod {fix})")
        if info.st_uid not in (0, uid):
            problems.append(f"warning: {path}: owned by uid {info.st_uid}, neither root nor uid {uid} "
                            f"(us): that user can change it")
    return problems
