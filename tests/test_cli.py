"""The `routemilter` command line: check, explain (text and --json), --version, -c."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from routemilter import __version__, cli
from routemilter.config import DEFAULT_PATH

CONFIG = """\
routes:
  backup: [mx, "[relay.example]:587"]
domains:
  d.example:
    catch_all:
      to: [catch@y.example]
  strict.example: {}
rules:
  - name: me
    addresses: [me@d.example]
    to:
      - address: me@gmail.example
        fallback:
          - {address: me@outlook.example, route: backup}
      - other@y.example
  - name: gone
    addresses: [old@strict.example]
    refuse: {code: 551, status: 5.1.6, text: "Moved\\nWrite to new@d.example"}
  - name: quiet
    addresses: [noreply@strict.example]
    discard: true
  - name: local
    addresses: [postmaster@strict.example]
    keep: true
    to: [admin@y.example]
  - name: shops
    patterns: ['shop-.*@strict\\.example']
    to: [shops@y.example]
"""


def line_of(marker: str) -> int:
    return next(i for i, ln in enumerate(CONFIG.splitlines(), 1) if marker in ln)


@pytest.fixture
def conf(write_config) -> Path:
    return write_config(CONFIG)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------- basics


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"routemilter {__version__}\n"


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, _err = run(capsys)
    assert code == 2
    assert out.startswith("usage: routemilter")
    for command in ("check", "explain", "run", "postfix-config", "sendmail-config", "dkim-keygen"):
        assert command in out


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_explain_needs_an_address(capsys, conf):
    with pytest.raises(SystemExit) as info:
        cli.main(["-c", str(conf), "explain"])
    assert info.value.code == 2
    assert "the following arguments are required: ADDRESS" in capsys.readouterr().err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "routemilter", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout) == (0, f"routemilter {__version__}\n")


# -------------------------------------------------------------------- check


def test_check_ok(capsys, conf):
    code, out, err = run(capsys, "-c", str(conf), "check")
    assert code == 0
    assert out == (f"{conf}: OK: 2 domain(s), 5 rule(s) (4 exact address(es), 1 pattern(s)), 2 route(s)\n")
    assert err == ""


def test_check_long_option(capsys, conf):
    code, out, _ = run(capsys, "--config", str(conf), "check")
    assert code == 0 and out.startswith(f"{conf}: OK:")


def test_check_refuses_a_bad_config_listing_every_problem(capsys, write_config):
    bad = write_config(textwrap.dedent("""\
        domains:
          d.example: {plus_delimiters: "x"}
        rules:
          - name: loop
            addresses: [a@d.example]
            to: [b@d.example]
        """), "bad.yaml")
    code, out, err = run(capsys, "-c", str(bad), "check")
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        "routemilter: config refused (2 problem(s)):",
        f'  {bad}:2: plus_delimiters must be punctuation characters like "+" or "+-"',
        f"  {bad}:6: destination b@d.example is in the managed domain d.example: that would loop (if it is a "
        "subdomain handled elsewhere, add it to subdomain_exclude)",
    ]


def test_check_missing_file(capsys, tmp_path):
    code, out, err = run(capsys, "-c", str(tmp_path / "none.yaml"), "check")
    assert code == 1 and out == ""
    assert err == (f"routemilter: config refused (1 problem(s)):\n"
                   f"  {tmp_path / 'none.yaml'}: cannot read: No such file or directory\n")


@pytest.mark.skipif(os.path.exists(DEFAULT_PATH), reason="this machine has a real config")
def test_check_default_path(capsys):
    code, _, err = run(capsys, "check")
    assert code == 1
    assert f"  {DEFAULT_PATH}: cannot read: No such file or directory" in err


def test_check_reads_srs_secrets_but_explain_does_not(capsys, write_config):
    path = write_config(CONFIG + "srs:\n  domain: fwd.example\n  secrets_file: /nonexistent/srs-secrets\n", "srs.yaml")
    code, _, err = run(capsys, "-c", str(path), "check")
    assert code == 1
    assert "cannot read srs.secrets_file /nonexistent/srs-secrets" in err
    code, out, err = run(capsys, "-c", str(path), "explain", "me@d.example")
    assert code == 0 and err == ""
    assert out.startswith("me@d.example\n  action: route\n")


# ------------------------------------------------------------ explain (text)


def test_explain_text(capsys, conf):
    code, out, err = run(capsys, "-c", str(conf), "explain", "Me+X@D.Example", "old@strict.example",
                         "nobody@strict.example", "x@gmail.example", "noreply@strict.example",
                         "postmaster@strict.example", "shop-1@strict.example", "who@d.example", "not an address")
    assert code == 0 and err == ""
    me, gone, shops = line_of("- name: me"), line_of("- name: gone"), line_of("- name: shops")
    assert out == textwrap.dedent(f"""\
        me+x@d.example
          action: route
          why:    rule me (line {me}): exact address me@d.example (plus-addressing: me+x without its extension)
          destination 1: me@gmail.example  (route mx: mx; deferred: waits for a bounce (needs srs: and bounces:))
            then fallback 1: me@outlook.example  (route backup: mx -> [relay.example]:587)
          destination 2: other@y.example  (route mx: mx)

        old@strict.example
          action: refuse
          why:    rule gone (line {gone}): exact address old@strict.example
          reply:  551 5.1.6 Moved / Write to new@d.example

        nobody@strict.example
          action: refuse
          why:    no rule matches and strict.example has no catch-all
          reply:  550 5.1.1 Recipient address rejected: no such user here

        x@gmail.example
          action: pass
          why:    gmail.example is not a managed domain

        noreply@strict.example
          action: discard
          why:    rule quiet (line {line_of('- name: quiet')}): exact address noreply@strict.example

        postmaster@strict.example
          action: route
          why:    rule local (line {line_of('- name: local')}): exact address postmaster@strict.example
          destination 1: admin@y.example  (route mx: mx)
          keep:   the original recipient also gets a copy

        shop-1@strict.example
          action: route
          why:    rule shops (line {shops}): pattern 'shop-.*@strict\\\\.example'
          destination 1: shops@y.example  (route mx: mx)

        who@d.example
          action: route
          why:    rule catch-all@d.example (line {line_of('catch_all:')}): catch-all of d.example
          destination 1: catch@y.example  (route mx: mx)

        not an address
          action: refuse
          why:    malformed address: address has no domain
          reply:  553 5.1.3 Recipient address rejected: malformed address
        """)


def test_explain_refuses_a_bad_config(capsys, write_config):
    bad = write_config("domains: {}\n", "bad.yaml")
    code, out, err = run(capsys, "-c", str(bad), "explain", "a@d.example")
    assert code == 1 and out == ""
    assert err == (f"routemilter: config refused (1 problem(s)):\n"
                   f"  {bad}:1: domains must map domain names to their settings\n")


# ------------------------------------------------------------ explain --json

KEYS = {"address", "action", "rule", "rule_line", "reason", "keep", "destinations"}


def explain_json(capsys, conf, *addresses):
    code, out, err = run(capsys, "-c", str(conf), "explain", "--json", *addresses)
    assert code == 0 and err == ""
    return json.loads(out)


def test_explain_json_schema(capsys, conf):
    addresses = ["me@d.example", "old@strict.example", "nobody@strict.example", "x@gmail.example",
                 "noreply@strict.example", "postmaster@strict.example", "<bad", "who@d.example"]
    result = explain_json(capsys, conf, *addresses)
    assert isinstance(result, list) and len(result) == len(addresses)
    for item in result:
        refused = item["action"] == "refuse"
        assert set(item) == KEYS | ({"reply"} if refused else set())
        assert item["action"] in {"pass", "route", "refuse", "discard"}
        assert isinstance(item["address"], str) and isinstance(item["reason"], str)
        assert isinstance(item["keep"], bool)
        assert (item["rule"] is None) == (item["rule_line"] is None)
        assert item["rule"] is None or (isinstance(item["rule"], str) and isinstance(item["rule_line"], int))
        for chain in item["destinations"]:
            assert chain, "a destination has at least its primary"
            for target in chain:
                assert set(target) == {"address", "route", "hops", "fallback_after"}
                assert isinstance(target["hops"], list) and target["hops"]
                assert (target["fallback_after"] is None) == (target is chain[-1])
        if refused:
            assert set(item["reply"]) == {"code", "status", "text"}
            assert isinstance(item["reply"]["code"], int) and isinstance(item["reply"]["text"], list)
    assert [i["action"] for i in result] == ["route", "refuse", "refuse", "pass", "discard", "route", "refuse",
                                             "route"]


def test_explain_json_values(capsys, conf):
    me, gone, unknown, foreign, quiet, local, bad = explain_json(
        capsys, conf, "ME@d.example", "old@strict.example", "nobody@strict.example", "x@Gmail.Example",
        "noreply@strict.example", "postmaster@strict.example", "<bad")
    assert me == {
        "address": "me@d.example", "action": "route", "rule": "me", "rule_line": line_of("- name: me"),
        "reason": f"rule me (line {line_of('- name: me')}): exact address me@d.example", "keep": False,
        "destinations": [
            [{"address": "me@gmail.example", "route": "mx", "hops": ["mx"], "fallback_after": "never"},
             {"address": "me@outlook.example", "route": "backup", "hops": ["mx", "[relay.example]:587"],
              "fallback_after": None}],
            [{"address": "other@y.example", "route": "mx", "hops": ["mx"], "fallback_after": None}],
        ],
    }
    assert gone["reply"] == {"code": 551, "status": "5.1.6", "text": ["Moved", "Write to new@d.example"]}
    assert gone["destinations"] == [] and gone["rule"] == "gone"
    assert unknown["reply"] == {"code": 550, "status": "5.1.1",
                                "text": ["Recipient address rejected: no such user here"]}
    assert (unknown["rule"], unknown["rule_line"]) == (None, None)
    assert foreign == {"address": "x@gmail.example", "action": "pass", "rule": None, "rule_line": None,
                       "reason": "gmail.example is not a managed domain", "keep": False, "destinations": []}
    assert (quiet["action"], quiet["destinations"], "reply" in quiet) == ("discard", [], False)
    assert local["keep"] is True and local["destinations"] == [
        [{"address": "admin@y.example", "route": "mx", "hops": ["mx"], "fallback_after": None}]]
    assert bad["address"] == "<bad"
    assert bad["reply"] == {"code": 553, "status": "5.1.3", "text": ["Recipient address rejected: malformed address"]}
