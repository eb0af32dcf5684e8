"""Unit tests of the SDK's pure pieces: codec, error mapping, retries, targets.

No server needed: property tests round-trip every datatype through the wire
encoding the SDK sends and the decoding it applies to replies.
"""

from __future__ import annotations

import math
import time
from typing import Any

import grpc
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockgate_client import (
    InferenceError,
    InvalidInputError,
    LockgateError,
    ModelNotFoundError,
    ProtocolError,
    RetryPolicy,
    UnavailableError,
    _base,
    codec,
)
from lockgate_client._channel import ChannelSettings, build_target
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._retry import RetrySchedule
from lockgate_client.datatypes import WIRE_DTYPES
from lockgate_client.errors import error_from_code, error_from_stream_message

FIXED = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


def round_trip(value: Any, datatype: str | None = None) -> tuple[str, np.ndarray]:
    wire_type, shape, raw = codec.encode_tensor(value, datatype)
    assert isinstance(raw, bytes)
    return wire_type, codec.decode_tensor(wire_type, shape, raw)


@pytest.mark.parametrize("datatype", sorted(FIXED))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fixed_size_round_trip(datatype: str, data: st.DataObject) -> None:
    dtype = np.dtype(FIXED[datatype])
    array = data.draw(hnp.arrays(dtype, shapes))
    wire_type, decoded = round_trip(array)
    assert wire_type == datatype
    assert decoded.shape == array.shape
    assert decoded.dtype == WIRE_DTYPES[datatype]
    # Bit-exact, NaN payloads included.
    assert decoded.tobytes() == np.ascontiguousarray(array).tobytes()


@settings(max_examples=30, deadline=None)
@given(array=hnp.arrays(np.dtype(">i4"), shapes))
def test_big_endian_arrays_are_sent_little_endian(array: np.ndarray) -> None:
    wire_type, decoded = round_trip(array)
    assert wire_type == "INT32"
    assert np.array_equal(decoded, array)


@settings(max_examples=30, deadline=None)
@given(array=hnp.arrays(np.float64, (3, 4), elements=st.floats(-1e3, 1e3)))
def test_non_contiguous_views(array: np.ndarray) -> None:
    view = array.T[::2]
    _, decoded = round_trip(view)
    assert np.array_equal(decoded, view)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_bytes_round_trip(data: st.DataObject) -> None:
    shape = data.draw(shapes)
    items = data.draw(
        st.lists(st.binary(max_size=40), min_size=math.prod(shape), max_size=math.prod(shape))
    )
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    array = array.reshape(shape)
    wire_type, decoded = round_trip(array)
    assert wire_type == "BYTES"
    assert decoded.dtype == np.object_
    assert decoded.shape == array.shape
    assert decoded.reshape(-1).tolist() == items


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(max_size=20), min_size=1, max_size=10))
def test_str_arrays_are_utf8_bytes(texts: list[str]) -> None:
    wire_type, decoded = round_trip(np.array(texts, dtype=np.str_))
    assert wire_type == "BYTES"
    # numpy's fixed-width str drops trailing NULs; compare with what it holds.
    assert decoded.tolist() == [t.encode() for t in np.array(texts, dtype=np.str_).tolist()]
    _, decoded = round_trip(np.array(texts, dtype=np.object_))
    assert decoded.tolist() == [t.encode() for t in texts]


def test_object_arrays_send_other_objects_as_str() -> None:
    _, decoded = round_trip(np.array([1, "a", b"b", 2.5], dtype=np.object_))
    assert decoded.tolist() == [b"1", b"a", b"b", b"2.5"]


def bf16_reference(values: np.ndarray) -> np.ndarray:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return values.astype(ml_dtypes.bfloat16).astype(np.float32)


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=True)


@settings(max_examples=100, deadline=None)
@given(array=hnp.arrays(np.float32, shapes, elements=finite_f32))
def test_bf16_override_rounds_to_nearest_even(array: np.ndarray) -> None:
    wire_type, decoded = round_trip(array, "BF16")
    assert wire_type == "BF16"
    assert decoded.dtype == np.float32
    assert decoded.shape == array.shape
    assert np.array_equal(decoded, bf16_reference(array))


@settings(max_examples=100, deadline=None)
@given(array=hnp.arrays(np.float32, st.integers(1, 20), elements=finite_f32))
def test_bf16_is_exact_for_bf16_values(array: np.ndarray) -> None:
    # Values already representable survive unchanged (widening is exact).
    exact = bf16_reference(array)
    _, decoded = round_trip(exact, "BF16")
    assert np.array_equal(decoded, exact)


def test_bf16_keeps_nan_and_accepts_ints() -> None:
    _, decoded = round_trip(np.array([np.nan, 1.0], dtype=np.float32), "BF16")
    assert np.isnan(decoded[0]) and decoded[1] == 1.0
    _, decoded = round_trip([1, 2, 3], "BF16")
    assert decoded.tolist() == [1.0, 2.0, 3.0]


@settings(max_examples=50, deadline=None)
@given(array=hnp.arrays(np.float32, shapes, elements=finite_f32))
def test_ml_dtypes_bfloat16_arrays_send_their_bits(array: np.ndarray) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = array.astype(ml_dtypes.bfloat16)
    wire_type, shape, raw = codec.encode_tensor(bf16)
    assert wire_type == "BF16"
    assert raw == np.ascontiguousarray(bf16).view(np.uint16).astype("<u2").tobytes()
    assert np.array_equal(codec.decode_tensor("BF16", shape, raw), bf16.astype(np.float32))


def test_overrides_cast_within_kind() -> None:
    wire_type, decoded = round_trip([[1, 2], [3, 4]], "INT32")
    assert wire_type == "INT32" and decoded.dtype == np.int32
    assert decoded.tolist() == [[1, 2], [3, 4]]
    wire_type, decoded = round_trip(np.array([0.5], dtype=np.float64), "FP16")
    assert wire_type == "FP16" and decoded.tolist() == [0.5]
    with pytest.raises(TypeError):
        codec.encode_tensor(np.array([0.5]), "INT32")
    with pytest.raises(TypeError):
        codec.encode_tensor(np.array(["a"]), "INT32")
    with pytest.raises(TypeError):
        codec.encode_tensor(np.array([1, 2]), "BYTES")
    with pytest.raises(TypeError):
        codec.encode_tensor(np.array([1]), "FP8")
    with pytest.raises(TypeError):
        codec.encode_tensor(np.array([1 + 2j]))


def test_decoded_outputs_are_zero_copy_views() -> None:
    raw = np.arange(6, dtype="<i4").tobytes()
    decoded = codec.decode_tensor("INT32", [2, 3], raw)
    assert not decoded.flags.writeable
    assert decoded.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_decode_rejects_wrong_sizes() -> None:
    with pytest.raises(ProtocolError):
        codec.decode_tensor("INT32", [2], b"\x00" * 7)
    with pytest.raises(ProtocolError):
        codec.decode_tensor("BYTES", [2], b"\x01\x00\x00\x00a")
    with pytest.raises(ProtocolError):
        codec.decode_tensor("FP8", [1], b"\x00")


def test_decode_outputs_raw_and_typed() -> None:
    raw = pb.ModelInferResponse(
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name="A", datatype="FP32", shape=[2]),
            pb.ModelInferResponse.InferOutputTensor(name="B", datatype="BYTES", shape=[1]),
        ],
        raw_output_contents=[np.array([1, 2], "<f4").tobytes(), b"\x02\x00\x00\x00hi"],
    )
    outputs = codec.decode_outputs(raw)
    assert list(outputs) == ["A", "B"]
    assert outputs["A"].tolist() == [1.0, 2.0] and outputs["B"].tolist() == [b"hi"]

    # Servers may answer in the typed contents fields instead.
    typed = pb.ModelInferResponse(
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name="A",
                datatype="INT16",
                shape=[1, 2],
                contents=pb.InferTensorContents(int_contents=[-1, 7]),
            ),
            pb.ModelInferResponse.InferOutputTensor(
                name="B",
                datatype="BYTES",
                shape=[1],
                contents=pb.InferTensorContents(bytes_contents=[b"x"]),
            ),
        ]
    )
    outputs = codec.decode_outputs(typed)
    assert outputs["A"].dtype == np.int16 and outputs["A"].tolist() == [[-1, 7]]
    assert outputs["B"].tolist() == [b"x"]

    with pytest.raises(ProtocolError):
        codec.decode_outputs(
            pb.ModelInferResponse(outputs=list(raw.outputs), raw_output_contents=[b""])
        )


def test_infer_request_building() -> None:
    request = _base.infer_request(
        "simple",
        {"INPUT0": np.zeros((1, 16), np.int32), "TEXT": ["a", "bc"]},
        outputs=["OUTPUT0"],
        version="2",
        datatypes={"INPUT0": "INT32"},
        request_id="r1",
        priority=1,
        queue_timeout=0.25,
        parameters={"flag": True, "n": 3, "x": 0.5, "s": "v"},
    )
    assert request.model_name == "simple" and request.model_version == "2" and request.id == "r1"
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("INPUT0", "INT32", [1, 16]),
        ("TEXT", "BYTES", [2]),
    ]
    # Raw contents only: tritonclient and our server both expect them.
    assert len(request.raw_input_contents) == 2
    assert not any(t.HasField("contents") for t in request.inputs)
    assert [o.name for o in request.outputs] == ["OUTPUT0"]
    params = request.parameters
    assert params["priority"].uint64_param == 1
    assert params["timeout"].int64_param == 250_000
    assert params["flag"].bool_param is True and params["n"].int64_param == 3
    assert params["x"].double_param == 0.5 and params["s"].string_param == "v"
    with pytest.raises(ValueError):
        _base.infer_request("m", {"A": [1]}, datatypes={"B": "INT32"})


def test_stream_response_reading() -> None:
    ok = pb.ModelStreamInferResponse(
        infer_response=pb.ModelInferResponse(
            model_name="m",
            id="7",
            outputs=[pb.ModelInferResponse.InferOutputTensor(name="Y", datatype="INT8", shape=[1])],
            raw_output_contents=[b"\x05"],
        )
    )
    response = _base.stream_response(ok)
    assert response.ok and response.id == "7" and response["Y"].tolist() == [5]
    failed = pb.ModelStreamInferResponse(
        error_message="[INVALID_ARGUMENT] bad input", infer_response=pb.ModelInferResponse(id="8")
    )
    response = _base.stream_response(failed)
    assert not response.ok and response.id == "8"
    assert isinstance(response.error, InferenceError)
    assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert response.error.message == "bad input"
    with pytest.raises(InferenceError):
        response.result()


def test_error_mapping() -> None:
    assert isinstance(error_from_code(grpc.StatusCode.NOT_FOUND, "x"), ModelNotFoundError)
    assert isinstance(error_from_code(grpc.StatusCode.INVALID_ARGUMENT, "x"), InvalidInputError)
    err = error_from_code(grpc.StatusCode.DATA_LOSS, "lost")
    assert type(err) is LockgateError and err.code == grpc.StatusCode.DATA_LOSS
    assert str(err) == "[DATA_LOSS] lost" and err.message == "lost"
    plain = error_from_stream_message("no code here")
    assert plain.code == grpc.StatusCode.UNKNOWN and plain.message == "no code here"
    assert error_from_stream_message("[NOT_A_CODE] m").code == grpc.StatusCode.UNKNOWN


def test_retry_schedule_respects_count_and_deadline() -> None:
    policy = RetryPolicy(max_retries=2, initial_backoff=0.01, max_backoff=0.01)
    unavailable = UnavailableError("down")
    schedule = RetrySchedule(2, policy, timeout=None)
    assert schedule.remaining() is None
    assert schedule.next_delay(unavailable) is not None
    assert schedule.next_delay(unavailable) is not None
    assert schedule.next_delay(unavailable) is None
    # Only UNAVAILABLE is retried.
    assert RetrySchedule(5, policy, None).next_delay(InvalidInputError("x")) is None
    # No retry starts that would end after the deadline.
    slow = RetryPolicy(max_retries=5, initial_backoff=10.0, max_backoff=10.0)
    late = RetrySchedule(5, slow, timeout=0.001)
    time.sleep(0.002)
    assert late.next_delay(unavailable) is None
    assert late.remaining() == 0.0


@settings(max_examples=50, deadline=None)
@given(retry=st.integers(0, 20))
def test_backoff_is_full_jitter_capped(retry: int) -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.5, multiplier=2.0)
    delay = policy.backoff(retry)
    assert 0.0 <= delay <= min(1.5, 0.1 * 2.0**retry)


def test_retry_policy_forms() -> None:
    assert RetryPolicy.coerce(None) == RetryPolicy()
    assert RetryPolicy.coerce(None).infer is False
    assert RetryPolicy.coerce(5) == RetryPolicy(max_retries=5, infer=True)
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_targets() -> None:
    assert build_target("127.0.0.1:8001") == "127.0.0.1:8001"
    assert build_target("grpc://host:8001/") == "host:8001"
    assert build_target("dns:///svc.ns.svc.cluster.local:8001").startswith("dns:///")
    assert build_target(["127.0.0.1:1", "10.0.0.2:2"]) == "ipv4:127.0.0.1:1,10.0.0.2:2"
    assert build_target(["[::1]:1", "[::2]:2"]) == "ipv6:[::1]:1,[::2]:2"
    assert build_target(["127.0.0.1:1"]) == "127.0.0.1:1"
    with pytest.raises(ValueError):
        build_target(["host-a:1", "host-b:2"])
    with pytest.raises(ValueError):
        build_target([])


def test_channel_settings() -> None:
    settings_ = ChannelSettings(target="x:1", token="t0k", metadata=(("x-team", "a"),))
    assert settings_.call_metadata() == (("authorization", "Bearer t0k"), ("x-team", "a"))
    options = dict(settings_.options())
    assert options["grpc.max_receive_message_length"] == 2**31 - 1
    assert options["grpc.max_send_message_length"] == 2**31 - 1
    assert "round_robin" in str(options["grpc.service_config"])
    # One server: no health checking, so is_ready() can still say False.
    assert "healthCheckConfig" not in str(options["grpc.service_config"])
    for replicated in (build_target(["127.0.0.1:1", "127.0.0.1:2"]), "dns:///lockgate:8001"):
        config = dict(ChannelSettings(target=replicated).options())["grpc.service_config"]
        assert '"healthCheckConfig": {"serviceName": ""}' in str(config)
    assert not settings_.secure
    assert ChannelSettings(target="x:1", client_cert=b"c").secure
