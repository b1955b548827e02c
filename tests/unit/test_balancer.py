"""Least-in-flight ordering, rotation among equals, and cooldown after repeated failures."""

from __future__ import annotations

from synapse_gateway.backends import Backend
from synapse_gateway.balancer import Balancer, Deployment, Target
from synapse_gateway.config.schema import BackendConfig, RoutingPolicy, Timeouts


def _targets(*names: str) -> list[Target]:
    return [Target(Deployment(Backend.from_config(n, BackendConfig(url=f"http://{n}:1"), Timeouts())), "m")
            for n in names]


def test_least_in_flight_first_then_the_others() -> None:
    targets = _targets("a", "b", "c")
    targets[0].backend.in_flight = 5
    targets[1].backend.in_flight = 1
    order = [t.backend.name for t in Balancer(RoutingPolicy(retries=2)).attempts(targets)]
    assert order[0] == "c" and order[1] == "b" and order[2] == "a"


def test_equals_take_turns() -> None:
    balancer = Balancer(RoutingPolicy(retries=0))
    targets = _targets("a", "b")
    firsts = [next(iter(balancer.attempts(targets))).backend.name for _ in range(4)]
    assert sorted(firsts) == ["a", "a", "b", "b"]


def test_attempt_budget_is_retries_plus_one() -> None:
    assert len(list(Balancer(RoutingPolicy(retries=3)).attempts(_targets("a")))) == 4
    assert len(list(Balancer(RoutingPolicy(retries=3)).attempts(_targets("a", "b")))) == 4


def test_cooldown_after_allowed_fails_moves_a_deployment_last() -> None:
    balancer = Balancer(RoutingPolicy(retries=1, allowed_fails=2, cooldown=60))
    targets = _targets("a", "b")
    assert balancer.failed(targets[0].deployment) is False
    assert balancer.failed(targets[0].deployment) is True
    for _ in range(4):
        assert [t.backend.name for t in balancer.attempts(targets)] == ["b", "a"]
    balancer.succeeded(targets[0].deployment)
    assert targets[0].deployment.consecutive_fails == 0


def test_a_deployment_that_can_answer_now_goes_before_one_that_must_wake() -> None:
    """A sleeping GPU backend waits behind an awake one, even when the awake one is busier."""
    balancer = Balancer(RoutingPolicy(retries=1))
    targets = _targets("asleep", "awake")
    targets[1].backend.in_flight = 3
    for _ in range(4):  # whatever the turn
        order = [t.backend.name for t in balancer.attempts(targets, waits=lambda t: t.backend.name == "asleep")]
        assert order == ["awake", "asleep"]
