"""GPU readings through NVML, for the ``nv_gpu_*`` metrics.

NVML comes from the optional ``nvidia-ml-py`` package (module ``pynvml``)
and the driver's ``libnvidia-ml.so``. Either may be missing (a CPU-only
machine, a container without the driver mounted): then ``open_gpus`` returns
None once, logs why at debug level, and the server exports no GPU metrics.
Nothing here runs on the request path; readings are taken at scrape time.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("lockgate.gpu")


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment, in Triton's units (None: the GPU can't say)."""

    uuid: str
    #: 0.0-1.0 over NVML's last sample period, like Triton's nv_gpu_utilization.
    utilization: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    #: Watts.
    power_usage: float | None
    power_limit: float | None
    #: Joules since the driver was loaded.
    energy_consumption: float | None


class Gpus:
    """The GPUs NVML sees; ``read`` samples all of them."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles
        self.uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]

    def read(self) -> list[GpuReading]:
        return [self._read(uuid, h) for uuid, h in zip(self.uuids, self._handles, strict=True)]

    def _read(self, uuid: str, handle: Any) -> GpuReading:
        nvml = self._nvml
        utilization = self._ask(nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = self._ask(nvml.nvmlDeviceGetMemoryInfo, handle)
        power_mw = self._ask(nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = self._ask(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        energy_mj = self._ask(nvml.nvmlDeviceGetTotalEnergyConsumption, handle)
        return GpuReading(
            uuid=uuid,
            utilization=utilization.gpu / 100 if utilization is not None else None,
            memory_used_bytes=int(memory.used) if memory is not None else None,
            memory_total_bytes=int(memory.total) if memory is not None else None,
            power_usage=power_mw / 1000 if power_mw is not None else None,
            power_limit=limit_mw / 1000 if limit_mw is not None else None,
            energy_consumption=energy_mj / 1000 if energy_mj is not None else None,
        )

    def _ask(self, query: Any, handle: Any) -> Any:
        # Many boards lack power or energy readings (NVML_ERROR_NOT_SUPPORTED):
        # that metric is left out for that GPU, the others are still reported.
        try:
            return query(handle)
        except self._nvml.NVMLError:
            return None

    def close(self) -> None:
        _shutdown(self._nvml)


def open_gpus() -> Gpus | None:
    """Initialise NVML and list the GPUs; None when there is no NVML or no GPU."""
    try:
        pynvml: Any = importlib.import_module("pynvml")
    except ImportError:
        log.debug("no GPU metrics: the nvidia-ml-py package (pynvml) is not installed")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        # NVML_ERROR_LIBRARY_NOT_FOUND / DRIVER_NOT_LOADED on CPU-only machines.
        log.debug("no GPU metrics: NVML is unavailable (%s)", exc)
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        gpus = Gpus(pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)])
    except pynvml.NVMLError as exc:
        log.warning("no GPU metrics: NVML cannot list the GPUs (%s)", exc)
        _shutdown(pynvml)
        return None
    if not gpus.uuids:
        log.debug("no GPU metrics: NVML sees no GPU")
        gpus.close()
        return None
    log.info("GPU metrics for %d GPU(s): %s", len(gpus.uuids), ", ".join(gpus.uuids))
    return gpus


def _shutdown(nvml: Any) -> None:
    with contextlib.suppress(nvml.NVMLError):  # the library is going away anyway
        nvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    # nvidia-ml-py before 11.5 returned bytes.
    return value.decode() if isinstance(value, bytes) else value
