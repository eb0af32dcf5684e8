"""Bad requests over raw stubs: the right status code, a message that says what
was wrong and what was expected, and a server that keeps serving afterwards.

No client input may produce INTERNAL or UNKNOWN: those mean a bug of ours.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ServerProcess

from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import inference_service_pb2_grpc as svc

Tensor = pb.ModelInferRequest.InferInputTensor
Requested = pb.ModelInferRequest.InferRequestedOutputTensor
Stub = svc.GRPCInferenceServiceStub
Mutation = Callable[[pb.ModelInferRequest], None]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED
#: Codes that mean "the server has a bug", never acceptable for client input.
BUG_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[Stub]:
    with grpc.insecure_channel(server.url) as channel:
        yield svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def simple_request() -> pb.ModelInferRequest:
    """A valid request to ``simple``: the tests below break one thing at a time."""
    return pb.ModelInferRequest(
        model_name="simple",
        id="good",
        inputs=[
            Tensor(name="INPUT0", datatype="INT32", shape=[1, 16]),
            Tensor(name="INPUT1", datatype="INT32", shape=[1, 16]),
        ],
        raw_input_contents=[A.tobytes(), B.tobytes()],
    )


def identity_request(
    datatype: str, shape: list[int], raw: bytes | None = None
) -> pb.ModelInferRequest:
    model = "identity_" + ("string" if datatype == "BYTES" else datatype.lower())
    request = pb.ModelInferRequest(
        model_name=model, inputs=[Tensor(name="INPUT0", datatype=datatype, shape=shape)]
    )
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


def assert_serving(stub: Stub) -> None:
    """The server still answers a good request correctly."""
    response = stub.ModelInfer(simple_request(), timeout=30)
    assert response.id == "good"
    total = np.frombuffer(response.raw_output_contents[0], dtype=np.int32)
    np.testing.assert_array_equal(total, (A + B).reshape(-1))


def expect_error(
    call: Callable[[], object], code: grpc.StatusCode, fragments: list[str]
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    details = error.details() or ""
    assert error.code() == code, details
    for fragment in fragments:
        assert fragment in details, (fragment, details)
    return error


# --- mutations of the good request ---------------------------------------------


def _model(name: str, version: str = "") -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        request.model_name = name
        request.model_version = version

    return mutate


def _input(index: int, shape: list[int] | None = None, **fields: str) -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        tensor = request.inputs[index]
        if shape is not None:
            del tensor.shape[:]
            tensor.shape.extend(shape)
        for key, value in fields.items():
            setattr(tensor, key, value)

    return mutate


def _raw(index: int, data: bytes) -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        request.raw_input_contents[index] = data

    return mutate


def _drop_input(request: pb.ModelInferRequest) -> None:
    del request.inputs[1]
    del request.raw_input_contents[1]


def _no_inputs(request: pb.ModelInferRequest) -> None:
    del request.inputs[:]
    del request.raw_input_contents[:]


def _duplicate_input(request: pb.ModelInferRequest) -> None:
    request.inputs[1].name = "INPUT0"


def _batch_disagree(request: pb.ModelInferRequest) -> None:
    request.inputs[1].shape[0] = 2
    request.raw_input_contents[1] = np.zeros((2, 16), np.int32).tobytes()


def _one_raw(request: pb.ModelInferRequest) -> None:
    del request.raw_input_contents[1]


def _raw_and_typed(request: pb.ModelInferRequest) -> None:
    request.inputs[0].contents.int_contents.extend(range(16))


def _typed(field: str, count: int) -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        del request.raw_input_contents[:]
        for tensor in request.inputs:
            getattr(tensor.contents, field).extend([1] * count)

    return mutate


def _outputs(*names: str) -> Mutation:
    def mutate(request: pb.ModelInferRequest) -> None:
        request.outputs.extend(Requested(name=n) for n in names)

    return mutate


def _priority_text(request: pb.ModelInferRequest) -> None:
    request.parameters["priority"].string_param = "high"


def _negative_timeout(request: pb.ModelInferRequest) -> None:
    request.parameters["timeout"].int64_param = -5


def _input_shared_memory(request: pb.ModelInferRequest) -> None:
    # What tritonclient's InferInput.set_shared_memory sends.
    request.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    request.inputs[0].parameters["shared_memory_byte_size"].int64_param = 64
    request.inputs[1].parameters["shared_memory_region"].string_param = "region0"
    request.inputs[1].parameters["shared_memory_byte_size"].int64_param = 64
    del request.raw_input_contents[:]


def _output_shared_memory(request: pb.ModelInferRequest) -> None:
    output = request.outputs.add(name="OUTPUT0")
    output.parameters["shared_memory_region"].string_param = "region1"


def _output_classification(request: pb.ModelInferRequest) -> None:
    # What tritonclient's InferRequestedOutput(class_count=3) sends.
    output = request.outputs.add(name="OUTPUT0")
    output.parameters["classification"].int64_param = 3


SIMPLE_CASES = [
    pytest.param(_model("nope"), NOT_FOUND, ["'nope'"], id="unknown-model"),
    pytest.param(_model(""), NOT_FOUND, ["unknown model"], id="empty-model-name"),
    pytest.param(_model("simple", "7"), NOT_FOUND, ["'simple'", "version 7"], id="no-such-version"),
    pytest.param(_model("simple", "latest"), INVALID, ["'latest'", "version"], id="bad-version"),
    pytest.param(_model("broken"), UNAVAILABLE, ["'broken'"], id="broken-model"),
    pytest.param(
        _input(1, name="INPUT9"), INVALID, ["'INPUT9'", "INPUT0", "INPUT1"], id="unknown-input"
    ),
    pytest.param(_drop_input, INVALID, ["missing", "INPUT1"], id="missing-input"),
    pytest.param(_no_inputs, INVALID, ["missing", "INPUT0", "INPUT1"], id="no-inputs"),
    pytest.param(_duplicate_input, INVALID, ["'INPUT0'", "more than once"], id="duplicate-input"),
    pytest.param(
        _input(1, datatype="FP32"), INVALID, ["'INPUT1'", "FP32", "expected INT32"], id="datatype"
    ),
    pytest.param(
        _input(0, datatype=""), INVALID, ["'INPUT0'", "expected INT32"], id="empty-datatype"
    ),
    pytest.param(
        _input(0, shape=[1, 15]), INVALID, ["'INPUT0'", "[1, 15]", "[-1, 16]"], id="shape"
    ),
    pytest.param(_input(0, shape=[16]), INVALID, ["'INPUT0'", "[16]", "[-1, 16]"], id="rank"),
    pytest.param(
        _input(0, shape=[0, 16]),
        INVALID,
        ["'INPUT0'", "batch size 0", "max_batch_size (8)"],
        id="zero-batch",
    ),
    pytest.param(
        _input(0, shape=[9, 16]),
        INVALID,
        ["'INPUT0'", "batch size 9", "max_batch_size (8)"],
        id="big-batch",
    ),
    pytest.param(_input(0, shape=[-1, 16]), INVALID, ["'INPUT0'", "negative"], id="negative-dim"),
    pytest.param(
        _batch_disagree, INVALID, ["'INPUT1'", "batch size 2", "has 1"], id="batch-disagree"
    ),
    pytest.param(
        _raw(0, bytes(60)), INVALID, ["'INPUT0'", "60 bytes", "expected 64"], id="raw-short"
    ),
    pytest.param(
        _raw(1, bytes(68)), INVALID, ["'INPUT1'", "68 bytes", "expected 64"], id="raw-long"
    ),
    pytest.param(
        _one_raw, INVALID, ["raw_input_contents", "1 entries", "2 inputs"], id="raw-count"
    ),
    pytest.param(_raw_and_typed, INVALID, ["'INPUT0'", "typed contents"], id="raw-and-typed"),
    pytest.param(
        _typed("int_contents", 15), INVALID, ["'INPUT0'", "15 elements", "16"], id="typed-count"
    ),
    pytest.param(
        _typed("fp32_contents", 16), INVALID, ["'INPUT0'", "int_contents", "16"], id="typed-field"
    ),
    pytest.param(
        _outputs("OUTPUT7"), INVALID, ["'OUTPUT7'", "OUTPUT0", "OUTPUT1"], id="unknown-output"
    ),
    pytest.param(
        _outputs("OUTPUT1", "OUTPUT1"), INVALID, ["'OUTPUT1'", "more than once"], id="dup-output"
    ),
    pytest.param(_priority_text, INVALID, ["priority", "integer"], id="priority-text"),
    pytest.param(_negative_timeout, INVALID, ["timeout", "negative"], id="negative-timeout"),
    pytest.param(
        _input_shared_memory,
        NOT_FOUND,
        ["'INPUT0'", "'region0'", "not registered"],
        id="input-shm-unregistered",
    ),
    pytest.param(
        _output_shared_memory,
        INVALID,
        ["'OUTPUT0'", "shared_memory_byte_size"],
        id="output-shm-no-size",
    ),
    pytest.param(
        _output_classification, UNIMPLEMENTED, ["'OUTPUT0'", "classification"], id="classification"
    ),
]


@pytest.mark.parametrize(("mutate", "code", "fragments"), SIMPLE_CASES)
def test_bad_simple_request(
    stub: Stub, mutate: Mutation, code: grpc.StatusCode, fragments: list[str]
) -> None:
    request = simple_request()
    mutate(request)
    expect_error(lambda: stub.ModelInfer(request, timeout=30), code, fragments)
    assert_serving(stub)


def _bytes_element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


OTHER_CASES = [
    pytest.param(
        identity_request("INT8", [1, 2]),
        ["'INPUT0'", "INT8", "-128..127"],
        id="typed-out-of-range",
    ),
    pytest.param(
        identity_request("FP16", [1, 2]),
        ["'INPUT0'", "FP16", "raw_input_contents"],
        id="fp16-no-typed-field",
    ),
    pytest.param(
        identity_request("BYTES", [1, 2], _bytes_element(b"ok") + b"\x09\x00"),
        ["'INPUT0'", "BYTES", "1 of 2"],
        id="bytes-truncated-prefix",
    ),
    pytest.param(
        identity_request("BYTES", [1, 1], struct.pack("<I", 100) + b"abc"),
        ["'INPUT0'", "100 bytes"],
        id="bytes-truncated-element",
    ),
    pytest.param(
        identity_request("BYTES", [1, 1], _bytes_element(b"ok") + b"junk"),
        ["'INPUT0'", "left over"],
        id="bytes-left-over",
    ),
    pytest.param(
        identity_request("BYTES", [1, 1], _bytes_element(b"\xff\xfe")),
        ["'INPUT0'", "UTF-8"],
        id="bytes-not-utf8",
    ),
    pytest.param(
        identity_request("UINT8", [1, 2**40], b""),
        ["'INPUT0'", str(2**40), "limit"],
        id="too-many-elements",
    ),
    pytest.param(
        identity_request("UINT8", [8, 2**62, 2**62], b""),
        ["'INPUT0'", "[8, 4611686018427387904, 4611686018427387904]", "expected [-1, -1]"],
        id="huge-rank-3",
    ),
    pytest.param(
        pb.ModelInferRequest(
            model_name="nobatch",
            inputs=[Tensor(name="INPUT0", datatype="FP32", shape=[1, 2, 3])],
            raw_input_contents=[bytes(24)],
        ),
        ["'INPUT0'", "[1, 2, 3]", "expected [2, 3]"],
        id="nobatch-shape",
    ),
    pytest.param(
        pb.ModelInferRequest(
            model_name="gather_fail",
            inputs=[
                Tensor(name="INPUT", datatype="FP32", shape=[1, 4]),
                Tensor(name="INDEX", datatype="INT64", shape=[1, 1]),
            ],
            raw_input_contents=[bytes(16), np.array([[10]], np.int64).tobytes()],
        ),
        ["model execution failed", "GatherElements", "index"],
        id="execution-out-of-range",
    ),
]


@pytest.mark.parametrize(("request_", "fragments"), OTHER_CASES)
def test_bad_typed_request(
    stub: Stub, request_: pb.ModelInferRequest, fragments: list[str]
) -> None:
    request = pb.ModelInferRequest()
    request.CopyFrom(request_)
    if request.model_name == "identity_int8":
        request.inputs[0].contents.int_contents.extend([1, 300])
    expect_error(lambda: stub.ModelInfer(request, timeout=30), INVALID, fragments)
    assert_serving(stub)


def test_non_utf8_typed_bytes(stub: Stub) -> None:
    request = identity_request("BYTES", [1, 2])
    request.inputs[0].contents.bytes_contents.extend([b"fine", b"\xc3\x28"])
    expect_error(
        lambda: stub.ModelInfer(request, timeout=30), INVALID, ["'INPUT0'", "element 1", "UTF-8"]
    )
    assert_serving(stub)


def test_metadata_and_config_errors(stub: Stub) -> None:
    expect_error(
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope")), NOT_FOUND, ["'nope'"]
    )
    expect_error(
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="simple", version="9")),
        NOT_FOUND,
        ["version 9"],
    )
    expect_error(
        lambda: stub.ModelConfig(pb.ModelConfigRequest(name="nope")), NOT_FOUND, ["'nope'"]
    )
    expect_error(
        lambda: stub.ModelConfig(pb.ModelConfigRequest(name="broken")),
        UNAVAILABLE,
        ["'broken'"],
    )
    expect_error(
        lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="nope")),
        NOT_FOUND,
        ["'nope'"],
    )
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="broken")).ready
    # A malformed version is the caller's mistake, as in Triton (not "not ready").
    expect_error(
        lambda: stub.ModelReady(pb.ModelReadyRequest(name="simple", version="x")),
        INVALID,
        ["'x'", "version number"],
    )
    assert_serving(stub)


def test_repository_control_refused(stub: Stub) -> None:
    """The session server runs in control mode none: load/unload are refused."""
    expect_error(
        lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="simple")),
        grpc.StatusCode.FAILED_PRECONDITION,
        ["load", "--model-control-mode explicit"],
    )
    expect_error(
        lambda: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="simple")),
        grpc.StatusCode.FAILED_PRECONDITION,
        ["unload", "--model-control-mode explicit"],
    )
    assert_serving(stub)


def test_stream_errors_are_in_band(stub: Stub) -> None:
    """A bad request on a stream is answered in-band; the stream carries on."""
    bad = simple_request()
    bad.id = "bad"
    bad.inputs[0].datatype = "FP32"
    responses = list(stub.ModelStreamInfer(iter([bad, simple_request()]), timeout=30))
    by_id = {r.infer_response.id: r for r in responses}
    assert set(by_id) == {"bad", "good"}
    assert by_id["bad"].error_message.startswith("[INVALID_ARGUMENT]")
    assert "'INPUT0'" in by_id["bad"].error_message
    assert by_id["good"].error_message == ""
    assert by_id["good"].infer_response.outputs[0].name == "OUTPUT0"


# --- bytes that are not the message the RPC takes -------------------------------------

#: model_name (field 1) holding bytes that are not UTF-8; then a truncated varint.
UNPARSABLE = [b"\x0a\x02\xff\xfe", b"\xff\xff\xff"]
METHODS = ["ModelInfer", "ModelMetadata", "ModelConfig", "ModelReady", "RepositoryIndex"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("payload", UNPARSABLE, ids=["bad-utf8", "corrupt"])
def test_unparsable_request(server: ServerProcess, stub: Stub, method: str, payload: bytes) -> None:
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}", None, None)
        error = expect_error(lambda: call(payload, timeout=30), INVALID, ["does not parse"])
    assert "Error parsing message" in (error.details() or "")
    assert_serving(stub)


def test_unparsable_stream_message(server: ServerProcess, stub: Stub) -> None:
    """Good messages before a broken one are answered; then the stream fails."""
    good = simple_request().SerializeToString()
    with grpc.insecure_channel(server.url) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", None, None)
        responses = call(iter([good, UNPARSABLE[0]]), timeout=30)
        answers: list[pb.ModelStreamInferResponse] = []
        with pytest.raises(grpc.RpcError) as info:
            for raw in responses:
                answers.append(pb.ModelStreamInferResponse.FromString(raw))
    assert info.value.code() == INVALID
    assert "does not parse" in (info.value.details() or "")
    assert len(answers) <= 1
    assert all(a.infer_response.id == "good" for a in answers)
    assert_serving(stub)


# --- fuzzing: whatever the request, never a bug code ------------------------------

DATATYPES = ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "BF16", "BYTES", "", "INT4"]
MODELS = ["simple", "identity_fp32", "identity_string", "nobatch", "identity_bf16", "nope"]

tensors = st.builds(
    lambda name, datatype, shape: Tensor(name=name, datatype=datatype, shape=shape),
    st.sampled_from(["INPUT0", "INPUT1", "x", ""]),
    st.sampled_from(DATATYPES),
    st.lists(st.integers(-2, 20) | st.sampled_from([2**31, 2**62]), max_size=4),
)
requests = st.builds(
    lambda model, inputs, raws, outputs: pb.ModelInferRequest(
        model_name=model,
        inputs=inputs,
        raw_input_contents=raws,
        outputs=[Requested(name=o) for o in outputs],
    ),
    st.sampled_from(MODELS),
    st.lists(tensors, max_size=3),
    st.lists(st.binary(max_size=80), max_size=3),
    st.lists(st.sampled_from(["OUTPUT0", "OUTPUT1", "y"]), max_size=2),
)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(request=requests)
def test_fuzzed_requests_never_crash(stub: Stub, request: pb.ModelInferRequest) -> None:
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() not in BUG_CODES, error.details()
        assert error.details()


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.binary(max_size=64))
def test_fuzzed_bytes_never_crash(server: ServerProcess, payload: bytes) -> None:
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", None, None)
        try:
            call(payload, timeout=30)
        except grpc.RpcError as error:
            assert error.code() not in BUG_CODES, error.details()


def test_server_survives_fuzzing(stub: Stub) -> None:
    assert_serving(stub)
