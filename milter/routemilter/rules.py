"""The rules engine: one recipient address in, one Decision out.

Order of evaluation (documented in docs/configuration.md, relied on by `explain`):

1. A recipient whose domain is not managed is passed through untouched,
   unless it lies below a managed domain or the SRS domain (at any depth):
   the MTA accepts such addresses for us (relay_domains), so they are refused
   (550 5.1.2) rather than relayed unrouted. A subdomain listed in
   subdomain_exclude is hosted elsewhere and passes (the MTA's own relay
   rules decide); anything below it is refused.
2. Exact addresses, looked up in a dict, for these keys in turn:
   the address itself; the address without its plus-extension
   (`user+shop@d` -> `user@d`); with subdomain addressing, the subdomain
   as the user (`anything@user.d` -> `user@d`).
3. Patterns (RE2, full match, case-insensitive) in the order of the file;
   the first rule with a matching pattern wins.
4. The domain's catch-all.
5. Otherwise the recipient is refused: 550 5.1.1.

Patterns are compiled into RE2 sets of a bounded size, so a miss costs a few
set scans rather than one regex per rule, and no pattern can backtrack.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import re2

from .addresses import Address, AddressError, parse
from .config import Config, Destination, Reply, Rule, managed_domain

if TYPE_CHECKING:
    from .config import Domain

UNKNOWN_USER = Reply(550, "5.1.1", ("Recipient address rejected: no such user here",))
BAD_ADDRESS = Reply(553, "5.1.3", ("Recipient address rejected: malformed address",))
NOT_SERVED = Reply(550, "5.1.2", ("Recipient address rejected: no such domain here",))
# Patterns per RE2 set: a miss scans every set, so fewer sets is faster; each set's DFA
# cache is bounded by max_mem. bench/rules_bench.py (1,000 patterns): 256 gave a miss
# p99 of about 30 µs against about 50 µs with 64.
_SET_SIZE = 256


class Action(enum.Enum):
    PASS = "pass"  # not one of ours: the MTA handles it as usual
    ROUTE = "route"
    REFUSE = "refuse"
    DISCARD = "discard"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    address: str  # the recipient in normal form (or as given, if malformed)
    reason: str  # one sentence: which rule matched and why
    rule: Rule | None = None
    reply: Reply | None = None  # for REFUSE
    destinations: tuple[Destination, ...] = ()
    keep: bool = False  # also deliver to the original recipient


class Router:
    """Immutable, built once per config; `decide` is safe from any thread."""

    def __init__(self, config: Config):
        self.config = config
        self._exact: dict[str, Rule] = {}
        self._pattern_rules: list[Rule] = []  # index i -> rule of pattern i
        self._pattern_text: list[str] = []
        for rule in config.rules:
            for address in rule.addresses:
                self._exact.setdefault(address, rule)
            for pattern in rule.patterns:
                self._pattern_rules.append(rule)
                self._pattern_text.append(pattern)
        self._sets = self._compile_sets(self._pattern_text)
        # Domains whose whole subtree we answer for, and the excluded subdomains
        # (hosted elsewhere) that pass as foreign domains.
        self._ours = set(config.domains) | ({config.srs.domain} if config.srs else set())
        self._elsewhere = {f"{label}.{name}" for name, d in config.domains.items() for label in d.subdomain_exclude}

    @staticmethod
    def _compile_sets(patterns: list[str]) -> list[tuple[int, re2.Set]]:
        options = re2.Options()
        options.case_sensitive = False
        options.max_mem = 64 << 20
        sets = []
        for start in range(0, len(patterns), _SET_SIZE):
            pattern_set = re2.Set.FullMatchSet(options)
            for pattern in patterns[start:start + _SET_SIZE]:
                pattern_set.Add(pattern)
            pattern_set.Compile()
            sets.append((start, pattern_set))
        return sets

    def first_pattern(self, address: str) -> int | None:
        """Index of the first pattern (in file order) that matches fully."""
        for start, pattern_set in self._sets:
            hits: list[int] = pattern_set.Match(address)  # indexes within this set
            if hits:
                return start + min(hits)
        return None

    def decide(self, raw_address: str | Address) -> Decision:
        """The Decision for an address as received, or for one parsed already (the milter's)."""
        try:
            address = raw_address if isinstance(raw_address, Address) else parse(raw_address)
            str(address).encode("utf-8")  # lone surrogates (invalid UTF-8 from pymilter): RE2 cannot take them
        except AddressError as exc:
            return Decision(Action.REFUSE, str(raw_address), f"malformed address: {exc}", reply=BAD_ADDRESS)
        except UnicodeEncodeError:
            return Decision(Action.REFUSE, str(raw_address), "malformed address: not valid UTF-8", reply=BAD_ADDRESS)
        full = str(address)
        owner = managed_domain(self.config.domains, address.domain)
        if owner is None:
            parent = self.answered_parent(address.domain)
            if parent is not None:
                return Decision(Action.REFUSE, full, f"{address.domain} lies below {parent}, which we answer for, "
                                                     "and is not managed", reply=NOT_SERVED)
            return Decision(Action.PASS, full, f"{address.domain} is not a managed domain")
        domain = self.config.domains[owner]

        for key, how in self._exact_keys(address.local, address.domain, domain):
            rule = self._exact.get(key)
            if rule is not None:
                return self._matched(rule, full, f"exact address {key}{how}")

        index = self.first_pattern(full) if self._sets else None
        if index is not None:
            rule = self._pattern_rules[index]
            return self._matched(rule, full, f"pattern {self._pattern_text[index]!r}")

        if domain.catch_all is not None:
            return self._matched(domain.catch_all, full, f"catch-all of {owner}")
        return Decision(Action.REFUSE, full, f"no rule matches and {owner} has no catch-all", reply=UNKNOWN_USER)

    def answered_parent(self, domain: str) -> str | None:
        """The managed or SRS domain that `domain` (not itself managed) lies below,
        at any depth; None for foreign domains and for an excluded subdomain itself."""
        if domain in self._elsewhere:
            return None
        rest = domain
        while "." in rest:
            rest = rest.split(".", 1)[1]
            if rest in self._ours:
                return rest
        return None

    @staticmethod
    def _exact_keys(local: str, domain_name: str, domain: Domain) -> Iterator[tuple[str, str]]:
        yield f"{local}@{domain_name}", ""
        if domain.plus_delimiters and not local.startswith('"'):
            cut = min((i for i, ch in enumerate(local) if ch in domain.plus_delimiters), default=-1)
            if cut > 0:
                yield f"{local[:cut]}@{domain_name}", f" (plus-addressing: {local} without its extension)"
        if domain_name != domain.name:
            user = domain_name.split(".", 1)[0]
            yield f"{user}@{domain.name}", f" (subdomain addressing: {domain_name} names the user)"

    @staticmethod
    def _matched(rule: Rule, address: str, why: str) -> Decision:
        reason = f"rule {rule.name} (line {rule.line}): {why}"
        if rule.refuse is not None:
            return Decision(Action.REFUSE, address, reason, rule, reply=rule.refuse)
        if rule.discard:
            return Decision(Action.DISCARD, address, reason, rule)
        return Decision(Action.ROUTE, address, reason, rule, destinations=rule.destinations, keep=rule.keep)
