"""CUDA/TensorRT options from config.pbtxt, and IO binding, on a CPU-only host.

The same config must load on a GPU host and on this one: GPU options are
checked here and reported as unused; bad values are refused on both.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from onnx import helper
from support import ServerProcess, launch_server

from lockgate.errors import ModelLoadError
from lockgate.providers import CPU, CUDA, OPENVINO, TENSORRT, resolve
from lockgate_client._proto import model_config_pb2 as mc
from models.build import Tensor, write_single

StartServer = Callable[..., ServerProcess]

GPU_OPTIONS = """
parameters { key: "cudnn_conv_algo_search" value: { string_value: "1" } }
parameters { key: "gpu_mem_limit" value: { string_value: "1073741824" } }
parameters { key: "arena_extend_strategy" value: { string_value: "1" } }
parameters { key: "do_copy_in_default_stream" value: { string_value: "0" } }
parameters { key: "enable_cuda_graph" value: { string_value: "0" } }
optimization { execution_accelerators { gpu_execution_accelerator [
  { name: "tensorrt"
    parameters { key: "precision_mode" value: "FP16" }
    parameters { key: "max_workspace_size_bytes" value: "1073741824" }
    parameters { key: "trt_engine_cache_enable" value: "1" } },
  { name: "cuda" parameters { key: "cudnn_conv_use_max_workspace" value: "1" } }
] } }
"""


def config(text: str) -> mc.ModelConfig:
    from google.protobuf import text_format

    parsed = mc.ModelConfig(name="m")
    text_format.Parse(text, parsed)
    return parsed


# --- the options, as ONNX Runtime gets them -------------------------------------


def test_gpu_instance_gets_triton_keys_as_ort_options() -> None:
    chosen = resolve(config(GPU_OPTIONS), 1, [TENSORRT, CUDA, CPU], tensorrt=True)
    assert chosen.providers == [
        (
            TENSORRT,
            {
                "device_id": "1",
                "trt_fp16_enable": "1",
                "trt_max_workspace_size": "1073741824",
                "trt_engine_cache_enable": "1",
            },
        ),
        (
            CUDA,
            {
                "device_id": "1",
                "cudnn_conv_algo_search": "HEURISTIC",
                "gpu_mem_limit": "1073741824",
                "arena_extend_strategy": "kSameAsRequested",
                "do_copy_in_default_stream": "0",
                "enable_cuda_graph": "0",
                "cudnn_conv_use_max_workspace": "1",
            },
        ),
        CPU,
    ]
    assert chosen.unused == []
    assert not chosen.cuda_graph


def test_cpu_instance_reports_gpu_options_unused() -> None:
    chosen = resolve(config(GPU_OPTIONS), None, [CPU], tensorrt=False)
    assert chosen.providers == [CPU]
    assert "parameters gpu_mem_limit" in chosen.unused
    assert "gpu_execution_accelerator tensorrt" in chosen.unused


def test_tensorrt_on_a_gpu_without_tensorrt_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="no usable TensorRT provider"):
        resolve(config(GPU_OPTIONS), 0, [CUDA, CPU], tensorrt=False)


def test_cuda_graph_and_names_accepted() -> None:
    text = """
    parameters { key: "enable_cuda_graph" value: { string_value: "true" } }
    parameters { key: "cudnn_conv_algo_search" value: { string_value: "DEFAULT" } }
    """
    chosen = resolve(config(text), 0, [CUDA, CPU], tensorrt=False)
    assert chosen.cuda_graph
    assert chosen.providers[0][1]["cudnn_conv_algo_search"] == "DEFAULT"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('parameters { key: "cudnn_conv_algo_search" value: { string_value: "3" } }', "0 (EXH"),
        ('parameters { key: "gpu_mem_limit" value: { string_value: "-1" } }', "positive"),
        ('parameters { key: "arena_extend_strategy" value: { string_value: "x" } }', "kSame"),
        ('parameters { key: "enable_cuda_graph" value: { string_value: "maybe" } }', "0 or 1"),
        (
            "optimization { execution_accelerators { gpu_execution_accelerator "
            '{ name: "tensorrtx" } } }',
            "unknown gpu_execution_accelerator 'tensorrtx'",
        ),
        (
            "optimization { execution_accelerators { gpu_execution_accelerator "
            '{ name: "tensorrt" parameters { key: "precision_mode" value: "FP8" } } } }',
            "precision_mode",
        ),
        (
            "optimization { execution_accelerators { gpu_execution_accelerator "
            '{ name: "tensorrt" parameters { key: "workspace" value: "1" } } } }',
            "no key 'workspace'",
        ),
        (
            "optimization { execution_accelerators { gpu_execution_accelerator "
            '{ name: "cuda" parameters { key: "gpu_mem_limit" value: "1" } } } }',
            "no key 'gpu_mem_limit'",
        ),
    ],
)
def test_bad_options_are_refused_on_any_host(text: str, message: str) -> None:
    for gpu in (None, 0):
        with pytest.raises(ModelLoadError, match=message.replace("(", r"\(")):
            resolve(config(text), gpu, [CUDA, CPU], tensorrt=False)


def test_openvino_is_used_where_present_and_reported_unused_elsewhere() -> None:
    text = (
        'optimization { execution_accelerators { cpu_execution_accelerator { name: "openvino" } } }'
    )
    chosen = resolve(config(text), None, [CUDA, CPU], tensorrt=False)
    assert chosen.providers == [CPU]
    assert "cpu_execution_accelerator openvino" in chosen.unused[0]
    openvino = resolve(config(text), None, [OPENVINO, CPU], tensorrt=False)
    assert openvino.providers == [OPENVINO, CPU]
    # Triton applies CPU accelerators to CPU instances only.
    assert resolve(config(text), 0, [CUDA, CPU], tensorrt=False).providers[-1] == CPU


# --- end to end on this CPU-only host -------------------------------------------


def add_model(repo: Path, name: str, extra: str, datatype: str = "TYPE_FP32") -> None:
    """OUTPUT0 = INPUT0 + INPUT1 ([4]) and OUTPUT1 = Identity(INPUT2) ([-1])."""
    inputs = [
        Tensor("INPUT0", datatype, (4,)),
        Tensor("INPUT1", datatype, (4,)),
        Tensor("INPUT2", datatype, (-1,)),
    ]
    outputs = [Tensor("OUTPUT0", datatype, (4,)), Tensor("OUTPUT1", datatype, (-1,))]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Identity", ["INPUT2"], ["OUTPUT1"]),
    ]
    write_single(repo, name, nodes, inputs, outputs, max_batch_size=16, extra=extra)


BINDING_ON = 'parameters { key: "io_binding" value: { string_value: "1" } }'


@pytest.fixture(scope="module")
def options_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    repo = tmp_path_factory.mktemp("providers")
    add_model(repo, "gpu_options", GPU_OPTIONS + BINDING_ON)
    add_model(repo, "bound_fp16", BINDING_ON, "TYPE_FP16")
    add_model(repo, "unbound", "")
    add_model(
        repo,
        "bad_algo",
        'parameters { key: "cudnn_conv_algo_search" value: { string_value: "9" } }',
    )
    server = launch_server(repo, tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()


def feeds(rows: int, width: int, dtype: type[np.generic], seed: int) -> list[tc.InferInput]:
    rng = np.random.default_rng(seed)
    wire = "FP16" if dtype is np.float16 else "FP32"
    arrays = [
        rng.standard_normal((rows, 4)).astype(dtype),
        rng.standard_normal((rows, 4)).astype(dtype),
        rng.standard_normal((rows, width)).astype(dtype),
    ]
    tensors = []
    for i, array in enumerate(arrays):
        tensor = tc.InferInput(f"INPUT{i}", list(array.shape), wire)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def check(client: tc.InferenceServerClient, model: str, seed: int) -> None:
    dtype: Any = np.float16 if model.endswith("fp16") else np.float32
    rows, width = 1 + seed % 5, 1 + seed % 3
    inputs = feeds(rows, width, dtype, seed)
    result = client.infer(model, inputs)
    a, b, c = (t._raw_content for t in inputs)
    assert a is not None and b is not None and c is not None
    x = np.frombuffer(a, dtype).reshape(rows, 4)
    y = np.frombuffer(b, dtype).reshape(rows, 4)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + y)
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT1"), np.frombuffer(c, dtype).reshape(rows, width)
    )


def test_gpu_config_loads_and_serves_on_cpu(options_server: ServerProcess) -> None:
    with tc.InferenceServerClient(options_server.url) as client:
        assert client.is_model_ready("gpu_options")
        check(client, "gpu_options", 3)
    log = options_server.log()
    assert "model gpu_options:" in log
    assert "gpu_mem_limit" in log and "gpu_execution_accelerator tensorrt" in log
    assert "unused on this cpu instance" in log


def test_bad_option_makes_only_that_model_unavailable(options_server: ServerProcess) -> None:
    with tc.InferenceServerClient(options_server.url) as client:
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["bad_algo"].state == "UNAVAILABLE"
        assert "cudnn_conv_algo_search = '9'" in index["bad_algo"].reason
        check(client, "unbound", 1)


@pytest.mark.parametrize("model", ["gpu_options", "bound_fp16", "unbound"])
def test_io_binding_gives_each_caller_its_own_rows(
    options_server: ServerProcess, model: str
) -> None:
    # Concurrent callers make the batcher merge requests of different sizes
    # into one bound run; every caller must get exactly its own rows.
    with (
        tc.InferenceServerClient(options_server.url) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        list(pool.map(lambda seed: check(client, model, seed), range(48)))
