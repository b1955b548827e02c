"""Keys: format, hashing, model globs, budget periods and prices."""

from __future__ import annotations

import calendar
import hashlib

import pytest

from synapse_gateway.access.control import AccessControl
from synapse_gateway.access.keys import ApiKey, budget_period, cost_of, hash_key, key_id_of, matches_hash, new_key
from synapse_gateway.config.access import KeySettings, Price

DAY = 86400


def _key(**settings: object) -> ApiKey:
    key_id, key = new_key()
    return ApiKey.build(key_id, hash_key(key), KeySettings.model_validate(settings), created_at=1_700_000_000.0)


def test_a_new_key_carries_its_id_and_at_least_128_random_bits() -> None:
    key_id, key = new_key()
    assert key_id_of(key) == key_id and len(key_id) == 12
    secret = key.removeprefix(f"sk-syn-{key_id}-")
    assert len(secret) * 6 >= 128
    assert new_key()[1] != key
    assert new_key(key_id)[0] == key_id and new_key(key_id)[1] != key


@pytest.mark.parametrize("presented", ["sk-master", "", "sk-syn-", "sk-syn-abc", "sk-syn-0123456789ab", "Bearer x"])
def test_other_strings_are_not_synapse_keys(presented: str) -> None:
    assert key_id_of(presented) is None


def test_only_the_hash_is_kept_and_it_is_sha256_of_the_key() -> None:
    _, key = new_key()
    stored = hash_key(key)
    assert stored == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert matches_hash(key, stored) and not matches_hash(key + "x", stored)


@pytest.mark.parametrize(("models", "name", "allowed"), [
    ([], "anything", True),
    (["*"], "anything", True),
    (["all-proxy-models"], "anything", True),
    (["llama-*"], "llama-3.2-8b", True),
    (["llama-*"], "qwen-7b", False),
    (["team/a"], "team/ab", False),
    (["Llama"], "llama", False),
])
def test_model_names_and_globs(models: list[str], name: str, allowed: bool) -> None:
    assert _key(models=models).allows(name) is allowed


def test_daily_periods_start_at_utc_midnight_of_the_creation_day() -> None:
    created = calendar.timegm((2026, 11, 3, 15, 30, 0))
    now = calendar.timegm((2026, 11, 30, 23, 59, 0))
    period, end = budget_period("1d", created, now)
    assert int(period) == calendar.timegm((2026, 11, 30, 0, 0, 0)) and end == int(period) + DAY
    period, end = budget_period("30d", created, now)
    assert int(period) == calendar.timegm((2026, 11, 3, 0, 0, 0)) and end == int(period) + 30 * DAY


def test_monthly_periods_are_calendar_months() -> None:
    period, end = budget_period("1mo", 0.0, calendar.timegm((2026, 12, 31, 12, 0, 0)))
    assert int(period) == calendar.timegm((2026, 12, 1, 0, 0, 0))
    assert end == calendar.timegm((2027, 1, 1, 0, 0, 0))
    period, end = budget_period("3mo", 0.0, calendar.timegm((2026, 11, 30, 0, 0, 0)))
    assert int(period) == calendar.timegm((2026, 10, 1, 0, 0, 0)) and end == calendar.timegm((2027, 1, 1, 0, 0, 0))


def test_without_a_period_the_budget_never_resets() -> None:
    assert budget_period(None, 0.0, 1e9) == ("all", None)


def test_prices_by_exact_name_then_glob() -> None:
    prices = {"llama-*": Price(input=1.0, output=2.0), "llama-big": Price(input=10.0, output=20.0)}
    assert cost_of(prices, "llama-small", 1_000_000, 500_000) == pytest.approx(2.0)
    assert cost_of(prices, "llama-big", 1_000_000, 0) == pytest.approx(10.0)
    assert cost_of(prices, "qwen", 1_000_000, 1_000_000) == 0.0


def test_expiry_and_revocation() -> None:
    assert _key(expires_at=2e9).usable(1.9e9) and not _key(expires_at=2e9).usable(2e9)
    assert not _key(revoked=True).usable(0.0)


def test_a_fallback_to_a_model_the_key_may_not_use_is_dropped() -> None:
    from synapse_gateway.routing import Resolution

    fallbacks = (Resolution("ok-model", "exact", [], "ok-model"), Resolution("secret", "exact", [], "secret"))
    resolution = Resolution("primary", "exact", [], "primary", fallbacks)
    permitted = AccessControl.permit(_key(models=["primary", "ok-*"]), resolution)
    assert [f.model for f in permitted.fallbacks] == ["ok-model"]


@pytest.mark.parametrize(("request_fields", "reserved"), [
    ({"max_tokens": 100}, 100),
    ({"max_tokens": "100"}, 100),
    ({"max_tokens": 100.0}, 100),
    ({"max_completion_tokens": 50, "max_tokens": 100}, 50),
    ({"max_tokens": 100, "n": 3}, 300),
    ({"max_tokens": 100, "best_of": 5, "n": 2}, 500),
    ({"max_tokens": 10, "prompt": ["a", "b", "c"]}, 30),
    ({"max_tokens": 10, "prompt": [1, 2, 3]}, 10),
    ({}, 4096),
    ({"max_tokens": "lots"}, 4096),
    ({"max_tokens": 2**63 - 1}, 2**40),
])
def test_what_a_request_reserves_for_its_answer(request_fields: dict[str, object], reserved: int) -> None:
    from synapse_gateway.access.control import _max_tokens

    assert _max_tokens({"model": "m", **request_fields}, 4096) == reserved


def test_the_keyring_accepts_a_key_once_verified_only_while_it_stays_the_same() -> None:
    from synapse_gateway.access.keyring import Keyring
    from synapse_gateway.config.access import AuthConfig, DeclaredKey

    key_id, key = new_key()
    master = f"sk-syn-{'m' * 12}-a-master-key-shaped-like-a-virtual-one"
    ring = Keyring(AuthConfig(master_key=master, keys=[DeclaredKey(id=key_id, hash=hash_key(key))]), None)
    first = ring.authenticate(key)
    assert first is not None and first.key is not None and ring.authenticate(key) == first
    assert ring.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    ring.keys[key_id] = ApiKey.build(key_id, hash_key(key), KeySettings(revoked=True), 0.0)
    assert ring.authenticate(key) is None, "a changed key is judged again, not by the earlier verification"
    _, other = new_key(key_id)
    ring.keys[key_id] = ApiKey.build(key_id, hash_key(other), KeySettings(), 0.0)
    assert ring.authenticate(key) is None and ring.authenticate(other) is not None, "a rotated key's old secret"
    master_principal = ring.authenticate(master)
    assert master_principal is not None and master_principal.key is None
