"""One Ollama model as a unit: loaded on wake, unloaded with keep_alive 0, `/api/ps` as the authority."""

from __future__ import annotations

import asyncio
from typing import Self

import aiohttp
import orjson

from ...config.schema import OllamaLifecycle
from .base import DriverContext, LifecycleError, SleepFailed, WakeFailed, json_object, lifecycle_errors

_UNLOAD_POLL = 0.2
_UNLOAD_PATIENCE = 30.0
_QUESTION_TIMEOUT = aiohttp.ClientTimeout(total=30)
_DEFAULT_REGISTRY = ("registry.ollama.ai/", "library/")


def canonical(name: str) -> str:
    """The model Ollama means by `name`: names are case-insensitive, no tag means `:latest`, and
    `registry.ollama.ai/library/` is the default prefix. `LLaMA3` and `llama3:latest` are one model."""
    name = name.strip().lower()
    for prefix in _DEFAULT_REGISTRY:
        name = name.removeprefix(prefix)
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def model_memory(config: OllamaLifecycle, model: str) -> int:
    """A model's size from `model_memory` (its keys matched as Ollama matches names), else `memory`."""
    sizes = {canonical(name): size for name, size in config.model_memory.items()}
    return sizes.get(canonical(model), config.memory)


async def loaded_models(session: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """`/api/ps`: the loaded models, canonical name to the name Ollama lists."""
    with lifecycle_errors(f"GET {url}/api/ps"):
        async with session.get(f"{url}/api/ps", timeout=_QUESTION_TIMEOUT) as answer:
            raw = await answer.read()
            if answer.status != 200:
                raise LifecycleError(f"answered {answer.status}: {raw[:200].decode(errors='replace')}")
        models = json_object(raw, "the answer to GET /api/ps").get("models") or []
        if not isinstance(models, list):
            raise LifecycleError(f"`models` is {type(models).__name__}, not a list")
        names = [m.get("name") or m.get("model") for m in models if isinstance(m, dict)]
        return {canonical(n): n for n in names if isinstance(n, str) and n}


class OllamaModelDriver:
    """Synapse decides when a model is unloaded, so models are loaded with keep_alive -1 (forever)."""

    def __init__(self, *, url: str, model: str, session: aiohttp.ClientSession, load_timeout: float = 1800.0) -> None:
        self.url = url
        self.model = model
        self.session = session
        self._load_timeout = aiohttp.ClientTimeout(total=load_timeout)

    @classmethod
    def from_config(cls, config: OllamaLifecycle, context: DriverContext, *, model: str) -> Self:
        """The driver of one model of the backend (Ollama's own name for it, as /api/tags or /api/ps list it)."""
        return cls(url=context.backend.url, model=model, session=context.session, load_timeout=config.wake_timeout)

    async def is_resident(self) -> bool:
        return canonical(self.model) in await loaded_models(self.session, self.url)

    async def wake(self) -> None:
        with lifecycle_errors(f"loading {self.model} on Ollama at {self.url}", WakeFailed):
            await self._generate(keep_alive=-1)

    async def sleep(self) -> None:
        with lifecycle_errors(f"unloading {self.model} on Ollama at {self.url}", SleepFailed):
            await self._generate(keep_alive=0)
            for _ in range(int(_UNLOAD_PATIENCE / _UNLOAD_POLL)):
                if not await self.is_resident():
                    return
                await asyncio.sleep(_UNLOAD_POLL)
            raise SleepFailed(f"{self.model} is still in /api/ps {_UNLOAD_PATIENCE:g}s after keep_alive 0")

    async def _generate(self, *, keep_alive: int) -> None:
        """A generate without a prompt only loads the model (keep_alive 0: unloads it)."""
        body = orjson.dumps({"model": self.model, "keep_alive": keep_alive, "stream": False})
        async with self.session.post(f"{self.url}/api/generate", data=body, timeout=self._load_timeout,
                                     headers={"Content-Type": "application/json"}) as answer:
            text = await answer.read()
            if answer.status != 200:
                raise LifecycleError(f"Ollama answered {answer.status}: {text[:200].decode(errors='replace')}")
        if json_object(text, "Ollama's answer").get("done") is not True:
            raise LifecycleError(f"Ollama's answer is not a finished load or unload: {text[:200]!r}")
