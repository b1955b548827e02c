"""The routing table: a model name to deployments by exact name, alias, pattern, discovery, then fallback."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field, replace
from fnmatch import translate
from typing import Literal

from .backends import Backend
from .balancer import Deployment, Target
from .config.schema import SynapseConfig
from .errors import InvalidRequest

Source = Literal["exact", "alias", "pattern", "discovered", "fallback"]
# Longer names are refused before they are looked up, cached or logged: no served model has one,
# and a client-chosen string must not grow the negative cache, the logs or the metrics.
MAX_MODEL_NAME = 256


def check_model_name(model: str) -> None:
    """Raise InvalidRequest (400, param "model") for a name no route can serve because of its length."""
    if len(model) > MAX_MODEL_NAME:
        raise InvalidRequest(f"the model name is {len(model)} characters long; "
                             f"model names have at most {MAX_MODEL_NAME}", param="model", code="invalid_model")


@dataclass(eq=False, slots=True)
class Route:
    """A public model (or pattern) with its deployments and the models to fall back to."""

    name: str
    deployments: list[Deployment]
    fallbacks: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a request for a model goes, and why.

    - `model`: the public model name (for an alias, the route's name; otherwise the requested name).
    - `source`: which rule matched.
    - `targets`: the deployments to try, each with the model name its backend expects.
    - `route`: a label with a bounded set of values, for metrics and logs: the route's model name
      (exact, alias), the pattern text (pattern), the listed name (discovered), or `fallback:<backend>`.
      Never a client's raw name on a pattern or fallback route.
    - `fallbacks`: resolutions to try, in order, once every target failed (the route's `fallbacks`,
      then theirs, breadth first). Each is already resolved, has no fallbacks of its own, and none
      repeats the requested model or another fallback, so walking them cannot loop.
    """

    model: str
    source: Source
    targets: list[Target]
    route: str
    fallbacks: tuple[Resolution, ...] = ()


@dataclass(slots=True)
class Router:
    """The routing table and its pure lookups; discovered models are swapped in by the catalog."""

    backends: dict[str, Backend]
    exact: dict[str, Route] = field(default_factory=dict)
    aliases: dict[str, Route] = field(default_factory=dict)
    patterns: list[Route] = field(default_factory=list)
    discovered: dict[str, list[Deployment]] = field(default_factory=dict)
    fallback: Backend | None = None
    _fallback_deployment: Deployment | None = None

    def canonical(self, name: str) -> str:
        """The model a listed name serves: an alias's route, else the name itself."""
        route = self.aliases.get(name)
        return route.name if route is not None else name

    @classmethod
    def from_config(cls, config: SynapseConfig, backends: dict[str, Backend]) -> Router:
        router = cls(backends=backends)
        for route in config.routes:
            deployments = [Deployment(backends[d.backend], d.model) for d in route.deployment_list()]
            if route.pattern is not None:
                compiled = _compile_glob(route.pattern)
                router.patterns.append(Route(route.pattern, deployments, tuple(route.fallbacks), compiled))
                continue
            assert route.model is not None
            entry = Route(route.model, deployments, tuple(route.fallbacks))
            router.exact[route.model] = entry
            for alias in route.aliases:
                router.aliases[alias] = entry
        for backend in backends.values():  # models listed on a backend: exact routes, merged per name
            for model in backend.static_models:
                entry = router.exact.setdefault(model, Route(model, []))
                if not any(d.backend is backend for d in entry.deployments):
                    entry.deployments.append(Deployment(backend))
        # The most specific pattern wins: more literal characters first, then config order.
        router.patterns.sort(key=lambda r: -len(r.name.replace("*", "").replace("?", "")))
        if config.fallback:
            router.fallback = backends[config.fallback]
            router._fallback_deployment = Deployment(router.fallback)
        return router

    def lookup(self, model: str, *, use_fallback: bool = True) -> Resolution | None:
        """The resolution of `model` in the table as it is now, its fallbacks included.

        None when no rule matches (with `use_fallback`, only when there is no fallback backend either):
        a refresh of the discovered models might still find it. Never waits and never refreshes; the
        catalog's `resolve` adds that.
        """
        hit = self._match(model, use_fallback=use_fallback)
        if hit is None:
            return None
        resolution, names = hit
        return replace(resolution, fallbacks=self._fallbacks(resolution, names)) if names else resolution

    def _match(self, model: str, *, use_fallback: bool) -> tuple[Resolution, tuple[str, ...]] | None:
        """The first rule that matches `model`, and the names of the route's fallback models."""
        route = self.exact.get(model)
        if route is not None:
            targets = [Target(d, d.upstream_for(model)) for d in route.deployments]
            return Resolution(model, "exact", targets, route.name), route.fallbacks
        route = self.aliases.get(model)
        if route is not None:  # sent upstream as the route's model (or its `upstream`), never as the alias
            targets = [Target(d, d.upstream_for(route.name)) for d in route.deployments]
            return Resolution(route.name, "alias", targets, route.name), route.fallbacks
        for route in self.patterns:
            assert route.pattern is not None
            match = route.pattern.fullmatch(model)
            if match:
                captured = match.group(1) if match.groups() else None
                targets = [Target(d, d.upstream_for(model, captured)) for d in route.deployments]
                return Resolution(model, "pattern", targets, route.name), route.fallbacks
        deployments = self.discovered.get(model)
        if deployments:
            return Resolution(model, "discovered", [Target(d, model) for d in deployments], model), ()
        if use_fallback and self._fallback_deployment is not None:
            label = f"fallback:{self._fallback_deployment.backend.name}"
            return Resolution(model, "fallback", [Target(self._fallback_deployment, model)], label), ()
        return None

    def _fallbacks(self, primary: Resolution, names: tuple[str, ...]) -> tuple[Resolution, ...]:
        """The fallback models of `primary`, then theirs, breadth first, each model once."""
        seen = {primary.model}
        queue = deque(names)
        found: list[Resolution] = []
        while queue:
            name = queue.popleft()
            if name in seen:
                continue
            seen.add(name)
            hit = self._match(name, use_fallback=True)
            if hit is None:
                continue  # unknown, and there is no fallback backend
            resolution, more = hit
            if resolution.model != name and resolution.model in seen:
                continue  # an alias of a model already in the chain
            seen.add(resolution.model)
            found.append(resolution)
            queue.extend(more)
        return tuple(found)

    def set_discovered(self, backend: Backend, models: frozenset[str]) -> None:
        """Replace what `backend` was found to serve, keeping the failure state of unchanged deployments."""
        backend.discovered = models
        table: dict[str, list[Deployment]] = {}
        for other in self.backends.values():
            for model in sorted(other.discovered):
                previous = {d.backend: d for d in self.discovered.get(model, [])}
                table.setdefault(model, []).append(previous.get(other) or Deployment(other))
        self.discovered = table

    def public_models(self) -> dict[str, str]:
        """Every listable model name and the backend that owns it (first deployment), deduplicated."""
        listing: dict[str, str] = {}
        for name, route in [*self.exact.items(), *self.aliases.items()]:
            listing.setdefault(name, route.deployments[0].backend.name if route.deployments else "synapse")
        for name, deployments in self.discovered.items():
            listing.setdefault(name, deployments[0].backend.name)
        return listing


def _compile_glob(pattern: str) -> re.Pattern[str]:
    """A glob as a regex whose first `*` is a capture group, so `ollama/*` can map to `*` upstream."""
    head, star, tail = pattern.partition("*")
    if not star:
        return re.compile(translate(pattern).removeprefix("(?s:").removesuffix(")\\Z"))
    left = translate(head).removeprefix("(?s:").removesuffix(")\\Z")
    right = translate(tail).removeprefix("(?s:").removesuffix(")\\Z")
    return re.compile(f"(?s:{left}(.*){right})")
