"""Each seed worker's example config (conf/examples/*.yaml) routes the addresses the
worker handles to exactly the chains the worker implies.

The seed (shared/seeds/001_*.txt) shows Cloudflare Email Workers; what each one does:

approach 1: regex aliases per user (plus-addressing and subdomain addressing, case
  insensitive); primary Gmail, then a backup that reaches the same mailbox through
  ImprovMX (imx.mydomain.net), and user1@outlook.com as the final catch-all for every
  branch, including the `default:` case (user3). Its alias "user1+.*@mydomain.net" is a
  JavaScript regex where `1+` is "one or more 1s", so bare user1@mydomain.net matches too.
approach 2: a user table of exact aliases over two domains, primary Gmail and backup
  GMX each; anything else goes to the catch-all user (its own primary and backup).
approach 3: forward to Gmail, on failure to the alternative mailbox; nothing else.
fan-out: one address delivered to two mailboxes, independently.
fan-out with backups: each mailbox with its own backup; the first variant sends every
  failure to one shared email@outlook.com.

`explain --json` is run through cli.main for every address, and once through the
installed `routemilter` command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from routemilter import cli

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "conf" / "examples"

PASS = "pass"
UNKNOWN = ("refuse", 550, "5.1.1")

U1 = ["user1@gmail.com", "user1@imx.mydomain.net", "user1@outlook.com"]
U2 = ["user2@gmail.com", "user2@imx.mydomain.net", "user1@outlook.com"]
U3 = ["user3@gmail.com", "user3@imx.mydomain.net", "user1@outlook.com"]  # the worker's default case
CATCHALL2 = ["catchall@gmail.com", "catchall@gmx.de"]

# file -> {address: [chain, ...] (fan-out branches, each primary then fallbacks) or PASS or UNKNOWN}
EXPECTED: dict[str, dict[str, object]] = {
    "approach1-regex-aliases.yaml": {
        "user1@mydomain.net": [U1],
        "user1+shopping@mydomain.net": [U1],
        "USER1+News@MyDomain.NET": [U1],  # RegExp(..., "i")
        "anything@user1.mydomain.net": [U1],
        "Anything@User1.MyDomain.net": [U1],
        "user2@mydomain.net": [U2],
        "user2+x@mydomain.net": [U2],
        "shop@user2.mydomain.net": [U2],
        "user3@mydomain.net": [U3],
        "someone@mydomain.net": [U3],
        "x@user3.mydomain.net": [U3],
        "x@unknown.mydomain.net": [U3],
        "user1@imx.mydomain.net": PASS,  # ImprovMX's subdomain: not this server's
        "user1@gmail.com": PASS,
    },
    "approach2-user-table.yaml": {
        "first@firstdomain.de": [["first@gmail.com", "first@gmx.de"]],
        "first@seconddomain.de": [["first@gmail.com", "first@gmx.de"]],
        "First@FirstDomain.DE": [["first@gmail.com", "first@gmx.de"]],  # RegExp(..., "i")
        "second@firstdomain.de": [["second@gmail.com", "second@gmx.de"]],
        "second@seconddomain.de": [CATCHALL2],  # second's alias is only in firstdomain.de
        "third_alias1@firstdomain.de": [["third@gmail.com", "third@gmx.de"]],
        "third_alias2@firstdomain.de": [["third@gmail.com", "third@gmx.de"]],
        "fourth@firstdomain.de": [["fourth@gmail.com", "fourth@gmx.de"]],
        "nobody@firstdomain.de": [CATCHALL2],
        "first+news@firstdomain.de": [CATCHALL2],  # whole-address match: no plus-addressing
        "nobody@seconddomain.de": [CATCHALL2],
        "first@gmail.com": PASS,
    },
    "approach3-simple-backup.yaml": {
        "dariusz@mydomain.net": [["dariusz@gmail.com", "dariusz@outlook.com"]],
        "Dariusz@MyDomain.net": [["dariusz@gmail.com", "dariusz@outlook.com"]],
        "someone@mydomain.net": UNKNOWN,  # no catch-all: refused at RCPT, never bounced later
        "dariusz@gmail.com": PASS,
    },
    "fanout.yaml": {
        "family@mydomain.net": [["email1@gmail.com"], ["email2@gmail.com"]],
        "someone@mydomain.net": UNKNOWN,
    },
    "fanout-with-backups.yaml": {
        "family@mydomain.net": [["email1@gmail.com", "email1@outlook.com"],
                                ["email2@gmail.com", "email2@outlook.com"]],
        "everyone@mydomain.net": [["email1@gmail.com", "email@outlook.com"],
                                  ["email2@gmail.com", "email@outlook.com"]],
        "someone@mydomain.net": UNKNOWN,
    },
}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_passes_check(capsys, name):
    path = EXAMPLES / name
    assert cli.main(["-c", str(path), "check"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: OK: ") and err == ""


def explain(capsys, path: Path, addresses: list[str]) -> list[dict]:
    assert cli.main(["-c", str(path), "explain", "--json", *addresses]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return json.loads(out)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_routes_as_the_worker_does(capsys, name):
    expected = EXPECTED[name]
    results = explain(capsys, EXAMPLES / name, list(expected))
    assert len(results) == len(expected)
    for (address, want), got in zip(expected.items(), results, strict=True):
        assert got["address"] == address.lower()
        if want == PASS:
            assert (got["action"], got["destinations"]) == ("pass", []), address
        elif want == UNKNOWN:
            assert got["action"] == "refuse", address
            assert (got["reply"]["code"], got["reply"]["status"]) == (550, "5.1.1"), address
            assert got["destinations"] == []
        else:
            assert got["action"] == "route", (address, got)
            chains = [[t["address"] for t in chain] for chain in got["destinations"]]
            assert chains == want, address
            assert got["keep"] is False
            # the seeds forward directly: every hop is the destination's own MX
            assert all(t["route"] == "mx" and t["hops"] == ["mx"] for c in got["destinations"] for t in c)


def test_approach1_reasons(capsys):
    # Which rule, and why: the explain output a reader uses to follow the worker.
    r = {d["address"]: d for d in explain(capsys, EXAMPLES / "approach1-regex-aliases.yaml", [
        "user1@mydomain.net", "user1+shopping@mydomain.net", "any@user2.mydomain.net", "someone@mydomain.net"])}
    assert r["user1@mydomain.net"]["rule"] == "user1"
    assert r["user1+shopping@mydomain.net"]["rule"] == "user1"
    assert r["any@user2.mydomain.net"]["rule"] == "user2"
    assert r["someone@mydomain.net"]["rule"] == "catch-all@mydomain.net"
    assert r["someone@mydomain.net"]["reason"].endswith("catch-all of mydomain.net")


def test_installed_command_gives_the_same_answer(capsys):
    name = "approach1-regex-aliases.yaml"
    addresses = list(EXPECTED[name])
    command = Path(sys.executable).parent / "routemilter"
    if not command.exists():
        command = REPO / ".venv" / "bin" / "routemilter"
    result = subprocess.run([str(command), "-c", str(EXAMPLES / name), "explain", "--json", *addresses],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == explain(capsys, EXAMPLES / name, addresses)
