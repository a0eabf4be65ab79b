"""Config loading: the model built from a good file, and every refusal with its
file:line and reason. Each `c.error(...)` in the config package has a test here."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routemilter import config as cfg
from routemilter.config import (
    DIRECT,
    ConfigError,
    Destination,
    DKIMKey,
    Reply,
    Route,
    Target,
    is_managed,
    load,
    loads,
    managed_domain,
    pattern_problem,
)
from routemilter.config.model import default

REPO = Path(__file__).resolve().parent.parent
BASE = "domains:\n  d.example: {}\n"  # the smallest valid config


# ------------------------------------------------------------------ helpers


def write(tmp_path: Path, text: str, name: str = "routemilter.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line(text: str, marker: str, nth: int = 1) -> int:
    """1-based number of the nth line of `text` (dedented) that contains `marker`."""
    found = [i for i, ln in enumerate(textwrap.dedent(text).splitlines(), 1) if marker in ln]
    assert len(found) >= nth, f"marker {marker!r} not found {nth} time(s)"
    return found[nth - 1]


def problems(tmp_path: Path, text: str, read_secrets: bool = True) -> tuple[str, list[str]]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, read_secrets=read_secrets)
    assert str(info.value) == "\n".join(info.value.problems)
    return str(path), info.value.problems


def only(tmp_path: Path, text: str, marker: str, reason: str, nth: int = 1) -> None:
    """The file is refused with exactly one problem: `reason` at the marker's line."""
    path, found = problems(tmp_path, text)
    assert found == [f"{path}:{line(text, marker, nth)}: {reason}"]


def ok(tmp_path: Path, text: str, read_secrets: bool = True) -> cfg.Config:
    return load(write(tmp_path, text), read_secrets=read_secrets)


# ------------------------------------------------------- a good config's model


def test_full_config_model(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "secrets").write_text("# rotate by adding a line at the top\n\n"
                                      "  new-secret-0123456789  \n"
                                      "   # an indented comment, not a secret\n"
                                      "old-secret-0123456789\n")
    text = """\
        server_name: mx.family.example
        milter:
          socket: inet:8891@127.0.0.1
          socket_mode: "0600"
          socket_group: postfix
          timeout: 30
          max_hops: 5
        srs:
          domain: Fwd.Family.Example.
          secrets_file: secrets
          hash_length: 10
          max_age_days: 7
        dkim:
          domain: family.example
          keys:
            - selector: rm2026
              key: keys/rm2026.private
            - selector: ed.2026
              key: /etc/routemilter/ed.private
        routes:
          via-backup: [mx, "[smtp.backup.example]:587"]
          relay-only: "[relay.example]"
        default_route: via-backup
        domains:
          Family.Example:
            plus_delimiters: "+-"
            subdomain_addressing: true
            subdomain_exclude: [IMX]
            catch_all:
              to: me@gmail.example
          other.example: {}
        rules:
          - name: me
            addresses: [Me@Family.Example]
            to:
              - address: me@gmail.example
                fallback:
                  - me@imx.family.example
                  - address: me@outlook.example
                    route: relay-only
          - patterns: ['kid\\+.*@family\\.example']
            to: [kid@gmail.example, kid2@gmail.example]
          - name: gone
            addresses: old@family.example
            refuse: This address has moved
          - name: noise
            addresses: [noreply@family.example]
            discard: true
          - name: local
            addresses: [postmaster@family.example]
            keep: true
        """
    c = ok(tmp_path, text)
    assert c.path == str(tmp_path / "routemilter.yaml")
    assert c.server_name == "mx.family.example"
    assert c.milter == cfg.MilterSettings("inet:8891@127.0.0.1", 0o600, "postfix", 30, 5)
    assert c.srs.domain == "fwd.family.example"
    assert c.srs.secrets == (b"new-secret-0123456789", b"old-secret-0123456789")
    assert (c.srs.hash_length, c.srs.max_age_days) == (10, 7)
    assert c.dkim.domain == "family.example"
    assert c.dkim.keys == (DKIMKey("rm2026", str(tmp_path / "keys/rm2026.private")),
                           DKIMKey("ed.2026", "/etc/routemilter/ed.private"))
    assert c.routes == {
        DIRECT: Route(DIRECT, (DIRECT,)),
        "via-backup": Route("via-backup", ("mx", "[smtp.backup.example]:587")),
        "relay-only": Route("relay-only", ("[relay.example]",)),
    }
    assert c.default_route == "via-backup"
    assert list(c.domains) == ["family.example", "other.example"]
    fam = c.domains["family.example"]
    assert fam.plus_delimiters == "+-"
    assert fam.subdomain_addressing is True
    assert fam.subdomain_exclude == frozenset({"imx"})
    assert fam.catch_all.name == "catch-all@family.example"
    assert fam.catch_all.destinations == (Destination((Target("me@gmail.example", "via-backup"),)),)
    other = c.domains["other.example"]
    assert (other.plus_delimiters, other.subdomain_addressing, other.catch_all) == ("+", False, None)

    me, kid, gone, noise, local = c.rules
    assert [r.name for r in c.rules] == ["me", "rule-2", "gone", "noise", "local"]
    assert me.addresses == ("me@family.example",)
    assert me.destinations == (Destination((
        Target("me@gmail.example", "via-backup"),
        Target("me@imx.family.example", "via-backup"),
        Target("me@outlook.example", "relay-only"),
    )),)
    assert kid.patterns == ("kid\\+.*@family\\.example",)
    assert [d.primary.address for d in kid.destinations] == ["kid@gmail.example", "kid2@gmail.example"]
    assert gone.refuse == Reply(550, "5.7.1", ("This address has moved",))
    assert gone.destinations == () and not gone.discard and not gone.keep
    assert noise.discard is True and noise.destinations == () and noise.refuse is None
    assert local.keep is True and local.destinations == ()
    # Each rule remembers where it was written, for `explain`.
    assert [r.line for r in c.rules] == [line(text, m) for m in (
        "- name: me", "- patterns:", "- name: gone", "- name: noise", "- name: local")]
    assert fam.catch_all.line == line(text, "catch_all:")


def test_defaults(tmp_path):
    c = ok(tmp_path, BASE)
    assert c.milter == cfg.MilterSettings()
    assert c.milter.socket_mode == 0o660
    assert c.srs is None and c.dkim is None
    assert c.routes == {DIRECT: Route(DIRECT, (DIRECT,))}
    assert c.default_route == DIRECT
    assert c.rules == ()
    assert c.server_name == "routemilter"


def test_loads_names_the_given_path():
    with pytest.raises(ConfigError) as info:
        loads("domains: []\n", "/etc/x.yaml")
    assert info.value.problems == ["/etc/x.yaml:1: domains must map domain names to their settings"]
    assert loads(BASE).path == "<string>"


def test_example_config_loads_without_secrets():
    c = load(REPO / "conf" / "routemilter.yaml", read_secrets=False)
    assert "family.example" in c.domains
    assert c.srs is not None and c.srs.secrets == ()


def test_yaml_anchor_shared_between_domains(tmp_path):
    c = ok(tmp_path, """\
        domains:
          a.example:
            catch_all: &ca {to: [x@y.example]}
          b.example:
            catch_all: *ca
        """)
    assert c.domains["a.example"].catch_all.destinations == c.domains["b.example"].catch_all.destinations


def test_left_out_settings_take_the_dataclass_defaults(tmp_path):
    """Each default is written once, in the dataclass; the builders take it from there."""
    c = ok(tmp_path, """\
        srs: {domain: fwd.example, secrets: [0123456789abcdef]}
        bounces: {}
        submission: {}
        domains:
          d.example: {}
        rules:
          - {addresses: a@d.example, keep: true}
        """)
    assert c.milter == cfg.MilterSettings()
    assert (c.srs.hash_length, c.srs.max_age_days) == (cfg.SRSSettings("x", ()).hash_length,
                                                       cfg.SRSSettings("x", ()).max_age_days)
    # a bounce token lives as long as the SRS address it rides in, unless set
    assert c.bounces == cfg.BounceSettings(max_age_days=c.srs.max_age_days)
    assert c.submission == cfg.SubmissionSettings()
    assert c.domains["d.example"] == cfg.Domain("d.example", 5)
    assert c.rules[0].discard is cfg.Rule("x", 1).discard
    assert (c.server_name, c.fallback_after) == (default(cfg.Config, "server_name"), cfg.DEFAULT_FALLBACK_AFTER)
    with pytest.raises(LookupError):
        default(cfg.Config, "path")  # a required field has none


def test_is_managed(tmp_path):
    c = ok(tmp_path, """\
        domains:
          d.example: {subdomain_addressing: true, subdomain_exclude: [imx]}
          flat.example: {}
          sub.d.example: {}
        """)
    assert managed_domain(c.domains, "d.example") == "d.example"
    assert managed_domain(c.domains, "user.d.example") == "d.example"
    assert managed_domain(c.domains, "sub.d.example") == "sub.d.example"  # its own entry wins
    assert managed_domain(c.domains, "imx.d.example") is None  # excluded: hosted elsewhere
    assert managed_domain(c.domains, "a.b.d.example") is None  # one label only
    assert managed_domain(c.domains, "user.flat.example") is None  # no subdomain addressing
    assert managed_domain(c.domains, "example") is None
    assert managed_domain(c.domains, "other.example") is None
    assert managed_domain(c.domains, "[192.0.2.1]") is None
    assert is_managed(c, "user.d.example") is True
    assert is_managed(c, "imx.d.example") is False


# ------------------------------------------------------- reading and YAML


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert info.value.problems == [f"{tmp_path}: cannot read: Is a directory"]


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("domains:\n  d\xe9.example: {}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems == [f"{path}: not UTF-8 text: invalid continuation byte"]


# The wording of a syntax error depends on whether PyYAML uses libyaml; the reason
# must start with the given text (the line is exact either way).
@pytest.mark.parametrize(
    "text, bad_line, reason",
    [
        ("domains:\n  d.example: [1, 2\n", 3, "while parsing a flow sequence: "),
        ("domains:\n  d.example: {}\n bad: 1\n", 3, "while parsing a block mapping: "),
        ("server_name: a: b\n", 1, "mapping values are not allowed"),
        ("server_name: 'unterminated\n", 2, "while scanning a quoted scalar: found unexpected end of stream"),
        ("domains:\n  d.example: {}\n---\ndomains: {}\n", 3,
         "expected a single document in the stream: but found another document"),
        ("server_name: !!python/object/apply:os.system [true]\n", 1,
         "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
        ("domains:\n  d.example: {}\nserver_name: \x07\n", 3, "unacceptable character #x0007: "),
        # non-ASCII before it must not shift the line (libyaml counts bytes)
        ("# " + "é" * 80 + "\ndomains:\n  d.example: {}\nserver_name: \x07\n", 4, "unacceptable character #x0007: "),
        # Duplicate keys are an error (PyYAML would silently keep the last one).
        ("domains:\n  d.example: {}\n  d.example: {catch_all: {discard: true}}\n", 3,
         "duplicate key 'd.example'"),
        ("rules: []\ndomains:\n  d.example: {}\nrules: []\n", 4, "duplicate key 'rules'"),
        ("domains:\n  d.example:\n    catch_all:\n      to: [a@b.example]\n      to: [c@b.example]\n", 5,
         "duplicate key 'to'"),
        ("domains:\n  d.example: {}\n? [a, b]\n: 1\n", 3, "unhashable key"),
    ],
)
def test_yaml_errors_name_the_line(tmp_path, text, bad_line, reason):
    path, found = problems(tmp_path, text)
    assert len(found) == 1
    assert found[0].startswith(f"{path}:{bad_line}: YAML syntax: {reason}")
    assert "\n" not in found[0]


def test_text_with_a_lone_surrogate():
    # Only loads() can be handed one (files are decoded as UTF-8 first).
    with pytest.raises(ConfigError) as info:
        loads(BASE + "server_name: x\udcff\n", "s.yaml")
    assert info.value.problems == ["s.yaml:3: not UTF-8 text: surrogates not allowed"]


def test_empty_file_needs_domains(tmp_path):
    path, found = problems(tmp_path, "")
    assert found == [f"{path}:1: domains: at least one managed domain is required"]
    path, found = problems(tmp_path, "# only a comment\n")
    assert found == [f"{path}:1: domains: at least one managed domain is required"]


def test_top_level_must_be_a_mapping(tmp_path):
    path, found = problems(tmp_path, "- a\n- b\n")
    assert found == [f"{path}:1: the top level must be a mapping",
                     f"{path}:1: domains: at least one managed domain is required"]


def test_unknown_top_level_key(tmp_path):
    text = BASE + "rule:\n  - addresses: [a@d.example]\n"
    path, found = problems(tmp_path, text)
    assert len(found) == 1
    prefix = f"{path}:3: unknown key 'rule' in the top level (known: "
    assert found[0].startswith(prefix) and found[0].endswith(")")
    known = found[0][len(prefix):-1].split(", ")
    assert known == sorted(known)
    assert {"default_route", "dkim", "domains", "milter", "routes", "rules", "server_name", "srs"} <= set(known)


def test_yaml_merge_keys_are_refused_not_misread(tmp_path):
    text = "base: &b {to: [x@y.example]}\ndomains:\n  d.example:\n    catch_all: {<<: *b}\n"
    path, found = problems(tmp_path, text)
    assert len(found) == 1 and found[0].startswith(f"{path}:4: YAML syntax:")


# --------------------------------------------------------------- top level


def test_default_route_unknown(tmp_path):
    text = BASE + "default_route: nope\n"
    only(tmp_path, text, "default_route", "default_route 'nope' is not a route")


def test_default_route_not_text(tmp_path):
    text = BASE + "default_route: [mx]\n"
    only(tmp_path, text, "default_route", "default_route ['mx'] is not a route")


def test_default_route_defined(tmp_path):
    c = ok(tmp_path, BASE + "routes:\n  r: ['[relay.example]:25']\ndefault_route: r\n"
                            "rules:\n  - addresses: [a@d.example]\n    to: x@y.example\n")
    assert c.rules[0].destinations[0].primary == Target("x@y.example", "r")


@pytest.mark.parametrize("value", ["'bad name'", "''", "5", "mx_1.example"])
def test_server_name(tmp_path, value):
    text = BASE + f"server_name: {value}\n"
    only(tmp_path, text, "server_name", "server_name must be a host name")


# ------------------------------------------------------------------ milter


def test_milter_must_be_a_mapping(tmp_path):
    text = BASE + "milter: [unix:/x]\n"
    only(tmp_path, text, "milter", "milter must be a mapping")


def test_milter_unknown_key(tmp_path):
    text = BASE + "milter:\n  sock: unix:/x\n"
    only(tmp_path, text, "sock:", "unknown key 'sock' in milter (known: max_hops, socket, "
                                  "socket_group, socket_mode, timeout)")


@pytest.mark.parametrize("socket", ["unix:/run/rm.sock", "local:/run/rm.sock", "inet:8891",
                                    "inet:8891@127.0.0.1", "inet6:8891@[::1]"])
def test_socket_good(tmp_path, socket):
    assert ok(tmp_path, BASE + f"milter:\n  socket: '{socket}'\n").milter.socket == socket


@pytest.mark.parametrize("socket", ["unix:relative.sock", "/run/rm.sock", "inet:port", "tcp:8891", "5"])
def test_socket_bad(tmp_path, socket):
    text = BASE + f"milter:\n  socket: '{socket}'\n"
    only(tmp_path, text, "socket:", "socket must be unix:/absolute/path or inet:PORT@HOST")


@pytest.mark.parametrize("mode, value", [('"0600"', 0o600), ('"660"', 0o660), ('"0o640"', 0o640)])
def test_socket_mode_good(tmp_path, mode, value):
    assert ok(tmp_path, BASE + f"milter:\n  socket_mode: {mode}\n").milter.socket_mode == value


@pytest.mark.parametrize("mode", ['"0999"', '"01000"', '"rw"', "0660", "660", "[1]", "true"])
def test_socket_mode_bad(tmp_path, mode):
    # Unquoted 0660 is the YAML 1.1 octal number 432: it must not turn into mode 0o432
    # (world-writable) silently.
    text = BASE + f"milter:\n  socket_mode: {mode}\n"
    only(tmp_path, text, "socket_mode", 'socket_mode must be quoted octal text, like "0660"')


def test_socket_group_bad(tmp_path):
    text = BASE + "milter:\n  socket_group: 115\n"
    only(tmp_path, text, "socket_group", "socket_group must be a group name")


@pytest.mark.parametrize("key", ["timeout", "max_hops"])
@pytest.mark.parametrize("value", ["0", "-1", "1000001", "true", "'10'", "1.5"])
def test_positive_ints(tmp_path, key, value):
    text = BASE + f"milter:\n  {key}: {value}\n"
    only(tmp_path, text, f"{key}:", f"{key} must be a whole number from 1 to 1000000")


# --------------------------------------------------------------------- srs

SECRET = "0123456789abcdef"  # 16 characters: the shortest accepted


def test_srs_inline_secrets(tmp_path):
    c = ok(tmp_path, BASE + f"srs:\n  domain: fwd.example\n  secrets: [{SECRET}, {SECRET}x]\n")
    assert c.srs == cfg.SRSSettings("fwd.example", (SECRET.encode(), f"{SECRET}x".encode()), 8, 21)


def test_srs_single_secret_string(tmp_path):
    c = ok(tmp_path, BASE + f"srs:\n  domain: fwd.example\n  secrets: {SECRET}\n")
    assert c.srs.secrets == (SECRET.encode(),)


def test_srs_secrets_file_relative_to_the_config(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "srs-secrets").write_text(f"{SECRET}-new\n#{SECRET}-commented\n{SECRET}-old\n")
    path = tmp_path / "etc" / "rm.yaml"
    path.write_text(BASE + f"srs:\n  domain: fwd.example\n  secrets: [{SECRET}-inline]\n"
                           "  secrets_file: srs-secrets\n")
    c = load(path)
    # inline secrets first (the first one signs), then the file's, in order
    assert c.srs.secrets == (f"{SECRET}-inline".encode(), f"{SECRET}-new".encode(), f"{SECRET}-old".encode())


def test_srs_secrets_file_missing(tmp_path):
    text = BASE + "srs:\n  domain: fwd.example\n  secrets_file: missing-secrets\n"
    only(tmp_path, text, "secrets_file",
         f"cannot read srs.secrets_file {tmp_path / 'missing-secrets'}: No such file or directory")


def test_srs_secrets_file_not_read_when_asked_not_to(tmp_path):
    text = BASE + "srs:\n  domain: fwd.example\n  secrets_file: /nonexistent/srs-secrets\n"
    c = ok(tmp_path, text, read_secrets=False)
    assert c.srs.domain == "fwd.example" and c.srs.secrets == ()
    # ...while the daemon's load (read_secrets=True) refuses the same file
    path, found = problems(tmp_path, text)
    assert found == [f"{path}:{line(text, 'secrets_file')}: cannot read srs.secrets_file /nonexistent/srs-secrets: "
                     "No such file or directory"]


def test_srs_secrets_file_unreadable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of their mode")
    secrets = tmp_path / "secrets"
    secrets.write_text(SECRET + "\n")
    secrets.chmod(0)
    text = BASE + "srs:\n  domain: fwd.example\n  secrets_file: secrets\n"
    only(tmp_path, text, "secrets_file", f"cannot read srs.secrets_file {secrets}: Permission denied")


def test_srs_secrets_file_is_a_directory(tmp_path):
    (tmp_path / "secrets.d").mkdir()
    text = BASE + "srs:\n  domain: fwd.example\n  secrets_file: secrets.d\n"
    only(tmp_path, text, "secrets_file", f"cannot read srs.secrets_file {tmp_path / 'secrets.d'}: Is a directory")


def test_srs_secrets_file_must_be_a_path(tmp_path):
    text = BASE + "srs:\n  domain: fwd.example\n  secrets_file: [a, b]\n  secrets: [" + SECRET + "]\n"
    only(tmp_path, text, "secrets_file", "srs.secrets_file must be a path")


def test_srs_secret_too_short(tmp_path):
    text = BASE + "srs:\n  domain: fwd.example\n  secrets: [" + SECRET[:-1] + ", short]\n"
    # one message for the block, however many secrets are short
    only(tmp_path, text, "srs:", "every SRS secret must be at least 16 characters")


def test_srs_secret_too_short_in_file(tmp_path):
    (tmp_path / "s").write_text("tooshort\n")
    text = BASE + "srs:\n  domain: fwd.example\n  secrets_file: s\n"
    only(tmp_path, text, "srs:", "every SRS secret must be at least 16 characters")


def test_srs_secret_too_short_even_without_reading_the_file(tmp_path):
    text = BASE + "srs:\n  domain: fwd.example\n  secrets: [short]\n  secrets_file: /nonexistent\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, read_secrets=False)
    assert info.value.problems == [f"{path}:{line(text, 'srs:')}: every SRS secret must be at least 16 characters"]


def test_srs_needs_secrets(tmp_path):
    text = BASE + "srs:\n  domain: fwd.example\n"
    only(tmp_path, text, "srs:", "srs needs secrets or secrets_file")
    assert ok(tmp_path, text, read_secrets=False).srs.secrets == ()


def test_srs_empty_secrets_file(tmp_path):
    (tmp_path / "s").write_text("# nothing yet\n\n")
    text = BASE + "srs:\n  domain: fwd.example\n  secrets_file: s\n"
    only(tmp_path, text, "srs:", "srs needs secrets or secrets_file")


def test_srs_secrets_entries_must_be_strings(tmp_path):
    text = BASE + f"srs:\n  domain: fwd.example\n  secrets:\n    - {SECRET}\n    - 12345678901234567890\n"
    only(tmp_path, text, "12345678901234567890", "srs.secrets entries must be strings")


def test_srs_secrets_must_be_a_list(tmp_path):
    text = BASE + "srs:\n  domain: fwd.example\n  secrets: {a: b}\n"
    path, found = problems(tmp_path, text)
    assert found == [f"{path}:{line(text, 'secrets:')}: srs.secrets must be a string or a list of strings",
                     f"{path}:{line(text, 'srs:')}: srs needs secrets or secrets_file"]


@pytest.mark.parametrize("key, value, low, high", [("hash_length", 5, 6, 27), ("hash_length", 28, 6, 27),
                                                    ("max_age_days", 0, 1, 365), ("max_age_days", 366, 1, 365)])
def test_srs_ranges(tmp_path, key, value, low, high):
    text = BASE + f"srs:\n  domain: fwd.example\n  secrets: [{SECRET}]\n  {key}: {value}\n"
    only(tmp_path, text, f"{key}:", f"{key} must be a whole number from {low} to {high}")


def test_srs_domain_missing(tmp_path):
    text = BASE + f"srs:\n  secrets: [{SECRET}]\n"
    only(tmp_path, text, "secrets:", "srs.domain must be a domain name")


def test_srs_domain_invalid(tmp_path):
    text = BASE + f"srs:\n  domain: fwd_bad.example\n  secrets: [{SECRET}]\n"
    only(tmp_path, text, "domain: fwd_bad", "srs.domain: 'fwd_bad.example': invalid character '_' in domain")


def test_srs_must_be_a_mapping(tmp_path):
    text = BASE + "srs: fwd.example\n"
    path, found = problems(tmp_path, text)
    assert found == [f"{path}:3: srs must be a mapping",
                     f"{path}:3: srs.domain must be a domain name",
                     f"{path}:3: srs needs secrets or secrets_file"]


def test_srs_unknown_key(tmp_path):
    text = BASE + f"srs:\n  domain: fwd.example\n  secrets: [{SECRET}]\n  secret: x\n"
    only(tmp_path, text, "secret: x", "unknown key 'secret' in srs (known: domain, hash_length, "
                                      "max_age_days, secrets, secrets_file)")


def test_srs_domain_must_not_be_managed(tmp_path):
    text = f"srs:\n  secrets: [{SECRET}]\n  domain: d.example\n" + BASE
    only(tmp_path, text, "domain: d.example", "the SRS domain d.example must not also be a managed domain")


def test_destination_in_srs_domain(tmp_path):
    text = BASE + f"""srs:\n  domain: fwd.example\n  secrets: [{SECRET}]
rules:
  - addresses: [a@d.example]
    to: [x@gmail.example, SRS0=abc@Fwd.Example]
"""
    only(tmp_path, text, "SRS0=", "destination srs0=abc@fwd.example is in the SRS domain fwd.example")


# -------------------------------------------------------------------- dkim


def test_dkim_keys_missing(tmp_path):
    text = BASE + "dkim:\n  domain: d.example\n"
    # the key is missing: the error points at the start of the dkim block
    only(tmp_path, text, "domain: d.example", "dkim.keys must list at least one key (selector and key file)")


def test_dkim_keys_empty(tmp_path):
    text = BASE + "dkim:\n  domain: d.example\n  keys: []\n"
    only(tmp_path, text, "keys:", "dkim.keys must list at least one key (selector and key file)")


@pytest.mark.parametrize("selector", ["''", "-bad", "'a b'", "5", "'s/x'"])
def test_dkim_selector_bad(tmp_path, selector):
    text = BASE + f"dkim:\n  domain: d.example\n  keys:\n    - selector: {selector}\n      key: k.pem\n"
    only(tmp_path, text, "- selector", "a dkim key needs a selector (letters, digits, '.', '_', '-')")


def test_dkim_key_file_missing(tmp_path):
    text = BASE + "dkim:\n  domain: d.example\n  keys:\n    - selector: s1\n    - {selector: s2, key: k2}\n"
    path, found = problems(tmp_path, text)
    assert found == [f"{path}:{line(text, 'selector: s1')}: dkim key 's1' needs key: the private key file"]


def test_dkim_key_unknown_key(tmp_path):
    text = BASE + "dkim:\n  domain: d.example\n  keys:\n    - {selector: s1, key: k, algorithm: rsa}\n"
    only(tmp_path, text, "algorithm", "unknown key 'algorithm' in a dkim key (known: key, selector)")


def test_dkim_domain_invalid(tmp_path):
    text = BASE + "dkim:\n  domain: -d.example\n  keys: [{selector: s, key: k}]\n"
    only(tmp_path, text, "domain: -d", "dkim.domain: '-d.example': domain label starts or ends with '-'")


def test_dkim_unknown_key(tmp_path):
    text = BASE + "dkim:\n  domain: d.example\n  keys: [{selector: s, key: k}]\n  selector: s\n"
    only(tmp_path, text, "  selector: s", "unknown key 'selector' in dkim (known: domain, keys)")


# ------------------------------------------------------------------ routes


def test_routes_must_be_a_mapping(tmp_path):
    text = BASE + "routes: [mx]\n"
    only(tmp_path, text, "routes", "routes must map route names to lists of hops")


@pytest.mark.parametrize("name", ["Backup", "1st", "a" * 32, "with space", "true"])
def test_route_name_bad(tmp_path, name):
    text = BASE + f"routes:\n  {name}: [mx]\n"
    shown = {"true": "True"}.get(name, repr(name))
    only(tmp_path, text, f"{name}:", f"route name {shown} must be lowercase letters, digits, '-' or '_' (at most 31)")


@pytest.mark.parametrize("hop", ["smtp://relay.example", "relay.example:25:1", "[relay.example", "relay example",
                                 "relay.example:", "[relay]x"])
def test_route_hop_bad(tmp_path, hop):
    text = BASE + f"routes:\n  r:\n    - mx\n    - '{hop}'\n"
    only(tmp_path, text, f"- '{hop}'", f"route r: hop {hop!r} must be 'mx' or a host like [relay.example]:25")


@pytest.mark.parametrize("hop", ["[relay.example]:0", "[relay.example]:65536", "relay.example:99999",
                                 "[2001:db8::1]:70000"])
def test_route_hop_port_out_of_range(tmp_path, hop):
    text = BASE + f"routes:\n  r:\n    - '{hop}'\n"
    only(tmp_path, text, f"- '{hop}'", f"route r: hop {hop!r}: port must be from 1 to 65535")


@pytest.mark.parametrize("hop", ["[relay.example]:1", "[relay.example]:65535", "relay.example:587",
                                 "[2001:db8::1]:25", "[192.0.2.7]", "relay.example"])
def test_route_hop_good(tmp_path, hop):
    assert ok(tmp_path, BASE + f"routes:\n  r: ['{hop}']\n").routes["r"].hops == (hop,)


def test_route_without_hops(tmp_path):
    text = BASE + "routes:\n  r: []\n"
    only(tmp_path, text, "r: []", "route r has no hops")


def test_route_hops_of_the_wrong_type(tmp_path):
    text = BASE + "routes:\n  r: {a: b}\n"
    path, found = problems(tmp_path, text)
    n = line(text, "r: {")
    assert found == [f"{path}:{n}: route r must be a string or a list of strings", f"{path}:{n}: route r has no hops"]


def test_route_hop_entries_must_be_strings(tmp_path):
    text = BASE + "routes:\n  r:\n    - mx\n    - 25\n"
    only(tmp_path, text, "- 25", "route r entries must be strings")


def test_route_hop_twice(tmp_path):
    text = BASE + "routes:\n  r: ['[a.example]', '[a.example]']\n"
    only(tmp_path, text, "r: [", "route r lists a hop twice")


def test_route_mx_only_first(tmp_path):
    text = BASE + "routes:\n  r: ['[a.example]', mx]\n"
    only(tmp_path, text, "r: [", "route r: 'mx' may only be the first hop (the MTA falls back to relays, "
                                 "not back to MX)")


def test_route_mx_cannot_be_redefined(tmp_path):
    text = BASE + "routes:\n  mx: ['[relay.example]:25']\n"
    only(tmp_path, text, "mx:", "route mx is built in (the destination's own MX hosts) and cannot be redefined")
    # restating it as it is is harmless
    assert ok(tmp_path, BASE + "routes:\n  mx: [mx]\n").routes[DIRECT].hops == (DIRECT,)


# ----------------------------------------------------------------- domains


def test_domains_missing(tmp_path):
    path, found = problems(tmp_path, "server_name: mx.example\n")
    assert found == [f"{path}:1: domains: at least one managed domain is required"]


def test_domains_null(tmp_path):
    path, found = problems(tmp_path, "server_name: mx.example\ndomains:\n")
    assert found == [f"{path}:2: domains: at least one managed domain is required"]


@pytest.mark.parametrize("value", ["[d.example]", "{}", "d.example"])
def test_domains_must_be_a_mapping(tmp_path, value):
    text = f"domains: {value}\n"
    only(tmp_path, text, "domains", "domains must map domain names to their settings")


def test_domain_name_invalid(tmp_path):
    text = "domains:\n  good.example: {}\n  bad_name.example: {}\n"
    only(tmp_path, text, "bad_name", "domain: 'bad_name.example': invalid character '_' in domain")


def test_domain_name_not_text(tmp_path):
    text = "domains:\n  good.example: {}\n  42: {}\n"
    only(tmp_path, text, "42:", "domain must be a domain name")


def test_domain_listed_twice_after_normalising(tmp_path):
    text = "domains:\n  d.example: {}\n  D.Example.: {}\n"
    only(tmp_path, text, "D.Example", "domain d.example is listed twice")


def test_domain_settings_must_be_a_mapping(tmp_path):
    text = "domains:\n  d.example: [catch_all]\n"
    only(tmp_path, text, "d.example", "domain d.example must be a mapping")


def test_domain_unknown_key(tmp_path):
    text = "domains:\n  d.example:\n    catchall: {to: x@y.example}\n"
    only(tmp_path, text, "catchall", "unknown key 'catchall' in domain d.example (known: catch_all, "
                                     "plus_delimiters, subdomain_addressing, subdomain_exclude)")


@pytest.mark.parametrize("value", ['"a"', '"+1"', '"."', '"@"', '" "', "'\"'", "5", "[+]"])
def test_plus_delimiters_bad(tmp_path, value):
    text = f"domains:\n  d.example:\n    plus_delimiters: {value}\n"
    only(tmp_path, text, "plus_delimiters", 'plus_delimiters must be punctuation characters like "+" or "+-"')


@pytest.mark.parametrize("value, stored", [('"+"', "+"), ('"+-_="', "+-_="), ('""', ""), ("", "")])
def test_plus_delimiters_good(tmp_path, value, stored):
    c = ok(tmp_path, f"domains:\n  d.example:\n    plus_delimiters: {value}\n")
    assert c.domains["d.example"].plus_delimiters == stored


@pytest.mark.parametrize("value", ["'yes please'", "1", "[true]"])
def test_subdomain_addressing_bad(tmp_path, value):
    text = f"domains:\n  d.example:\n    subdomain_addressing: {value}\n"
    only(tmp_path, text, "subdomain_addressing", "subdomain_addressing must be true or false")


@pytest.mark.parametrize("label", ["imx.d", "a_b", "-" * 64, "é"])
def test_subdomain_exclude_bad_label(tmp_path, label):
    text = f"domains:\n  d.example:\n    subdomain_exclude:\n      - ok\n      - '{label}'\n"
    only(tmp_path, text, f"- '{label}'", f"subdomain_exclude: {label!r} must be a single label, like imx")


def test_subdomain_exclude_entries_must_be_strings(tmp_path):
    text = "domains:\n  d.example:\n    subdomain_exclude:\n      - [imx]\n"
    only(tmp_path, text, "- [imx]", "subdomain_exclude entries must be strings")


def test_subdomain_exclude_single_string(tmp_path):
    c = ok(tmp_path, "domains:\n  d.example:\n    subdomain_addressing: true\n    subdomain_exclude: IMX\n")
    assert c.domains["d.example"].subdomain_exclude == frozenset({"imx"})


def test_catch_all_unknown_key(tmp_path):
    text = "domains:\n  d.example:\n    catch_all:\n      to: x@y.example\n      addresses: [a@d.example]\n"
    only(tmp_path, text, "addresses", "unknown key 'addresses' in domain d.example catch_all "
                                      "(known: discard, keep, refuse, senders, to)")


def test_catch_all_empty(tmp_path):
    text = "domains:\n  d.example:\n    catch_all:\n"
    only(tmp_path, text, "catch_all", "rule catch-all@d.example: give exactly one of to, refuse, discard "
                                      "(or keep alone); found none")


@pytest.mark.parametrize("action, expect", [
    ("{discard: true}", "discard"), ("{refuse: Nobody here}", "refuse"), ("{keep: true}", "keep")])
def test_catch_all_actions(tmp_path, action, expect):
    rule = ok(tmp_path, f"domains:\n  d.example:\n    catch_all: {action}\n").domains["d.example"].catch_all
    assert (rule.discard, rule.refuse is not None, rule.keep) == (
        expect == "discard", expect == "refuse", expect == "keep")


# -------------------------------------------------------------------- rules


def rules_text(body: str) -> str:
    return "routes:\n  alt: ['[alt.example]:25']\n" + BASE + "rules:\n" + textwrap.dedent(body)


def test_rules_must_be_a_list(tmp_path):
    text = BASE + "rules:\n  me: {addresses: [me@d.example], to: x@y.example}\n"
    only(tmp_path, text, "rules:", "rules must be a list")


def test_rule_must_be_a_mapping(tmp_path):
    text = rules_text("  - me@d.example\n")
    path, found = problems(tmp_path, text)
    n = line(text, "- me@")
    assert found == [f"{path}:{n}: a rule must be a mapping",
                     f"{path}:{n}: rule rule-1 matches nothing: give addresses or patterns",
                     f"{path}:{n}: rule rule-1: give exactly one of to, refuse, discard (or keep alone); found none"]


def test_rule_unknown_key(tmp_path):
    text = rules_text("""\
      - name: me
        adresses: [me@d.example]
        addresses: [me@d.example]
        to: x@y.example
    """)
    only(tmp_path, text, "adresses", "unknown key 'adresses' in a rule (known: addresses, discard, keep, name, "
                                     "patterns, refuse, senders, to)")


@pytest.mark.parametrize("name", ["5", "''", "'  '", "[a]"])
def test_rule_name_must_be_text(tmp_path, name):
    text = rules_text(f"  - name: {name}\n    addresses: [me@d.example]\n    to: x@y.example\n")
    only(tmp_path, text, "- name", "rule name must be text")


def test_rule_name_used_twice(tmp_path):
    text = rules_text("""\
      - name: me
        addresses: [a@d.example]
        to: x@y.example
      - name: me
        addresses: [b@d.example]
        to: x@y.example
    """)
    only(tmp_path, text, "- name: me", "rule name 'me' is used twice", 2)


def test_rule_default_names_follow_position(tmp_path):
    c = ok(tmp_path, rules_text("""\
      - {addresses: [a@d.example], to: x@y.example}
      - {name: b, addresses: [b@d.example], to: x@y.example}
      - {addresses: [c@d.example], to: x@y.example}
    """))
    assert [r.name for r in c.rules] == ["rule-1", "b", "rule-3"]


def test_rule_address_invalid(tmp_path):
    text = rules_text("""\
      - name: me
        addresses:
          - me@d.example
          - not-an-address
        to: x@y.example
    """)
    only(tmp_path, text, "- not-an-address", "rule me: address 'not-an-address': address has no domain")


def test_rule_addresses_wrong_type(tmp_path):
    text = rules_text("  - name: me\n    addresses: {me: d.example}\n    to: x@y.example\n")
    only(tmp_path, text, "addresses:", "rule me addresses must be a string or a list of strings")


def test_rule_address_entries_must_be_strings(tmp_path):
    text = rules_text("  - name: me\n    addresses:\n      - 5\n    to: x@y.example\n")
    only(tmp_path, text, "- 5", "rule me addresses entries must be strings")


def test_rule_matches_nothing(tmp_path):
    text = rules_text("  - name: me\n    to: x@y.example\n")
    only(tmp_path, text, "- name: me", "rule me matches nothing: give addresses or patterns")


def test_rule_address_not_in_a_managed_domain(tmp_path):
    text = rules_text("  - name: me\n    addresses: [me@other.example]\n    to: x@y.example\n")
    only(tmp_path, text, "- name: me", "rule me: me@other.example is not in a managed domain "
                                       "(add its domain under domains:)")


def test_rule_address_in_an_excluded_subdomain(tmp_path):
    text = ("domains:\n  d.example: {subdomain_addressing: true, subdomain_exclude: [imx]}\n"
            "rules:\n  - name: me\n    addresses: [me@imx.d.example]\n    to: x@y.example\n")
    only(tmp_path, text, "- name: me", "rule me: me@imx.d.example is not in a managed domain "
                                       "(add its domain under domains:)")


def test_rule_address_in_a_managed_subdomain_is_fine(tmp_path):
    c = ok(tmp_path, "domains:\n  d.example: {subdomain_addressing: true}\n"
                     "rules:\n  - {addresses: [shop@kid.d.example], to: x@y.example}\n")
    assert c.rules[0].addresses == ("shop@kid.d.example",)


def test_exact_address_in_two_rules(tmp_path):
    text = rules_text("""\
      - name: a
        addresses: [me@d.example]
        to: x@y.example
      - name: b
        addresses: [ME@D.Example.]
        to: z@y.example
    """)
    only(tmp_path, text, "- name: b", "rule b: me@d.example is already matched by rule a "
                                      "(exact addresses must be unique)")


@pytest.mark.parametrize("pattern, reason", [
    ("''", "empty pattern"),
    ("'" + "a" * 1001 + "'", "longer than 1000 characters"),
])
def test_rule_pattern_bad(tmp_path, pattern, reason):
    text = rules_text(f"  - name: p\n    patterns:\n      - {pattern}\n    to: x@y.example\n")
    path, found = problems(tmp_path, text)
    shown = pattern.strip("'")
    assert found == [f"{path}:{line(text, '- ' + pattern[:20])}: rule p: pattern {shown!r}: {reason}"]


@pytest.mark.parametrize("pattern", [r"(a)\1@d\.example", r"(?=a).*@d\.example", r"a(b@d\.example",
                                     r"a{2000}@d\.example"])
def test_rule_pattern_not_re2(tmp_path, pattern):
    text = rules_text(f"  - name: p\n    patterns:\n      - '{pattern}'\n    to: x@y.example\n")
    path, found = problems(tmp_path, text)
    assert len(found) == 1
    assert found[0].startswith(f"{path}:{line(text, pattern[:6])}: rule p: pattern {pattern!r}: "
                               "not a valid RE2 regular expression (")


def test_pattern_problem_direct():
    assert pattern_problem(r"kid\+.*@d\.example") is None
    assert pattern_problem("") == "empty pattern"
    assert pattern_problem("(?<=a)b").startswith("not a valid RE2 regular expression")


def test_rule_patterns_wrong_type(tmp_path):
    text = rules_text("  - name: p\n    patterns: 5\n    to: x@y.example\n")
    only(tmp_path, text, "patterns", "rule p patterns must be a string or a list of strings")


# ------------------------------------------------------------ rule actions


@pytest.mark.parametrize("flag", ["discard", "keep"])
def test_flags_must_be_bool(tmp_path, flag):
    text = rules_text(f"  - name: r\n    addresses: [a@d.example]\n    to: x@y.example\n    {flag}: 'no thanks'\n")
    path, found = problems(tmp_path, text)
    assert f"{path}:{line(text, flag + ':')}: rule r: {flag} must be true or false" in found


@pytest.mark.parametrize("actions, found_list", [
    ("to: x@y.example\n    refuse: go away", "['to', 'refuse']"),
    ("to: x@y.example\n    discard: true", "['to', 'discard']"),
    ("refuse: go away\n    discard: true", "['refuse', 'discard']"),
    ("keep: false", "none"),
    ("discard: false", "none"),
])
def test_exactly_one_action(tmp_path, actions, found_list):
    text = rules_text(f"  - name: r\n    addresses: [a@d.example]\n    {actions}\n")
    only(tmp_path, text, "- name: r", f"rule r: give exactly one of to, refuse, discard (or keep alone); "
                                      f"found {found_list}")


@pytest.mark.parametrize("other", ["refuse: go away", "discard: true"])
def test_keep_with_refuse_or_discard(tmp_path, other):
    text = rules_text(f"  - name: r\n    addresses: [a@d.example]\n    keep: true\n    {other}\n")
    only(tmp_path, text, "- name: r", "rule r: keep cannot be combined with refuse or discard")


def test_keep_with_to_and_keep_alone(tmp_path):
    c = ok(tmp_path, rules_text("""\
      - {name: both, addresses: [a@d.example], keep: true, to: x@y.example}
      - {name: alone, addresses: [b@d.example], keep: true}
    """))
    assert c.rules[0].keep and c.rules[0].destinations[0].primary.address == "x@y.example"
    assert c.rules[1].keep and c.rules[1].destinations == ()


def test_an_invalid_refuse_is_reported_once(tmp_path):
    # Not also as "found none": the rule does say refuse.
    text = rules_text("  - name: r\n    addresses: [a@d.example]\n    refuse: {code: 250, text: hi}\n")
    only(tmp_path, text, "refuse:", "rule r: refuse code must be 4xx or 5xx")


# ------------------------------------------------------------ destinations


def test_to_is_empty(tmp_path):
    text = rules_text("  - name: r\n    addresses: [a@d.example]\n    to: []\n")
    only(tmp_path, text, "to: []", "rule r: to is empty")


def test_destination_forms(tmp_path):
    c = ok(tmp_path, rules_text("""\
      - name: r
        addresses: [a@d.example]
        to:
          - Plain@Y.Example
          - address: p@y.example
            route: alt
            fallback: single@y.example
          - address: q@y.example
            fallback:
              - f1@y.example
              - {address: f2@y.example, route: alt}
    """))
    assert c.rules[0].destinations == (
        Destination((Target("plain@y.example", "mx"),)),
        Destination((Target("p@y.example", "alt"), Target("single@y.example", "mx"))),
        Destination((Target("q@y.example", "mx"), Target("f1@y.example", "mx"), Target("f2@y.example", "alt"))),
    )


def test_destination_unknown_key(tmp_path):
    text = rules_text("  - name: r\n    addresses: [a@d.example]\n    to:\n      - {adress: x@y.example}\n")
    path, found = problems(tmp_path, text)
    n = line(text, "adress")
    assert found == [f"{path}:{n}: unknown key 'adress' in rule r destination "
                     "(known: address, fallback, fallback_after, route)",
                     f"{path}:{n}: rule r: a destination needs an address"]


def test_destination_not_a_mapping(tmp_path):
    text = rules_text("  - name: r\n    addresses: [a@d.example]\n    to:\n      - 42\n")
    path, found = problems(tmp_path, text)
    n = line(text, "- 42")
    assert found == [f"{path}:{n}: rule r destination must be a mapping",
                     f"{path}:{n}: rule r: a destination needs an address"]


def test_destination_address_invalid(tmp_path):
    text = rules_text("  - name: r\n    addresses: [a@d.example]\n    to:\n      - x@y.example\n      - nobody\n")
    only(tmp_path, text, "- nobody", "rule r: destination 'nobody': address has no domain")


def test_fallback_address_invalid(tmp_path):
    text = rules_text("""\
      - name: r
        addresses: [a@d.example]
        to:
          - address: x@y.example
            fallback:
              - ok@y.example
              - bad@@y.example
    """)
    only(tmp_path, text, "bad@@", "rule r: destination 'bad@@y.example': space or '@' in an unquoted local part")


@pytest.mark.parametrize("route, shown", [("nope", "'nope'"), ("[alt]", "['alt']"), ("{a: 1}", "{'a': 1}")])
def test_destination_unknown_route(tmp_path, route, shown):
    text = rules_text(f"  - name: r\n    addresses: [a@d.example]\n    to:\n      - address: x@y.example\n"
                      f"        route: {route}\n")
    only(tmp_path, text, "address: x@", f"rule r: unknown route {shown} (defined: alt, mx)")


def test_fallback_unknown_route_and_key(tmp_path):
    text = rules_text("""\
      - name: r
        addresses: [a@d.example]
        to:
          - address: x@y.example
            fallback:
              - {address: f@y.example, route: nope, via: x}
    """)
    path, found = problems(tmp_path, text)
    n = line(text, "f@y.example")
    assert found == [f"{path}:{n}: unknown key 'via' in rule r fallback (known: address, route)",
                     f"{path}:{n}: rule r: unknown route 'nope' (defined: alt, mx)"]


def test_fallback_chain_names_an_address_twice(tmp_path):
    text = rules_text("""\
      - name: r
        addresses: [a@d.example]
        to:
          - address: x@y.example
            fallback: [f@y.example, X@Y.example]
    """)
    only(tmp_path, text, "- address: x@", "rule r: a fallback chain names the same address twice")


def test_fan_out_may_share_a_fallback(tmp_path):
    c = ok(tmp_path, rules_text("""\
      - name: r
        addresses: [a@d.example]
        to:
          - {address: one@y.example, fallback: shared@y.example}
          - {address: two@y.example, fallback: shared@y.example}
    """))
    assert [d.chain[-1].address for d in c.rules[0].destinations] == ["shared@y.example"] * 2


# -------------------------------------------------------------------- loops


def test_destination_in_a_managed_domain_loops(tmp_path):
    text = rules_text("  - name: r\n    addresses: [a@d.example]\n    to:\n      - x@y.example\n"
                      "      - B@D.Example\n")
    only(tmp_path, text, "B@D", "destination b@d.example is in the managed domain d.example: that would loop "
                                "(if it is a subdomain handled elsewhere, add it to subdomain_exclude)")


def test_destination_in_a_managed_subdomain_loops(tmp_path):
    text = ("domains:\n  d.example: {subdomain_addressing: true, subdomain_exclude: [imx]}\n"
            "rules:\n  - name: r\n    addresses: [a@d.example]\n    to:\n      - address: x@y.example\n"
            "        fallback: [a@imx.d.example, a@backup.d.example]\n")
    only(tmp_path, text, "fallback", "destination a@backup.d.example is in the managed domain d.example: that "
                                     "would loop (if it is a subdomain handled elsewhere, add it to "
                                     "subdomain_exclude)")


def test_catch_all_destination_loops(tmp_path):
    text = "domains:\n  d.example:\n    catch_all:\n      to: someone@d.example\n"
    only(tmp_path, text, "to: someone", "destination someone@d.example is in the managed domain d.example: "
                                        "that would loop (if it is a subdomain handled elsewhere, add it to "
                                        "subdomain_exclude)")


def test_destination_in_another_managed_domain_loops(tmp_path):
    text = ("domains:\n  a.example: {}\n  b.example: {}\n"
            "rules:\n  - {name: r, addresses: [x@a.example], to: x@b.example}\n")
    only(tmp_path, text, "name: r", "destination x@b.example is in the managed domain b.example: that would loop "
                                    "(if it is a subdomain handled elsewhere, add it to subdomain_exclude)")


# -------------------------------------------------------- route conflicts


def test_one_address_one_route(tmp_path):
    text = rules_text("""\
      - name: a
        addresses: [a@d.example]
        to: [x@y.example]
      - name: b
        addresses: [b@d.example]
        to:
          - address: X@y.example
            route: alt
    """)
    only(tmp_path, text, "- name: b", f"rule b: x@y.example uses route alt here but mx at line "
                                      f"{line(text, '- name: a')}; one address, one route")


def test_route_conflict_with_a_catch_all(tmp_path):
    text = ("routes:\n  alt: ['[alt.example]']\n"
            "domains:\n  d.example:\n    catch_all:\n      to: [{address: x@y.example, route: alt}]\n"
            "rules:\n  - name: a\n    addresses: [a@d.example]\n    to: [x@y.example]\n")
    only(tmp_path, text, "catch_all", f"rule catch-all@d.example: x@y.example uses route alt here but mx at "
                                      f"line {line(text, '- name: a')}; one address, one route")


def test_route_conflict_inside_one_rule(tmp_path):
    text = rules_text("""\
      - name: a
        addresses: [a@d.example]
        to:
          - {address: p@y.example, fallback: [x@y.example]}
          - {address: x@y.example, route: alt}
    """)
    n = line(text, "- name: a")
    only(tmp_path, text, "- name: a", f"rule a: x@y.example uses route alt here but mx at line {n}; "
                                      "one address, one route")


# ---------------------------------------------------------------- refuse


def refuse_rule(body: str) -> str:
    return rules_text("  - name: r\n    addresses: [a@d.example]\n    refuse:" + body)


@pytest.mark.parametrize("body, reply", [
    (" Gone\n", Reply(550, "5.7.1", ("Gone",))),
    ("\n      text: Try later\n      code: 450\n", Reply(450, "4.7.1", ("Try later",))),
    ("\n      code: 550\n      status: 5.1.6\n      text: Moved to me@new.example\n",
     Reply(550, "5.1.6", ("Moved to me@new.example",))),
    ("\n      code: 551\n      status: 5.1.6\n      text: |\n        Moved.\n        Write to me@new.example\n",
     Reply(551, "5.1.6", ("Moved.", "Write to me@new.example"))),
    # CR LF in the text make separate reply lines (each sent with its own code):
    # they can never smuggle a raw SMTP line into the session.
    (' "Gone\\r\\n250 2.0.0 OK"\n', Reply(550, "5.7.1", ("Gone", "250 2.0.0 OK"))),
    (' "Gone\\rDATA"\n', Reply(550, "5.7.1", ("Gone", "DATA"))),
    (' "Gone\\NRCPT TO:<x@y>"\n', Reply(550, "5.7.1", ("Gone", "RCPT TO:<x@y>"))),  # \N is NEL
    (' "  padded  \\n  lines  "\n', Reply(550, "5.7.1", ("padded", "lines"))),
    ("\n      text: '" + "x" * 400 + "'\n", Reply(550, "5.7.1", ("x" * 400,))),
    ("\n      text: |\n" + "".join(f"        line {i}\n" for i in range(10)),
     Reply(550, "5.7.1", tuple(f"line {i}" for i in range(10)))),
])
def test_refuse_good(tmp_path, body, reply):
    rule = ok(tmp_path, refuse_rule(body)).rules[0]
    assert rule.refuse == reply
    assert all("\r" not in ln and "\n" not in ln for ln in rule.refuse.lines)


def test_reply_str():
    assert str(Reply(550, "5.1.6", ("Moved.", "Write to me"))) == "550 5.1.6 Moved. / Write to me"


@pytest.mark.parametrize("code", ["250", "600", "399", "'550'", "true", "5.5"])
def test_refuse_code_bad(tmp_path, code):
    only(tmp_path, refuse_rule(f"\n      code: {code}\n      text: no\n"), "refuse:",
         "rule r: refuse code must be 4xx or 5xx")


@pytest.mark.parametrize("code, status, klass", [
    (550, "'5.1'", "5"), (550, "'4.7.1'", "5"), (450, "'5.7.1'", "4"), (550, "'5.1.1000'", "5"),
    (550, "'x.1.1'", "5"), (550, "5", "5"), (550, "'2.0.0'", "5"),
])
def test_refuse_status_bad(tmp_path, code, status, klass):
    import yaml

    shown = repr(yaml.safe_load(status))
    only(tmp_path, refuse_rule(f"\n      code: {code}\n      status: {status}\n      text: no\n"), "refuse:",
         f"rule r: refuse status {shown} must look like {klass}.7.1 and match the code's class")


@pytest.mark.parametrize("body", ["\n      code: 550\n", " ''\n", " '   '\n", "\n      text: 5\n",
                                  "\n      text: [a, b]\n"])
def test_refuse_needs_a_text(tmp_path, body):
    only(tmp_path, refuse_rule(body), "refuse:", "rule r: refuse needs a text")


@pytest.mark.parametrize("text", [
    '"first\\n\\nthird"',  # an empty line
    '"tab\\there"',
    '"nul\\0here"',
    '"bell\\a"',
    '"esc\\e[31m"',
    '"caf\\u00e9"',  # not ASCII
    '"del\\x7f"',
    '"line\\u2028sep"',  # splitlines splits on it, and the pieces are fine... but not the \x1c below
    '"fs\\x1cgs"',
])
def test_refuse_text_printable_ascii(tmp_path, text):
    path = write(tmp_path, refuse_rule(f" {text}\n"))
    try:
        rule = load(path).rules[0]
    except ConfigError as exc:
        assert exc.problems == [f"{path}:{line(refuse_rule(' ' + text), 'refuse:')}: rule r: refuse text must "
                                "be printable ASCII, without empty lines"]
    else:
        # Accepted only if every resulting line is printable ASCII (a separator split it).
        assert all(ln and all(0x20 <= ord(ch) <= 0x7E for ch in ln) for ln in rule.refuse.lines), rule.refuse
        assert text in ('"line\\u2028sep"', '"fs\\x1cgs"')


def test_refuse_text_lines_limit(tmp_path):
    eleven = "\n      text: |\n" + "".join(f"        line {i}\n" for i in range(11))
    only(tmp_path, refuse_rule(eleven), "refuse:", "rule r: refuse text is limited to 10 lines of 400 characters")
    long = "\n      text: '" + "x" * 401 + "'\n"
    only(tmp_path, refuse_rule(long), "refuse:", "rule r: refuse text is limited to 10 lines of 400 characters")


def test_refuse_unknown_key(tmp_path):
    text = refuse_rule("\n      message: no\n")
    path, found = problems(tmp_path, text)
    n = line(text, "refuse:")
    assert found == [f"{path}:{line(text, 'message')}: unknown key 'message' in rule r refuse (known: code, "
                     "status, text)",
                     f"{path}:{n}: rule r: refuse needs a text"]


def test_refuse_wrong_type(tmp_path):
    text = refuse_rule(" [no]\n")
    path, found = problems(tmp_path, text)
    n = line(text, "refuse:")
    assert found == [f"{path}:{n}: rule r refuse must be a mapping", f"{path}:{n}: rule r: refuse needs a text"]


# ------------------------------------------------------- many problems at once


def test_every_problem_is_reported_at_once(tmp_path):
    text = """\
        milter:
          timeout: 0
        routes:
          bad: ['smtp://relay']
        domains:
          d.example:
            plus_delimiters: "x"
        colour: blue
        rules:
          - name: a
            patterns: ['(?=x)']
            to: [me@d.example]
          - name: b
            addresses: [b@elsewhere.example]
            refuse: {code: 200, text: ok}
        """
    path, found = problems(tmp_path, text)
    expected_lines = {
        line(text, "colour"): "unknown key 'colour'",
        line(text, "timeout"): "timeout must be a whole number",
        line(text, "smtp://"): "route bad: hop 'smtp://relay'",
        line(text, "plus_delimiters"): "plus_delimiters must be punctuation",
        line(text, "(?=x)"): "rule a: pattern '(?=x)': not a valid RE2",
        line(text, "refuse:"): "rule b: refuse code must be 4xx or 5xx",
        line(text, "- name: b"): "rule b: b@elsewhere.example is not in a managed domain",
        line(text, "to: [me@"): "destination me@d.example is in the managed domain d.example",
    }
    assert len(found) == len(expected_lines)
    for n, reason in expected_lines.items():
        assert any(p.startswith(f"{path}:{n}: {reason}") for p in found), (n, reason, found)


# ---------------------------------------------------- loading never crashes

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12),
                    st.sampled_from(["mx", "d.example", "a@d.example", "x@y.example", "[r.example]:25",
                                     "0660", "+", "unix:/x", "fwd.example", "0123456789abcdef0"]))
keys = st.sampled_from(["milter", "srs", "dkim", "routes", "default_route", "domains", "rules", "server_name",
                        "d.example", "to", "address", "fallback", "route", "refuse", "code", "status", "text",
                        "discard", "keep", "addresses", "patterns", "name", "catch_all", "plus_delimiters",
                        "subdomain_addressing", "subdomain_exclude", "socket", "socket_mode", "secrets",
                        "domain", "keys", "selector", "key", "mx", "alt"])
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=5)), max_leaves=30)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, trees, max_size=8))
def test_any_yaml_shape_is_a_config_or_a_config_error(data):
    import yaml

    text = yaml.safe_dump(data)
    try:
        loads(text, "fuzz.yaml", read_secrets=False)
    except ConfigError as exc:
        assert exc.problems
        assert all(p.startswith("fuzz.yaml:") for p in exc.problems)
