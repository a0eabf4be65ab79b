"""alias_files: big alias tables in Postfix's virtual-table shape."""

from __future__ import annotations

import pytest

from routemilter.config import ConfigError, load
from routemilter.rules import Action, Router
from testkit import SRS_SECTION

YAML = "\n" + SRS_SECTION + """\
alias_files: [aliases]
domains:
  family.test:
    subdomain_addressing: true
rules:
  - name: me
    addresses: [me@family.test]
    to: [me@gmail.test]
  - name: shops
    patterns: ['shop-.*@family\\.test']
    to: [shops@gmail.test]
"""


def write(tmp_path, aliases: str):
    (tmp_path / "aliases").write_text(aliases)
    path = tmp_path / "rm.yaml"
    path.write_text(YAML)
    return path


def problems(tmp_path, aliases: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, aliases))
    return info.value.problems


def test_lines_become_exact_rules_with_fan_out_and_fallback_chains(tmp_path):
    config = load(write(tmp_path, "# sales team\n"
                                  "sales@family.test   bob@gmail.test > bob@outlook.test, Alice@Outlook.test\n"
                                  "\n"
                                  "info@family.test\tme@gmail.test   # trailing comment\n"))
    router = Router(config)
    decision = router.decide("<Sales+q3@family.test>")
    assert decision.action is Action.ROUTE
    assert decision.rule.name == "aliases:2" and decision.rule.source.endswith("aliases")
    assert [[t.address for t in d.chain] for d in decision.destinations] == [
        ["bob@gmail.test", "bob@outlook.test"], ["alice@outlook.test"]]
    assert all(t.route == "mx" for d in decision.destinations for t in d.chain)
    assert router.decide("info@family.test").destinations[0].primary.address == "me@gmail.test"


def test_alias_file_entries_beat_patterns_like_any_exact_address(tmp_path):
    router = Router(load(write(tmp_path, "shop-1@family.test special@gmail.test\n")))
    assert router.decide("shop-1@family.test").rule.name == "aliases:1"
    assert router.decide("shop-2@family.test").rule.name == "shops"


@pytest.mark.parametrize("line, reason", [
    ("nodest@family.test", "expected an alias and at least one destination"),
    ("bad@@family.test x@gmail.test", "space or '@' in an unquoted local part"),
    ("x@other.test y@gmail.test", "x@other.test is not in a managed domain"),
    ("loop@family.test a@kid.family.test", "destination a@kid.family.test is in a managed or the SRS domain"),
    ("srs@family.test a@fwd.family.test", "destination a@fwd.family.test is in a managed or the SRS domain"),
    ("twice@family.test a@gmail.test > a@gmail.test", "a fallback chain names the same address twice"),
    ("me@family.test other@gmail.test", "me@family.test is already matched by rule me"),
])
def test_each_bad_line_is_named_by_file_and_line(tmp_path, line, reason):
    found = problems(tmp_path, "ok@family.test a@gmail.test\n" + line + "\n")
    assert len(found) == 1, found
    assert found[0].startswith(f"{tmp_path / 'aliases'}:2: ") and reason in found[0], found


def test_duplicate_inside_the_file_is_refused(tmp_path):
    found = problems(tmp_path, "a@family.test x@gmail.test\nA@family.test y@gmail.test\n")
    assert found == [f"{tmp_path / 'aliases'}:2: rule aliases:2: a@family.test is already matched by rule "
                     f"aliases:1 (exact addresses must be unique)"]


def test_unreadable_alias_file_is_a_config_error_at_its_yaml_line(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text(YAML)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems == [
        f"{path}:5: cannot read alias file {tmp_path / 'aliases'}: No such file or directory"]
