"""The rules engine: every rule kind, the evaluation order, and property tests
against a plain reference implementation of the documented order."""

from __future__ import annotations

import contextlib
import math
import random
import re
import string
import textwrap

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from routemilter import rules as rules_module
from routemilter.addresses import AddressError, parse
from routemilter.config import Reply, loads
from routemilter.rules import BAD_ADDRESS, UNKNOWN_USER, Action, Decision, Router

CONFIG = """\
routes:
  backup: [mx, "[relay.example]:587"]
domains:
  family.example:
    subdomain_addressing: true
    subdomain_exclude: [imx]
    catch_all:
      to:
        - address: me@gmail.example
          fallback:
            - address: me@outlook.example
              route: backup
  strict.example:
    plus_delimiters: "+-"
  noplus.example:
    plus_delimiters: ""
    catch_all:
      refuse:
        code: 550
        status: 5.1.1
        text: |
          No such user here.
          See https://noplus.example/contact
rules:
  - name: me
    addresses: [me@family.example, Me@Strict.Example]
    to:
      - address: me@gmail.example
        fallback: [me@imx.family.example]
  - name: me-work
    addresses: [me+work@family.example]
    to: [me@work.example]
  - name: kid
    addresses: [kid@family.example]
    to: [kid@gmail.example]
  - name: kid-shop
    addresses: [shop@kid.family.example]
    to: [kid-shop@gmail.example]
  - name: everything-at-family   # a pattern that matches every family.example address
    patterns: ['.*@family\\.example']
    to: [pattern@gmail.example]
  - name: strict-a
    addresses: [a@strict.example]
    to: [a@gmail.example]
  - name: parents
    addresses: [parents@strict.example]
    to:
      - address: mum@gmail.example
        fallback: [mum@outlook.example]
      - dad@gmail.example
  - name: shops-first
    patterns: ['shop-.*@strict\\.example', 'store-.*@strict\\.example']
    to: [shops@gmail.example]
  - name: shops-second          # overlaps shops-first: never reached for shop-*
    patterns: ['shop-special@strict\\.example', 'x.*@strict\\.example']
    to: [special@gmail.example]
  - name: moved
    addresses: [old@strict.example]
    refuse:
      code: 551
      status: 5.1.6
      text: |
        This address has moved.
        Please write to new@strict.example
  - name: tempfail
    addresses: [later@strict.example]
    refuse: {code: 450, text: Mailbox being migrated}
  - name: noreply
    addresses: [noreply@strict.example]
    discard: true
  - name: postmaster
    addresses: [postmaster@strict.example]
    keep: true
    to: [admin@gmail.example]
  - name: local-only
    addresses: [local@strict.example]
    keep: true
  - name: plus-off
    addresses: [bob@noplus.example]
    to: [bob@gmail.example]
"""


@pytest.fixture(scope="module")
def config():
    return loads(CONFIG, "rules.yaml")


@pytest.fixture(scope="module")
def router(config):
    return Router(config)


@contextlib.contextmanager
def set_size(n: int):
    """Build routers with n patterns per RE2 set, to cross set boundaries with few patterns."""
    saved = rules_module._SET_SIZE
    rules_module._SET_SIZE = n
    try:
        yield
    finally:
        rules_module._SET_SIZE = saved


def line_of(marker: str, text: str = CONFIG) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if marker in ln)


def chains(decision: Decision) -> list[list[tuple[str, str]]]:
    return [[(t.address, t.route) for t in d.chain] for d in decision.destinations]


# ---------------------------------------------------------------- exact


def test_exact(router):
    d = router.decide("me@family.example")
    assert d.action is Action.ROUTE
    assert d.address == "me@family.example"
    assert d.rule.name == "me"
    assert d.reason == f"rule me (line {line_of('- name: me')}): exact address me@family.example"
    assert chains(d) == [[("me@gmail.example", "mx"), ("me@imx.family.example", "mx")]]
    assert d.reply is None and d.keep is False


@pytest.mark.parametrize("raw", ["ME@FAMILY.EXAMPLE", "<Me@Family.Example>", " me@family.example. ",
                                 "<@relay.example:me@family.example>"])
def test_exact_is_case_insensitive_and_shape_independent(router, raw):
    d = router.decide(raw)
    assert (d.action, d.rule.name, d.address) == (Action.ROUTE, "me", "me@family.example")


def test_one_rule_many_addresses_across_domains(router):
    assert router.decide("me@strict.example").rule.name == "me"


def test_fan_out_keeps_each_chain(router):
    d = router.decide("parents@strict.example")
    assert chains(d) == [[("mum@gmail.example", "mx"), ("mum@outlook.example", "mx")],
                         [("dad@gmail.example", "mx")]]


# ------------------------------------------------------- plus-addressing


def test_plus_addressing_default_delimiter(router):
    d = router.decide("me+shop@family.example")
    assert d.rule.name == "me"
    assert d.address == "me+shop@family.example"  # the recipient as given, normalised
    assert d.reason.endswith("exact address me@family.example (plus-addressing: me+shop without its extension)")


@pytest.mark.parametrize("raw, rule", [
    ("me+a+b@family.example", "me"),  # cut at the first delimiter
    ("me+@family.example", "me"),  # empty extension
    ("me+work@family.example", "me-work"),  # an exact plus-address wins over the stripped form
    ("ME+WORK@family.example", "me-work"),
    ("me+work+x@family.example", "me"),  # not me-work: the extension starts at the first '+'
])
def test_plus_addressing_variants(router, raw, rule):
    assert router.decide(raw).rule.name == rule


def test_leading_delimiter_is_not_an_extension(router):
    # "+me" has no user part; it is an unknown user: the pattern for the domain takes it.
    d = router.decide("+me@family.example")
    assert d.rule.name == "everything-at-family"


def test_quoted_local_part_is_not_split(router):
    d = router.decide('"me+x"@strict.example')
    assert d.action is Action.REFUSE and d.reply == UNKNOWN_USER


@pytest.mark.parametrize("raw, rule", [
    ("me-news@strict.example", "me"),
    ("me+news@strict.example", "me"),
    ("a-b+c@strict.example", "strict-a"),  # the first delimiter of either kind cuts
    ("a+b-c@strict.example", "strict-a"),
])
def test_custom_and_multiple_delimiters(router, raw, rule):
    d = router.decide(raw)
    assert d.rule.name == rule
    assert "(plus-addressing:" in d.reason


def test_other_characters_are_not_delimiters(router):
    d = router.decide("me_news@strict.example")
    assert (d.action, d.reply) == (Action.REFUSE, UNKNOWN_USER)


def test_plus_addressing_off(router):
    assert router.decide("bob@noplus.example").rule.name == "plus-off"
    d = router.decide("bob+x@noplus.example")
    assert d.rule.name == "catch-all@noplus.example"
    assert d.action is Action.REFUSE


# -------------------------------------------------- subdomain addressing


def test_subdomain_addressing(router):
    d = router.decide("anything@kid.family.example")
    assert d.rule.name == "kid"
    assert d.address == "anything@kid.family.example"
    assert d.reason.endswith("exact address kid@family.example (subdomain addressing: kid.family.example "
                             "names the user)")
    assert chains(d) == [[("kid@gmail.example", "mx")]]


def test_exact_address_in_a_subdomain_wins(router):
    assert router.decide("shop@kid.family.example").rule.name == "kid-shop"
    assert router.decide("Shop+x@Kid.Family.Example").rule.name == "kid-shop"


def test_plus_and_subdomain_together(router):
    assert router.decide("kid+x@kid.family.example").rule.name == "kid"


def test_unknown_subdomain_user_goes_to_the_owner_domain(router):
    d = router.decide("x@nobody.family.example")
    # no exact key: the domain-wide pattern does not match (it is for family.example
    # itself), so the owner's catch-all takes it
    assert d.rule.name == "catch-all@family.example"
    assert d.reason == f"rule catch-all@family.example (line {line_of('catch_all:')}): catch-all of family.example"


def test_excluded_subdomain_is_not_managed(router):
    d = router.decide("me@imx.family.example")
    assert d.action is Action.PASS
    assert d.reason == "imx.family.example is not a managed domain"


@pytest.mark.parametrize("raw, parent", [
    ("a@b.kid.family.example", "family.example"), ("kid@x.y.family.example", "family.example"),
    ("a@x.imx.family.example", "family.example"),  # below an excluded subdomain
    ("x@me.strict.example", "strict.example"),  # no subdomain addressing
])
def test_unmanaged_names_below_a_managed_domain_are_refused(router, raw, parent):
    # The MTA may accept them for us (relay_domains, Sendmail's class R matches every
    # depth): refused at RCPT, never relayed unrouted (issue #12, item 1).
    d = router.decide(raw)
    assert d.action is Action.REFUSE and (d.reply.code, d.reply.status) == (550, "5.1.2"), d
    assert f"lies below {parent}" in d.reason


# -------------------------------------------------------------- patterns


@pytest.mark.parametrize("raw, rule, pattern", [
    ("shop-books@strict.example", "shops-first", r"shop-.*@strict\.example"),
    ("store-1@strict.example", "shops-first", r"store-.*@strict\.example"),
    # shops-second's own pattern matches exactly, but shops-first comes first in the file
    ("shop-special@strict.example", "shops-first", r"shop-.*@strict\.example"),
    ("xylophone@strict.example", "shops-second", r"x.*@strict\.example"),
    ("SHOP-BOOKS@STRICT.EXAMPLE", "shops-first", r"shop-.*@strict\.example"),
])
def test_patterns_first_match_in_file_order(router, raw, rule, pattern):
    d = router.decide(raw)
    assert d.action is Action.ROUTE
    assert d.rule.name == rule
    assert d.reason.endswith(f"pattern {pattern!r}")


def test_pattern_must_match_the_whole_address(router):
    # 'x.*@strict\.example' would match inside "ax@strict.example.org" as a search
    assert router.decide("ax@strict.example").action is Action.REFUSE


def test_exact_beats_an_earlier_pattern(router):
    # everything-at-family matches every family.example address and comes before
    # nothing else; exact addresses still win, including plus and subdomain forms.
    assert router.decide("me@family.example").rule.name == "me"
    assert router.decide("me+x@family.example").rule.name == "me"
    assert router.decide("z@kid.family.example").rule.name == "kid"
    assert router.decide("stranger@family.example").rule.name == "everything-at-family"


def test_exact_beats_a_pattern_written_before_it():
    text = textwrap.dedent("""\
        domains: {d.example: {}}
        rules:
          - {name: wide, patterns: ['.*'], to: wide@y.example}
          - {name: exact, addresses: [me@d.example], to: me@y.example}
    """)
    router = Router(loads(text))
    assert router.decide("me@d.example").rule.name == "exact"
    assert router.decide("me+tag@d.example").rule.name == "exact"
    assert router.decide("you@d.example").rule.name == "wide"


@pytest.mark.parametrize("size", [1, 16, 64, None])
def test_first_match_across_pattern_sets(size):
    # More patterns than one RE2 set holds: the first in file order must win
    # whichever set it lands in (None: the engine's own set size).
    rules = [f"  - {{name: r{i}, patterns: ['p{i}-.*@d\\.example'], to: r{i}@y.example}}" for i in range(200)]
    rules.insert(70, "  - {name: early, patterns: ['shared@d\\.example'], to: early@y.example}")
    rules.insert(150, "  - {name: late, patterns: ['shar.*@d\\.example'], to: late@y.example}")
    rules.insert(10, "  - {name: first, patterns: ['(?:a|b)only@d\\.example', 'bonly@d\\.example'], "
                     "to: first@y.example}")
    rules.insert(199, "  - {name: later, patterns: ['bonly@d\\.example'], to: later@y.example}")
    with set_size(size or rules_module._SET_SIZE):
        router = Router(loads("domains: {d.example: {}}\nrules:\n" + "\n".join(rules) + "\n"))
    assert len(router._sets) == math.ceil(205 / (size or rules_module._SET_SIZE))  # 205 patterns
    assert router.decide("shared@d.example").rule.name == "early"
    assert router.decide("sharp@d.example").rule.name == "late"
    assert router.decide("bonly@d.example").rule.name == "first"
    assert router.decide("p199-x@d.example").rule.name == "r199"
    assert router.decide("p0-x@d.example").rule.name == "r0"
    assert router.decide("nothing@d.example").action is Action.REFUSE


def test_pattern_rules_span_managed_domains_only(router):
    # x.*@strict\.example never makes a non-managed address ours
    assert router.decide("xavier@strict.example.evil.example").action is Action.PASS


# ------------------------------------------------------ catch-all and refusal


def test_catch_all(router):
    d = router.decide("stranger@family.example")  # taken by the pattern: use another domain
    assert d.rule.name == "everything-at-family"
    text = "domains:\n  d.example:\n    catch_all:\n      to: [{address: c@y.example, fallback: c@z.example}]\n"
    d = Router(loads(text)).decide("whoever@d.example")
    assert d.action is Action.ROUTE
    assert d.rule.name == "catch-all@d.example"
    assert d.reason == "rule catch-all@d.example (line 3): catch-all of d.example"
    assert chains(d) == [[("c@y.example", "mx"), ("c@z.example", "mx")]]


def test_catch_all_with_a_route(router):
    d = router.decide("someone@nobody.family.example")
    assert chains(d) == [[("me@gmail.example", "mx"), ("me@outlook.example", "backup")]]


def test_no_catch_all_refuses_unknown_users(router):
    d = router.decide("nobody@strict.example")
    assert d.action is Action.REFUSE
    assert d.reply == UNKNOWN_USER == Reply(550, "5.1.1", ("Recipient address rejected: no such user here",))
    assert d.rule is None and d.destinations == ()
    assert d.reason == "no rule matches and strict.example has no catch-all"


def test_catch_all_that_refuses_with_its_own_text(router):
    d = router.decide("nobody@noplus.example")
    assert d.action is Action.REFUSE
    assert d.reply == Reply(550, "5.1.1", ("No such user here.", "See https://noplus.example/contact"))
    assert d.rule.name == "catch-all@noplus.example"


def test_refuse_custom_code_status_and_lines(router):
    d = router.decide("old@strict.example")
    assert d.action is Action.REFUSE
    assert d.reply == Reply(551, "5.1.6", ("This address has moved.", "Please write to new@strict.example"))
    assert d.destinations == ()
    assert d.reason == f"rule moved (line {line_of('- name: moved')}): exact address old@strict.example"


def test_refuse_temporary(router):
    d = router.decide("later+x@strict.example")
    assert d.reply == Reply(450, "4.7.1", ("Mailbox being migrated",))


def test_discard(router):
    d = router.decide("noreply@strict.example")
    assert d.action is Action.DISCARD
    assert d.rule.name == "noreply"
    assert d.destinations == () and d.reply is None and d.keep is False


def test_keep_with_forward(router):
    d = router.decide("postmaster@strict.example")
    assert d.action is Action.ROUTE and d.keep is True
    assert chains(d) == [[("admin@gmail.example", "mx")]]


def test_keep_alone(router):
    d = router.decide("local@strict.example")
    assert d.action is Action.ROUTE and d.keep is True and d.destinations == ()


# ------------------------------------------------------ not ours, malformed


@pytest.mark.parametrize("raw, domain", [
    ("someone@gmail.example", "gmail.example"),
    ("Me@Family.Example.Evil.Example", "family.example.evil.example"),
    ("me@evilfamily.example", "evilfamily.example"),
    ("me@example", "example"),
    ("postmaster@[192.0.2.1]", "[192.0.2.1]"),
])
def test_non_managed_domains_pass_untouched(router, raw, domain):
    d = router.decide(raw)
    assert d.action is Action.PASS
    assert d.reason == f"{domain} is not a managed domain"
    assert d.rule is None and d.destinations == () and d.reply is None and d.keep is False
    assert d.address == parse(raw).__str__()


def test_a_match_everything_pattern_never_makes_a_relay():
    router = Router(loads("domains:\n  d.example: {catch_all: {to: c@y.example}}\n"
                          "rules:\n  - {patterns: ['.*', '.*@.*'], to: all@y.example}\n"))
    assert router.decide("victim@elsewhere.example").action is Action.PASS
    assert router.decide("anyone@d.example").rule.name == "rule-1"


@pytest.mark.parametrize("raw", ["", "<>", "no-domain", "a@b@c", "a@-bad.example", "me@family.example\r\nDATA",
                                 "x" * 400])
def test_malformed_is_refused_553(router, raw):
    d = router.decide(raw)
    assert d.action is Action.REFUSE
    assert d.reply == BAD_ADDRESS == Reply(553, "5.1.3", ("Recipient address rejected: malformed address",))
    assert d.address == raw
    assert d.reason.startswith("malformed address: ")
    with pytest.raises(AddressError) as info:
        parse(raw)
    assert d.reason == f"malformed address: {info.value}"


# -------------------------------------------------------------- structure


class _Untouchable:
    def Match(self, address):  # noqa: N802 (the re2.Set API)
        raise AssertionError(f"patterns consulted for {address}")


class _Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def Match(self, address):  # noqa: N802
        self.calls += 1
        return self.inner.Match(address)


def test_exact_hits_never_consult_patterns(config):
    router = Router(config)
    router._sets = [(start, _Untouchable()) for start, _ in router._sets]
    assert router.decide("me+x@family.example").rule.name == "me"
    assert router.decide("y@kid.family.example").rule.name == "kid"
    assert router.decide("parents@strict.example").rule.name == "parents"
    assert router.decide("x@gmail.example").action is Action.PASS


def test_a_miss_scans_each_pattern_set_once():
    rules = [f"  - {{name: r{i}, patterns: ['p{i}-.*@d\\.example'], to: r{i}@y.example}}" for i in range(1000)]
    router = Router(loads("domains: {d.example: {}}\nrules:\n" + "\n".join(rules) + "\n"))
    counters = [(start, _Counting(s)) for start, s in router._sets]
    router._sets = counters
    n = math.ceil(1000 / rules_module._SET_SIZE)
    assert len(counters) == n < 1000 // 10  # a few sets, not 1000 regexes
    assert router.decide("nobody@d.example").action is Action.REFUSE
    assert [c.calls for _, c in counters] == [1] * n
    assert router.decide("p3-x@d.example").rule.name == "r3"
    assert [c.calls for _, c in counters] == [2] + [1] * (n - 1)  # stops at the first set that hits


def test_router_with_no_rules():
    router = Router(loads("domains: {d.example: {}}\n"))
    assert router._sets == []
    assert router.decide("a@d.example").reply == UNKNOWN_USER


def test_decision_is_immutable(router):
    d = router.decide("me@family.example")
    with pytest.raises(AttributeError):
        d.action = Action.PASS  # type: ignore[misc]


# ------------------------------------------------------------ properties


def reference_decide(config, raw: str):
    """The documented order, written plainly: returns (action, rule name or None)."""
    try:
        address = parse(raw)
    except AddressError:
        return Action.REFUSE, None
    local, domain = address.local, address.domain
    if domain in config.domains:
        owner = domain
    else:
        label, _, parent = domain.partition(".")
        d = config.domains.get(parent)
        owner = parent if d and d.subdomain_addressing and label not in d.subdomain_exclude else None
    if owner is None:
        return Action.PASS, None
    settings_ = config.domains[owner]
    keys = [f"{local}@{domain}"]
    if settings_.plus_delimiters and not local.startswith('"'):
        cuts = [i for i, ch in enumerate(local) if ch in settings_.plus_delimiters]
        if cuts and cuts[0] > 0:
            keys.append(f"{local[:cuts[0]]}@{domain}")
    if domain != owner:
        keys.append(f"{domain.split('.')[0]}@{owner}")
    for key in keys:
        for rule in config.rules:
            if key in rule.addresses:
                return Action.ROUTE, rule.name
    for rule in config.rules:
        for pattern in rule.patterns:
            if re.fullmatch(pattern, f"{local}@{domain}", re.IGNORECASE):
                return Action.ROUTE, rule.name
    ca = settings_.catch_all
    return (Action.ROUTE, ca.name) if ca else (Action.REFUSE, None)


LOCAL_ALPHABET = "abcx+-"
locals_ = st.text(alphabet=LOCAL_ALPHABET, min_size=1, max_size=6).filter(lambda s: s[0] not in "+-")
DOMAINS = ["d.example", "e.example", "u.d.example", "v.d.example", "imx.d.example", "other.example"]
pattern_atoms = st.sampled_from(["a", "b", "c", "x", ".", ".*", "[ab]+", "\\+", "-", "a?", "(b|c)", "[^@]*"])
pattern_domains = st.sampled_from(["@d\\.example", "@e\\.example", "@(d|e)\\.example", "@.*", "@[a-z]\\.d\\.example"])
patterns = st.builds(lambda atoms, dom: "".join(atoms) + dom, st.lists(pattern_atoms, min_size=1, max_size=4),
                     pattern_domains)


@st.composite
def rule_sets(draw):
    n_exact = draw(st.integers(0, 12))
    n_pattern_rules = draw(st.integers(0, 25))  # 1-3 patterns each
    exact = draw(st.lists(st.tuples(locals_, st.sampled_from(DOMAINS[:4])), min_size=n_exact, max_size=n_exact,
                          unique=True))
    lines = []
    rules = [("e", f"addresses: ['{local}@{d}']") for local, d in exact]
    rules += [("p", "patterns: [" + ", ".join(f"'{p}'" for p in draw(st.lists(patterns, min_size=1, max_size=3)))
               + "]") for _ in range(n_pattern_rules)]
    order = draw(st.permutations(range(len(rules))))
    for pos, i in enumerate(order):
        lines.append(f"  - {{name: r{pos}, {rules[i][1]}, to: r{pos}@y.example}}")
    delims = draw(st.sampled_from(["+", "+-", ""]))
    catch_all = draw(st.booleans())
    text = ("domains:\n"
            f"  d.example: {{plus_delimiters: '{delims}', subdomain_addressing: true, subdomain_exclude: [imx]"
            + (", catch_all: {to: c@y.example}" if catch_all else "") + "}\n"
            "  e.example: {}\n"
            "rules:\n" + ("\n".join(lines) if lines else "  []") + "\n")
    if not lines:
        text = text.replace("rules:\n  []\n", "")
    addresses = [f"{local}@{d}" for local, d in exact]
    return loads(text, "generated.yaml"), addresses, draw(st.sampled_from([1, 3, 16, None]))


addresses_ = st.builds(lambda local, d: f"{local}@{d}", locals_, st.sampled_from(DOMAINS))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_sets(), st.lists(addresses_, min_size=1, max_size=40))
def test_router_agrees_with_the_reference(ruleset, probes):
    config, exact, size = ruleset
    with set_size(size or rules_module._SET_SIZE):  # small sets: many set boundaries
        router = Router(config)
    for raw in probes + exact:
        d = router.decide(raw)
        assert (d.action, d.rule.name if d.rule else None) == reference_decide(config, raw), raw


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_sets(), st.data())
def test_exact_beats_pattern(ruleset, data):
    config, exact, _ = ruleset
    assume(exact)
    # add a rule at the very top whose patterns match everything in every domain
    text_rules = [r for r in config.rules]
    router = Router(config)
    wide = Router(loads(
        "domains:\n  d.example: {subdomain_addressing: true, subdomain_exclude: [imx]}\n  e.example: {}\n"
        "rules:\n  - {name: wide, patterns: ['.*'], to: wide@y.example}\n"
        + "".join(f"  - {{name: {r.name}, addresses: {list(r.addresses)}, to: x@y.example}}\n"
                  for r in text_rules if r.addresses)))
    address = data.draw(st.sampled_from(exact))
    variant = data.draw(st.sampled_from([address, address.upper(), f"<{address}>"]))
    owner = next(r.name for r in config.rules if address in r.addresses)
    assert router.decide(variant).rule.name == owner
    assert wide.decide(variant).rule.name == owner


def random_rule_set(rng: random.Random, n_rules: int) -> str:
    atoms = ["a", "b", "c", "x", ".", ".*", "[ab]+", "\\+", "-", "a?", "(b|c)", "[^@]*"]
    doms = ["@d\\.example", "@e\\.example", "@(d|e)\\.example", "@.*", "@[a-z]\\.d\\.example"]
    lines = []
    for i in range(n_rules):
        if rng.random() < 0.2:
            local = "".join(rng.choice("abcx") for _ in range(rng.randint(1, 4)))
            lines.append(f"  - {{name: r{i}, addresses: ['{local}{i}@{rng.choice(DOMAINS[:4])}'], to: r{i}@y.example}}")
        else:
            pats = ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 4))) + rng.choice(doms)
                    for _ in range(rng.randint(1, 3))]
            lines.append(f"  - {{name: r{i}, patterns: [{', '.join(repr(p) for p in pats)}], to: r{i}@y.example}}")
    return ("domains:\n"
            "  d.example: {subdomain_addressing: true, subdomain_exclude: [imx], catch_all: {to: c@y.example}}\n"
            "  e.example: {}\nrules:\n" + "\n".join(lines) + "\n")


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_router_agrees_with_the_reference_on_large_rule_sets(seed):
    # Hundreds of patterns over several RE2 sets, against the one-by-one reference.
    rng = random.Random(seed)
    config = loads(random_rule_set(rng, rng.randint(100, 200)), "large.yaml")
    with set_size(rng.choice([7, 32])):
        router = Router(config)
    assert len(router._sets) >= 2
    for _ in range(150):
        raw = "".join(rng.choice(LOCAL_ALPHABET) for _ in range(rng.randint(1, 6))) + "@" + rng.choice(DOMAINS)
        if raw[0] in "+-":
            raw = "a" + raw
        d = router.decide(raw)
        assert (d.action, d.rule.name if d.rule else None) == reference_decide(config, raw), raw


any_text = st.one_of(
    st.text(max_size=100),
    st.text(alphabet=string.ascii_letters + "@.+-<>\"[]: \r\n\x00\u0130\u00a0", max_size=60),
    addresses_,
    st.builds(lambda a, b: f"{a}@{b}", st.text(max_size=20), st.sampled_from(DOMAINS + ["kid.family.example"])),
)


@pytest.fixture(scope="module")
def second_router():
    return Router(loads(CONFIG, "rules.yaml"))  # built again from scratch


@settings(max_examples=1000, deadline=None)
@given(any_text)
def test_decide_never_crashes_and_is_deterministic(router, second_router, raw):
    first = router.decide(raw)
    assert isinstance(first, Decision)
    assert first.action in Action
    assert router.decide(raw) == first
    if first.action is Action.REFUSE:
        assert first.reply is not None
    if first.action is Action.ROUTE:
        assert first.destinations or first.keep
    # the same input gives the same decision, from a router built separately too
    assert second_router.decide(raw) == first


labels = st.builds(lambda a, b: a + b, st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"),
                   st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", max_size=8))
tlds = st.sampled_from(["example", "com", "net", "de", "org"])
foreign = st.builds(lambda local, ds, tld: f"{local}@{'.'.join(ds + [tld])}", locals_,
                    st.lists(st.one_of(labels, st.sampled_from(
                        ["family", "strict", "noplus", "kid", "imx", "gmail", "d"])), min_size=0, max_size=3), tlds)


@settings(max_examples=400, deadline=None)
@given(foreign, st.sampled_from(["{}", "<{}>", "{}.", " {} "]), st.booleans())
def test_outside_managed_domains_always_pass(config, router, raw, shape, upper):
    address = parse(raw)
    _label, _, _parent = address.domain.partition(".")
    assume(address.domain not in config.domains)
    # Names below a managed domain are managed or refused (test above), except the
    # excluded subdomain itself, which is hosted elsewhere.
    assume(address.domain == "imx.family.example"
           or not any(address.domain.endswith("." + d) for d in config.domains))
    d = router.decide(shape.format(raw.upper() if upper else raw))
    assert d.action is Action.PASS
    assert d.destinations == () and d.rule is None


def test_rules_bench_runs_small():
    # The benchmark itself (bench/rules_bench.py) at a tiny size: its generated config
    # loads, every lookup gets the expected rule and both baselines agree with the
    # Router. No timing is asserted here.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "rules_bench.py"
    spec = importlib.util.spec_from_file_location("rules_bench_smoke", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--aliases", "400", "--patterns", "40", "--lookups", "300", "--naive", "50", "--scan", "10"])
    assert "decisions checked: 1,500, wrong: 0; baseline lookups disagreeing with the Router: 0" in report
    assert not [f for f in bench.FAILED if "wrong" in f or "disagree" in f]
    for kind in ("exact", "plus", "pattern", "miss", "pass"):
        assert f"\n| {kind} | 300 |" in report
