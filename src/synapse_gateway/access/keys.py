"""Virtual API keys: how a secret is made, stored (only as a hash), recognised, and what it allows.

A key reads `sk-syn-<id>-<secret>`: the 12-character id is public (listings, logs, usage), the
secret is 192 random bits. Only `sha256(key)` is stored: with that much entropy a slow hash buys
nothing, and a fast one keeps authentication in memory and in microseconds.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import translate
from typing import Any, Literal, NamedTuple

from ..config.access import DeclaredKey, KeySettings, Price, period_length
from .limits import Limits

KEY_PREFIX = "sk-syn-"
_ID_LENGTH = 12
_ALL_MODELS = {"*", "all-proxy-models"}  # LiteLLM's spelling of "every model" too
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def new_key(key_id: str | None = None) -> tuple[str, str]:
    """A fresh (id, key), or a new secret for `key_id`: the key is shown once to its owner and never stored."""
    key_id = key_id or secrets.token_hex(_ID_LENGTH // 2)
    return key_id, f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(24)}"


def hash_key(key: str) -> str:
    return "sha256:" + digest_of(key).hex()


def key_id_of(presented: str) -> str | None:
    """The public id inside a presented key, or None when it is not a Synapse key."""
    if len(presented) > len(KEY_PREFIX) + _ID_LENGTH + 1 and presented.startswith(KEY_PREFIX):
        end = len(KEY_PREFIX) + _ID_LENGTH
        if presented[end] == "-":
            return presented[len(KEY_PREFIX):end]
    return None


def matches_hash(presented: str, stored_hash: str) -> bool:
    """Whether `presented` hashes to `stored_hash`, compared in constant time."""
    return hmac.compare_digest(digest_of(presented), bytes.fromhex(stored_hash.removeprefix("sha256:")))


def digest_of(presented: str) -> bytes:
    # surrogateescape: a header's undecodable bytes hash like any other wrong key (never an error)
    return hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One virtual key as every replica holds it in memory."""

    id: str
    hash: str
    settings: KeySettings
    created_at: float
    source: Literal["api", "config"] = "api"
    _patterns: tuple[re.Pattern[str], ...] | None = field(default=None, repr=False, compare=False)
    restricted: bool = field(default=False, repr=False, compare=False)  # only some models (read per request)
    admin: bool = field(default=False, repr=False, compare=False)  # the `admin` scope (read per request)
    digest: bytes = field(default=b"", repr=False, compare=False)  # the stored hash, as bytes
    # Each model name's answer from the globs, remembered (bounded): asked on every request.
    _allowed: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)
    # The limits of the current budget period and when they stop being current: read on every request.
    _current: list[Any] = field(default_factory=lambda: [None, 0.0], repr=False, compare=False)

    @classmethod
    def build(cls, key_id: str, key_hash: str, settings: KeySettings, created_at: float,
              source: Literal["api", "config"] = "api") -> ApiKey:
        names = settings.models
        patterns = None if not names or _ALL_MODELS & set(names) else tuple(
            re.compile(translate(name)) for name in names)
        return cls(key_id, key_hash, settings, created_at, source, patterns, patterns is not None,
                   settings.scope == "admin",
                   bytes.fromhex(key_hash.removeprefix("sha256:")))

    @classmethod
    def declared(cls, declared: DeclaredKey, loaded_at: float) -> ApiKey:
        settings = KeySettings(**declared.model_dump(exclude={"id", "hash"}))
        return cls.build(declared.id, declared.hash, settings, loaded_at, "config")

    def usable(self, now: float) -> bool:
        """Neither revoked nor expired."""
        expires = self.settings.expires_at
        return not self.settings.revoked and (expires is None or now < expires)


    def allows(self, model: str) -> bool:
        """Whether this key may be served `model` (a public model name)."""
        patterns = self._patterns
        if patterns is None:
            return True
        allowed = self._allowed.get(model)
        if allowed is None:
            if len(self._allowed) >= 1024:  # client-chosen names: keep the memory bounded
                self._allowed.clear()
            allowed = self._allowed[model] = any(p.fullmatch(model) for p in patterns)
        return allowed

    def limits(self, now: float) -> Limits:
        """The key's limits, with the budget period that `now` falls in."""
        current, until = self._current
        if current is not None and now < until:
            return current  # type: ignore[no-any-return]
        s = self.settings
        period, period_end = budget_period(s.budget_duration, self.created_at, now)
        limits = Limits(rpm=s.rpm_limit, tpm=s.tpm_limit, parallel=s.max_parallel_requests,
                        token_budget=s.token_budget, money_budget=s.max_budget, period=period, period_end=period_end)
        self._current[:] = [limits, float("inf") if period_end is None else period_end]
        return limits

    def public(self, now: float | None = None) -> dict[str, Any]:
        """The key as the management API shows it: everything but its hash."""
        s = self.settings
        now = time.time() if now is None else now
        _, reset = budget_period(s.budget_duration, self.created_at, now)
        return {
            "token": self.id, "key_id": self.id, "key_alias": s.key_alias, "key_name": _display_name(self.id),
            "scope": s.scope, "models": list(s.models), "rpm_limit": s.rpm_limit, "tpm_limit": s.tpm_limit,
            "max_parallel_requests": s.max_parallel_requests, "max_budget": s.max_budget,
            "token_budget": s.token_budget, "budget_duration": s.budget_duration,
            "budget_reset_at": iso(reset), "default_max_tokens": s.default_max_tokens,
            "prices": {name: price.model_dump() for name, price in s.prices.items()},
            "metadata": s.metadata, "expires": iso(s.expires_at), "revoked": s.revoked,
            "blocked": s.revoked, "created_at": iso(self.created_at), "source": self.source,
        }


class Principal(NamedTuple):
    """Who sent a request: the master key (`key` None) or a virtual key (a named tuple: one per request)."""

    key: ApiKey | None

    @property
    def id(self) -> str:
        return "master" if self.key is None else self.key.id

    @property
    def admin(self) -> bool:
        return self.key is None or self.key.admin

    @property
    def inference(self) -> bool:
        return self.key is None or not self.key.admin


MASTER = Principal(None)


def _display_name(key_id: str) -> str:
    """How a key is shown where LiteLLM shows an abbreviated key: the prefix and id, never the secret."""
    return f"{KEY_PREFIX}{key_id}-…"


def iso(moment: float | None) -> str | None:
    return None if moment is None else datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def budget_period(budget_duration: str | None, created_at: float, now: float) -> tuple[str, float | None]:
    """The budget period `now` falls in, as (id, end): periods start at the key's creation day (UTC
    midnight), so a `1d` budget resets at midnight; `Nmo` periods are calendar months."""
    if budget_duration is None:
        return "all", None
    count, unit = period_length(budget_duration)
    if unit == "mo":
        moment = datetime.fromtimestamp(now, UTC)
        index = (moment.year * 12 + moment.month - 1) // count * count
        month_start = calendar.timegm((index // 12, index % 12 + 1, 1, 0, 0, 0))
        end_index = index + count
        return str(month_start), float(calendar.timegm((end_index // 12, end_index % 12 + 1, 1, 0, 0, 0)))
    length = count * _UNIT_SECONDS[unit]
    anchor = created_at - created_at % 86400 if length >= 86400 else 0.0
    start = anchor + (now - anchor) // length * length
    return str(int(start)), start + length


def cost_of(prices: dict[str, Price], model: str, tokens_in: int, tokens_out: int) -> float:
    """Money for a request's tokens at the price of `model` (exact name first, then globs); 0 unpriced."""
    price = prices.get(model)
    if price is None:
        for name, candidate in prices.items():
            if re.fullmatch(translate(name), model):
                price = candidate
                break
    if price is None:
        return 0.0
    return (tokens_in * price.input + tokens_out * price.output) / 1_000_000
