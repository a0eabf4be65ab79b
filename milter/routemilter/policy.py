"""Everything a message is judged by, loaded together and swapped as one.

A Policy is built from a config file: the rules engine, the SRS rewriter and
the DKIM signer with its keys already read. The daemon holds the current
Policy; each SMTP transaction takes the one current at MAIL FROM and keeps it,
so a reload never changes the rules half-way through a message.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import signpolicy
from .config import Config, load
from .rules import Router
from .senders import Senders
from .signing import Signer
from .srs import SenderRewriter
from .state import MemoryStore, Store
from .tokens import TokenCodec

if TYPE_CHECKING:
    from .authcheck import Authenticator  # imported when used: SPF/DMARC libraries only with `auth:`


@dataclass(frozen=True)
class Policy:
    config: Config
    router: Router
    srs: SenderRewriter | None
    signer: Signer | None
    tokens: TokenCodec | None = None  # bounce tokens (tokens.py), when `bounces:` is configured
    auth: Authenticator | None = None  # inbound checks, when `auth:` is configured
    senders: Senders | None = None  # our users' outgoing mail, when `submission:` is configured

    @classmethod
    def from_config(cls, config: Config, store: Store | None = None) -> Policy:
        """Build every part; raises ConfigError or SigningError on any problem.
        `store`: the running daemon's (PolicyHolder.store), for the rate limits;
        their own MemoryStore if None (tests, tools)."""
        srs = SenderRewriter(config.srs) if config.srs else None
        signer = Signer.from_settings(config.dkim) if config.dkim else None
        if config.dkim:
            signpolicy.org_domain(config.dkim.domain)  # the Public Suffix List (~60 ms) now, not in a message
        tokens = TokenCodec(config.srs, config.bounces.max_age_days) if config.srs and config.bounces else None
        auth: Authenticator | None = None
        if config.auth is not None:
            from .authcheck import Authenticator  # noqa: PLC0415 (SPF/DMARC libraries only when used)
            auth = Authenticator.from_config(config, store=store, signer=signer)  # ARC seals with its key
        router = Router(config)
        senders = Senders(config, router) if config.submission else None
        return cls(config, router, srs, signer, tokens, auth, senders)

    @classmethod
    def load(cls, path: str, store: Store | None = None) -> Policy:
        return cls.from_config(load(path), store)


class PolicyHolder:
    """The daemon's current Policy; replaced whole on reload. The state store
    (state.py) stays across reloads: the daemon builds each new Policy over it."""

    def __init__(self, policy: Policy, store: Store | None = None):
        self._policy = policy
        self._lock = threading.Lock()
        self.store: Store = store if store is not None else MemoryStore()

    @property
    def current(self) -> Policy:
        return self._policy

    def replace(self, policy: Policy) -> None:
        with self._lock:
            self._policy = policy
