"""Fixtures every test module may use. The helpers behind them, and the constants (SRS_SECRET,
SRS_SECTION, ROUTE_ME) and FakeCtx that module-level code needs, are in testkit.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from testkit import DkimKeys, ForeignKey, make_dkim_keys, make_foreign_key
from testkit import write_config as _write_config


@pytest.fixture(scope="session")
def dkim_keys(tmp_path_factory: pytest.TempPathFactory) -> DkimKeys:
    """One RSA and one ed25519 signing key for the whole run (generating RSA keys is slow)."""
    return make_dkim_keys(tmp_path_factory.mktemp("dkim-keys"))


@pytest.fixture(scope="session")
def foreign_key() -> ForeignKey:
    """A remote sender's RSA DKIM key and its TXT record."""
    return make_foreign_key()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """write_config(text, name="routemilter.yaml") -> the path of the file written in tmp_path."""

    def write(text: str, name: str = "routemilter.yaml") -> Path:
        return _write_config(tmp_path, text, name)

    return write
