"""Settings that reach the store: CLV_TOP_KEEP."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from streams.keys import TOP_KEEP
from streams.settings import Settings
from streams.store import RedisStore


def test_top_keep_reaches_the_store_and_defaults_to_the_key_layouts_value(monkeypatch):
    assert Settings(_env_file=None).top_keep == TOP_KEEP
    monkeypatch.setenv("CLV_TOP_KEEP", "250")
    s = Settings(_env_file=None)
    assert RedisStore.from_settings(s).top_keep == 250  # no connection is made until a call


def test_top_keep_below_one_is_refused_with_the_reason():
    with pytest.raises(ValidationError, match="top_keep"):
        Settings(_env_file=None, top_keep=0)
