"""Property tests (fuzzing) over the address parser, the rules engine and the config loader.

Two generators: Hypothesis (shrinks a failure to a minimal example) and a
plain seeded random generator (fast, for volume). `make test` runs 200
Hypothesis cases per property and 2,000 random cases per target. The long
mode, ROUTEMILTER_LONG=1, runs 10,000 Hypothesis cases per property and
100,000 random cases for each of the parser, the rules engine and the config
loader (ROUTEMILTER_FUZZ_CASES=N sets the random count); run it on a schedule,
e.g. nightly:

    ROUTEMILTER_LONG=1 .venv/bin/python -m pytest -q tests/test_fuzz.py

What must hold for every generated input:
* the parser raises only AddressError, and its normal form is a fixed point
  free of controls, spaces outside quotes, and over-long parts;
* the rules engine never raises, never routes, discards or refuses a recipient
  outside the managed domains (no open relay), only routes to configured
  destinations, and answers the same for the same address;
* RE2 patterns of any shape compile or are refused at load time, and matching
  stays fast (no catastrophic backtracking);
* the config loader raises only ConfigError, each problem naming file:line.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routemilter.addresses import AddressError, is_null_sender, parse, strip_envelope
from routemilter.config import ConfigError, SRSSettings, loads, managed_domain, pattern_problem
from routemilter.dsn import parse_dsn
from routemilter.rules import Action, Router
from routemilter.srs import SenderRewriter, SRSError
from routemilter.tokens import TokenCodec, TokenError

LONG = os.environ.get("ROUTEMILTER_LONG", "") not in ("", "0")
CASES = 10_000 if LONG else 200  # Hypothesis, per property
RANDOM_CASES = int(os.environ.get("ROUTEMILTER_FUZZ_CASES", 100_000 if LONG else 2_000))  # per target
RANDOM_SECONDS = 3600 if LONG else 120  # a time bound too; the count run is printed
FUZZ = settings(max_examples=CASES, deadline=None, database=None, derandomize=not LONG,
                suppress_health_check=list(HealthCheck))

CONFIG = r"""
domains:
  family.test:
    subdomain_addressing: true
    plus_delimiters: "+-"
    subdomain_exclude: [imx]
    catch_all:
      to: [catch@gmail.test]
  strict.test: {}
rules:
  - name: me
    addresses: [me@family.test, me@strict.test]
    to:
      - address: me@gmail.test
        fallback: [me@outlook.test]
  - name: fan
    addresses: [fan@family.test]
    to: [a@gmail.test, b@outlook.test]
  - name: shops
    patterns: ['shop-[a-z0-9]+@family\.test', '(a|aa)+b@strict\.test', '.*x.*y.*z.*@strict\.test']
    to: [shops@outlook.test]
  - name: gone
    addresses: [gone@family.test]
    refuse: "This address has moved"
  - name: void
    addresses: [void@strict.test]
    discard: true
"""
ROUTER = Router(loads(CONFIG))
DESTINATIONS = {"catch@gmail.test", "me@gmail.test", "a@gmail.test", "b@outlook.test", "shops@outlook.test"}

# Characters that matter to the parser and the rules, plus any Unicode at all.
SPECIAL = list("@<>\"\\ .+-_:,;[]()\t\r\n\x00\x7f\u0130\u2028\ufeff\udcff") + ["SRS0=", "family.test", "strict.test"]
address_text = st.one_of(
    st.text(max_size=400),
    st.lists(st.one_of(st.sampled_from(SPECIAL), st.text(max_size=8)), max_size=40).map("".join),
    st.builds(lambda local, d: f"{local}@{d}",
              st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=70),
              st.sampled_from(["family.test", "FAMILY.test.", "kid.family.test", "strict.test", "x.strict.test",
                               "a.kid.family.test", "imx.family.test", "x.imx.family.test", "gmail.test",
                               "familytest", "family.test.evil.test", "evil-family.test", "[127.0.0.1]"])),
)


@FUZZ
@given(address_text)
def test_parser_never_crashes_and_normal_form_is_a_fixed_point(raw):
    strip_envelope(raw)
    is_null_sender(raw)
    try:
        address = parse(raw)
    except AddressError as exc:
        assert str(exc)  # says why
        return
    text = str(address)
    assert parse(text) == address
    assert text == text.lower() or any(c.lower() != c and c.lower().upper() != c for c in text)
    assert len(address.domain) <= 255 and "@" not in address.domain
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
    if not address.local.startswith('"'):
        assert not any(c.isspace() for c in address.local)


def below_ours(domain: str) -> bool:
    """The oracle: a proper subdomain (any depth) of a managed domain, other than
    the excluded subdomain itself (hosted elsewhere)."""
    if domain == "imx.family.test":
        return False
    labels = domain.split(".")
    return any(".".join(labels[i:]) in ("family.test", "strict.test") for i in range(1, len(labels)))


@FUZZ
@given(address_text)
def test_rules_engine_no_open_relay(raw):
    decision = ROUTER.decide(raw)
    assert decision == ROUTER.decide(raw)  # deterministic
    try:
        address = parse(raw)
    except AddressError:
        assert decision.action is Action.REFUSE and decision.reply.code == 553
        return
    try:
        str(address).encode("utf-8")
    except UnicodeEncodeError:  # invalid UTF-8 from the MTA (pymilter's surrogates): malformed
        assert decision.action is Action.REFUSE and decision.reply.code == 553
        return
    managed = managed_domain(ROUTER.config.domains, address.domain)
    if managed is None and below_ours(address.domain):
        # Below a domain we answer for but not managed: refused, never relayed unrouted.
        assert decision.action is Action.REFUSE and decision.reply.code == 550, (raw, decision)
        return
    if managed is None:
        # Not ours: never rewritten, refused or swallowed; the MTA's relay rules decide.
        assert decision.action is Action.PASS, (raw, decision)
        return
    assert decision.action is not Action.PASS
    if decision.action is Action.ROUTE:
        assert {d.primary.address for d in decision.destinations} <= DESTINATIONS
    if decision.action is Action.REFUSE:
        assert 500 <= decision.reply.code < 600
        assert all("\r" not in line and "\n" not in line for line in decision.reply.lines)


# RE2 syntax pieces, including the ones that make backtracking engines explode.
REGEX_PIECES = ["(a+)+", "(a|aa)*", "(.*)*", "\\1", "(?=x)", "(?<n>a)", "[^@]*", ".*", "+", "*", "?",
                "{1,1000}", "{1000}", "(", ")", "[", "]", "|", "\\", "^", "$", "a", "@", "\\.", "\\d",
                "\\p{L}", "(?i)", "x{2,}", "[a-z]", "é"]
patterns = st.lists(st.sampled_from(REGEX_PIECES), min_size=1, max_size=12).map("".join)


@settings(FUZZ, max_examples=max(CASES // 10, 50))
@given(patterns, st.text(alphabet="a@x.", min_size=0, max_size=60))
def test_any_pattern_is_refused_or_matches_in_bounded_time(pattern, probe):
    problem = pattern_problem(pattern)
    text = CONFIG + f"  - name: fuzz\n    patterns: [{yaml.safe_dump(pattern, default_style=chr(39)).strip()}]\n" \
                    f"    to: [fuzz@gmail.test]\n"
    try:
        config = loads(text)
    except ConfigError as exc:
        assert problem is not None or any("fuzz" in p for p in exc.problems), exc.problems
        return
    assert problem is None
    router = Router(config)
    address = "a" * 40 + probe + "@strict.test"
    started = time.monotonic()
    router.decide(address)
    assert time.monotonic() - started < 0.5, f"{pattern!r} took too long on {address!r}"


def test_backtracking_bombs_are_linear_with_re2():
    # Each would take longer than the age of the universe on a backtracking engine.
    router = ROUTER
    for size in (30, 3000):
        started = time.monotonic()
        decision = router.decide("a" * size + "c@strict.test")
        assert decision.action is Action.REFUSE  # no rule, no catch-all: 550
        assert time.monotonic() - started < 0.5
    for construct in ("(a)\\1@x\\.test", "(?=a)a@x\\.test", "(?<!b)a@x\\.test"):
        assert pattern_problem(construct) is not None  # not in RE2's language: refused at load


# -- config loader: random YAML documents and mutations of a valid one

yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=30),
                         st.sampled_from(["mx", "me@gmail.test", "[127.0.0.1]:25", "0660", "family.test",
                                          "(a+)+", "unix:/tmp/x.sock", "550", "5.7.1"]))
KEYS = ["milter", "srs", "dkim", "routes", "default_route", "domains", "rules", "server_name", "socket",
        "socket_mode", "timeout", "max_hops", "domain", "secrets", "hash_length", "keys", "selector", "key",
        "name", "addresses", "patterns", "to", "refuse", "discard", "keep", "address", "route", "fallback",
        "catch_all", "plus_delimiters", "subdomain_addressing", "subdomain_exclude", "code", "status", "text",
        "family.test", "x"]
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(KEYS), children, max_size=5)),
    max_leaves=25)


def _check_loader(text: str) -> None:
    # Model a config *file*: it is read as strict UTF-8, so text with lone surrogates
    # cannot occur (the long run once fed one through loads(str) and RE2 choked on it).
    text = text.encode("utf-8", "replace").decode("utf-8")
    try:
        config = loads(text, "fuzz.yaml", read_secrets=False)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.startswith("fuzz.yaml:"), problem
        return
    Router(config)  # whatever loads must also build


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS[:8]), yaml_values, max_size=8))
def test_config_loader_structures(document):
    _check_loader(yaml.safe_dump(document, allow_unicode=True))


@FUZZ
@given(st.integers(0, len(CONFIG) - 1), st.integers(0, 40), st.text(max_size=12))
def test_config_loader_mutations(position, cut, insert):
    _check_loader(CONFIG[:position] + insert + CONFIG[position + cut:])


@FUZZ
@given(st.text(max_size=300))
def test_config_loader_any_text(text):
    _check_loader(text)


# -- volume: a seeded random generator, same properties

def _random_address(r: random.Random) -> str:
    pieces = []
    for _ in range(r.randint(0, 30)):
        kind = r.random()
        if kind < 0.4:
            pieces.append(r.choice(SPECIAL))
        elif kind < 0.8:
            pieces.append("".join(r.choice("abcxyz0123456789-_.+") for _ in range(r.randint(1, 8))))
        else:
            pieces.append(chr(r.choice([r.randint(0, 0x7F), r.randint(0x80, 0x7FF), r.randint(0x800, 0x10FFFF)])))
    text = "".join(pieces)
    if r.random() < 0.6:
        text += "@" + r.choice(["family.test", "kid.family.test", "strict.test", "gmail.test",
                                "family.test.evil.test", "FAMILY.TEST.", "a..b", "[127.0.0.1]", ""])
    if r.random() < 0.3:
        text = f"<{text}>"
    return text


def _random_value(r: random.Random, depth: int = 0):
    kind = r.random()
    if depth < 4 and kind < 0.25:
        return {r.choice(KEYS): _random_value(r, depth + 1) for _ in range(r.randint(0, 5))}
    if depth < 4 and kind < 0.4:
        return [_random_value(r, depth + 1) for _ in range(r.randint(0, 4))]
    return r.choice([None, True, False, r.randint(-5, 70000), "mx", "me@gmail.test", "[127.0.0.1]:25",
                     "0660", "family.test", "(a+)+", "550", "5.7.1", "x" * r.randint(0, 300),
                     _random_address(r)])


def _mutate(r: random.Random, text: str) -> str:
    for _ in range(r.randint(1, 4)):
        i = r.randrange(len(text) + 1)
        op = r.random()
        if op < 0.35:
            text = text[:i] + text[i + r.randint(1, 30):]
        elif op < 0.7:
            text = text[:i] + r.choice([":", "-", " ", "\n", "\t", "'", '"', "[", "{", "&a", "*a",
                                        "!!python/object:os.system", "@", "\x00", "\udcff", "é", "0" * 20]) + text[i:]
        else:
            j = r.randrange(len(text) + 1)
            text = text[:i] + text[j:j + 40] + text[i:]
    return text


def _run_random(name, check, capsys=None):
    r = random.Random(f"routemilter-{name}-{os.environ.get('ROUTEMILTER_FUZZ_SEED', '1')}")
    deadline = time.monotonic() + RANDOM_SECONDS
    started = time.monotonic()
    done = 0
    while done < RANDOM_CASES and time.monotonic() < deadline:
        check(r)
        done += 1
    line = f"fuzz {name}: {done} random cases in {time.monotonic() - started:.1f}s"
    if capsys is not None:
        with capsys.disabled():
            print(f"\n{line}")
    else:
        print(f"\n{line}")
    assert done == RANDOM_CASES, f"only {done} of {RANDOM_CASES} cases within {RANDOM_SECONDS}s"


def test_random_parser_and_rules(capsys):
    def check(r):
        raw = _random_address(r)
        test_parser_never_crashes_and_normal_form_is_a_fixed_point.hypothesis.inner_test(raw)
        test_rules_engine_no_open_relay.hypothesis.inner_test(raw)
    _run_random("parser+rules", check, capsys)


def test_random_config_loader(capsys):
    def check(r):
        if r.random() < 0.5:
            document = {r.choice(KEYS[:8]): _random_value(r) for _ in range(r.randint(0, 8))}
            _check_loader(yaml.safe_dump(document, allow_unicode=True))
        else:
            _check_loader(_mutate(r, CONFIG))
    _run_random("config", check, capsys)


# -- bounces: the DSN parser, and forgery of SRS addresses and bounce tokens

DSN = (b"From: MAILER-DAEMON@mx.gmail.test\r\nTo: rmb=x@fwd.test\r\nSubject: Undelivered Mail\r\n"
       b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n"
       b"\tboundary=\"BOUND\"\r\n\r\n--BOUND\r\nContent-Type: text/plain\r\n\r\nIt failed.\r\n"
       b"--BOUND\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.gmail.test\r\n\r\n"
       b"Final-Recipient: rfc822; me@gmail.test\r\nOriginal-Recipient: rfc822;me@gmail.test\r\n"
       b"Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; gmail.test\r\n"
       b"Diagnostic-Code: smtp; 550 5.1.1 <me@gmail.test> User unknown\r\n\r\n"
       b"--BOUND\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
       b"From: alice@sender.test\r\nTo: me@family.test\r\nSubject: hi\r\n\r\nhello\r\n--BOUND--\r\n")
DSN_TOKENS = [b"--BOUND", b"--BOUND--", b"\r\n", b"\r\n\r\n", b"Content-Type: multipart/report; boundary=X\r\n",
              b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
              b"=\r\n", b"=ZZ", b"Action: failed\r\n", b"Status: 9.9.9\r\n", b"\x00", b"\xff\xfe", b"\r", b"\n",
              b"Final-Recipient: rfc822; " + b"a" * 5000 + b"\r\n", b"Content-Type: message/rfc822\r\n\r\n" * 8]
SRS_SETTINGS = SRSSettings("fwd.test", (b"fuzz-secret-0123456789",), 8, 21)
NOW = 1_700_000_000.0


def _mutate_bytes(r: random.Random, data: bytes) -> bytes:
    for _ in range(r.randint(1, 6)):
        i = r.randrange(len(data) + 1)
        op = r.random()
        if op < 0.3:
            data = data[:i] + data[i + r.randint(1, 60):]
        elif op < 0.6:
            data = data[:i] + r.choice(DSN_TOKENS) + data[i:]
        elif op < 0.8:
            data = data[:i] + bytes(r.randrange(256) for _ in range(r.randint(1, 8))) + data[i:]
        else:
            j = r.randrange(len(data) + 1)
            data = data[:i] + data[j:j + r.randint(1, 400)] + data[i:]
    return data


def _mutate_address(r: random.Random, address: str) -> str:
    chars = list(address)
    for _ in range(r.randint(1, 3)):
        i = r.randrange(len(chars))
        op = r.random()
        if op < 0.5:
            chars[i] = r.choice("abcdefghijklmnopqrstuvwxyz234567ABZ=+/@.-_0\x00 ")
        elif op < 0.75:
            del chars[i]
            if not chars:
                chars = ["x"]
        else:
            chars.insert(i, r.choice("a=@.2"))
    return "".join(chars)


def test_random_dsn_parser_and_return_address_forgery(capsys):
    srs = SenderRewriter(SRS_SETTINGS, clock=lambda: NOW)
    tokens = TokenCodec(SRS_SETTINGS, 21, clock=lambda: NOW)
    late_srs = SenderRewriter(SRS_SETTINGS, clock=lambda: NOW + 22 * 86400)
    late_tokens = TokenCodec(SRS_SETTINGS, 21, clock=lambda: NOW + 22 * 86400)

    def check(r):
        data = _mutate_bytes(r, DSN) if r.random() < 0.9 else bytes(r.randrange(256) for _ in range(r.randint(0, 3000)))
        started = time.monotonic()
        report = parse_dsn(data)  # never raises
        assert time.monotonic() - started < 2
        for rcpt in report.recipients:
            assert isinstance(rcpt.final_recipient, str) and isinstance(rcpt.reason, str)

        sender = r.choice(["alice@sender.test", "b.c+d@x.example", "o'neil@old.example"])
        genuine_srs = srs.forward(sender)
        genuine_token = tokens.mint(sender, ["me", "fan"], dest=r.choice([None, 0, 3]), pos=r.randint(0, 3))
        assert srs.reverse(genuine_srs) == sender and tokens.check(genuine_token).sender == sender
        for genuine, reverse, late, error in ((genuine_srs, srs.reverse, late_srs.reverse, SRSError),
                                              (genuine_token, tokens.check, late_tokens.check, TokenError)):
            with pytest.raises(error):
                late(genuine)  # replay past expiry
            forged = _mutate_address(r, genuine)
            if forged.lower() == genuine.lower():
                continue
            try:
                result = reverse(forged)
            except error:
                continue
            # The only accepted changes: case in the hash, or a domain that still means ours.
            assert forged.split("@")[0].lower() == genuine.split("@")[0].lower(), (genuine, forged, result)
    _run_random("dsn+forgery", check, capsys)


def test_case_count_reported():
    print(f"\nfuzz: {CASES} Hypothesis cases per property, {RANDOM_CASES} random cases per target "
          f"({'long' if LONG else 'short'} mode)")
