"""Reads a config file (native or LiteLLM format) into a validated SynapseConfig, with located problems."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from . import litellm
from .problems import ConfigError, Problem
from .problems import Path as KeyPath
from .schema import (
    DRIVERS,
    LIFECYCLE_MODELS,
    AlwaysOnLifecycle,
    DeviceConfig,
    LifecycleConfig,
    OllamaLifecycle,
    ProcessLifecycle,
    SynapseConfig,
)

Dialect = Literal["native", "litellm"]
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class LoadedConfig:
    """A usable configuration and the warnings found while reading it."""

    config: SynapseConfig
    source: str
    dialect: Dialect
    warnings: list[Problem] = field(default_factory=list)


def load_config(path: str | os.PathLike[str]) -> LoadedConfig:
    """Read and validate a config file; raise ConfigError naming every problem."""
    filename = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem("error", f"cannot read the file: {exc.strerror}", "check the path",
                                   file=filename)]) from exc
    return parse_config(text, filename)


def check_file(path: str | os.PathLike[str]) -> list[Problem]:
    """Every problem in a config file, errors and warnings, for `synapse check`."""
    try:
        return load_config(path).warnings
    except ConfigError as exc:
        return exc.problems


def parse_config(text: str, filename: str = "<config>") -> LoadedConfig:
    """Validate config text; raise ConfigError when any problem is an error."""
    try:
        tree = YAML(typ="rt").load(text)
    except YAMLError as exc:
        line = exc.problem_mark.line + 1 if isinstance(exc, MarkedYAMLError) and exc.problem_mark else None
        problem = Problem("error", f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                          "fix the YAML syntax (indentation, quotes, colons)", file=filename, line=line)
        raise ConfigError([problem]) from exc
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError([Problem("error", "the top level must be a mapping of keys",
                                   "start with `backends:` (native) or `model_list:` (LiteLLM)", file=filename)])
    problems: list[Problem] = []
    plain = _substitute_env(tree, problems)
    if plain is None:
        raise ConfigError([_locate(p, tree, filename, "native") for p in problems])
    dialect: Dialect = "litellm" if "model_list" in plain else "native"
    native = _translate(plain, problems) if dialect == "litellm" else plain
    config = _validate(native, problems)
    problems.extend(check_references(native))
    if config is not None:
        problems.extend(check_budget(config))
        problems.extend(check_access(config))
    located = sorted((_locate(p, tree, filename, dialect) for p in problems), key=lambda p: p.line or 0)
    if config is None or any(p.severity == "error" for p in located):
        raise ConfigError(located)
    return LoadedConfig(config=config, source=filename, dialect=dialect, warnings=located)


# A config has hundreds of values; YAML aliases can make a few lines expand to billions ("billion laughs").
MAX_VALUES = 100_000
MAX_DEPTH = 64


class _TooLarge(Exception):
    """The tree expands past MAX_VALUES values or MAX_DEPTH levels (aliases of aliases, or a recursive alias)."""


def _substitute_env(tree: Any, problems: list[Problem]) -> Any:
    """A plain copy of the YAML tree with ${VAR} and ${VAR:-default} replaced; None when it expands too far."""
    budget = [MAX_VALUES]
    try:
        return _substitute(tree, (), problems, budget)
    except _TooLarge as exc:
        problems.append(Problem("error", f"the config expands to {exc}",
                                "write the values out, or use fewer YAML anchors and aliases (`&name`, `*name`)"))
        return None


def _substitute(node: Any, path: KeyPath, problems: list[Problem], budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge(f"more than {MAX_VALUES} values")
    if len(path) > MAX_DEPTH:
        raise _TooLarge(f"more than {MAX_DEPTH} levels")
    if isinstance(node, dict):
        return {str(k): _substitute(v, (*path, str(k)), problems, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, (*path, i), problems, budget) for i, v in enumerate(node)]
    if isinstance(node, str):
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name, default)
            if value is None:
                problems.append(Problem("error", f"environment variable {name} is not set",
                                        f"export {name}=... or write ${{{name}:-default}}", path))
                return ""
            return value
        return _ENV.sub(replace, str(node))
    return node


def _translate(plain: dict[str, Any], problems: list[Problem]) -> dict[str, Any]:
    """The LiteLLM translation, where a value of a type it did not expect is a problem, not a traceback."""
    try:
        return litellm.translate(plain, problems)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        problems.append(Problem("error", f"a LiteLLM setting has a value of the wrong type ({exc})",
                                "check the values under `litellm_settings`, `router_settings` and `model_list` "
                                "against LiteLLM's documentation (numbers where numbers are expected)"))
        return {}


def _validate(data: dict[str, Any], problems: list[Problem]) -> SynapseConfig | None:
    try:
        return SynapseConfig.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            problems.append(_problem_from_pydantic(error))
        return None


def _problem_from_pydantic(error: Any) -> Problem:
    path, driver = _untagged(tuple(error["loc"]))
    kind = error["type"]
    if kind == "extra_forbidden":
        return _unknown_key(path, driver)
    if kind == "missing":
        needs = f"the {driver} driver needs" if driver else "this section needs"
        return Problem("error", f"{needs} `{path[-1]}`", f"add `{path[-1]}: ...` here", path)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = error.get("ctx", {}).get("tag")
        close = [d for d in DRIVERS if d.startswith(str(tag))] or difflib.get_close_matches(str(tag), DRIVERS, n=1)
        fix = f"did you mean `{close[0]}`?" if close else f"set `driver:` to one of {', '.join(DRIVERS)}"
        message = f"unknown driver {tag!r}" if kind == "union_tag_invalid" else "`driver` is required"
        return Problem("error", message, fix, (*path, "driver"))
    message, _, fix = str(error["msg"]).removeprefix("Value error, ").partition("|")
    return Problem("error", message, fix or "see docs/config.md for the allowed values", path)


def _untagged(loc: KeyPath) -> tuple[KeyPath, str | None]:
    """Pydantic puts a discriminated union's tag into the location (`lifecycle.vllm-sleep.x`); the file has none."""
    for i, key in enumerate(loc[:-1]):
        if key == "lifecycle" and loc[i + 1] in DRIVERS:
            return (*loc[: i + 1], *loc[i + 2:]), str(loc[i + 1])
    return loc, None


def _unknown_key(path: KeyPath, driver: str | None) -> Problem:
    key = str(path[-1])
    if driver is not None:
        owners = [name for name, model in LIFECYCLE_MODELS.items() if key in model.model_fields]
        if owners:
            return Problem("error", f"`{key}` is not a setting of the {driver} driver",
                           f"it belongs to the {' or '.join(owners)} driver: remove it, or set "
                           f"`driver: {owners[0]}`", path)
    known = list(LIFECYCLE_MODELS[driver].model_fields) if driver else _known_keys()
    close = difflib.get_close_matches(key, known, n=1)
    fix = f"did you mean `{close[0]}`?" if close else "remove it; docs/config.md lists every key"
    return Problem("error", f"unknown key `{key}`", fix, path)


def _known_keys() -> list[str]:
    from . import schema

    names: set[str] = set()
    for model in vars(schema).values():
        if isinstance(model, type) and hasattr(model, "model_fields"):
            names.update(model.model_fields)
    return sorted(names)


def check_references(data: dict[str, Any]) -> list[Problem]:
    """Problems that span sections (unknown backends, names used twice), read from the raw config."""
    problems: list[Problem] = []
    backends = _mapping(data.get("backends"))
    known = sorted(backends)
    fix = f"use one of {known} or define it under `backends:`"
    fallback = data.get("fallback")
    if fallback is not None and fallback not in backends:
        problems.append(Problem("error", f"fallback {fallback!r} is not a backend", fix, ("fallback",)))
    routes = _sequence(data.get("routes"))
    names: dict[str, int] = {}
    for index, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        for where, backend in _route_backends(route, index):
            if backend not in backends:
                problems.append(Problem("error", f"backend {backend!r} is not defined", fix, where))
        aliases = _sequence(route.get("aliases"))
        for name in ([route["model"]] if isinstance(route.get("model"), str) else []) + aliases:
            if name in names:
                problems.append(Problem("error", f"model name {name!r} is already used by routes[{names[name]}]",
                                        "give each public model name one route; list several "
                                        "`deployments` to serve it from several backends", ("routes", index)))
            names[name] = index
    return problems


def check_access(config: SynapseConfig) -> list[Problem]:
    """Access settings that would not do what they seem to: money budgets with no prices, replicas
    that would each keep their own keys."""
    problems: list[Problem] = []
    auth = config.auth
    for index, key in enumerate(auth.keys):
        if key.max_budget is not None and not (auth.prices or key.prices):
            problems.append(Problem("warning", f"key {key.id} has a `max_budget` in money but no model has a price, "
                                    "so every request costs 0", "add `auth.prices: {\"llama-*\": {input: 0.1, "
                                    "output: 0.2}}` (money per million tokens), or use `token_budget`",
                                    ("auth", "keys", index, "max_budget")))
    if config.redis_url and config.database_url is None:
        problems.append(Problem("warning", "`redis_url` shares limits between replicas, but keys and usage stay in "
                                "each replica's own SQLite file", "set `database_url: postgresql://...` on every "
                                "replica so that they share keys and the usage ledger", ("redis_url",)))
    return problems


def check_budget(config: SynapseConfig) -> list[Problem]:
    """GPU-scheduled backends need a `gpu:` budget and a known device, must be able to wake at all, and
    must be true for every replica when several share the budget."""
    scheduled = {name: b.lifecycle for name, b in config.backends.items() if b.lifecycle is not None}
    if not scheduled:
        return []
    if config.gpu is None:
        return [Problem("error", "backends have a `lifecycle` but there is no `gpu:` budget",
                        "add `gpu: {memory: 32GiB, reserve: 1GiB}` (see docs/gpu.md)", ("gpu",))]
    devices = {d.name: d for d in config.gpu.device_list()}
    problems: list[Problem] = []
    for name, lifecycle in scheduled.items():
        if lifecycle.device not in devices:
            problems.append(Problem("error", f"device {lifecycle.device!r} is not in the gpu budget",
                                    f"use one of {sorted(devices)}", (*_lifecycle_path(name), "device")))
        if isinstance(lifecycle, ProcessLifecycle) and config.backends[name].managed is None:
            problems.append(Problem("error", "the process driver starts a managed engine, and there is none",
                                    "add `managed: {command: [...]}` to this backend",
                                    (*_lifecycle_path(name), "driver")))
    for device in devices.values():
        problems.extend(check_wakes(device, {n: c for n, c in scheduled.items() if c.device == device.name}))
    if config.gpu.redis_url:
        problems.extend(_check_replicas(config, scheduled))
    return problems


def check_wakes(device: DeviceConfig, units: dict[str, LifecycleConfig]) -> list[Problem]:
    """Every unit must be able to wake while the always-on units hold their memory and the others sleep.

    Otherwise the scheduler waits for room that never comes (always-on units are never evicted, and
    an asleep unit still holds its `sleeping_memory`).
    """
    problems: list[Problem] = []
    always = {n: c.memory for n, c in units.items() if isinstance(c, AlwaysOnLifecycle)}
    asleep = {n: c.sleeping_memory for n, c in units.items() if not isinstance(c, AlwaysOnLifecycle | OllamaLifecycle)}
    floor = sum(always.values()) + sum(asleep.values())
    for name, config in units.items():
        awake = _largest_memory(config)
        need = floor - always.get(name, 0) - asleep.get(name, 0) + awake
        if need <= device.capacity:
            continue
        path = (*_lifecycle_path(name), "memory")
        if awake > device.capacity:
            problems.append(Problem("error", f"needs {_gib(awake)} but device {device.name} has "
                                    f"{_gib(device.capacity)} after its reserve",
                                    "lower `memory`, the device's `reserve`, or move it to a larger device", path))
            continue
        held = [f"{n} {_gib(m)}" for n, m in always.items() if n != name]
        held += [f"{n} {_gib(m)} asleep" for n, m in asleep.items() if n != name and m]
        problems.append(Problem(
            "error", f"can never wake: it needs {_gib(awake)}, and device {device.name} ({_gib(device.capacity)} "
            f"after its reserve) always holds {', '.join(held)}",
            "lower `memory` here or on the always-on backends, give an always-on backend a driver that can "
            "sleep, or move one of them to another device", path))
    return problems


def _check_replicas(config: SynapseConfig, scheduled: dict[str, LifecycleConfig]) -> list[Problem]:
    """With `gpu.redis_url`, every replica must see one backend, not start its own copy of it."""
    problems: list[Problem] = []
    for name in scheduled:
        if config.backends[name].managed is None:
            continue
        copy = "each replica would start its own copy of this engine"
        problems.append(Problem(
            "error", f"a `managed` engine cannot share the GPU budget across replicas (`gpu.redis_url` is set): "
            f"{copy}, and the budget could not hold",
            "run the engine as its own service (for example a Deployment with `driver: kubernetes`, or a "
            "vLLM with `driver: vllm-sleep` and no `managed`), or run one gateway replica without `redis_url`",
            (*_lifecycle_path(name), "driver")))
    return problems


def _largest_memory(config: LifecycleConfig) -> int:
    if isinstance(config, OllamaLifecycle):
        return max([config.memory, *config.model_memory.values()])
    return config.memory


def _lifecycle_path(backend: str) -> KeyPath:
    return ("backends", backend, "lifecycle")


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _sequence(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _route_backends(route: dict[str, Any], index: int) -> list[tuple[KeyPath, Any]]:
    if "backend" in route:
        return [(("routes", index, "backend"), route["backend"])]
    deployments = _sequence(route.get("deployments"))
    return [(("routes", index, "deployments", i, "backend"), d.get("backend"))
            for i, d in enumerate(deployments) if isinstance(d, dict) and "backend" in d]


def _locate(problem: Problem, tree: Any, filename: str, dialect: Dialect) -> Problem:
    line = line_of(tree, problem.path) if problem.path else None
    if dialect == "litellm" and problem.path and problem.path[0] not in tree:
        line = None
    return Problem(problem.severity, problem.message, problem.fix, problem.path, filename, line)


def line_of(tree: Any, path: KeyPath) -> int | None:
    """The 1-based line of the deepest element of `path` found in the round-trip YAML tree."""
    node: Any = tree
    line = None
    for key in path:
        try:
            if isinstance(node, dict) and key in node:
                line = cast(Any, node).lc.key(key)[0] + 1
                node = node[key]
            elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
                line = cast(Any, node).lc.item(key)[0] + 1
                node = node[key]
            else:
                break
        except (AttributeError, KeyError, TypeError):
            break
    return line
