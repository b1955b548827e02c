"""One Ollama model as a unit: loaded on wake, unloaded with keep_alive 0, `/api/ps` as the authority."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from .base import SleepFailed, WakeFailed

_TIMEOUT = aiohttp.ClientTimeout(total=1800)
_UNLOAD_POLL = 0.2


class OllamaModelDriver:
    """Synapse decides when a model is unloaded, so models are loaded with keep_alive -1 (forever)."""

    def __init__(self, *, url: str, model: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.model = model
        self.session = session

    async def loaded(self) -> dict[str, dict[str, object]]:
        """`/api/ps`: the loaded models by name (with size and size_vram)."""
        async with self.session.get(f"{self.url}/api/ps", timeout=_TIMEOUT) as answer:
            body = orjson.loads(await answer.read())
        return {str(m.get("name")): m for m in body.get("models") or [] if isinstance(m, dict)}

    async def is_resident(self) -> bool:
        return _matches(self.model, await self.loaded())

    async def wake(self) -> None:
        await self._generate(keep_alive=-1, failure=WakeFailed)

    async def sleep(self) -> None:
        await self._generate(keep_alive=0, failure=SleepFailed)
        for _ in range(int(30 / _UNLOAD_POLL)):
            if not await self.is_resident():
                return
            await asyncio.sleep(_UNLOAD_POLL)
        raise SleepFailed(f"{self.model} is still in /api/ps 30s after keep_alive 0")

    async def _generate(self, *, keep_alive: int, failure: type[Exception]) -> None:
        body = orjson.dumps({"model": self.model, "keep_alive": keep_alive, "stream": False})
        async with self.session.post(f"{self.url}/api/generate", data=body, timeout=_TIMEOUT,
                                     headers={"Content-Type": "application/json"}) as answer:
            text = await answer.read()
            if answer.status != 200:
                raise failure(f"Ollama answered {answer.status} for {self.model}: "
                              f"{text[:200].decode(errors='replace')}")


def _matches(model: str, loaded: dict[str, dict[str, object]]) -> bool:
    """Ollama names a model without a tag as `:latest`."""
    return model in loaded or (":" not in model and f"{model}:latest" in loaded)
