"""vLLM sleep mode: sleep and wake through its admin routes, verify with a canary, restart when that fails."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiohttp
import orjson

from .base import SleepFailed, WakeFailed

log = logging.getLogger("synapse.scheduler.vllm")
_ADMIN_TIMEOUT = aiohttp.ClientTimeout(total=600)


class VllmSleepDriver:
    """Level 1 keeps weights in host RAM (fast wake); level 2 drops them and reloads on wake.

    `GET /is_sleeping` is the authority. A failed wake or canary falls back to `restart` (the managed
    process or pod), because a half-woken engine crashes on the next request (vllm#15483, #36753).
    """

    def __init__(self, *, url: str, model: str | None, session: aiohttp.ClientSession, level: int = 1,
                 canary: bool = True, restart: Callable[[], Awaitable[None]] | None = None,
                 on_fallback: Callable[[], None] | None = None) -> None:
        self.url = url
        self.model = model
        self.session = session
        self.level = level
        self.canary = canary
        self.restart = restart
        self.on_fallback = on_fallback

    async def is_resident(self) -> bool:
        async with self.session.get(f"{self.url}/is_sleeping", timeout=_ADMIN_TIMEOUT) as answer:
            if answer.status != 200:
                raise WakeFailed(f"GET /is_sleeping answered {answer.status}: is sleep mode enabled "
                                 "(VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode)?")
            return not bool(orjson.loads(await answer.read()).get("is_sleeping"))

    async def sleep(self) -> None:
        try:
            await self._post(f"/sleep?level={self.level}")
        except WakeFailed as exc:
            raise SleepFailed(str(exc)) from exc
        if await self.is_resident():
            raise SleepFailed("vLLM still reports is_sleeping=false after POST /sleep")

    async def wake(self) -> None:
        try:
            await self._wake_up()
            if not await self.is_resident():
                raise WakeFailed("vLLM still reports is_sleeping=true after waking")
            if self.canary:
                await self._canary()
        except (WakeFailed, aiohttp.ClientError, TimeoutError) as exc:
            if self.restart is None:
                raise WakeFailed(f"wake failed and there is no process or pod to restart: {exc}") from exc
            log.error("waking vLLM at %s failed (%s); restarting it", self.url, exc)
            if self.on_fallback is not None:
                self.on_fallback()
            await self.restart()

    async def _wake_up(self) -> None:
        if self.level == 1:
            await self._post("/wake_up")
            return
        await self._post("/wake_up?tags=weights")
        await self._post("/collective_rpc", {"method": "reload_weights"})
        await self._post("/wake_up?tags=kv_cache")
        await self._post("/reset_prefix_cache")

    async def _canary(self) -> None:
        """One token, to prove the engine really serves before any user request reaches it."""
        if self.model is None:
            async with self.session.get(f"{self.url}/v1/models", timeout=_ADMIN_TIMEOUT) as answer:
                served = orjson.loads(await answer.read()).get("data") or [{}]
            self.model = str(served[0].get("id", ""))
        await self._post("/v1/completions", {"model": self.model, "prompt": "ping", "max_tokens": 1})

    async def _post(self, path: str, body: dict[str, object] | None = None) -> None:
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else None
        async with self.session.post(self.url + path, data=data, headers=headers,
                                     timeout=_ADMIN_TIMEOUT) as answer:
            text = await answer.read()
            if answer.status >= 300:
                raise WakeFailed(f"POST {path} answered {answer.status}: {text[:200].decode(errors='replace')}")
