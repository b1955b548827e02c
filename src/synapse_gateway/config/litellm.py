"""Reads a LiteLLM proxy config (`model_list`, `router_settings`, `general_settings`) as a native Synapse config."""

from __future__ import annotations

import math
import os
import re
from typing import Any
from urllib.parse import urlsplit

from .problems import Path as KeyPath
from .problems import Problem

# LiteLLM provider prefix -> Synapse backend protocol.
PROVIDERS = {"openai": "openai", "hosted_vllm": "vllm", "ollama": "ollama", "ollama_chat": "ollama"}
DEFAULT_API_BASE = {"openai": "https://api.openai.com/v1", "ollama": "http://localhost:11434"}
_USED_PARAMS = {"model", "api_base", "api_key", "timeout"}
_ROUTER_KEYS = {"num_retries": "retries", "allowed_fails": "allowed_fails", "cooldown_time": "cooldown"}
_MAX_RETRIES = 10
_SECTIONS = {"model_list", "router_settings", "litellm_settings", "environment_variables", "general_settings"}
_STRATEGIES_EQUIVALENT = {"least-busy", "simple-shuffle"}
_STRATEGIES = _STRATEGIES_EQUIVALENT | {
    "latency-based-routing", "usage-based-routing", "usage-based-routing-v2", "cost-based-routing"}


def translate(data: dict[str, Any], problems: list[Problem]) -> dict[str, Any]:
    """A native config dict equivalent to the LiteLLM config `data`; problems use LiteLLM's paths."""
    variables = data.get("environment_variables") or {}
    if not isinstance(variables, dict):
        problems.append(Problem("error", "`environment_variables` must be a mapping",
                                "write `NAME: value` pairs", ("environment_variables",)))
        variables = {}
    env = {str(k): str(v) for k, v in variables.items()}
    backends: dict[str, dict[str, Any]] = {}
    routes: dict[str, dict[str, Any]] = {}
    entries = data.get("model_list")
    if not isinstance(entries, list):
        problems.append(Problem("error", "`model_list` must be a list of models",
                                "write `model_list:` followed by `- model_name: ...` entries", ("model_list",)))
        entries = []
    for index, entry in enumerate(entries):
        _add_entry(entry, ("model_list", index), env, backends, routes, problems)
    native: dict[str, Any] = {"backends": backends, "routes": list(routes.values())}
    routing, timeouts = _settings(data, routes, problems)
    native["routing"], native["timeouts"] = routing, timeouts
    auth = _general_settings(data.get("general_settings"), env, problems)
    if auth:
        native["auth"] = auth
    for key in data:
        if key not in _SECTIONS:
            _unused(problems, (key,), f"`{key}` is not used by Synapse yet")
    return native


def _general_settings(settings: Any, env: dict[str, str], problems: list[Problem]) -> dict[str, Any]:
    """The native `auth` section: LiteLLM's `master_key` is the key clients must send."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        problems.append(Problem("error", "`general_settings` must be a mapping", "write `key: value` pairs",
                                ("general_settings",)))
        return {}
    auth: dict[str, Any] = {}
    for key, value in settings.items():
        path: KeyPath = ("general_settings", key)
        if key != "master_key":
            _unused(problems, path, f"`{key}` is kept but not used by Synapse yet")
            continue
        key_value = _resolve(value, path, env, problems)
        if key_value is not None and not isinstance(key_value, str):
            problems.append(Problem("error", "`master_key` must be a string",
                                    "quote it: `master_key: \"sk-...\"`", path))
            continue
        auth["master_key"] = key_value
    return auth


def _add_entry(entry: Any, path: KeyPath, env: dict[str, str], backends: dict[str, dict[str, Any]],
               routes: dict[str, dict[str, Any]], problems: list[Problem]) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("model_name"), str):
        problems.append(Problem("error", "each entry needs a `model_name`",
                                "write `- model_name: NAME` with `litellm_params: {model: provider/NAME}`", path))
        return
    params = entry.get("litellm_params")
    if not isinstance(params, dict) or not isinstance(params.get("model"), str):
        problems.append(Problem("error", "`litellm_params.model` is required",
                                "write e.g. `litellm_params: {model: openai/NAME, api_base: http://host:8000/v1}`",
                                (*path, "litellm_params")))
        return
    provider, _, upstream = params["model"].partition("/")
    if not upstream:
        provider, upstream = "openai", params["model"]
    protocol = PROVIDERS.get(provider)
    if protocol is None:
        problems.append(Problem("warning", f"provider `{provider}/` is not supported; this entry is skipped",
                                f"Synapse speaks to {sorted(PROVIDERS)}; use one of those prefixes",
                                (*path, "litellm_params", "model")))
        return
    backend = _backend(params, protocol, (*path, "litellm_params"), env, problems)
    name = _backend_name(backend, backends)
    backends[name] = backend
    for key in params:
        if key not in _USED_PARAMS:
            _unused(problems, (*path, "litellm_params", key), f"`{key}` is kept but not used by Synapse yet")
    for key in entry:
        if key not in {"model_name", "litellm_params"}:
            _unused(problems, (*path, key), f"`{key}` is kept but not used by Synapse yet")
    model_name = entry["model_name"]
    route = routes.setdefault(model_name, _new_route(model_name))
    route["deployments"].append({"backend": name, "model": upstream})


def _new_route(model_name: str) -> dict[str, Any]:
    if any(ch in model_name for ch in "*?["):
        return {"pattern": model_name, "deployments": []}
    return {"model": model_name, "deployments": []}


def _backend(params: dict[str, Any], protocol: str, path: KeyPath, env: dict[str, str],
             problems: list[Problem]) -> dict[str, Any]:
    api_base = _resolve(params.get("api_base"), (*path, "api_base"), env, problems)
    url = str(api_base or DEFAULT_API_BASE["ollama" if protocol == "ollama" else "openai"]).rstrip("/")
    if protocol != "ollama":
        url = re.sub(r"/v1$", "", url)
    backend: dict[str, Any] = {"url": url, "protocol": protocol, "discover": False}
    api_key = _resolve(params.get("api_key"), (*path, "api_key"), env, problems)
    if api_key is None and "api.openai.com" in url:
        api_key = os.environ.get("OPENAI_API_KEY")
    if api_key:
        backend["api_key"] = str(api_key)
    if params.get("timeout") is not None:
        timeout = _number(params["timeout"], (*path, "timeout"), problems, positive=True)
        if timeout is not None:
            backend["timeouts"] = {"total": timeout}
    return backend


def _resolve(value: Any, path: KeyPath, env: dict[str, str], problems: list[Problem]) -> Any:
    """LiteLLM's `os.environ/NAME` references, looked up in environment_variables, then the environment."""
    if isinstance(value, str) and value.startswith("os.environ/"):
        name = value.removeprefix("os.environ/")
        found = env.get(name, os.environ.get(name))
        if found is None:
            problems.append(Problem("error", f"environment variable {name} is not set", f"export {name}=...", path))
        return found
    return value


def _backend_name(backend: dict[str, Any], backends: dict[str, dict[str, Any]]) -> str:
    """A readable, stable name (host-port) shared by entries that point at the same server the same way."""
    parts = urlsplit(backend["url"])
    base = f"{parts.hostname or 'backend'}-{parts.port or (443 if parts.scheme == 'https' else 80)}"
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", base)
    name, suffix = base, 2
    while name in backends and backends[name] != backend:
        name, suffix = f"{base}-{suffix}", suffix + 1
    return name


def _settings(data: dict[str, Any], routes: dict[str, dict[str, Any]],
              problems: list[Problem]) -> tuple[dict[str, Any], dict[str, Any]]:
    routing: dict[str, Any] = {}
    timeouts: dict[str, Any] = {}
    for section in ("litellm_settings", "router_settings"):  # router_settings wins: it is read last
        settings = data.get(section) or {}
        if not isinstance(settings, dict):
            problems.append(Problem("error", f"`{section}` must be a mapping", "write `key: value` pairs",
                                    (section,)))
            continue
        for key, value in settings.items():
            path: KeyPath = (section, key)
            if key in _ROUTER_KEYS:
                _router_number(key, value, path, routing, problems)
            elif key in {"timeout", "request_timeout"}:
                total = None if value is None else _number(value, path, problems, positive=True)
                if total is not None:
                    timeouts["total"] = total
            elif key == "fallbacks":
                _fallbacks(value, path, routes, problems)
            elif key == "routing_strategy":
                _strategy(str(value), path, problems)
            else:
                _unused(problems, path, f"`{key}` is kept but not used by Synapse yet")
    return routing, timeouts


def _router_number(key: str, value: Any, path: KeyPath, routing: dict[str, Any],
                   problems: list[Problem]) -> None:
    """`num_retries` and `allowed_fails` (whole numbers) or `cooldown_time` (seconds) into `routing`."""
    if key == "cooldown_time":
        number = _number(value, path, problems, positive=False)
        if number is not None:
            routing["cooldown"] = number
        return
    count = _count(value, path, problems, least=0 if key == "num_retries" else 1)
    if count is None:
        return
    if key == "num_retries" and count > _MAX_RETRIES:
        problems.append(Problem("warning", f"num_retries {count} is capped at {_MAX_RETRIES}",
                                f"write `num_retries: {_MAX_RETRIES}` or less", path))
        count = _MAX_RETRIES
    routing[_ROUTER_KEYS[key]] = count


def _count(value: Any, path: KeyPath, problems: list[Problem], *, least: int) -> int | None:
    """A whole number of at least `least` (a quoted one too); None after reporting anything else."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= least:
        return value
    problems.append(Problem("error", f"`{path[-1]}` must be a whole number of {least} or more, not {value!r}",
                            f"write e.g. `{path[-1]}: {max(least, 2)}`", path))
    return None


def _number(value: Any, path: KeyPath, problems: list[Problem], *, positive: bool) -> float | None:
    """A number of seconds (a quoted one too); None after reporting anything else."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is not None and math.isfinite(number) and (number > 0 if positive else number >= 0):
        return int(number) if number.is_integer() else number
    bound = "more than 0" if positive else "0 or more"
    problems.append(Problem("error", f"`{path[-1]}` must be a number of seconds, {bound}, not {value!r}",
                            f"write e.g. `{path[-1]}: 30`", path))
    return None


def _fallbacks(value: Any, path: KeyPath, routes: dict[str, dict[str, Any]], problems: list[Problem]) -> None:
    if not isinstance(value, list):
        problems.append(Problem("error", "`fallbacks` must be a list like [{model-a: [model-b]}]",
                                "write `fallbacks: [{\"model-a\": [\"model-b\"]}]`", path))
        return
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            problems.append(Problem("error", "each fallback is a mapping {model: [fallback models]}",
                                    "write `- model-a: [model-b]`", (*path, index)))
            continue
        for model, targets in item.items():
            if model not in routes:
                problems.append(Problem("warning", f"fallback for unknown model {model!r} is ignored",
                                        "name a `model_name` from `model_list`", (*path, index)))
                continue
            targets = targets if isinstance(targets, list) else [targets]
            routes[model].setdefault("fallbacks", []).extend(str(t) for t in targets)


def _strategy(value: str, path: KeyPath, problems: list[Problem]) -> None:
    if value not in _STRATEGIES:
        problems.append(Problem("warning", f"unknown routing_strategy {value!r}; least-in-flight is used",
                                f"use one of {sorted(_STRATEGIES)}", path))
    elif value not in _STRATEGIES_EQUIVALENT:
        _unused(problems, path, f"routing_strategy {value!r} is served by least-in-flight balancing")


def _unused(problems: list[Problem], path: KeyPath, message: str) -> None:
    problems.append(Problem("warning", message, "", path))
