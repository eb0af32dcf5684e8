"""Fuzzing: whatever a client sends, the server answers with a client-error status,
never INTERNAL or UNKNOWN, never crashes, and keeps serving valid traffic.

Inputs are arbitrary and mutated ``ModelInferRequest``s (names, datatypes,
shapes with huge and negative dimensions, raw contents of the wrong size,
typed contents of the wrong kind, parameters of the wrong type), random bytes
sent as the serialized message of any RPC, streams mixing all of these, and
random or mutated ``config.pbtxt`` / JSON model configurations.

``LOCKGATE_FUZZ_EXAMPLES`` sets the examples per test (default 150, a few
seconds each; ``make fuzz`` sets 5000). Short runs are derandomized, so they
are repeatable; long runs explore. ``make fuzz`` then runs the coverage-guided
atheris harness, bench/fuzz_atheris.py; the last test here is its smoke test.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import ROOT, SERVICE, ServerProcess

from lockgate.config import (
    OnnxTensor,
    complete_config,
    parse_config_override,
    parse_model_config,
    validate_config,
)
from lockgate.errors import ModelLoadError
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client.datatypes import WIRE_DTYPES

EXAMPLES = int(os.environ.get("LOCKGATE_FUZZ_EXAMPLES", "150"))
EXPLORE = "LOCKGATE_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not EXPLORE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Codes that mean "the server has a bug": never an answer to a client's mistake.
BUG_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
#: A valid request is checked after this many fuzzed calls.
CHECK_EVERY = 25
TIMEOUT_S = 60.0

Tensor = pb.ModelInferRequest.InferInputTensor
Requested = pb.ModelInferRequest.InferRequestedOutputTensor
Parameter = pb.InferParameter


# --- the server under fuzz ------------------------------------------------------------------


@dataclass
class Target:
    """The shared test server, and a check that it still serves, run every few calls."""

    server: ServerProcess
    channel: grpc.Channel
    calls: int = 0

    def unary(self, method: str) -> Any:
        return self.channel.unary_unary(SERVICE + method, None, None)

    def counted(self) -> None:
        self.calls += 1
        if self.calls % CHECK_EVERY == 0:
            self.assert_serving()

    def assert_serving(self) -> None:
        assert self.server.process.poll() is None, self.server.log()[-3000:]
        reply = pb.ModelInferResponse.FromString(
            self.unary("ModelInfer")(good_request().SerializeToString(), timeout=TIMEOUT_S)
        )
        total = np.frombuffer(reply.raw_output_contents[0], np.int32)
        assert total.tolist() == [2 * i + 3 for i in range(16)]


@pytest.fixture(scope="module")
def target(server: ServerProcess) -> Iterator[Target]:
    with grpc.insecure_channel(server.url) as channel:
        fuzzed = Target(server, channel)
        fuzzed.assert_serving()
        yield fuzzed
        fuzzed.assert_serving()


def good_request() -> pb.ModelInferRequest:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    return pb.ModelInferRequest(
        model_name="simple",
        id="good",
        inputs=[
            Tensor(name="INPUT0", datatype="INT32", shape=[1, 16]),
            Tensor(name="INPUT1", datatype="INT32", shape=[1, 16]),
        ],
        raw_input_contents=[a.tobytes(), (a + 3).tobytes()],
    )


def assert_client_error(target: Target, send: Callable[[], object]) -> None:
    """``send`` succeeds, or fails with a code and a message that blame the request."""
    try:
        send()
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        details: str = error.details() or ""
        assert code not in BUG_CODES, details
        assert details, code
    finally:
        target.counted()


# --- strategies: requests -------------------------------------------------------------------

MODELS = [
    "simple",
    "simple_string",
    "identity_fp32",
    "identity_string",
    "identity_bf16",
    "identity_bool",
    "identity_fp16",
    "identity_uint64",
    "identity_int8",
    "nobatch",
    "gather_fail",
    "versioned",
    "autocomplete",
    "broken",
    "nope",
    "",
]
DATATYPES = [*WIRE_DTYPES, "", "INT4", "fp32", "STRING", "TYPE_FP32"]
INT64 = st.integers(-(2**63), 2**63 - 1)
dims = st.integers(-3, 20) | st.sampled_from([0, 2**31, 2**32 + 1, 2**62, 2**63 - 1, -(2**63)])
texts = st.text(max_size=8)
names = st.sampled_from(["INPUT0", "INPUT1", "INPUT", "INDEX", "x", "OUTPUT0", ""]) | texts
versions = (
    st.sampled_from(["", "1", "2", "3", "0", "-1", "²", "99999999999999999999", " 1"]) | texts
)
parameter_keys = (
    st.sampled_from(
        [
            "priority",
            "timeout",
            "binary_data_output",
            "binary_data_size",
            "shared_memory_region",
            "shared_memory_byte_size",
            "classification",
            "sequence_id",
        ]
    )
    | texts
)
parameter_values = st.one_of(
    st.builds(lambda v: Parameter(bool_param=v), st.booleans()),
    st.builds(lambda v: Parameter(int64_param=v), INT64),
    st.builds(lambda v: Parameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: Parameter(double_param=v), st.floats()),
    st.builds(lambda v: Parameter(string_param=v), texts),
    st.just(Parameter()),
)
parameters = st.dictionaries(parameter_keys, parameter_values, max_size=3)


def small_lists(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(elements, max_size=6)


contents = st.builds(
    pb.InferTensorContents,
    bool_contents=small_lists(st.booleans()),
    int_contents=small_lists(st.integers(-(2**31), 2**31 - 1)),
    int64_contents=small_lists(INT64),
    uint_contents=small_lists(st.integers(0, 2**32 - 1)),
    uint64_contents=small_lists(st.integers(0, 2**64 - 1)),
    fp32_contents=small_lists(st.floats(width=32)),
    fp64_contents=small_lists(st.floats()),
    bytes_contents=small_lists(st.binary(max_size=12)),
)


@st.composite
def tensors(draw: st.DrawFn) -> Tensor:
    tensor = Tensor(
        name=draw(names),
        datatype=draw(st.sampled_from(DATATYPES) | texts),
        shape=draw(st.lists(dims, max_size=5)),
        parameters=draw(parameters),
    )
    if draw(st.booleans()):
        tensor.contents.CopyFrom(draw(contents))
    return tensor


def raw_for(tensor: Tensor, slack: int) -> bytes:
    """Raw bytes about the size the tensor declares: off by ``slack``."""
    count = math.prod(d for d in tensor.shape) if tensor.shape else 1
    itemsize = WIRE_DTYPES[tensor.datatype].itemsize if tensor.datatype in WIRE_DTYPES else 4
    size = count * (4 if tensor.datatype == "BYTES" else itemsize) + slack
    return bytes(max(0, min(size, 4096)))


@st.composite
def arbitrary_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    inputs = draw(st.lists(tensors(), max_size=3))
    raws: list[bytes] = []
    style = draw(st.sampled_from(["none", "random", "sized"]))
    if style == "random":
        raws = draw(st.lists(st.binary(max_size=64), max_size=4))
    elif style == "sized":
        raws = [raw_for(t, draw(st.integers(-2, 2))) for t in inputs]
    outputs = [
        Requested(name=name, parameters=draw(parameters))
        for name in draw(st.lists(names, max_size=2))
    ]
    return pb.ModelInferRequest(
        model_name=draw(st.sampled_from(MODELS) | texts),
        model_version=draw(versions),
        id=draw(texts),
        parameters=draw(parameters),
        inputs=inputs,
        outputs=outputs,
        raw_input_contents=raws,
    )


def _string_bytes(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v.encode() for v in values)


def valid_requests(rows: int) -> list[pb.ModelInferRequest]:
    """One valid request per model kind: the seeds of mutation."""
    ints = np.arange(16 * rows, dtype=np.int32).reshape(rows, 16)
    simple = pb.ModelInferRequest(
        model_name="simple",
        inputs=[Tensor(name=f"INPUT{i}", datatype="INT32", shape=[rows, 16]) for i in range(2)],
        raw_input_contents=[ints.tobytes(), ints.tobytes()],
    )
    typed = pb.ModelInferRequest(
        model_name="simple",
        inputs=[
            Tensor(
                name=f"INPUT{i}",
                datatype="INT32",
                shape=[rows, 16],
                contents=pb.InferTensorContents(int_contents=ints.ravel().tolist()),
            )
            for i in range(2)
        ],
    )
    text = _string_bytes([str(i) for i in range(16 * rows)])
    strings = pb.ModelInferRequest(
        model_name="simple_string",
        inputs=[Tensor(name=f"INPUT{i}", datatype="BYTES", shape=[rows, 16]) for i in range(2)],
        raw_input_contents=[text, text],
    )
    fp16 = pb.ModelInferRequest(
        model_name="identity_fp16",
        inputs=[Tensor(name="INPUT0", datatype="FP16", shape=[rows, 3])],
        raw_input_contents=[np.ones((rows, 3), np.float16).tobytes()],
    )
    nobatch = pb.ModelInferRequest(
        model_name="nobatch",
        inputs=[Tensor(name="INPUT0", datatype="FP32", shape=[2, 3])],
        raw_input_contents=[np.ones((2, 3), np.float32).tobytes()],
    )
    gather = pb.ModelInferRequest(
        model_name="gather_fail",
        inputs=[
            Tensor(name="INPUT", datatype="FP32", shape=[rows, 4]),
            Tensor(name="INDEX", datatype="INT64", shape=[rows, 1]),
        ],
        raw_input_contents=[
            np.ones((rows, 4), np.float32).tobytes(),
            np.full((rows, 1), 2, np.int64).tobytes(),
        ],
    )
    return [simple, typed, strings, fp16, nobatch, gather]


def _mutate(request: pb.ModelInferRequest, draw: st.DrawFn) -> None:
    """Break one thing about ``request``, in place."""
    kind = draw(st.integers(0, 13))
    inputs, raws = request.inputs, request.raw_input_contents
    index = draw(st.integers(0, max(0, len(inputs) - 1)))
    if kind == 0 and inputs:
        del inputs[index]
        if index < len(raws):
            del raws[index]
    elif kind == 1 and inputs:
        inputs.append(inputs[index])
        if index < len(raws):
            raws.append(raws[index])
    elif kind == 2 and inputs:
        inputs[index].name = draw(names)
    elif kind == 3 and inputs:
        inputs[index].datatype = draw(st.sampled_from(DATATYPES))
    elif kind == 4 and inputs and inputs[index].shape:
        shape = inputs[index].shape
        shape[draw(st.integers(0, len(shape) - 1))] = draw(dims)
    elif kind == 5 and inputs:
        inputs[index].shape.append(draw(dims))
    elif kind == 6 and index < len(raws):
        raw = raws[index]
        raws[index] = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif kind == 7 and index < len(raws):
        raws[index] = raws[index] + draw(st.binary(min_size=1, max_size=9))
    elif kind == 8 and index < len(raws) and raws[index]:
        flipped = bytearray(raws[index])
        flipped[draw(st.integers(0, len(flipped) - 1))] ^= 1 << draw(st.integers(0, 7))
        raws[index] = bytes(flipped)
    elif kind == 9 and inputs:
        inputs[index].contents.CopyFrom(draw(contents))  # typed and raw, or the wrong kind
    elif kind == 10:
        del raws[:]
    elif kind == 11:
        raws.append(draw(st.binary(max_size=16)))
    elif kind == 12:
        request.parameters[draw(parameter_keys)].CopyFrom(draw(parameter_values))
    else:
        request.model_version = draw(versions)
        request.outputs.add(name=draw(names), parameters=draw(parameters))


@st.composite
def mutated_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = draw(st.sampled_from(valid_requests(draw(st.integers(1, 3)))))
    mutated = pb.ModelInferRequest()
    mutated.CopyFrom(request)
    for _ in range(draw(st.integers(1, 3))):
        _mutate(mutated, draw)
    return mutated


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    """A valid request's serialized bytes with a few bytes flipped, cut or inserted."""
    data = bytearray(draw(st.sampled_from(valid_requests(1))).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.integers(0, 2))
        if action == 0 and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif action == 1:
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


any_request_bytes = st.one_of(
    arbitrary_requests().map(lambda r: r.SerializeToString()),
    mutated_requests().map(lambda r: r.SerializeToString()),
    mutated_bytes(),
    st.binary(max_size=128),
)


# --- requests against the server -----------------------------------------------------------


@FUZZ
@given(request=arbitrary_requests())
@example(request=pb.ModelInferRequest(model_name="simple", model_version="²"))
@example(
    request=pb.ModelInferRequest(
        model_name="identity_string",
        inputs=[Tensor(name="INPUT0", datatype="BYTES", shape=[1, 2**27])],
        raw_input_contents=[b"\x01\x00\x00\x00a"],
    )
)
def test_arbitrary_requests(target: Target, request: pb.ModelInferRequest) -> None:
    infer = target.channel.unary_unary(
        SERVICE + "ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=None,
    )
    assert_client_error(target, lambda: infer(request, timeout=TIMEOUT_S))


@FUZZ
@given(request=mutated_requests())
def test_mutated_requests(target: Target, request: pb.ModelInferRequest) -> None:
    infer = target.channel.unary_unary(
        SERVICE + "ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=None,
    )
    assert_client_error(target, lambda: infer(request, timeout=TIMEOUT_S))


UNARY_METHODS = [
    "ModelInfer",
    "ModelMetadata",
    "ModelConfig",
    "ModelReady",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "ServerMetadata",
    "ServerLive",
    "ServerReady",
]


@FUZZ
@given(method=st.sampled_from(UNARY_METHODS), payload=any_request_bytes)
@example(method="ModelInfer", payload=b"\xff\xff\xff")
def test_random_bytes_as_messages(target: Target, method: str, payload: bytes) -> None:
    """Bytes sent as the serialized message, with no serializer in between."""
    call = target.unary(method)
    assert_client_error(target, lambda: call(payload, timeout=TIMEOUT_S))


@FUZZ
@given(
    messages=st.lists(any_request_bytes | st.just(good_request().SerializeToString()), max_size=6)
)
def test_stream_messages(target: Target, messages: list[bytes]) -> None:
    stream = target.channel.stream_stream(SERVICE + "ModelStreamInfer", None, None)
    answers: list[pb.ModelStreamInferResponse] = []

    def send() -> None:
        for raw in stream(iter(messages), timeout=TIMEOUT_S):
            answers.append(pb.ModelStreamInferResponse.FromString(raw))

    assert_client_error(target, send)
    assert len(answers) <= len(messages)
    for answer in answers:
        # In-band errors carry their code in front: never a bug's code either.
        assert not answer.error_message.startswith(("[INTERNAL]", "[UNKNOWN]")), answer
        if answer.error_message:
            assert answer.error_message.startswith("[")


def test_server_survives_fuzzing(target: Target) -> None:
    target.assert_serving()
    # The servicer logs "internal error" for exceptions that are not LockgateErrors.
    assert "internal error" not in target.server.log()


# --- model configurations ----------------------------------------------------------------------

ONNX_INPUTS = [OnnxTensor("INPUT0", "tensor(float)", (-1, 16))]
ONNX_OUTPUTS = [OnnxTensor("OUTPUT0", "tensor(float)", (-1, 16))]
BASE_CONFIG = """name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching {
  preferred_batch_size: [ 4 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy { max_queue_size: 2 timeout_action: DELAY }
}
instance_group [ { count: 1 kind: KIND_CPU } ]
version_policy { specific { versions: [ 1 ] } }
model_warmup [ { name: "w" batch_size: 1 inputs { key: "INPUT0" value: {
  data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } } } ]
"""
CONFIG_TOKENS = [
    "{", "}", "[", "]", ":", ",", "-1", "0", "99999999999999999999", "-5", "1e400", "nan",
    "TYPE_FP32", "TYPE_STRING", "TYPE_INVALID", "data_type: 99", "data_type: -3", "dims: [ 0 ]",
    "dims: [ -7 ]", "reshape { shape: [ 1 ] }", "optional: true", "max_batch_size: -1",
    "kind: KIND_GPU", "kind: KIND_MODEL", "kind: 17", "gpus: [ 3 ]", "count: -2",
    "sequence_batching { }", "ensemble_scheduling { }", 'name: "other"', 'platform: "x"',
    'backend: "tensorflow"', "decoupled: true", "input [ ]", "#", '"', "'", "\\x00",
    "default_model_filename: \"../x\"", "timeout_action: 9",
]  # fmt: skip


@st.composite
def mutated_text(draw: st.DrawFn, base: str, tokens: list[str]) -> str:
    text = base
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.integers(0, 2))
        if action == 0:
            text = text[:at] + text[at + draw(st.integers(1, 24)) :]
        elif action == 1:
            text = f"{text[:at]} {draw(st.sampled_from(tokens))} {text[at:]}"
        else:
            text = text[:at] + draw(st.text(max_size=6)) + text[at:]
    return text


def check_config(config_text: str, is_json: bool) -> None:
    """Parse, validate and complete as loading does: only ModelLoadError may come out."""
    try:
        if is_json:
            config = parse_config_override(config_text, "config")
        else:
            config = parse_model_config(config_text, "config.pbtxt")
        validate_config(config)
        complete_config(config, "m", ONNX_INPUTS, ONNX_OUTPUTS, 4)
        validate_config(config)
    except ModelLoadError as error:
        assert error.message


@FUZZ
@given(text=mutated_text(BASE_CONFIG, CONFIG_TOKENS) | st.text(max_size=200))
@example(text='input [ { name: "INPUT0" data_type: 99 dims: [ 16 ] } ]')
@example(text='input [ { name: "INPUT0" data_type: 99999999999999999999 } ]')
@example(text="dynamic_batching { " * 2000)
def test_config_pbtxt(text: str) -> None:
    check_config(text, is_json=False)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
config_keys = st.sampled_from(
    [
        "name", "max_batch_size", "input", "output", "dynamic_batching", "instance_group",
        "version_policy", "platform", "backend", "default_model_filename", "model_warmup",
        "parameters", "sequence_batching",
    ]
)  # fmt: skip
json_configs = st.dictionaries(config_keys, json_values, max_size=4).map(json.dumps)


@FUZZ
@given(
    text=json_configs
    | mutated_text('{"max_batch_size": 8, "input": [{"name": "INPUT0", "dims": [16]}]}', ["{"])
    | st.text(max_size=60)
)
@example(text='{"input": [{"name": "INPUT0", "data_type": 99}]}')
@example(text="[" * 100_000)
def test_config_json(text: str) -> None:
    check_config(text, is_json=True)


# --- the coverage-guided harness ----------------------------------------------------------------


def test_atheris_harness_smoke(model_repository: Path, tmp_path: Path) -> None:
    """bench/fuzz_atheris.py starts its server, fuzzes 200 inputs and finds nothing.

    atheris is not a dev dependency (no wheel on some platforms): ``make fuzz``
    installs it, and this runs wherever it is installed.
    """
    pytest.importorskip("atheris")
    harness = ROOT / "bench" / "fuzz_atheris.py"
    command = [sys.executable, str(harness), "--repository", str(model_repository)]
    command += ["--corpus", str(tmp_path / "corpus"), f"-artifact_prefix={tmp_path}/"]
    command += ["-runs=200", "-seed=1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "fuzzing verdict: PASS" in done.stdout
    assert not list(tmp_path.glob("crash-*"))
