"""vLLM sleep mode: sleep and wake through its admin routes, verify with a canary, restart when that fails."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Literal, Self

import aiohttp
import orjson

from ...config.schema import VllmSleepLifecycle
from .base import DriverContext, LifecycleError, SleepFailed, WakeFailed, json_object, lifecycle_errors
from .process import restarter

log = logging.getLogger("synapse.scheduler.vllm")

Task = Literal["auto", "generate", "embed"]
# `GET /is_sleeping` is a quick question; a wake or a sleep may take as long as the config allows.
_QUESTION_TIMEOUT = 30.0


class VllmSleepDriver:
    """Level 1 keeps weights in host RAM (fast wake); level 2 drops them and reloads on wake.

    `GET /is_sleeping` is the authority. A failed wake or canary falls back to `restart` (the managed
    process or pod), because a half-woken engine crashes on the next request (vllm#15483, #36753).
    """

    def __init__(self, *, url: str, model: str | None, session: aiohttp.ClientSession, level: int = 1,
                 canary: bool = True, task: Task = "auto", restart: Callable[[], Awaitable[None]] | None = None,
                 action_timeout: float = 1800.0) -> None:
        self.url = url
        self.model = model
        self.session = session
        self.level = level
        self.canary = canary
        self.task: Task = task
        self.restart = restart
        # Never below the wake deadline: a level-2 reload or a large model may take that long (F14).
        self._action_timeout = aiohttp.ClientTimeout(total=action_timeout)
        self._question_timeout = aiohttp.ClientTimeout(total=min(_QUESTION_TIMEOUT, action_timeout))

    @classmethod
    def from_config(cls, config: VllmSleepLifecycle, context: DriverContext) -> Self:
        """A driver for a backend's `lifecycle: {driver: vllm-sleep}`; a `managed` engine is the restart path."""
        backend = context.backend
        restart: Callable[[], Awaitable[None]] | None = None
        if backend.engine is not None:
            restart_engine = restarter(backend.engine)

            async def restart() -> None:
                context.on_fallback()  # counted in synapse_gpu_wake_fallbacks_total
                await restart_engine()

        return cls(url=backend.url, model=(backend.static_models or (None,))[0], session=context.session,
                   level=config.sleep_level, canary=config.canary, task=config.task, restart=restart,
                   action_timeout=config.wake_timeout)

    async def is_resident(self) -> bool:
        with lifecycle_errors(f"asking vLLM at {self.url} whether it sleeps"):
            status, raw = await self._request("GET", "/is_sleeping", timeout=self._question_timeout)
            if status != 200:
                raise LifecycleError(f"GET /is_sleeping answered {status}: is sleep mode enabled "
                                     "(VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode)?")
            sleeping = json_object(raw, "the answer to GET /is_sleeping").get("is_sleeping")
            if not isinstance(sleeping, bool):
                raise LifecycleError(f"`is_sleeping` is {sleeping!r}, not true or false")
            return not sleeping

    async def sleep(self) -> None:
        with lifecycle_errors(f"putting vLLM at {self.url} to sleep", SleepFailed):
            await self._post(f"/sleep?level={self.level}")
            if await self.is_resident():
                raise SleepFailed("vLLM still reports is_sleeping=false after POST /sleep")

    async def wake(self) -> None:
        with lifecycle_errors(f"waking vLLM at {self.url}", WakeFailed):
            try:
                await self._wake_up()
                if not await self.is_resident():
                    raise WakeFailed("vLLM still reports is_sleeping=true after waking")
                if self.canary:
                    await self._canary()
            except LifecycleError as exc:
                if self.restart is None:
                    raise WakeFailed(f"wake failed and there is no process or pod to restart: {exc}") from exc
                log.error("waking vLLM at %s failed (%s); restarting it", self.url, exc)
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
        """One token (or one embedding), to prove the engine really serves before any user request reaches it.

        An embeddings-only engine refuses completions with 400 or 404 before its engine is involved,
        so `auto` then asks for an embedding, and remembers which one worked.
        """
        model = self.model or await self._served_model()
        if self.task != "embed":
            body: dict[str, object] = {"model": model, "prompt": "ping", "max_tokens": 1}
            status, raw = await self._request("POST", "/v1/completions", body)
            if status == 200:
                self.task = "generate"
                return
            if self.task == "generate" or status not in (400, 404):
                raise WakeFailed(f"canary POST /v1/completions answered {status}: {_excerpt(raw)}")
        await self._post("/v1/embeddings", {"model": model, "input": "ping"})
        self.task = "embed"

    async def _served_model(self) -> str:
        status, raw = await self._request("GET", "/v1/models", timeout=self._question_timeout)
        data = json_object(raw, "the answer to GET /v1/models").get("data") if status == 200 else None
        first = data[0] if isinstance(data, list) and data else None
        if not isinstance(first, dict) or not isinstance(first.get("id"), str):
            raise WakeFailed(f"GET /v1/models answered {status} without a model id: {_excerpt(raw)}")
        self.model = str(first["id"])
        return self.model

    async def _post(self, path: str, body: dict[str, object] | None = None) -> None:
        status, raw = await self._request("POST", path, body)
        if status >= 300:
            raise WakeFailed(f"POST {path} answered {status}: {_excerpt(raw)}")

    async def _request(self, method: str, path: str, body: dict[str, object] | None = None, *,
                       timeout: aiohttp.ClientTimeout | None = None) -> tuple[int, bytes]:
        """Every call to vLLM goes through here, so transport errors become LifecycleErrors in one place."""
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else None
        with lifecycle_errors(f"{method} {path}"):
            async with self.session.request(method, self.url + path, data=data, headers=headers,
                                            timeout=timeout or self._action_timeout) as answer:
                return answer.status, await answer.read()


def _excerpt(raw: bytes) -> str:
    return raw[:200].decode(errors="replace")
