"""The config of access control: modes, the master key, declared keys, prices, and each key's settings.

`KeySettings` is also the wire format of the key-management API, with LiteLLM's field names where
the concept is the same, so one model validates a key from a YAML file and from `/key/generate`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from .units import Duration

_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-z]{12}$")
# Budget periods: a number of seconds/minutes/hours/days/weeks, or calendar months ("1mo").
_PERIOD = re.compile(r"^\s*([1-9]\d{0,8})\s*(s|m|h|d|w|mo)\s*$")
_PERIOD_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "mo": 31 * 86400}
_LONGEST_PERIOD = 100 * 366 * 86400  # a century: longer is a typo, and dates past it overflow


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    """Money per million tokens, so budgets can be set in money (`max_budget`) as LiteLLM users do."""

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)


class KeySettings(_Strict):
    """What a virtual key may do: its models, limits, budgets and life span (all optional)."""

    key_alias: str | None = Field(None, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    # `admin` keys manage keys and the admin routes and cannot run inference; `inference` keys the reverse.
    scope: Literal["inference", "admin"] = "inference"
    # Public model names or globs (`llama-*`); empty means every model.
    models: list[str] = Field(default_factory=list)
    rpm_limit: int | None = Field(None, ge=1)
    tpm_limit: int | None = Field(None, ge=1)
    max_parallel_requests: int | None = Field(None, ge=1)
    max_budget: float | None = Field(None, ge=0)  # money per budget period, priced by `prices`
    token_budget: int | None = Field(None, ge=0)  # tokens (in + out) per budget period
    budget_duration: str | None = None  # "1d", "30d", "1mo"...; none: the budget never resets
    # What a request that names no `max_tokens` reserves for its answer (default: auth.default_max_tokens).
    default_max_tokens: int | None = Field(None, ge=1)
    prices: dict[str, Price] = Field(default_factory=dict)  # this key's own prices, over auth.prices
    expires_at: float | None = None  # unix time
    revoked: StrictBool = False  # true or false only: "false" must not read as a revocation

    @field_validator("budget_duration")
    @classmethod
    def _period(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _PERIOD.match(value)
        if not match or int(match.group(1)) * _PERIOD_SECONDS[match.group(2)] > _LONGEST_PERIOD:
            raise ValueError(f"{value!r} is not a budget period|write e.g. 1h, 1d, 7d, 30d or 1mo (at most a century)")
        return value.strip()

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, default=str)) > 16384:
            raise ValueError("`metadata` is over 16 KiB|keep notes short; every replica holds them in memory")
        return value

    @field_validator("expires_at")
    @classmethod
    def _sane_expiry(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value < 4e9:
            raise ValueError("`expires_at` must be a unix time before 2096|or leave it out: the key never expires")
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        if any(not isinstance(name, str) or not name for name in value):
            raise ValueError("model names must be non-empty strings|write e.g. [\"llama-3.2-8b\", \"qwen*\"]")
        return value


def period_length(budget_duration: str) -> tuple[int, str]:
    """A budget period as (count, unit), unit one of s, m, h, d, w, mo."""
    match = _PERIOD.match(budget_duration)
    assert match is not None, "validated by KeySettings"
    return int(match.group(1)), match.group(2)


class DeclaredKey(KeySettings):
    """A key declared in the config file (GitOps): only its id and hash are written, never the key."""

    id: str
    hash: str

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _KEY_ID.match(value):
            raise ValueError(f"{value!r} is not a key id|`synapse keys hash` prints a key with its id and hash")
        return value

    @field_validator("hash")
    @classmethod
    def _hash(cls, value: str) -> str:
        if not _HASH.match(value):
            raise ValueError("`hash` must be `sha256:` and 64 hex digits"
                             "|`synapse keys hash` prints a new key with its hash")
        return value


class AuthConfig(_Strict):
    """Who may call the gateway.

    `mode: required` needs a key on every inference route; `off` (the default without a master key)
    serves anyone who can reach it. `master_key` may be written as is, as `${VAR}`, or LiteLLM-style
    as `os.environ/VAR`; SYNAPSE_MASTER_KEY, when set, replaces it.
    """

    mode: Literal["off", "required"] | None = None  # default: required when a master key or keys exist
    master_key: str | None = Field(None, validate_default=True, repr=False)  # kept out of logs
    metrics: Literal["open", "keyed"] = "keyed"
    # OpenAI's x-ratelimit-* headers: on every 429 (`refusals`), or on every answer of a limited key
    # (`always`, as OpenAI does, for clients that pace themselves by them; about 3% more CPU per request).
    rate_limit_headers: Literal["refusals", "always"] = "refusals"
    default_max_tokens: int = Field(4096, ge=1)
    prices: dict[str, Price] = Field(default_factory=dict)
    keys: list[DeclaredKey] = Field(default_factory=list)
    # How often each replica reads key changes from the database (a revoked key stops within this).
    key_sync_interval: Duration = Field(0.5, gt=0, le=5)

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # `mode: off` is a boolean to YAML 1.1 readers

    @field_validator("master_key", mode="before")
    @classmethod
    def _from_environment(cls, value: object) -> object:
        override = os.environ.get("SYNAPSE_MASTER_KEY")
        if override:
            return override
        if isinstance(value, str) and value.startswith("os.environ/"):
            name = value.removeprefix("os.environ/")
            found = os.environ.get(name)
            if not found:
                raise ValueError(f"environment variable {name} is not set"
                                 f"|export {name}=... (or SYNAPSE_MASTER_KEY=...)")
            return found
        if value == "":
            raise ValueError("`master_key` is empty|set a key, or remove `master_key` to run without one")
        return value

    @property
    def required(self) -> bool:
        if self.mode is not None:
            return self.mode == "required"
        return self.master_key is not None or bool(self.keys)


class UsageConfig(_Strict):
    """The usage ledger: one event per request, written in batches off the request path."""

    enabled: bool = True
    buffer_size: int = Field(10000, ge=100)
    batch_size: int = Field(500, ge=1)
    flush_interval: Duration = Field(1.0, gt=0)
