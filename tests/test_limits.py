"""Limits that protect the server's memory, and safe RepositoryModelLoad files.

A private server runs with small limits (1 MiB messages, 4096 elements per
tensor, 64-byte BYTES elements, 2 streams per connection) so each limit can be
crossed cheaply. Declared shapes that imply more memory than the payload
holds must be refused before anything is allocated: checked in-process with
tracemalloc, which sees numpy's allocations.
"""

from __future__ import annotations

import json
import queue
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from support import SERVICE, ServerProcess, launch_server, rpc

from lockgate import uploads
from lockgate.cli import build_parser, config_from_args
from lockgate.codec import Limits, TensorSpec, decode_request
from lockgate.config import MAX_MESSAGE_BYTES, ServerConfig
from lockgate.errors import InvalidInputError, LockgateError, ModelLoadError
from lockgate.repository import ModelSource
from lockgate.uploads import write_model_files
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import model_config_pb2 as mc
from lockgate_client.datatypes import BytesFormatError, deserialize_bytes
from models.build import build_identity, build_simple

Tensor = pb.ModelInferRequest.InferInputTensor
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MESSAGE_LIMIT = 2**20
ELEMENT_LIMIT = 4096
BYTES_ELEMENT_LIMIT = 64
#: A refusal may allocate this much, not what the declared shape implies.
ALLOCATION_BUDGET = 2**20


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's TMPDIR: where RepositoryModelLoad writes uploaded files."""
    return tmp_path_factory.mktemp("server-tmp")


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, scratch: Path) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("limits-repo")
    build_simple(repo)
    build_identity(repo, "identity_string", "TYPE_STRING")
    build_identity(repo, "identity_fp32", "TYPE_FP32")
    proc = launch_server(
        repo,
        tmp_path_factory.mktemp("limits-logs"),
        *("--max-message-bytes", str(MESSAGE_LIMIT)),
        *("--max-tensor-elements", str(ELEMENT_LIMIT)),
        *("--max-bytes-element", str(BYTES_ELEMENT_LIMIT)),
        *("--max-concurrent-streams", "2"),
        *("--model-control-mode", "explicit", "--load-model", "*"),
        env={"TMPDIR": str(scratch)},
    )
    yield proc
    proc.stop()


@pytest.fixture
def channel(limited: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(limited.url) as ch:
        yield ch


def call(channel: grpc.Channel, method: str, request: Any, response: Any) -> Any:
    return rpc(channel, method, request, response, timeout=60)


def infer(channel: grpc.Channel, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return call(channel, "ModelInfer", request, pb.ModelInferResponse)  # type: ignore[no-any-return]


def refused(action: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        action()
    error: Any = info.value
    return error.code(), error.details() or ""


def identity(datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    model = "identity_string" if datatype == "BYTES" else "identity_fp32"
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[Tensor(name="INPUT0", datatype=datatype, shape=shape)],
        raw_input_contents=[raw],
    )


def strings(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def assert_serving(channel: grpc.Channel) -> None:
    data = np.arange(8, dtype=np.float32).reshape(1, 8)
    reply = infer(channel, identity("FP32", [1, 8], data.tobytes()))
    assert reply.raw_output_contents[0] == data.tobytes()


# --- defaults and flags -----------------------------------------------------------------------


def test_defaults_are_bounded() -> None:
    config = ServerConfig()
    assert config.max_message_bytes <= 256 * 2**20 < MAX_MESSAGE_BYTES
    assert config.max_tensor_elements <= 2**28
    assert config.max_bytes_element <= config.max_message_bytes
    assert 100 <= config.max_concurrent_streams <= 1024
    assert config.model_control_mode == "none"
    assert config.host == "127.0.0.1"
    assert config.tls_cert is None and config.auth_token_file is None


def test_limit_flags_reach_the_config() -> None:
    args = build_parser().parse_args(
        [
            *("serve", "--model-repository", "repo"),
            *("--max-message-bytes", "1000", "--max-tensor-elements", "10"),
            *("--max-bytes-element", "5", "--max-concurrent-streams", "3"),
        ]
    )
    config = config_from_args(args)
    assert (
        config.max_message_bytes,
        config.max_tensor_elements,
        config.max_bytes_element,
        config.max_concurrent_streams,
    ) == (1000, 10, 5, 3)


# --- limits, end to end ------------------------------------------------------------------------


def test_message_size_limit(channel: grpc.Channel) -> None:
    size = MESSAGE_LIMIT // 4 + 16  # over the limit once serialized
    request = identity("FP32", [1, size], bytes(size * 4))
    code, _ = refused(lambda: infer(channel, request))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serving(channel)


def test_tensor_element_limit(channel: grpc.Channel) -> None:
    fits = ELEMENT_LIMIT
    assert len(infer(channel, identity("FP32", [1, fits], bytes(fits * 4))).outputs) == 1
    for shape in ([1, ELEMENT_LIMIT + 1], [1, 2**40], [8, 2**61]):
        request = identity("FP32", shape, bytes(4 * (ELEMENT_LIMIT + 1)))
        code, details = refused(lambda r=request: infer(channel, r))  # type: ignore[misc]
        assert code == INVALID, shape
        assert f"limit of {ELEMENT_LIMIT}" in details
    assert_serving(channel)


def test_bytes_element_limit(channel: grpc.Channel) -> None:
    longest = b"x" * BYTES_ELEMENT_LIMIT
    reply = infer(channel, identity("BYTES", [1, 2], strings(longest, b"ok")))
    assert reply.raw_output_contents[0] == strings(longest, b"ok")
    too_long = b"y" * (BYTES_ELEMENT_LIMIT + 1)
    code, details = refused(lambda: infer(channel, identity("BYTES", [1, 1], strings(too_long))))
    assert code == INVALID
    assert f"limit of {BYTES_ELEMENT_LIMIT}" in details
    # The same limit for typed contents.
    typed = pb.ModelInferRequest(
        model_name="identity_string",
        inputs=[
            Tensor(
                name="INPUT0",
                datatype="BYTES",
                shape=[1, 1],
                contents=pb.InferTensorContents(bytes_contents=[too_long]),
            )
        ],
    )
    code, details = refused(lambda: infer(channel, typed))
    assert code == INVALID
    assert f"limit of {BYTES_ELEMENT_LIMIT}" in details
    assert_serving(channel)


def test_shapes_larger_than_their_payload(channel: grpc.Channel) -> None:
    cases = [
        identity("BYTES", [1, ELEMENT_LIMIT], strings(b"a", b"b")),
        identity("BYTES", [1, 3], strings(b"a")),
        identity("FP32", [1, ELEMENT_LIMIT], bytes(4)),
        identity("FP32", [1, 3], bytes(8)),
        pb.ModelInferRequest(
            model_name="identity_fp32",
            inputs=[
                Tensor(
                    name="INPUT0",
                    datatype="FP32",
                    shape=[1, ELEMENT_LIMIT],
                    contents=pb.InferTensorContents(fp32_contents=[1.0]),
                )
            ],
        ),
    ]
    for request in cases:
        code, details = refused(lambda r=request: infer(channel, r))  # type: ignore[misc]
        assert code == INVALID
        assert "INPUT0" in details
    assert_serving(channel)


def test_concurrent_streams_per_connection(channel: grpc.Channel, limited: ServerProcess) -> None:
    """The third concurrent RPC on one connection waits until one of two streams ends."""
    feeds: list[queue.Queue[bytes | None]] = [queue.Queue(), queue.Queue()]

    def feed(q: queue.Queue[bytes | None]) -> Iterator[bytes]:
        while (item := q.get()) is not None:
            yield item

    stream = channel.stream_stream(SERVICE + "ModelStreamInfer", None, None)
    good = identity("FP32", [1, 2], bytes(8)).SerializeToString()
    calls = [stream(feed(q), timeout=120) for q in feeds]
    try:
        for q, open_call in zip(feeds, calls, strict=True):
            q.put(good)
            answer = pb.ModelStreamInferResponse.FromString(next(iter(open_call)))
            assert not answer.error_message  # both streams are open on the server
        # A third RPC on the same connection is held back by the client's
        # HTTP/2 stream limit: it cannot even start while both streams are open.
        code, _ = refused(
            lambda: channel.unary_unary(SERVICE + "ServerLive", None, None)(
                pb.ServerLiveRequest().SerializeToString(), timeout=1.0
            )
        )
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        # Another connection is not affected.
        fresh = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(limited.url, options=fresh) as other:
            assert_serving(other)
        waiting = channel.unary_unary(SERVICE + "ServerLive", None, None).future(
            pb.ServerLiveRequest().SerializeToString(), timeout=60
        )
        feeds[0].put(None)
        assert list(calls[0]) == []
        assert pb.ServerLiveResponse.FromString(waiting.result()).live
    finally:
        for q in feeds:
            q.put(None)
        for open_call in calls:
            open_call.cancel()  # type: ignore[no-untyped-call]


# --- what a declared shape may cost: nothing, when the payload cannot fill it -----------------


def peak_allocation(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        action()
    except (LockgateError, BytesFormatError):
        pass
    else:
        pytest.fail("the request was accepted")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def decode(datatype: str, shape: list[int], raw: bytes | None, **contents: Any) -> None:
    tensor = Tensor(name="x", datatype=datatype, shape=shape)
    if contents:
        tensor.contents.CopyFrom(pb.InferTensorContents(**contents))
    request = pb.ModelInferRequest(inputs=[tensor], raw_input_contents=[] if raw is None else [raw])
    specs = {"x": TensorSpec("x", datatype, (-1,))}
    # No element limit here: the payload check alone must protect the memory.
    decode_request(request, specs, frozenset(), Limits(max_batch_size=8, max_elements=2**62))


@pytest.mark.parametrize(
    "datatype, raw, contents",
    [
        ("BYTES", strings(b"ab", b"cd"), {}),
        ("BYTES", b"", {}),
        ("FP32", bytes(16), {}),
        ("INT64", bytes(16), {}),
        ("BOOL", bytes(1), {}),
        ("FP32", None, {"fp32_contents": [1.0, 2.0]}),
        ("INT8", None, {"int_contents": [1, 2]}),
        ("BYTES", None, {"bytes_contents": [b"a"]}),
    ],
)
def test_refused_before_allocating(
    datatype: str, raw: bytes | None, contents: dict[str, Any]
) -> None:
    declared = [1, 2**27]  # 1 GiB as object pointers or FP64, 512 MiB as FP32
    peak = peak_allocation(lambda: decode(datatype, declared, raw, **contents))
    assert peak < ALLOCATION_BUDGET


def test_client_bytes_decoder_checks_the_count_first() -> None:
    """A server's response is as untrusted to the SDK as a request is to the server."""
    peak = peak_allocation(lambda: deserialize_bytes(strings(b"a"), 2**27))
    assert peak < ALLOCATION_BUDGET
    with pytest.raises(BytesFormatError):
        deserialize_bytes(b"", -1)
    assert deserialize_bytes(strings(b"a", b""), 2).tolist() == [b"a", b""]


# --- RepositoryModelLoad files --------------------------------------------------------------


def load(channel: grpc.Channel, name: str, files: dict[str, bytes], config: str = "{}") -> None:
    parameters = {"config": pb.ModelRepositoryParameter(string_param=config)}
    for path, content in files.items():
        parameters["file:" + path] = pb.ModelRepositoryParameter(bytes_param=content)
    request = pb.RepositoryModelLoadRequest(model_name=name, parameters=parameters)
    call(channel, "RepositoryModelLoad", request, pb.RepositoryModelLoadResponse)


def everything_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    "name, path",
    [
        ("up", "../escape/model.onnx"),
        ("up", "1/../../escape"),
        ("up", "/tmp/escape"),
        ("up", "//escape"),
        ("up", "..\\escape"),
        ("up", "1/model.onnx\x00.txt"),
        ("up", ""),
        ("up", "."),
        ("up", "x" * 300),
        ("..", "1/model.onnx"),
        ("a/b", "1/model.onnx"),
        ("a\\b", "1/model.onnx"),
    ],
)
def test_load_files_stay_in_the_model_directory(
    channel: grpc.Channel, scratch: Path, name: str, path: str
) -> None:
    before = everything_under(scratch)
    code, _ = refused(lambda: load(channel, name, {path: b"x"}))
    assert code == INVALID
    assert everything_under(scratch) == before  # nothing written, nothing left behind


def test_load_files_that_collide(channel: grpc.Channel, scratch: Path) -> None:
    before = everything_under(scratch)
    for files in (
        {"1": b"a file", "1/model.onnx": b"then a directory of the same name"},
        {"1/model.onnx": b"a", "1/./model.onnx": b"the same file again"},
    ):
        code, details = refused(lambda f=files: load(channel, "up", f))  # type: ignore[misc]
        assert code == INVALID
        assert "cannot write model file" in details
        assert str(scratch) not in details  # the server's paths stay private
    assert everything_under(scratch) == before


def test_oversized_load_is_refused(channel: grpc.Channel, scratch: Path) -> None:
    code, _ = refused(lambda: load(channel, "big", {"1/model.onnx": bytes(MESSAGE_LIMIT)}))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not list(scratch.glob("lockgate-load-*"))
    assert_serving(channel)


def test_model_file_name_cannot_be_a_path(channel: grpc.Channel, limited: ServerProcess) -> None:
    """A config may not point a model at a file outside its own directory."""
    for filename in ("../../simple/1/model.onnx", "/etc/hostname", "1/model.onnx"):
        config = json.dumps({"max_batch_size": 8, "default_model_filename": filename})
        code, details = refused(
            lambda c=config: load(channel, "up", {"1/model.onnx": b"x"}, c)  # type: ignore[misc]
        )
        assert code == INVALID
        assert "must be a file name" in details
        code, _ = refused(
            lambda c=config: call(  # type: ignore[misc]
                channel,
                "RepositoryModelLoad",
                pb.RepositoryModelLoadRequest(
                    model_name="simple",
                    parameters={"config": pb.ModelRepositoryParameter(string_param=c)},
                ),
                pb.RepositoryModelLoadResponse,
            )
        )
        assert code == INVALID
    # simple still serves the version loaded at start.
    a = np.ones((1, 16), dtype=np.int32).tobytes()
    request = pb.ModelInferRequest(
        model_name="simple",
        inputs=[Tensor(name=f"INPUT{i}", datatype="INT32", shape=[1, 16]) for i in range(2)],
        raw_input_contents=[a, a],
    )
    assert len(infer(channel, request).outputs) == 2


def test_uploaded_model_lives_in_its_own_directory(
    channel: grpc.Channel, limited: ServerProcess, scratch: Path
) -> None:
    repo = Path(limited.args[limited.args.index("--model-repository") + 1])
    onnx = (repo / "identity_fp32" / "1" / "model.onnx").read_bytes()
    load(channel, "uploaded", {"1/model.onnx": onnx}, json.dumps({"max_batch_size": 8}))
    written = [p for p in scratch.glob("lockgate-load-*/**/*") if p.is_file()]
    assert [p.relative_to(scratch).parts[1:] for p in written] == [("uploaded", "1", "model.onnx")]
    assert written[0].stat().st_mode & 0o077 == 0  # readable by the server only
    call(
        channel,
        "RepositoryModelUnload",
        pb.RepositoryModelUnloadRequest(model_name="uploaded"),
        pb.RepositoryModelUnloadResponse,
    )
    # Removed with the model; the unload drains first, so allow it a moment.
    deadline = time.monotonic() + 10
    while list(scratch.glob("lockgate-load-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(scratch.glob("lockgate-load-*"))


# --- RepositoryModelLoad files: unit -----------------------------------------------------------


def test_write_model_files_never_follows_a_planted_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "up").mkdir(parents=True)
    (root / "up" / "1").symlink_to(outside)
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **_: str(root))
    with pytest.raises(InvalidInputError):
        write_model_files("up", {"1/model.onnx": b"x"})
    assert not any(outside.iterdir())


def test_write_model_files_total_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "MAX_LOAD_FILE_BYTES", 10)
    with pytest.raises(InvalidInputError) as info:
        write_model_files("up", {"1/model.onnx": b"x" * 6, "1/more": b"y" * 5})
    assert "11 bytes" in info.value.message


def test_model_source_refuses_file_paths(tmp_path: Path) -> None:
    source = ModelSource("m", tmp_path)
    for name in ("../model.onnx", "/abs/model.onnx", "a/b.onnx", "..", "a\\b"):
        config = mc.ModelConfig(default_model_filename=name)
        with pytest.raises(ModelLoadError):
            source.versions(config)
    (tmp_path / "²").mkdir()  # a digit to str.isdigit(), not to int()
    assert source.versions(mc.ModelConfig()) == {}
