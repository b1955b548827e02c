"""The Kubernetes driver, through the real kubernetes_asyncio client, against a fake API server over HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from kubernetes_asyncio.client import ApiClient, Configuration

from synapse_gateway.backends import Backend
from synapse_gateway.config.schema import BackendConfig, KubernetesLifecycle, Timeouts
from synapse_gateway.scheduler.drivers.base import DriverContext, LifecycleError, SleepFailed, WakeFailed
from synapse_gateway.scheduler.drivers.kubernetes import KubernetesDriver, Polling, load_client_config
from tests.fakes.faults import FAULTS, Fault
from tests.fakes.kubernetes import MERGE_PATCH, FakeKubernetes
from tests.fakes.vllm import FakeVLLM

NS, NAME = "gpu", "vllm"
FAST = Polling(wake_timeout=5.0, sleep_timeout=5.0, interval=0.01, request_timeout=2.0)
SCALE_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}/scale"


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    with FakeKubernetes(ready_delay=0.05, terminate_delay=0.05) as fake:
        yield fake


@pytest.fixture
def backend() -> Iterator[FakeVLLM]:
    with FakeVLLM() as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def api(kube: FakeKubernetes) -> AsyncIterator[ApiClient]:
    config = Configuration(host=kube.url, api_key={"BearerToken": kube.token}, api_key_prefix={"BearerToken": "Bearer"})
    async with ApiClient(config) as client:
        yield client


@pytest.fixture
def driver(backend: FakeVLLM, session: aiohttp.ClientSession, api: ApiClient) -> KubernetesDriver:
    return make_driver(backend, session, api)


def make_driver(
    backend: FakeVLLM, session: aiohttp.ClientSession, api: ApiClient, polling: Polling = FAST
) -> KubernetesDriver:
    return KubernetesDriver(namespace=NS, deployment=NAME, health_url=backend.url + "/health", session=session,
                            api=api, polling=polling)


def health_checks(backend: FakeVLLM) -> int:
    return backend.paths().count("/health")


# -- wake ------------------------------------------------------------------------------------
async def test_wake_from_zero_patches_the_scale_and_waits_for_ready_and_healthy(
    kube: FakeKubernetes, backend: FakeVLLM, driver: KubernetesDriver
) -> None:
    kube.ready_delay = 0.2
    kube.add_deployment(NAME, namespace=NS, replicas=0)
    assert not await driver.is_resident()
    started = time.monotonic()
    await driver.wake()
    assert time.monotonic() - started >= 0.2  # the pod's readiness delay
    [patch] = kube.patches()
    assert patch.path == SCALE_PATH
    assert patch.headers["content-type"] == MERGE_PATCH
    assert patch.headers["authorization"] == "Bearer test-token"
    assert patch.body == {"spec": {"replicas": 1}}
    dep = kube.deployments[NS, NAME]
    assert dep.generation == dep.observed_generation == 2
    assert health_checks(backend) >= 1
    assert await driver.is_resident()


async def test_wake_waits_until_the_controller_observed_the_new_generation(
    kube: FakeKubernetes, driver: KubernetesDriver
) -> None:
    # A scale-down not yet observed: status still shows the old Ready pod, but spec.replicas is 0.
    kube.observe_delay = 0.3
    kube.add_deployment(NAME, namespace=NS, replicas=1)
    async with aiohttp.ClientSession() as raw:
        await patch_replicas(raw, kube, 0)
    started = time.monotonic()
    await driver.wake()
    assert time.monotonic() - started >= 0.25
    dep = kube.deployments[NS, NAME]
    assert dep.replicas == 1 and dep.observed_generation == dep.generation == 3


async def test_wake_when_resident_sends_no_patch(kube: FakeKubernetes, driver: KubernetesDriver) -> None:
    kube.add_deployment(NAME, namespace=NS, replicas=1)
    assert await driver.is_resident()
    await driver.wake()
    assert kube.patches() == []


async def test_unhealthy_backend_keeps_wake_waiting(
    kube: FakeKubernetes, backend: FakeVLLM, driver: KubernetesDriver
) -> None:
    kube.add_deployment(NAME, namespace=NS, replicas=0)
    backend.healthy = False
    task = asyncio.create_task(driver.wake())
    await until(lambda: health_checks(backend) >= 3)
    assert kube.deployments[NS, NAME].counts(time.monotonic())["readyReplicas"] == 1
    assert not task.done()
    backend.healthy = True
    await asyncio.wait_for(task, 2)


async def test_wake_timeout_names_the_deployment_and_what_it_waited_for(
    kube: FakeKubernetes, backend: FakeVLLM, session: aiohttp.ClientSession, api: ApiClient
) -> None:
    kube.ready_delay = 60
    kube.add_deployment(NAME, namespace=NS, replicas=0)
    driver = make_driver(backend, session, api, Polling(wake_timeout=0.3, interval=0.01))
    with pytest.raises(WakeFailed, match=r"deployment gpu/vllm did not become ready within 0\.3s: no Ready replica"):
        await driver.wake()


async def test_wake_timeout_on_an_unhealthy_backend_says_so(
    kube: FakeKubernetes, backend: FakeVLLM, session: aiohttp.ClientSession, api: ApiClient
) -> None:
    kube.add_deployment(NAME, namespace=NS, replicas=1)
    backend.healthy = False
    driver = make_driver(backend, session, api, Polling(wake_timeout=0.2, interval=0.01))
    with pytest.raises(WakeFailed, match=r"gpu/vllm .*/health answered 503"):
        await driver.wake()


async def test_api_error_on_patch_is_wake_failed(kube: FakeKubernetes, driver: KubernetesDriver) -> None:
    kube.add_deployment(NAME, namespace=NS, replicas=0)
    kube.fail_next_patch = True
    with pytest.raises(WakeFailed, match=r"wake deployment gpu/vllm: the Kubernetes API answered 500 .*etcdserver"):
        await driver.wake()


async def test_unknown_deployment_is_wake_failed_and_is_resident_raises(driver: KubernetesDriver) -> None:
    with pytest.raises(WakeFailed, match=r'404 Not Found: deployments.apps "vllm" not found'):
        await driver.wake()
    with pytest.raises(LifecycleError, match="404"):
        await driver.is_resident()


async def test_a_wrong_token_is_wake_failed(
    kube: FakeKubernetes, backend: FakeVLLM, session: aiohttp.ClientSession
) -> None:
    kube.add_deployment(NAME, namespace=NS, replicas=0)
    config = Configuration(host=kube.url, api_key={"BearerToken": "wrong"}, api_key_prefix={"BearerToken": "Bearer"})
    async with ApiClient(config) as api:
        with pytest.raises(WakeFailed, match="401 Unauthorized"):
            await make_driver(backend, session, api).wake()


# -- sleep -----------------------------------------------------------------------------------
async def test_sleep_waits_until_the_pods_are_gone(kube: FakeKubernetes, driver: KubernetesDriver) -> None:
    kube.terminate_delay = 0.3
    kube.add_deployment(NAME, namespace=NS, replicas=1, labels={"app": NAME, "tier": "gpu"})
    started = time.monotonic()
    await driver.sleep()
    assert time.monotonic() - started >= 0.3
    assert kube.deployments[NS, NAME].pods == []
    [patch] = kube.patches()
    assert patch.headers["content-type"] == MERGE_PATCH and patch.body == {"spec": {"replicas": 0}}
    pod_lists = [r.path for r in kube.requests if r.path.startswith(f"/api/v1/namespaces/{NS}/pods")]
    assert len(pod_lists) >= 2
    assert {parse_qs(urlsplit(p).query)["labelSelector"][0] for p in pod_lists} == {"app=vllm,tier=gpu"}
    assert not await driver.is_resident()


async def test_sleep_timeout_is_sleep_failed_naming_the_pods(
    kube: FakeKubernetes, backend: FakeVLLM, session: aiohttp.ClientSession, api: ApiClient
) -> None:
    kube.terminate_delay = 60
    kube.add_deployment(NAME, namespace=NS, replicas=1)
    driver = make_driver(backend, session, api, Polling(sleep_timeout=0.2, interval=0.01))
    with pytest.raises(SleepFailed, match=r"gpu/vllm still had pods after 0\.2s: 1 pod\(s\) still present \(vllm-"):
        await driver.sleep()


async def test_api_error_on_sleep_is_sleep_failed(kube: FakeKubernetes, driver: KubernetesDriver) -> None:
    kube.add_deployment(NAME, namespace=NS, replicas=1)
    kube.fail_next_patch = True
    with pytest.raises(SleepFailed, match="500 Internal Server Error"):
        await driver.sleep()


async def test_sleep_then_wake_round_trip(kube: FakeKubernetes, driver: KubernetesDriver) -> None:
    kube.add_deployment(NAME, namespace=NS, replicas=1)
    await driver.sleep()
    await driver.wake()
    assert await driver.is_resident()
    assert [p.body["spec"]["replicas"] for p in kube.patches()] == [0, 1]
    assert len(kube.deployments[NS, NAME].pods) == 1


# -- every fault of the API server or the network is a LifecycleError (F5) -------------------
@pytest.mark.parametrize("fault", FAULTS)
async def test_api_faults_are_lifecycle_errors(
    kube: FakeKubernetes, backend: FakeVLLM, session: aiohttp.ClientSession, api: ApiClient, fault: Fault
) -> None:
    kube.add_deployment(NAME, namespace=NS, replicas=1)
    driver = make_driver(backend, session, api, Polling(wake_timeout=2, sleep_timeout=2, interval=0.01,
                                                        request_timeout=0.2))
    kube.fault = fault
    with pytest.raises(LifecycleError, match="deployment gpu/vllm"):
        await driver.is_resident()
    with pytest.raises(WakeFailed, match="wake deployment gpu/vllm"):
        await driver.wake()
    with pytest.raises(SleepFailed, match="deployment gpu/vllm"):
        await driver.sleep()
    kube.fault = None
    # A request that hung is released now and may still be applied (a slow API server does that):
    # give those a moment, then the driver must work again.
    await asyncio.sleep(0.5)
    await driver.wake()
    assert await driver.is_resident()


async def test_an_unreachable_api_server_is_wake_failed(backend: FakeVLLM, session: aiohttp.ClientSession) -> None:
    config = Configuration(host=dead_url(), api_key={"BearerToken": "t"}, api_key_prefix={"BearerToken": "Bearer"})
    async with ApiClient(config) as api:
        with pytest.raises(WakeFailed, match="the Kubernetes API is unreachable"):
            await make_driver(backend, session, api).wake()


def dead_url() -> str:
    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# -- credentials -----------------------------------------------------------------------------
def write_kubeconfig(path: Path, server: str, token: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters:\n- name: fake\n  cluster:\n    server: {server}\n"
        f"users:\n- name: tester\n  user:\n    token: {token}\n"
        "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n"
    )
    return path


def lifecycle(**fields: Any) -> KubernetesLifecycle:
    return KubernetesLifecycle.model_validate({"driver": "kubernetes", "memory": "1GiB", "namespace": NS,
                                               "deployment": NAME, "wake_timeout": 5, **fields})


def context(backend: FakeVLLM, session: aiohttp.ClientSession) -> DriverContext:
    config = BackendConfig(url=backend.url, protocol="vllm", health_path="/health")
    return DriverContext(Backend.from_config(NAME, config, Timeouts()), session)


@pytest.fixture
def outside_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)


@pytest.mark.usefixtures("outside_a_pod")
async def test_from_config_loads_the_configured_kubeconfig(
    kube: FakeKubernetes, backend: FakeVLLM, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = write_kubeconfig(tmp_path / "config", kube.url, kube.token)
    kube.add_deployment(NAME, namespace=NS, replicas=0)
    driver = KubernetesDriver.from_config(lifecycle(kubeconfig=str(path)), context(backend, session),
                                          poll_interval=0.01)
    await driver.wake()
    assert await driver.is_resident()
    assert kube.patches()[0].headers["authorization"] == "Bearer test-token"


@pytest.mark.usefixtures("outside_a_pod")
async def test_from_config_falls_back_to_the_kubeconfig_env_var(
    kube: FakeKubernetes, backend: FakeVLLM, session: aiohttp.ClientSession, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "config", kube.url, kube.token)))
    kube.add_deployment(NAME, namespace=NS, replicas=1)
    driver = KubernetesDriver.from_config(lifecycle(), context(backend, session))
    assert await driver.is_resident()


@pytest.mark.usefixtures("outside_a_pod")
async def test_a_missing_kubeconfig_is_wake_failed_saying_what_to_set(
    backend: FakeVLLM, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = lifecycle(kubeconfig=str(tmp_path / "nope"))
    driver = KubernetesDriver.from_config(config, context(backend, session))
    with pytest.raises(WakeFailed, match=r"cannot load Kubernetes credentials .*`kubeconfig:`"):
        await driver.wake()


async def test_in_a_pod_the_service_account_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    config = await load_client_config(service_account=tmp_path)
    assert config.host == "https://10.0.0.1:443"
    assert config.api_key["BearerToken"] == "Bearer sa-token"
    assert config.ssl_ca_cert == str(tmp_path / "ca.crt")


async def test_an_explicit_kubeconfig_wins_over_the_service_account(
    kube: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("sa-token")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    path = write_kubeconfig(tmp_path / "config", kube.url, "kc-token")
    config = await load_client_config(str(path), service_account=tmp_path)
    assert config.host == kube.url and config.api_key["BearerToken"] == "Bearer kc-token"


# -- the fake answers as the API server does -------------------------------------------------
async def patch_replicas(
    raw: aiohttp.ClientSession, kube: FakeKubernetes, body: Any, content_type: str = MERGE_PATCH
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else None
    json_body = {"spec": {"replicas": body}} if isinstance(body, int) else body
    async with raw.patch(kube.url + SCALE_PATH, data=data, json=None if data else json_body,
                         headers={"Authorization": f"Bearer {kube.token}", "Content-Type": content_type}) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b"{not json", MERGE_PATCH, 400, "BadRequest"),
        ({"spec": {"replicas": "one"}}, MERGE_PATCH, 400, "BadRequest"),
        (-1, MERGE_PATCH, 422, "Invalid"),
        (1, "application/json", 415, "UnsupportedMediaType"),
    ],
)
async def test_fake_rejects_bad_patches_with_a_status(
    kube: FakeKubernetes, session: aiohttp.ClientSession, body: Any, content_type: str, status: int, reason: str
) -> None:
    kube.add_deployment(NAME, namespace=NS)
    code, answer = await patch_replicas(session, kube, body, content_type)
    assert (code, answer["kind"], answer["reason"], answer["code"]) == (status, "Status", reason, status)
    assert kube.deployments[NS, NAME].generation == 1


async def test_fake_requires_a_token_and_answers_unknown_names_with_not_found(
    kube: FakeKubernetes, session: aiohttp.ClientSession
) -> None:
    url = kube.url + f"/apis/apps/v1/namespaces/{NS}/deployments/ghost"
    async with session.get(url) as resp:
        assert resp.status == 401 and (await resp.json())["reason"] == "Unauthorized"
    async with session.get(url, headers={"Authorization": f"Bearer {kube.token}"}) as resp:
        status = await resp.json()
    assert resp.status == 404
    assert status["reason"] == "NotFound" and status["details"] == {"name": "ghost", "group": "apps",
                                                                   "kind": "deployments"}
    async with session.get(kube.url + "/version") as resp:
        assert resp.status == 200 and (await resp.json())["major"] == "1"


async def until(predicate: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
