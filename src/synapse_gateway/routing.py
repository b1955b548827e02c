"""Resolves a requested model name to deployments: exact, alias, pattern, discovered, then fallback."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Literal

from .backends import Backend
from .balancer import Deployment, Target
from .config.schema import SynapseConfig

Source = Literal["exact", "alias", "pattern", "discovered", "fallback"]


@dataclass(eq=False, slots=True)
class Route:
    """A public model (or pattern) with its deployments and the models to fall back to."""

    name: str
    deployments: list[Deployment]
    fallbacks: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a request for `model` goes, and why."""

    model: str
    source: Source
    targets: list[Target]
    fallbacks: tuple[str, ...] = ()


@dataclass(slots=True)
class Router:
    """The routing table; discovered models are swapped in by the catalog."""

    backends: dict[str, Backend]
    exact: dict[str, Route] = field(default_factory=dict)
    aliases: dict[str, Route] = field(default_factory=dict)
    patterns: list[Route] = field(default_factory=list)
    discovered: dict[str, list[Deployment]] = field(default_factory=dict)
    fallback: Backend | None = None
    _fallback_deployment: Deployment | None = None

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

    def resolve(self, model: str, *, use_fallback: bool = True) -> Resolution | None:
        """The route for `model`, or None when only a refresh of discovered models could still find it."""
        route = self.exact.get(model)
        if route is not None:
            return Resolution(model, "exact", [Target(d, d.upstream_for(model)) for d in route.deployments],
                              route.fallbacks)
        route = self.aliases.get(model)
        if route is not None:
            targets = [Target(d, d.upstream_for(route.name)) for d in route.deployments]
            return Resolution(route.name, "alias", targets, route.fallbacks)
        for route in self.patterns:
            assert route.pattern is not None
            match = route.pattern.fullmatch(model)
            if match:
                captured = match.group(1) if match.groups() else None
                targets = [Target(d, d.upstream_for(model, captured)) for d in route.deployments]
                return Resolution(model, "pattern", targets, route.fallbacks)
        deployments = self.discovered.get(model)
        if deployments:
            return Resolution(model, "discovered", [Target(d, model) for d in deployments])
        if use_fallback and self._fallback_deployment is not None:
            return Resolution(model, "fallback", [Target(self._fallback_deployment, model)])
        return None

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
