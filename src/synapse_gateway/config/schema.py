"""The native configuration format: backends, routes, a fallback, timeouts and limits."""

from __future__ import annotations

import os
import shlex
from typing import Annotated, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from .access import AuthConfig, UsageConfig
from .units import Duration, Size

Protocol = Literal["openai", "vllm", "ollama"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """How long to wait for a backend; the first-byte default leaves room for a model that is loading."""

    connect: Duration = Field(5.0, gt=0)
    first_byte: Duration = Field(600.0, gt=0)
    stream_idle: Duration = Field(300.0, gt=0)
    total: Duration | None = Field(None, gt=0)


class TimeoutsOverride(_Strict):
    """Per-backend timeouts; unset fields inherit the global ones."""

    connect: Duration | None = Field(None, gt=0)
    first_byte: Duration | None = Field(None, gt=0)
    stream_idle: Duration | None = Field(None, gt=0)
    total: Duration | None = Field(None, gt=0)

    def over(self, base: Timeouts) -> Timeouts:
        updates = {k: v for k, v in self.model_dump().items() if v is not None}
        return base.model_copy(update=updates)


class ManagedConfig(_Strict):
    """A command Synapse starts, watches and stops for a backend (llama-server, vllm serve, ...)."""

    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    health: str | None = None
    startup_timeout: Duration = Field(120.0, gt=0)
    restart: Literal["on-failure", "always", "never"] = "on-failure"
    backoff_initial: Duration = Field(1.0, gt=0)
    backoff_max: Duration = Field(30.0, gt=0)
    stop_grace: Duration = Field(10.0, ge=0)
    # Once ready, the engine's health is probed every health_interval; health_failures misses in a
    # row (while it prints nothing either) restart it, so a hung engine cannot look ready for ever.
    health_interval: Duration = Field(10.0, gt=0)
    health_timeout: Duration = Field(10.0, gt=0)
    health_failures: int = Field(3, ge=1)

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return shlex.split(value) if isinstance(value, str) else value


class _Lifecycle(_Strict):
    """What every driver shares: where a backend lives, what it holds awake and asleep, and its policy."""

    device: str = "gpu0"
    memory: Size = Field(gt=0)
    sleeping_memory: Size = Field(0, ge=0)
    priority: int = 0
    idle_timeout: Duration | None = Field(None, gt=0)
    min_residency: Duration = Field(0.0, ge=0)
    exclusive: list[str] = Field(default_factory=list)
    wake_timeout: Duration = Field(1800.0, gt=0)

    @model_validator(mode="after")
    def _held_asleep(self) -> Self:
        if self.sleeping_memory > self.memory:
            raise ValueError("`sleeping_memory` is larger than `memory`|a backend holds less asleep than awake")
        return self


class VllmSleepLifecycle(_Lifecycle):
    """vLLM sleep mode: level 1 keeps weights in host RAM, level 2 drops them; a canary checks each wake."""

    driver: Literal["vllm-sleep"]
    sleep_level: Literal[1, 2] = 1
    canary: bool = True
    # What the canary asks: `auto` tries a completion, then an embedding (an embeddings-only engine).
    task: Literal["auto", "generate", "embed"] = "auto"


class OllamaLifecycle(_Lifecycle):
    """Each Ollama model is its own unit; `memory` is a model's size unless `model_memory` names it."""

    driver: Literal["ollama"]
    max_loaded_models: int = Field(2, ge=1)
    model_memory: dict[str, Size] = Field(default_factory=dict)


class KubernetesLifecycle(_Lifecycle):
    """A Deployment scaled between one replica (awake) and zero (asleep)."""

    driver: Literal["kubernetes"]
    deployment: str = Field(min_length=1)
    namespace: str = "default"
    kubeconfig: str | None = None


class ProcessLifecycle(_Lifecycle):
    """The backend's `managed` engine: asleep means not running."""

    driver: Literal["process"]


class AlwaysOnLifecycle(_Lifecycle):
    """Counted against the budget, never put to sleep."""

    driver: Literal["always-on"]


# How a backend shares the GPU; `driver` picks the model, so each driver accepts only its own fields.
LifecycleConfig = Annotated[
    VllmSleepLifecycle | OllamaLifecycle | KubernetesLifecycle | ProcessLifecycle | AlwaysOnLifecycle,
    Field(discriminator="driver"),
]
_LIFECYCLE: TypeAdapter[LifecycleConfig] = TypeAdapter(LifecycleConfig)
# Each driver's name and model, in the order the docs list them.
LIFECYCLE_MODELS: dict[str, type[_Lifecycle]] = {
    get_args(model.model_fields["driver"].annotation)[0]: model for model in get_args(get_args(LifecycleConfig)[0])
}
DRIVERS = tuple(LIFECYCLE_MODELS)


def parse_lifecycle(data: object) -> LifecycleConfig:
    """A `lifecycle:` block validated into its driver's model (for code and tests that build one by hand)."""
    return _LIFECYCLE.validate_python(data)


class DeviceConfig(_Strict):
    """One GPU's memory budget."""

    name: str = "gpu0"
    memory: Size = Field(gt=0)
    reserve: Size = Field(0, ge=0)
    index: int | None = Field(None, ge=0)

    @property
    def capacity(self) -> int:
        return self.memory - self.reserve


class GpuConfig(_Strict):
    """The GPU budget and the scheduler's limits; `memory` and `reserve` are a one-device shorthand."""

    memory: Size | None = Field(None, gt=0)
    reserve: Size = Field(0, ge=0)
    devices: list[DeviceConfig] = Field(default_factory=list)
    nvml: bool | None = None
    max_queue: int = Field(256, ge=1)
    max_wait: Duration = Field(1800.0, gt=0)
    starvation_cap: Duration = Field(30.0, gt=0)
    keepalive_interval: Duration = Field(10.0, gt=0)
    redis_url: str | None = None
    redis_prefix: str = "synapse"
    lease_ttl: Duration = Field(15.0, gt=0)

    @model_validator(mode="after")
    def _one_form(self) -> GpuConfig:
        if self.memory is not None and self.devices:
            raise ValueError("give `memory` (one device) or `devices`, not both|keep one of them")
        return self

    def device_list(self) -> list[DeviceConfig]:
        if self.memory is not None:
            return [DeviceConfig(name="gpu0", memory=self.memory, reserve=self.reserve, index=0)]
        return list(self.devices)


class BackendConfig(_Strict):
    """One inference server Synapse forwards to."""

    url: str
    protocol: Protocol = "openai"
    api_key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    models: list[str] = Field(default_factory=list)
    discover: bool = True
    timeouts: TimeoutsOverride = TimeoutsOverride()
    health_path: str | None = None
    managed: ManagedConfig | None = None
    lifecycle: LifecycleConfig | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL|write e.g. http://127.0.0.1:8000")
        return url.rstrip("/")


class DeploymentConfig(_Strict):
    """One backend that serves a route, optionally under another (upstream) model name."""

    backend: str
    model: str | None = None


class RouteConfig(_Strict):
    """A public model name (or glob pattern) and the deployments that serve it, in order of preference."""

    model: str | None = None
    pattern: str | None = None
    aliases: list[str] = Field(default_factory=list)
    backend: str | None = None
    upstream: str | None = None
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    fallbacks: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _shape(self) -> RouteConfig:
        if (self.model is None) == (self.pattern is None):
            raise ValueError("a route needs exactly one of `model` or `pattern`"
                             "|write `model: NAME` (an exact name) or `pattern: \"qwen*\"` (a glob)")
        if self.backend and self.deployments:
            raise ValueError("`backend` and `deployments` are both given"
                             "|keep `backend: NAME` for one deployment, or a `deployments:` list")
        if not self.backend and not self.deployments:
            raise ValueError("the route has no backend"
                             "|add `backend: NAME`, or a `deployments:` list of `- backend: NAME`")
        if self.upstream and not self.backend:
            raise ValueError("`upstream` goes with `backend`"
                             "|in a `deployments` list, set each deployment's `model` instead")
        return self

    def deployment_list(self) -> list[DeploymentConfig]:
        if self.backend:
            return [DeploymentConfig(backend=self.backend, model=self.upstream)]
        return list(self.deployments)


class RoutingPolicy(_Strict):
    """Retries, failover and cooldown across the deployments of one model."""

    retries: int = Field(2, ge=0, le=10)
    allowed_fails: int = Field(3, ge=1)
    cooldown: Duration = Field(30.0, ge=0)
    strategy: Literal["least-in-flight"] = "least-in-flight"


class DiscoveryConfig(_Strict):
    """How often backends are asked which models they serve."""

    interval: Duration = Field(60.0, gt=0)
    negative_ttl: Duration = Field(10.0, ge=0)
    min_refresh_gap: Duration = Field(2.0, ge=0)


class ServerConfig(_Strict):
    """Listening address, request limits and shutdown."""

    host: str = "127.0.0.1"
    port: int = Field(4000, ge=0, le=65535)
    max_body_size: Size = Field(32 * 1024 * 1024, gt=0)
    max_upload_size: Size = Field(25 * 1000 * 1000, gt=0)
    drain_timeout: Duration = Field(30.0, ge=0)
    shutdown_delay: Duration = Field(0.0, ge=0)
    # Slow clients: a request head must arrive within header_timeout (also how long an idle
    # keep-alive connection is kept), and a body with no more than body_idle_timeout between chunks
    # and body_timeout in all.
    header_timeout: Duration = Field(60.0, gt=0)
    body_idle_timeout: Duration = Field(60.0, gt=0)
    body_timeout: Duration = Field(600.0, gt=0)
    # A non-streamed answer is read whole before it is relayed; this bounds what one answer may hold.
    max_response_size: Size = Field(256 * 1024 * 1024, gt=0)
    max_connections_per_backend: int = Field(1024, ge=1)
    access_log: bool = True
    # Where state lives (the SQLite database of keys and usage): default $SYNAPSE_DATA_DIR, else
    # $XDG_DATA_HOME/synapse, else ~/.local/share/synapse.
    data_dir: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class SynapseConfig(_Strict):
    """The whole gateway configuration."""

    server: ServerConfig = ServerConfig()
    timeouts: Timeouts = Timeouts()
    routing: RoutingPolicy = RoutingPolicy()
    discovery: DiscoveryConfig = DiscoveryConfig()
    backends: dict[str, BackendConfig] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    fallback: str | None = None
    gpu: GpuConfig | None = None
    auth: AuthConfig = Field(default_factory=AuthConfig)
    usage: UsageConfig = UsageConfig()
    # Keys, budget checkpoints and the usage ledger: `sqlite:///PATH` or `postgresql://...` (several
    # replicas share one PostgreSQL). Default: SQLite in the data directory.
    database_url: str | None = None
    # Limits, in-flight counts and budget reservations shared by replicas; without it, in-process.
    redis_url: str | None = None
    redis_prefix: str = "synapse"

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError(f"{value!r} is not a database URL"
                             "|write sqlite:///path/to/synapse.db or postgresql://user@host/db")
        return value

    def data_directory(self) -> str:
        """Where the default SQLite database lives."""
        if self.server.data_dir:
            return os.path.expanduser(self.server.data_dir)
        if os.environ.get("SYNAPSE_DATA_DIR"):
            return os.path.expanduser(os.environ["SYNAPSE_DATA_DIR"])
        base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
        return os.path.join(base, "synapse")

    def database(self) -> str:
        """The database URL in effect."""
        return self.database_url or "sqlite:///" + os.path.join(self.data_directory(), "synapse.db")
