"""A faithful fake of the Kubernetes API server for Deployments: the scale subresource, pods, auth, Status errors.

State advances lazily from timestamps on each request (no background tasks), so the timeline is deterministic:
a change to ``spec.replicas`` is observed by the "deployment controller" ``observe_delay`` seconds after the
PATCH; it then creates pods that turn Ready ``ready_delay`` seconds later, or marks surplus pods Terminating
and removes them ``terminate_delay`` seconds later.
"""

from __future__ import annotations

import itertools
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from ._base import Handler, json_response
from .faults import Fault, faulty_answer
from .server import ServedFake

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
VERSION = {
    "major": "1", "minor": "31", "gitVersion": "v1.31.0", "gitCommit": "fake", "gitTreeState": "clean",
    "buildDate": "2024-08-13T07:28:49Z", "goVersion": "go1.22.5", "compiler": "gc", "platform": "linux/amd64",
}
_DEPLOYMENT = r"/apis/apps/v1/namespaces/{ns}/deployments/{name}"
_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|!=|=)\s*(?P<value>[A-Za-z0-9_.-]*)|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


class KubeRequest(NamedTuple):
    """One request as the fake saw it: method, path with query, parsed JSON body (or None), lower-cased headers."""

    method: str
    path: str
    body: Any
    headers: dict[str, str]


class StatusError(Exception):
    """Answer with a metav1 ``Status`` object (kind Status, status Failure)."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def response(self) -> web.Response:
        body: dict[str, Any] = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return json_response(body, self.code)


def timestamp(wall: float) -> str:
    """RFC 3339 in UTC, second precision, as the API server writes metav1.Time."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


@dataclass
class Pod:
    """One pod of a Deployment; ``ready_at`` and ``deleted_at`` are monotonic times."""

    name: str
    labels: dict[str, str]
    ready_at: float
    created: float = field(default_factory=time.time)
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    deleted_at: float | None = None
    deleted_wall: float | None = None

    def ready(self, now: float) -> bool:
        return self.deleted_at is None and now >= self.ready_at

    def to_json(self, namespace: str, owner: str, now: float) -> dict[str, Any]:
        ready = self.ready(now)
        cond = [{"type": t, "status": "True" if ok else "False", "lastProbeTime": None,
                 "lastTransitionTime": timestamp(self.created)}
                for t, ok in (("PodScheduled", True), ("Initialized", True), ("ContainersReady", ready),
                              ("Ready", ready))]
        meta: dict[str, Any] = {
            "name": self.name, "generateName": self.name[:-5], "namespace": namespace, "uid": self.uid,
            "resourceVersion": "1", "creationTimestamp": timestamp(self.created), "labels": dict(self.labels),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner,
                                 "uid": owner, "controller": True, "blockOwnerDeletion": True}],
        }
        if self.deleted_wall is not None:
            meta["deletionTimestamp"] = timestamp(self.deleted_wall)
            meta["deletionGracePeriodSeconds"] = 30
        return {
            "metadata": meta,
            "spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:latest"}],
                     "terminationGracePeriodSeconds": 30},
            "status": {"phase": "Running" if now >= self.ready_at else "Pending", "conditions": cond,
                       "startTime": timestamp(self.created)},
        }


@dataclass
class Deployment:
    """One Deployment (strategy Recreate) and its pods; ``sync_at`` is when the controller next acts."""

    namespace: str
    name: str
    labels: dict[str, str]
    replicas: int
    generation: int = 1
    observed_generation: int = 1
    sync_at: float | None = None
    pods: list[Pod] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    template_hash: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))

    def live(self) -> list[Pod]:
        return [p for p in self.pods if p.deleted_at is None]

    def counts(self, now: float) -> dict[str, int]:
        live = self.live()
        ready = sum(p.ready(now) for p in live)
        return {"replicas": len(live), "updatedReplicas": len(live), "readyReplicas": ready,
                "availableReplicas": ready, "unavailableReplicas": max(self.replicas - ready, 0)}

    def metadata(self, rv: int) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "uid": self.uid, "resourceVersion": str(rv),
                "creationTimestamp": timestamp(self.created)}

    def to_json(self, now: float, rv: int) -> dict[str, Any]:
        counts = self.counts(now)
        available = counts["availableReplicas"] >= self.replicas
        status: dict[str, Any] = {k: v for k, v in counts.items() if v}  # omitempty, as the real server
        status["observedGeneration"] = self.observed_generation
        status["conditions"] = [
            {"type": "Available", "status": "True" if available else "False",
             "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
             "message": "Deployment has minimum availability." if available
             else "Deployment does not have minimum availability.",
             "lastUpdateTime": timestamp(self.created), "lastTransitionTime": timestamp(self.created)},
        ]
        template = {"metadata": {"labels": {**self.labels, "pod-template-hash": self.template_hash}},
                    "spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:latest",
                                             "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}
        return {
            "kind": "Deployment", "apiVersion": "apps/v1",
            "metadata": {**self.metadata(rv), "generation": self.generation, "labels": dict(self.labels),
                         "annotations": {"deployment.kubernetes.io/revision": "1"}},
            "spec": {"replicas": self.replicas, "selector": {"matchLabels": dict(self.labels)},
                     "template": template, "strategy": {"type": "Recreate"}, "revisionHistoryLimit": 10,
                     "progressDeadlineSeconds": 600},
            "status": status,
        }

    def scale_json(self, now: float, rv: int) -> dict[str, Any]:
        return {"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": self.metadata(rv),
                "spec": {"replicas": self.replicas},
                "status": {"replicas": self.counts(now)["replicas"], "selector": self.selector}}


class FakeKubernetes(ServedFake):
    """An API server holding Deployments; every request needs ``Authorization: Bearer <token>``."""

    def __init__(
        self, *, token: str = "test-token", ready_delay: float = 0.05, terminate_delay: float = 0.05,
        observe_delay: float = 0.0,
    ) -> None:
        self.token = token
        # Knobs: plain attributes, read on the server loop, so tests may set them at any time.
        self.ready_delay = ready_delay
        self.terminate_delay = terminate_delay
        self.observe_delay = observe_delay
        self.fail_next_patch = False
        self.fault: Fault | None = None  # injected into every API request (not /version) until cleared
        self.requests: list[KubeRequest] = []
        self.deployments: dict[tuple[str, str], Deployment] = {}
        self.url = ""
        self._rv = itertools.count(1000)
        self.app = web.Application(middlewares=[self._record, self._errors, self._auth, self._faults])
        r = self.app.router
        r.add_get("/version", self._version)
        r.add_get(_DEPLOYMENT, self._get_deployment)
        r.add_get(_DEPLOYMENT + "/scale", self._get_scale)
        r.add_patch(_DEPLOYMENT + "/scale", self._patch_scale)
        r.add_get("/api/v1/namespaces/{ns}/pods", self._list_pods)

    # -- test-side API ---------------------------------------------------------------------
    def add_deployment(
        self, name: str, *, namespace: str = "default", replicas: int = 0, labels: dict[str, str] | None = None
    ) -> Deployment:
        """Create a settled Deployment whose ``replicas`` pods are already Ready."""
        dep = Deployment(namespace, name, dict(labels or {"app": name}), replicas)
        dep.pods = [self._new_pod(dep, ready_at=0.0) for _ in range(replicas)]
        self.deployments[namespace, name] = dep
        return dep

    def patches(self) -> list[KubeRequest]:
        """The recorded PATCH requests, in order."""
        return [r for r in self.requests if r.method == "PATCH"]

    # -- the "controllers" -----------------------------------------------------------------
    def _new_pod(self, dep: Deployment, ready_at: float) -> Pod:
        suffix = uuid.uuid4().hex[:5]
        labels = {**dep.labels, "pod-template-hash": dep.template_hash}
        return Pod(f"{dep.name}-{dep.template_hash}-{suffix}", labels, ready_at)

    def _reconcile(self, dep: Deployment) -> None:
        now = time.monotonic()
        if dep.sync_at is not None and now >= dep.sync_at:
            at, dep.sync_at = dep.sync_at, None
            dep.observed_generation = dep.generation
            live = dep.live()
            for _ in range(dep.replicas - len(live)):
                dep.pods.append(self._new_pod(dep, ready_at=at + self.ready_delay))
            for pod in live[dep.replicas:]:
                pod.deleted_at, pod.deleted_wall = at, time.time()
        dep.pods = [p for p in dep.pods if p.deleted_at is None or now < p.deleted_at + self.terminate_delay]

    def _find(self, request: web.Request) -> Deployment:
        ns, name = request.match_info["ns"], request.match_info["name"]
        dep = self.deployments.get((ns, name))
        if dep is None:
            raise StatusError(404, "NotFound", f'deployments.apps "{name}" not found',
                              {"name": name, "group": "apps", "kind": "deployments"})
        self._reconcile(dep)
        return dep

    # -- handlers --------------------------------------------------------------------------
    async def _version(self, request: web.Request) -> web.Response:
        return json_response(VERSION)

    async def _get_deployment(self, request: web.Request) -> web.Response:
        return json_response(self._find(request).to_json(time.monotonic(), next(self._rv)))

    async def _get_scale(self, request: web.Request) -> web.Response:
        return json_response(self._find(request).scale_json(time.monotonic(), next(self._rv)))

    async def _patch_scale(self, request: web.Request) -> web.Response:
        dep = self._find(request)
        if self.fail_next_patch:
            self.fail_next_patch = False
            raise StatusError(500, "InternalError", "Internal error occurred: etcdserver: request timed out")
        replicas = _patched_replicas(request.content_type, await request.read(), dep.replicas)
        if replicas < 0:
            raise StatusError(422, "Invalid", f'Scale.autoscaling "{dep.name}" is invalid: spec.replicas: '
                              f"Invalid value: {replicas}: must be greater than or equal to 0")
        if replicas != dep.replicas:  # generation counts changes to the spec, not requests
            dep.replicas, dep.generation = replicas, dep.generation + 1
            dep.sync_at = time.monotonic() + self.observe_delay
            self._reconcile(dep)
        return json_response(dep.scale_json(time.monotonic(), next(self._rv)))

    async def _list_pods(self, request: web.Request) -> web.Response:
        ns = request.match_info["ns"]
        match = _selector(request.query.get("labelSelector", ""))
        now = time.monotonic()
        items = []
        for dep in self.deployments.values():
            if dep.namespace == ns:
                self._reconcile(dep)
                owner = f"{dep.name}-{dep.template_hash}"
                items += [p.to_json(ns, owner, now) for p in dep.pods if match(p.labels)]
        rv = str(next(self._rv))
        return json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": rv},
                              "items": items})

    # -- middlewares -----------------------------------------------------------------------
    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(KubeRequest(request.method, request.path_qs, body, headers))
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except StatusError as exc:
            return exc.response()
        except web.HTTPNotFound:
            return StatusError(404, "NotFound", "the server could not find the requested resource").response()
        except web.HTTPMethodNotAllowed:
            return StatusError(405, "MethodNotAllowed", "the server does not allow this method on the "
                               "requested resource").response()

    @web.middleware
    async def _faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/version":
            return await handler(request)
        return await faulty_answer(request, self.fault, lambda: self.fault == "hang") or await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization")
        anonymous_ok = header is None and request.path == "/version"  # system:public-info-viewer
        if not anonymous_ok and header != f"Bearer {self.token}":
            raise StatusError(401, "Unauthorized", "Unauthorized")
        return await handler(request)


def _patched_replicas(content_type: str, raw: bytes, current: int) -> int:
    """``spec.replicas`` after applying a merge, strategic-merge or JSON patch to a Scale."""
    if content_type not in (MERGE_PATCH, STRATEGIC_PATCH, JSON_PATCH):
        raise StatusError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                          f"accepted media types include: {JSON_PATCH}, {MERGE_PATCH}, {STRATEGIC_PATCH}")
    try:
        patch = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StatusError(400, "BadRequest", f"error decoding patch: {exc}") from None
    if content_type == JSON_PATCH:
        return _json_patch_replicas(patch, current)
    spec = patch.get("spec", {}) if isinstance(patch, dict) else None
    if not isinstance(spec, dict):
        raise StatusError(400, "BadRequest", "json: cannot unmarshal into Go value of type autoscaling.Scale")
    replicas = spec.get("replicas", current)
    if replicas is None:  # a merge patch's null deletes the field; int32's zero value remains
        return 0
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise StatusError(400, "BadRequest", "json: cannot unmarshal into Go struct field "
                          "ScaleSpec.spec.replicas of type int32")
    return replicas


def _json_patch_replicas(ops: Any, current: int) -> int:
    """Apply the ``replace``/``add`` operations on ``/spec/replicas`` that a scaler sends."""
    if not isinstance(ops, list):
        raise StatusError(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    for op in ops:
        if not (isinstance(op, dict) and op.get("op") in ("replace", "add") and op.get("path") == "/spec/replicas"
                and isinstance(op.get("value"), int) and not isinstance(op.get("value"), bool)):
            raise StatusError(422, "Invalid", f"the fake supports only replace/add of /spec/replicas: {op!r}")
        current = op["value"]
    return current


def _selector(text: str) -> Callable[[dict[str, str]], bool]:
    """A predicate over labels for an equality- or set-based label selector; 400 when it does not parse."""
    reqs = []
    for part in re.split(r",(?![^()]*\))", text) if text.strip() else []:
        m = _REQUIREMENT.match(part)
        if m is None or (m["neg"] and (m["op"] or m["setop"])):
            raise StatusError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        reqs.append(m)

    def match(labels: dict[str, str]) -> bool:
        return all(_requirement_holds(m, labels) for m in reqs)

    return match


def _requirement_holds(m: re.Match[str], labels: dict[str, str]) -> bool:
    key, value = m["key"], labels.get(m["key"])
    if m["neg"]:
        return key not in labels
    if m["op"] in ("=", "=="):
        return value == m["value"]
    if m["op"] == "!=":
        return value != m["value"]
    if m["setop"]:
        values = {v.strip() for v in m["values"].split(",")}
        return (value in values) if m["setop"] == "in" else (value not in values)
    return key in labels
