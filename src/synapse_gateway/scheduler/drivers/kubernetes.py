"""Wake and sleep a backend that runs as a Kubernetes Deployment by scaling it between one replica and zero."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import aiohttp
from kubernetes_asyncio.client import (
    ApiClient,
    AppsV1Api,
    Configuration,
    CoreV1Api,
    V1Deployment,
    V1DeploymentStatus,
    V1Scale,
)
from kubernetes_asyncio.client.rest import ApiException
from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config

from ...config.schema import KubernetesLifecycle
from .base import DriverContext, LifecycleError, SleepFailed, WakeFailed, describe, lifecycle_errors

__all__ = ["SERVICE_ACCOUNT", "CredentialsError", "KubernetesDriver", "Polling", "load_client_config"]

log = logging.getLogger("synapse.scheduler.kubernetes")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"


class CredentialsError(LifecycleError):
    """Neither a service account nor a usable kubeconfig was found."""


@dataclass(frozen=True)
class Polling:
    """How long a wake or a sleep may take, how often it looks, and how long one request may take."""

    wake_timeout: float = 1800.0
    sleep_timeout: float = 300.0
    interval: float = 1.0
    request_timeout: float = 10.0


async def load_client_config(
    kubeconfig: str | None = None, *, service_account: Path = SERVICE_ACCOUNT
) -> Configuration:
    """Credentials from `kubeconfig` if set, else the pod's service account, else $KUBECONFIG or ~/.kube/config."""
    config = Configuration()
    try:
        if kubeconfig is None and _in_pod(service_account):
            load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=config,
                token_filename=str(service_account / "token"),
                cert_filename=str(service_account / "ca.crt"),
            )
        else:
            path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
            await load_kube_config(config_file=path, client_configuration=config, persist_config=False)
    except (ConfigException, OSError, ValueError) as exc:
        raise CredentialsError(
            f"cannot load Kubernetes credentials ({exc}): run the gateway in a pod with a service account, "
            "or point `kubeconfig:` in the backend's lifecycle (or $KUBECONFIG) at a readable kubeconfig file"
        ) from exc
    return config


def _in_pod(service_account: Path) -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (service_account / "token").is_file()


@dataclass(frozen=True)
class _Apis:
    apps: AppsV1Api
    core: CoreV1Api


class KubernetesDriver:
    """One Deployment: awake at one Ready replica whose health URL answers 200, asleep when its pods are gone.

    With `api`, every call goes through that client (the caller closes it). Without, each action loads
    credentials afresh (service-account and exec-plugin tokens expire) into a client it closes itself.
    """

    def __init__(
        self,
        *,
        namespace: str,
        deployment: str,
        health_url: str,
        session: aiohttp.ClientSession,
        api: ApiClient | None = None,
        kubeconfig: str | None = None,
        polling: Polling | None = None,
    ) -> None:
        self.namespace = namespace
        self.deployment = deployment
        self.health_url = health_url
        self.kubeconfig = kubeconfig
        self.polling = polling or Polling()
        self._session = session
        self._api = api
        self._waiting_for = ""  # what the last poll saw, for the timeout message

    @classmethod
    def from_config(cls, config: KubernetesLifecycle, context: DriverContext, *, poll_interval: float = 1.0) -> Self:
        """A driver for a backend's `lifecycle:` block; credentials are loaded as `load_client_config` does."""
        return cls(
            namespace=config.namespace, deployment=config.deployment, health_url=context.backend.health_url(),
            session=context.session, kubeconfig=config.kubeconfig,
            polling=Polling(wake_timeout=config.wake_timeout, interval=poll_interval),
        )

    @property
    def name(self) -> str:
        return f"deployment {self.namespace}/{self.deployment}"

    async def is_resident(self) -> bool:
        """True when the Deployment wants a replica and one is Ready; LifecycleError when the API cannot say."""
        async with self._apis(LifecycleError, "read") as k:
            dep = await self._read(k)
            status = dep.status or V1DeploymentStatus()
            return (dep.spec.replicas or 0) >= 1 and (status.ready_replicas or 0) >= 1

    async def wake(self) -> None:
        """Scale to one replica if at zero, then wait for a Ready replica and a healthy backend."""
        timeout = self.polling.wake_timeout
        self._waiting_for = "the first poll"
        try:
            async with asyncio.timeout(timeout), self._apis(WakeFailed, "wake") as k:
                if ((await self._read(k)).spec.replicas or 0) == 0:
                    log.info("scaling %s to 1 replica", self.name)
                    await self._scale(k, 1)
                await self._until_ready(k)
        except TimeoutError:
            raise WakeFailed(f"{self.name} did not become ready within {timeout:g}s: {self._waiting_for}") from None

    async def sleep(self) -> None:
        """Scale to zero replicas, then wait until the Deployment's pods are gone and their GPU memory is free."""
        timeout = self.polling.sleep_timeout
        self._waiting_for = "the first poll"
        try:
            async with asyncio.timeout(timeout), self._apis(SleepFailed, "sleep") as k:
                log.info("scaling %s to 0 replicas", self.name)
                scale = await self._scale(k, 0)
                await self._until_gone(k, scale.status.selector if scale.status else None)
        except TimeoutError:
            raise SleepFailed(f"{self.name} still had pods after {timeout:g}s: {self._waiting_for}") from None

    # -- polling ---------------------------------------------------------------------------
    async def _until_ready(self, k: _Apis) -> None:
        while True:
            self._waiting_for = _not_ready(await self._read(k)) or await self._unhealthy()
            if not self._waiting_for:
                return
            await asyncio.sleep(self.polling.interval)

    async def _until_gone(self, k: _Apis, selector: str | None) -> None:
        if not selector:
            raise SleepFailed(f"{self.name} has no label selector: cannot tell when its pods are gone")
        while True:
            pods = await k.core.list_namespaced_pod(
                self.namespace, label_selector=selector, _request_timeout=self.polling.request_timeout
            )
            if not pods.items:
                return
            names = ", ".join(p.metadata.name for p in pods.items if p.metadata)
            self._waiting_for = f"{len(pods.items)} pod(s) still present ({names})"
            await asyncio.sleep(self.polling.interval)

    async def _unhealthy(self) -> str:
        """Why the backend's own health URL is not ready yet; empty when it answers 200."""
        timeout = aiohttp.ClientTimeout(total=self.polling.request_timeout)
        try:
            async with self._session.get(self.health_url, timeout=timeout) as resp:
                return "" if resp.status == 200 else f"{self.health_url} answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{self.health_url} is unreachable ({type(exc).__name__}: {exc})"

    # -- API calls -------------------------------------------------------------------------
    async def _read(self, k: _Apis) -> V1Deployment:
        return await k.apps.read_namespaced_deployment(
            self.deployment, self.namespace, _request_timeout=self.polling.request_timeout
        )

    async def _scale(self, k: _Apis, replicas: int) -> V1Scale:
        # The stubs omit `_content_type`; without it the client sends a strategic merge patch.
        return await k.apps.patch_namespaced_deployment_scale(  # type: ignore[call-arg]
            self.deployment, self.namespace, {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH, _request_timeout=self.polling.request_timeout,
        )

    @asynccontextmanager
    async def _apis(self, failure: type[LifecycleError], action: str) -> AsyncIterator[_Apis]:
        """The API for one action; the one place where client-library errors become this driver's failures."""
        with lifecycle_errors(f"{action} {self.name}", failure), _api_errors():
            if self._api is not None:
                yield _Apis(AppsV1Api(self._api), CoreV1Api(self._api))
                return
            async with ApiClient(await load_client_config(self.kubeconfig)) as api:
                yield _Apis(AppsV1Api(api), CoreV1Api(api))


@contextmanager
def _api_errors() -> Iterator[None]:
    """Say what the API server answered, or that it could not be reached; `lifecycle_errors` maps the rest."""
    try:
        yield
    except ApiException as exc:
        raise LifecycleError(f"the Kubernetes API answered {_describe(exc)}") from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise LifecycleError(f"the Kubernetes API is unreachable ({describe(exc)})") from exc


def _not_ready(dep: V1Deployment) -> str:
    """Why the Deployment is not ready yet; empty when its controller caught up and a replica is Ready."""
    generation = dep.metadata.generation or 0
    status = dep.status or V1DeploymentStatus()
    observed = status.observed_generation or 0
    if observed < generation:
        return f"the controller has not yet observed generation {generation} (observedGeneration {observed})"
    if (status.ready_replicas or 0) < 1:
        return f"no Ready replica yet ({status.replicas or 0} pod(s), spec.replicas {dep.spec.replicas or 0})"
    return ""


def _describe(exc: ApiException) -> str:
    """`404 Not Found: deployments.apps "x" not found`, the message taken from the Status object when present."""
    text = f"{exc.status} {exc.reason}"
    try:
        message = json.loads(exc.body or b"{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{text}: {message}" if message else text
