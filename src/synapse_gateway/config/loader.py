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
from .schema import SynapseConfig

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
    plain = _substitute_env(tree, (), problems)
    dialect: Dialect = "litellm" if "model_list" in plain else "native"
    native = litellm.translate(plain, problems) if dialect == "litellm" else plain
    config = _validate(native, problems)
    problems.extend(check_references(native))
    if config is not None:
        problems.extend(check_budget(config))
    located = sorted((_locate(p, tree, filename, dialect) for p in problems), key=lambda p: p.line or 0)
    if config is None or any(p.severity == "error" for p in located):
        raise ConfigError(located)
    return LoadedConfig(config=config, source=filename, dialect=dialect, warnings=located)


def _substitute_env(node: Any, path: KeyPath, problems: list[Problem]) -> Any:
    """A plain copy of the YAML tree with ${VAR} and ${VAR:-default} replaced from the environment."""
    if isinstance(node, dict):
        return {str(k): _substitute_env(v, (*path, str(k)), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute_env(v, (*path, i), problems) for i, v in enumerate(node)]
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


def _validate(data: dict[str, Any], problems: list[Problem]) -> SynapseConfig | None:
    try:
        return SynapseConfig.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            problems.append(_problem_from_pydantic(error))
        return None


def _problem_from_pydantic(error: Any) -> Problem:
    path: KeyPath = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(path[-1])
        close = difflib.get_close_matches(key, _known_keys(), n=1)
        fix = f"did you mean `{close[0]}`?" if close else "remove it; docs/config.md lists every key"
        return Problem("error", f"unknown key `{key}`", fix, path)
    if kind == "missing":
        return Problem("error", f"`{path[-1]}` is required", f"add `{path[-1]}: ...` here", path)
    message, _, fix = str(error["msg"]).removeprefix("Value error, ").partition("|")
    return Problem("error", message, fix or "see docs/config.md for the allowed values", path)


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


def check_budget(config: SynapseConfig) -> list[Problem]:
    """GPU-scheduled backends need a `gpu:` budget, a known device, and to fit it on their own."""
    scheduled = {name: b.lifecycle for name, b in config.backends.items() if b.lifecycle is not None}
    if not scheduled:
        return []
    if config.gpu is None:
        return [Problem("error", "backends have a `lifecycle` but there is no `gpu:` budget",
                        "add `gpu: {memory: 32GiB, reserve: 1GiB}` (see docs/gpu.md)", ("gpu",))]
    devices = {d.name: d for d in config.gpu.device_list()}
    problems: list[Problem] = []
    for name, lifecycle in scheduled.items():
        path: KeyPath = ("backends", name, "lifecycle")
        device = devices.get(lifecycle.device)
        if device is None:
            problems.append(Problem("error", f"device {lifecycle.device!r} is not in the gpu budget",
                                    f"use one of {sorted(devices)}", (*path, "device")))
        elif lifecycle.memory > device.capacity:
            problems.append(Problem("error", f"needs {lifecycle.memory / 2**30:.1f} GiB but device {device.name} "
                                    f"has {device.capacity / 2**30:.1f} GiB after its reserve",
                                    "lower `memory`, the device's `reserve`, or move it to a larger device",
                                    (*path, "memory")))
        if lifecycle.driver == "process" and config.backends[name].managed is None:
            problems.append(Problem("error", "the process driver starts a managed engine, and there is none",
                                    "add `managed: {command: [...]}` to this backend", (*path, "driver")))
    return problems


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
