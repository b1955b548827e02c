"""What a key may do with one request: which models it may be served, and what its limits let through.

The model check runs on what will really be served: the resolution's model after alias, pattern,
discovery and fallback, and its `fallbacks` models one by one (the attempt loop asks again before it
tries each). Limits are taken once per request, before its first attempt: a reservation of tokens
(a prompt estimate plus `max_tokens`) and money, settled to the real `usage` when the request ends.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from ..accesslog import RequestRecord
from ..config.access import AuthConfig, Price
from ..errors import ModelNotAllowed, RateLimited
from ..routing import Resolution
from .keys import ApiKey, cost_of, iso
from .limits import Grant, Limiter, LimitExceeded, MemoryLimiter, Usage

log = logging.getLogger("synapse.limits")
_BYTES_PER_TOKEN = 4  # a prompt's size in tokens is estimated from its JSON: generous for most text
_MOST_TOKENS = 2**40  # no request reserves more (a larger count is a mistake or an attack on the counters)


@dataclasses.dataclass(slots=True)
class Admitted:
    """A request's hold on its key's limits, settled once when it ends."""

    key: ApiKey
    model: str
    grant: Grant | None
    reserved: Usage
    shared: bool = False  # the limits live in Redis: `AccessControl.acquire` / `settle_shared` are awaited


class AccessControl:
    """Model permissions and limits for virtual keys (the master key has neither)."""

    def __init__(self, auth: AuthConfig, limiter: Limiter) -> None:
        self.limiter = limiter
        # In-process limits are taken without a coroutine per call (they never wait).
        self._local = limiter if isinstance(limiter, MemoryLimiter) else None
        self.prices = auth.prices
        self.default_max_tokens = auth.default_max_tokens
        self.headers_always = auth.rate_limit_headers == "always"

    @staticmethod
    def permit(key: ApiKey, resolution: Resolution, *, asked: str | None = None) -> Resolution:
        """`resolution` cut to what `key` may be served: 403 when its own model is not allowed (naming
        the model as `asked`, so an alias's target stays unknown); fallbacks it may not use are dropped."""
        if not key.restricted:
            return resolution
        if not key.allows(resolution.model):
            raise ModelNotAllowed(asked or resolution.model)
        if not resolution.fallbacks:
            return resolution
        allowed = tuple(f for f in resolution.fallbacks if key.allows(f.model))
        if len(allowed) != len(resolution.fallbacks):
            resolution = dataclasses.replace(resolution, fallbacks=allowed)
        return resolution

    def admit(self, key: ApiKey, model: str, payload: dict[str, Any] | None, *, body_size: int,
              generates: bool) -> Admitted | None:
        """Reserve for one request and take the key's in-process limits now (429 with the limit's state
        when one refuses); None when the key has no limits (and no prices of its own). With limits
        shared through Redis, `shared` says `acquire` must still be awaited.

        Not a coroutine: it runs on every request of a limited key, and in-process limits never wait.
        `generates`: whether the answer is made of tokens (chat, completions), so `max_tokens` counts.
        """
        limits = key.limits(time.time())
        if not limits.any and not key.settings.prices:
            return None
        prompt = body_size // _BYTES_PER_TOKEN if payload is not None else 0
        answer = _max_tokens(payload, key.settings.default_max_tokens or self.default_max_tokens) if generates else 0
        prices = self._prices(key) if key.settings.prices else self.prices
        reserved = Usage(prompt + answer, cost_of(prices, model, prompt, answer) if prices else 0.0)
        admitted = Admitted(key, model, None, reserved)
        if limits.any:
            local = self._local
            if local is None:
                admitted.shared = True
                return admitted
            try:
                admitted.grant = local.take(key.id, limits, reserved)
            except LimitExceeded as exc:
                raise self._refused(key, exc) from None
        return admitted

    async def acquire(self, admitted: Admitted) -> None:
        """Take the limits shared through Redis for an admitted request (`admitted.shared`)."""
        key = admitted.key
        try:
            admitted.grant = await self.limiter.acquire(key.id, key.limits(time.time()), admitted.reserved)
        except LimitExceeded as exc:
            raise self._refused(key, exc) from None

    @staticmethod
    def _refused(key: ApiKey, exc: LimitExceeded) -> RateLimited:
        log.info("key %s refused: %s", key.id, exc.reason)
        return _refusal(exc)

    def settle(self, admitted: Admitted, record: RequestRecord) -> Usage:
        """Charge what the request really used to in-process limits, and return it; a grant held in
        Redis is settled by awaiting `settle_shared` with it."""
        used = self.usage_of(admitted, record)
        grant = admitted.grant
        if grant is not None and self._local is not None:
            self._local.give_back(grant, used)
        return used

    async def settle_shared(self, admitted: Admitted, used: Usage) -> None:
        if admitted.grant is not None:
            await self.limiter.settle(admitted.grant, used)

    def usage_of(self, admitted: Admitted, record: RequestRecord) -> Usage:
        """The backend's `usage` when it sent one; else the reservation if an answer was under way (a
        client that leaves mid-stream still pays), and nothing for a request that never got one."""
        if record.tokens_in is not None or record.tokens_out is not None:
            tokens_in, tokens_out = record.tokens_in or 0, record.tokens_out or 0
            prices = self._prices(admitted.key) if admitted.key.settings.prices else self.prices
            cost = cost_of(prices, admitted.model, tokens_in, tokens_out) if prices else 0.0
            return Usage(tokens_in + tokens_out, cost)
        if record.first_byte is not None or (200 <= record.status < 300 and record.error is None):
            return admitted.reserved
        return Usage()  # nothing was answered (a stream that only sent keep-alives, then an error, included)

    def cost(self, key: ApiKey | None, model: str, record: RequestRecord) -> float | None:
        """A request's cost at its key's prices, for the usage ledger (None: nothing priced)."""
        prices = self._prices(key) if key is not None else self.prices
        if not prices or (record.tokens_in is None and record.tokens_out is None):
            return None
        return cost_of(prices, model, record.tokens_in or 0, record.tokens_out or 0)

    def _prices(self, key: ApiKey) -> dict[str, Price]:
        own = key.settings.prices
        return {**self.prices, **own} if own else self.prices  # a key's own table is rare: merged when asked


def _max_tokens(payload: dict[str, Any] | None, default: int) -> int:
    """What the answer may cost: the request's own cap (as a backend would read it: `"40000"` and
    `40000.0` too) times the answers asked for (`n`, `best_of`, a list of prompts), else the key's
    (or the gateway's) default; never more than _MOST_TOKENS."""
    if payload is None:
        return 0
    cap = default
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(name)
        if value is not None:
            value = value if type(value) is int else _whole(value)
            if value is not None and value > 0:
                cap = value
                break
    answers = 1
    for name in ("n", "best_of"):
        value = payload.get(name)
        if value is not None:
            answers = max(answers, _whole(value) or 1)
    prompt = payload.get("prompt")
    if type(prompt) is list and prompt and not all(isinstance(p, int) for p in prompt):
        answers *= len(prompt)  # a list of prompts (not one prompt of token ids): an answer each
    return min(cap * answers, _MOST_TOKENS)


def _whole(value: object) -> int | None:
    """A whole number as lax JSON readers (pydantic) take it: 7, 7.0 or "7"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _refusal(exc: LimitExceeded) -> RateLimited:
    retry_after = max(1, int(exc.retry_after + 0.999))
    if exc.reason == "budget":
        reset = exc.limits.period_end
        when = f"; it resets at {iso(reset)}" if reset is not None else "; it does not reset"
        error = RateLimited(f"budget exceeded for this key{when}", code="budget_exceeded", retry_after=retry_after)
    else:
        error = RateLimited(str(exc), retry_after=retry_after)
    error.headers.update(rate_headers(exc.limits.rpm, exc.limits.tpm, exc.remaining_requests, exc.remaining_tokens))
    return error


def rate_headers(rpm: int | None, tpm: int | None, remaining_requests: int | None,
                 remaining_tokens: int | None) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the limits a key has."""
    headers: dict[str, str] = {}
    if rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, remaining_requests or 0))
    if tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, remaining_tokens or 0))
    return headers
