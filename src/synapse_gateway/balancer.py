"""Least-in-flight choice among a model's deployments, with a cooldown for those that keep failing."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .backends import Backend
from .config.schema import RoutingPolicy


@dataclass(eq=False, slots=True)
class Deployment:
    """A backend serving one route, under `upstream` (None: the requested name); keeps failure state."""

    backend: Backend
    upstream: str | None = None
    consecutive_fails: int = 0
    cooldown_until: float = 0.0

    def upstream_for(self, requested: str, captured: str | None = None) -> str:
        if self.upstream is None:
            return requested
        if captured is not None and "*" in self.upstream:
            return self.upstream.replace("*", captured, 1)
        return self.upstream


class Target(NamedTuple):
    """One concrete place to send a request: a deployment and the model name it expects."""

    deployment: Deployment
    upstream_model: str

    @property
    def backend(self) -> Backend:
        return self.deployment.backend


class Balancer:
    """Orders attempts across deployments and tracks their health; state lives on the deployments."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self._turn = 0

    def attempts(self, targets: list[Target], *, waits: Callable[[Target], bool] | None = None) -> list[Target]:
        """Targets to try in order: up to `retries + 1`, none twice in a row.

        Healthy first, then those that can answer now (no wake or start to wait for, per `waits`),
        then the least loaded; ties take turns.
        """
        budget = self.policy.retries + 1
        count = len(targets)
        if count == 1:
            return targets * budget
        now = time.monotonic()
        self._turn += 1
        turn = self._turn
        must_wait = [waits(t) for t in targets] if waits is not None else [False] * count
        order = sorted(
            range(count),
            key=lambda i: (targets[i].deployment.cooldown_until > now, must_wait[i],
                           targets[i].backend.in_flight, (i - turn) % count),
        )
        return [targets[order[n % count]] for n in range(budget)]

    def succeeded(self, deployment: Deployment) -> None:
        deployment.consecutive_fails = 0

    def failed(self, deployment: Deployment) -> bool:
        """Count a failure; True when the deployment has just been put in cooldown."""
        deployment.consecutive_fails += 1
        if deployment.consecutive_fails >= self.policy.allowed_fails:
            deployment.consecutive_fails = 0
            deployment.cooldown_until = time.monotonic() + self.policy.cooldown
            return True
        return False
