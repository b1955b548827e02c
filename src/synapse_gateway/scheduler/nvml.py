"""Real device memory from NVML (the `nvidia-ml-py` package), where a driver and the package exist."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from ..config.schema import DeviceConfig

log = logging.getLogger("synapse.scheduler.nvml")


class DeviceMemory:
    """Reads used and total memory per configured device; every read is None where NVML is absent."""

    def __init__(self, devices: list[DeviceConfig], enabled: bool | None) -> None:
        self._nvml: ModuleType | None = None
        self._handles: dict[str, Any] = {}
        if enabled is False:
            return
        try:
            import pynvml  # type: ignore[import-not-found,unused-ignore]

            pynvml.nvmlInit()
            self._handles = {d.name: pynvml.nvmlDeviceGetHandleByIndex(d.index or 0) for d in devices}
            self._nvml = pynvml
        except Exception as exc:  # ImportError, or pynvml.NVMLError from a machine without a driver
            (log.error if enabled else log.debug)("NVML is not available (%s); using the configured budget only",
                                                   exc)
            self._handles = {}

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def used(self, device: str) -> int | None:
        return self._info(device, "used")

    def free(self, device: str) -> int | None:
        return self._info(device, "free")

    def _info(self, device: str, field: str) -> int | None:
        handle = self._handles.get(device)
        if self._nvml is None or handle is None:
            return None
        try:
            return int(getattr(self._nvml.nvmlDeviceGetMemoryInfo(handle), field))
        except Exception as exc:  # pynvml.NVMLError: a device that vanished or a driver reset
            log.warning("NVML read of %s failed: %s", device, exc)
            return None

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None
