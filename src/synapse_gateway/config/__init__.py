"""Configuration: the native schema, the LiteLLM dialect, and the loader that locates problems."""

from .loader import LoadedConfig, check_file, load_config, parse_config
from .problems import ConfigError, Problem
from .schema import BackendConfig, RouteConfig, SynapseConfig, Timeouts

__all__ = [
    "BackendConfig", "ConfigError", "LoadedConfig", "Problem", "RouteConfig", "SynapseConfig", "Timeouts",
    "check_file", "load_config", "parse_config",
]
