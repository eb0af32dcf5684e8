"""Execution providers for one instance, from config.pbtxt with Triton's keys.

Triton's ONNX Runtime backend configures the CUDA provider from the model's
``parameters`` (``cudnn_conv_algo_search``, ``gpu_mem_limit``,
``arena_extend_strategy``, ``do_copy_in_default_stream``,
``enable_cuda_graph``) and adds accelerators from
``optimization.execution_accelerators``: ``tensorrt`` and ``cuda`` for GPU
instances, ``openvino`` for CPU ones. Everything is checked on every host, so a
typo fails in CI on a CPU as it would on a GPU; options for a device an
instance does not use are accepted and reported as unused, because one config
must load on a CPU-only host and on a GPU host alike.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from lockgate.errors import ModelLoadError
from lockgate_client._proto import model_config_pb2 as mc

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"

#: TensorRT 10 is what onnxruntime-gpu 1.20+ links against.
_NVINFER = ("libnvinfer.so.10",)

Parse = Callable[[str], str]


def _choice(*names: str) -> Parse:
    """Triton's numeric codes (index into ``names``) or the names ONNX Runtime uses."""

    def parse(text: str) -> str:
        if text.isdigit() and int(text) < len(names):
            return names[int(text)]
        if text in names:
            return text
        codes = ", ".join(f"{i} ({n})" for i, n in enumerate(names))
        raise ValueError(f"must be one of {codes}")

    return parse


def _flag(text: str) -> str:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "on", "yes"):
        return "1"
    if lowered in ("0", "false", "off", "no"):
        return "0"
    raise ValueError("must be 0 or 1 (or true/false)")


def _positive_int(text: str) -> str:
    if not text.strip().isdigit() or int(text) <= 0:
        raise ValueError("must be a positive integer")
    return str(int(text))


def _non_negative_int(text: str) -> str:
    if not text.strip().isdigit():
        raise ValueError("must be a non-negative integer")
    return str(int(text))


def _text(text: str) -> str:
    return text


#: Model ``parameters`` keys for the CUDA provider (Triton's ORT backend names),
#: each with how its value becomes ONNX Runtime's CUDA provider option.
CUDA_PARAMETERS: dict[str, Parse] = {
    "cudnn_conv_algo_search": _choice("EXHAUSTIVE", "HEURISTIC", "DEFAULT"),
    "gpu_mem_limit": _positive_int,
    "arena_extend_strategy": _choice("kNextPowerOfTwo", "kSameAsRequested"),
    "do_copy_in_default_stream": _flag,
    "enable_cuda_graph": _flag,
}

#: Parameters of ``gpu_execution_accelerator { name: "cuda" }``.
CUDA_ACCELERATOR_PARAMETERS: dict[str, Parse] = {
    "cudnn_conv_use_max_workspace": _flag,
    "use_ep_level_unified_stream": _flag,
}

#: Triton's own TensorRT keys; every ``trt_*`` key goes to ONNX Runtime as is
#: (it checks them when the session is created).
_PRECISIONS = {"FP32": {}, "FP16": {"trt_fp16_enable": "1"}, "INT8": {"trt_int8_enable": "1"}}


@dataclass
class Providers:
    """What one instance asks ONNX Runtime for, and what it was told but ignores."""

    #: In priority order, as ``InferenceSession(providers=...)`` takes them.
    providers: list[Any]
    #: Options given for a device this instance does not use, for one log line.
    unused: list[str] = field(default_factory=list)

    @property
    def cuda_graph(self) -> bool:
        """The CUDA provider captures CUDA graphs (IO binding must keep buffers fixed)."""
        return any(
            isinstance(p, tuple) and p[0] == CUDA and p[1].get("enable_cuda_graph") == "1"
            for p in self.providers
        )


@functools.cache
def tensorrt_usable() -> bool:
    """This ONNX Runtime build has the TensorRT provider and TensorRT's library loads.

    onnxruntime-gpu lists TensorrtExecutionProvider whether or not TensorRT is
    installed, and then falls back to CUDA with a wall of errors; asking for
    libnvinfer ourselves turns that into one clear refusal.
    """
    import onnxruntime as ort

    if TENSORRT not in ort.get_available_providers():
        return False
    for name in _NVINFER:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def for_instance(config: mc.ModelConfig, gpu: int | None) -> Providers:
    """The providers for an instance on GPU ``gpu`` (None: the CPU) of this model.

    Raises ModelLoadError naming the key for any value Triton's backend would
    reject, for an unknown accelerator, and for TensorRT on a GPU instance
    when the TensorRT provider is not usable here.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return resolve(config, gpu, available, tensorrt=tensorrt_usable())


def resolve(
    config: mc.ModelConfig, gpu: int | None, available: Collection[str], *, tensorrt: bool
) -> Providers:
    """``for_instance`` with what the host offers passed in (testable anywhere)."""
    cuda = _cuda_options(config)
    accelerators = config.optimization.execution_accelerators
    trt: dict[str, str] | None = None
    for accelerator in accelerators.gpu_execution_accelerator:
        if accelerator.name == "tensorrt":
            trt = _tensorrt_options(config.name, accelerator)
        elif accelerator.name == "cuda":
            cuda.update(
                _parse(config.name, accelerator.parameters, CUDA_ACCELERATOR_PARAMETERS, "cuda")
            )
        else:
            raise ModelLoadError(
                f"model '{config.name}': unknown gpu_execution_accelerator "
                f"'{accelerator.name}'; Lockgate knows 'tensorrt' and 'cuda'"
            )
    openvino = False
    for accelerator in accelerators.cpu_execution_accelerator:
        if accelerator.name != "openvino":
            raise ModelLoadError(
                f"model '{config.name}': unknown cpu_execution_accelerator "
                f"'{accelerator.name}'; Lockgate knows 'openvino'"
            )
        openvino = True

    if gpu is None:
        return _cpu_providers(cuda, trt is not None, openvino, available)
    providers: list[Any] = []
    if trt is not None:
        if not tensorrt:
            raise ModelLoadError(
                f"model '{config.name}': optimization.execution_accelerators asks for "
                "TensorRT, but this ONNX Runtime has no usable TensorRT provider "
                "(TensorrtExecutionProvider with libnvinfer.so.10); install TensorRT 10 "
                "or remove the 'tensorrt' accelerator"
            )
        providers.append((TENSORRT, {"device_id": str(gpu), **trt}))
    providers.append((CUDA, {"device_id": str(gpu), **cuda}))
    providers.append(CPU)
    return Providers(providers)


def _cpu_providers(
    cuda: dict[str, str], trt: bool, openvino: bool, available: Collection[str]
) -> Providers:
    unused = [f"parameters {key}" for key in sorted(cuda)]
    if trt:
        unused.append("gpu_execution_accelerator tensorrt")
    providers: list[Any] = [CPU]
    if openvino and OPENVINO in available:
        providers.insert(0, OPENVINO)
    elif openvino:
        # Like the GPU options on a CPU host: an optional speed-up this host
        # lacks, so the model still loads (on the plain CPU provider).
        unused.append("cpu_execution_accelerator openvino (no onnxruntime-openvino here)")
    return Providers(providers, unused)


def _cuda_options(config: mc.ModelConfig) -> dict[str, str]:
    present = {k: v for k, v in config.parameters.items() if k in CUDA_PARAMETERS}
    return _parse(config.name, present, CUDA_PARAMETERS, "parameters")


def _parse(
    model: str, given: Any, known: dict[str, Parse], where: str, *, passthrough: str = ""
) -> dict[str, str]:
    options: dict[str, str] = {}
    for key, value in given.items():
        text = value if isinstance(value, str) else value.string_value
        parse = known.get(key) or (_text if passthrough and key.startswith(passthrough) else None)
        if parse is None:
            raise ModelLoadError(
                f"model '{model}': {where} has no key '{key}'; it knows "
                + ", ".join(sorted(known))
                + (f" and {passthrough}* keys" if passthrough else "")
            )
        try:
            options[key] = parse(text)
        except ValueError as exc:
            raise ModelLoadError(f"model '{model}': {where} {key} = '{text}': {exc}") from None
    return options


def _tensorrt_options(
    model: str, accelerator: mc.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator
) -> dict[str, str]:
    given = dict(accelerator.parameters)
    precision = given.pop("precision_mode", "FP32").upper()
    if precision not in _PRECISIONS:
        raise ModelLoadError(
            f"model '{model}': tensorrt precision_mode = '{precision}': must be FP32, FP16 or INT8"
        )
    options = dict(_PRECISIONS[precision])
    workspace = given.pop("max_workspace_size_bytes", None)
    if workspace is not None:
        options["trt_max_workspace_size"] = _checked(model, workspace, _positive_int)
    options.update(_parse(model, given, {}, "tensorrt accelerator", passthrough="trt_"))
    return options


def _checked(model: str, text: str, parse: Parse) -> str:
    try:
        return parse(text)
    except ValueError as exc:
        raise ModelLoadError(
            f"model '{model}': tensorrt max_workspace_size_bytes = '{text}': {exc}"
        ) from None
