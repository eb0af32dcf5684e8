"""Every KServe datatype round-trips unchanged through ``identity_<type>``.

Three ways in: tritonclient, raw stubs with ``raw_input_contents``, and raw
stubs with typed ``contents`` where the protocol has a field for the type.
Answers always come back in ``raw_output_contents``; they must hold exactly
the bytes that went in (NaN payloads, -0.0 and subnormals included).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tc
from support import ServerProcess
from tritonclient.utils import InferenceServerException

from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import inference_service_pb2_grpc as svc
from lockgate_client.datatypes import CONTENTS_FIELD, WIRE_DTYPES, serialize_bytes

Array = npt.NDArray[Any]
Tensor = pb.ModelInferRequest.InferInputTensor

DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
]
TYPED = [d for d in DATATYPES if d in CONTENTS_FIELD]

#: BYTES elements ONNX Runtime can hold: empty, non-ASCII, NUL inside, long.
TEXTS = [
    b"",
    "héllo ✓".encode(),
    "日本語".encode(),
    b"plain",
    "\U0001f600".encode(),
    b"nul\x00inside",
    b"x" * 1000,
    b"",
]

#: float32 values that bfloat16 holds exactly (tritonclient truncates to BF16).
BF16_EXACT = [1.0, -2.5, 0.0, -0.0, 2.0**100, float("inf"), float("-inf"), 0.0078125]


def model_for(datatype: str) -> str:
    return "identity_" + ("string" if datatype == "BYTES" else datatype.lower())


def sample(datatype: str) -> Array:
    """A [2, 4] tensor of ``datatype`` holding its edge values."""
    if datatype == "BYTES":
        return np.array(TEXTS, dtype=np.object_).reshape(2, 4)
    if datatype == "BOOL":
        return np.array([True, False, True, False, False, False, True, True]).reshape(2, 4)
    if datatype == "BF16":
        return np.array(BF16_EXACT, dtype=np.float32).reshape(2, 4)
    dtype = WIRE_DTYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype.name)
        values = [info.min, info.max, 0, 1, info.min + 1, info.max - 1, 2, info.max // 3]
        return np.array(values, dtype=dtype).reshape(2, 4)
    finfo = np.finfo(dtype.name)
    floats = [0.0, -0.0, finfo.max, finfo.smallest_subnormal, np.inf, -np.inf, np.nan, -1.25]
    return np.array(floats, dtype=dtype).reshape(2, 4)


def wire_bytes(array: Array, datatype: str) -> bytes:
    """The raw wire form of ``array`` (BF16: the upper half of each float32)."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    if datatype == "BF16":
        return (array.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return array.astype(WIRE_DTYPES[datatype]).tobytes()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[svc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def check_response(response: pb.ModelInferResponse, datatype: str, expected: bytes) -> None:
    assert len(response.outputs) == 1
    output = response.outputs[0]
    assert output.name == "OUTPUT0"
    assert output.datatype == datatype
    assert list(output.shape) == [2, 4]
    assert response.raw_output_contents[0] == expected


@pytest.mark.parametrize("datatype", DATATYPES)
def test_tritonclient_round_trip(client: tc.InferenceServerClient, datatype: str) -> None:
    data = sample(datatype)
    tensor = tc.InferInput("INPUT0", list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    result = client.infer(model_for(datatype), [tensor])
    output = result.get_output("OUTPUT0")
    assert output.datatype == datatype
    assert list(output.shape) == [2, 4]
    got = result.as_numpy("OUTPUT0")
    assert got is not None
    if datatype == "BYTES":
        assert got.tolist() == data.tolist()
    else:
        assert got.dtype == data.dtype
        assert got.tobytes() == data.tobytes()


@pytest.mark.parametrize("datatype", DATATYPES)
def test_raw_contents_round_trip(stub: svc.GRPCInferenceServiceStub, datatype: str) -> None:
    raw = wire_bytes(sample(datatype), datatype)
    request = pb.ModelInferRequest(
        model_name=model_for(datatype),
        inputs=[Tensor(name="INPUT0", datatype=datatype, shape=[2, 4])],
        raw_input_contents=[raw],
    )
    check_response(stub.ModelInfer(request, timeout=30), datatype, raw)


@pytest.mark.parametrize("datatype", TYPED)
def test_typed_contents_round_trip(stub: svc.GRPCInferenceServiceStub, datatype: str) -> None:
    data = sample(datatype)
    tensor = Tensor(name="INPUT0", datatype=datatype, shape=[2, 4])
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(data.reshape(-1).tolist())
    request = pb.ModelInferRequest(model_name=model_for(datatype), inputs=[tensor])
    check_response(stub.ModelInfer(request, timeout=30), datatype, wire_bytes(data, datatype))


@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "BF16"])
def test_zero_sized_tensor(stub: svc.GRPCInferenceServiceStub, datatype: str) -> None:
    request = pb.ModelInferRequest(
        model_name=model_for(datatype),
        inputs=[Tensor(name="INPUT0", datatype=datatype, shape=[1, 0])],
        raw_input_contents=[b""],
    )
    response = stub.ModelInfer(request, timeout=30)
    assert list(response.outputs[0].shape) == [1, 0]
    assert response.raw_output_contents[0] == b""


def test_bytes_not_utf8_via_tritonclient(client: tc.InferenceServerClient) -> None:
    """ONNX Runtime string tensors hold text: non-UTF-8 bytes are refused, clearly."""
    data = np.array([[b"ok", b"\xff\xfe not text"]], dtype=np.object_)
    tensor = tc.InferInput("INPUT0", [1, 2], "BYTES")
    tensor.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as info:
        client.infer("identity_string", [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    message = info.value.message()
    assert "'INPUT0'" in message
    assert "element 1" in message
    assert "UTF-8" in message
    # The server keeps serving text.
    assert client.is_model_ready("identity_string")


def test_bytes_not_utf8_typed(stub: svc.GRPCInferenceServiceStub) -> None:
    tensor = Tensor(name="INPUT0", datatype="BYTES", shape=[1, 1])
    tensor.contents.bytes_contents.append(b"\x80")
    request = pb.ModelInferRequest(model_name="identity_string", inputs=[tensor])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in (info.value.details() or "")


def test_simple_string(client: tc.InferenceServerClient) -> None:
    """Triton's ``simple_string``: decimal strings in, sums and differences out."""
    a = np.array([[str(i).encode() for i in range(16)]], dtype=np.object_)
    b = np.array([[b"1"] * 16], dtype=np.object_)
    inputs = [tc.InferInput(f"INPUT{i}", [1, 16], "BYTES") for i in range(2)]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("simple_string", inputs)
    total, difference = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    assert total is not None and difference is not None
    assert [int(x) for x in total.reshape(-1)] == [i + 1 for i in range(16)]
    assert [int(x) for x in difference.reshape(-1)] == [i - 1 for i in range(16)]
