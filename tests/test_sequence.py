"""The sequence batcher: what NVIDIA's sequence example clients do, against an
ONNX accumulator with implicit state, plus controls, string IDs and errors.

``simple_grpc_sequence_sync_infer_client.py`` interleaves two sequences over
unary calls; ``simple_grpc_sequence_stream_infer_client.py`` does the same
over one ModelStreamInfer stream. Both send the values below, flag the first
request ``sequence_start`` and the last ``sequence_end``, and expect the
running sum back from each request.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tc
from support import ServerProcess, launch_server
from tritonclient.utils import InferenceServerException

from models.build import (
    ACCUMULATOR_CONTROLS,
    accumulator_config,
    accumulator_onnx,
    build_accumulator,
    write_model,
)

Array = npt.NDArray[Any]
StartServer = Callable[..., ServerProcess]

#: The values NVIDIA's sequence examples send: one sequence adds them, the other
#: their negatives.
VALUES = [11, 7, 5, 3, 2, 0, 1]
CORRID_CONTROL = (
    ',\n    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: %s } ] }'
)


def _corrid_onnx(name: str, corrid_type: str) -> bytes:
    """The accumulator with a CORRID input echoed as a second output (ECHO)."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(accumulator_onnx(name))
    onnx_type = {"TYPE_UINT64": onnx.TensorProto.UINT64, "TYPE_STRING": onnx.TensorProto.STRING}
    elem = onnx_type[corrid_type]
    model.graph.input.append(helper.make_tensor_value_info("CORRID", elem, ["batch", 1]))
    model.graph.output.append(helper.make_tensor_value_info("ECHO", elem, ["batch", 1]))
    model.graph.node.append(helper.make_node("Identity", ["CORRID"], ["ECHO"]))
    data: bytes = model.SerializeToString()
    return data


def build_sequence_repository(repo: Path) -> None:
    build_accumulator(repo)
    write_model(
        repo,
        "accumulator_oldest",
        accumulator_config(
            "accumulator_oldest",
            strategy="oldest { max_candidate_sequences: 4 max_queue_delay_microseconds: 1000 }",
        ),
        {1: accumulator_onnx("accumulator_oldest")},
    )
    write_model(
        repo,
        "accumulator_short",
        accumulator_config("accumulator_short", idle_us=200_000),
        {1: accumulator_onnx("accumulator_short")},
    )
    for name, corrid_type in (("corrid_int", "TYPE_UINT64"), ("corrid_string", "TYPE_STRING")):
        config = accumulator_config(
            name, controls=ACCUMULATOR_CONTROLS + CORRID_CONTROL % corrid_type
        )
        config = config.replace(
            'output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]',
            'output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] }, '
            f'{{ name: "ECHO" data_type: {corrid_type} dims: [ 1 ] }} ]',
        )
        write_model(repo, name, config, {1: _corrid_onnx(name, corrid_type)})
    # Refused at load: the state names a tensor the ONNX model does not have.
    bad = accumulator_config("bad_state").replace('input_name: "ACC_IN"', 'input_name: "MEMORY"')
    write_model(repo, "bad_state", bad, {1: accumulator_onnx("bad_state")})
    bad = accumulator_config("bad_control").replace('name: "READY"', 'name: "IS_READY"')
    write_model(repo, "bad_control", bad, {1: accumulator_onnx("bad_control")})


@pytest.fixture(scope="module")
def sequence_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("sequence-repo")
    build_sequence_repository(repo)
    proc = launch_server(repo, tmp_path_factory.mktemp("sequence-logs"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(sequence_server: ServerProcess) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(sequence_server.url) as triton:
        yield triton


def _input(value: int) -> list[tc.InferInput]:
    tensor = tc.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [tensor]


def _send(
    client: tc.InferenceServerClient,
    model: str,
    sequence_id: int | str,
    value: int,
    start: bool = False,
    end: bool = False,
) -> tc.InferResult:
    return client.infer(
        model,
        _input(value),
        sequence_id=sequence_id,
        sequence_start=start,
        sequence_end=end,
    )


def _value(result: tc.InferResult, name: str = "OUTPUT") -> Any:
    out: Array | None = result.as_numpy(name)
    assert out is not None and out.shape == (1, 1)
    return out[0, 0]


def _expected(values: list[int]) -> list[int]:
    return [int(v) for v in np.cumsum(values)]


@pytest.mark.parametrize("model", ["accumulator", "accumulator_oldest"])
@pytest.mark.parametrize("ids", [(1000, 1001), ("seq-a", "seq-b")])
def test_sync_client_interleaves_two_sequences(
    client: tc.InferenceServerClient, model: str, ids: tuple[int | str, int | str]
) -> None:
    """simple_grpc_sequence_sync_infer_client.py, with integer and string IDs."""
    first, second = ids
    results: tuple[list[int], list[int]] = ([], [])
    last = len(VALUES) - 1
    for i, value in enumerate(VALUES):
        for sequence_id, sign, out in ((first, 1, results[0]), (second, -1, results[1])):
            result = _send(client, model, sequence_id, sign * value, start=i == 0, end=i == last)
            out.append(int(_value(result)))
    assert results[0] == _expected(VALUES)
    assert results[1] == _expected([-v for v in VALUES])


def test_stream_client_interleaves_two_sequences(sequence_server: ServerProcess) -> None:
    """simple_grpc_sequence_stream_infer_client.py: both sequences over one stream."""
    replies: queue.Queue[tuple[tc.InferResult | None, Any]] = queue.Queue()

    def callback(result: tc.InferResult | None, error: Any) -> None:
        replies.put((result, error))

    with tc.InferenceServerClient(sequence_server.url) as client:
        client.start_stream(callback=partial(callback))
        last = len(VALUES) - 1
        sent = 0
        for i, value in enumerate(VALUES):
            for sequence_id, sign in ((2000, 1), ("stream-b", -1)):
                client.async_stream_infer(
                    "accumulator",
                    _input(sign * value),
                    request_id=f"{sequence_id}:{i}",
                    sequence_id=sequence_id,
                    sequence_start=i == 0,
                    sequence_end=i == last,
                )
                sent += 1
        got: dict[str, list[tuple[int, int]]] = {"2000": [], "stream-b": []}
        for _ in range(sent):
            result, error = replies.get(timeout=60)
            assert error is None, error
            assert result is not None
            request_id = result.get_response().id
            sequence_id, index = request_id.split(":")
            got[sequence_id].append((int(index), int(_value(result))))
        client.stop_stream()
    assert [v for _, v in sorted(got["2000"])] == _expected(VALUES)
    assert [v for _, v in sorted(got["stream-b"])] == _expected([-v for v in VALUES])


def test_our_sdk_sends_sequences_as_parameters(sequence_server: ServerProcess) -> None:
    from lockgate_client import Client

    with Client(sequence_server.url) as sdk:
        sums = []
        last = len(VALUES) - 1
        for i, value in enumerate(VALUES):
            flags = {"sequence_start": i == 0, "sequence_end": i == last}
            outputs = sdk.infer(
                "accumulator",
                {"INPUT": np.array([[value]], dtype=np.int32)},
                parameters={"sequence_id": "sdk-1", **flags},
            )
            sums.append(int(outputs["OUTPUT"][0, 0]))
    assert sums == _expected(VALUES)


def test_a_new_start_resets_the_state(client: tc.InferenceServerClient) -> None:
    _send(client, "accumulator", 3000, 5, start=True)
    assert _value(_send(client, "accumulator", 3000, 5)) == 10
    assert _value(_send(client, "accumulator", 3000, 1, start=True)) == 1
    assert _value(_send(client, "accumulator", 3000, 1, end=True)) == 2


def test_correlation_ids_reach_the_model(client: tc.InferenceServerClient) -> None:
    result = _send(client, "corrid_int", 2**40 + 5, 1, start=True, end=True)
    assert _value(result, "ECHO") == 2**40 + 5
    result = _send(client, "corrid_string", "user-42", 1, start=True, end=True)
    assert _value(result, "ECHO") == b"user-42"
    assert _value(result) == 1
    with pytest.raises(InferenceServerException) as info:
        _send(client, "corrid_int", "not-a-number", 1, start=True, end=True)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "integer correlation IDs" in str(info.value.message())


def test_state_outputs_stay_on_the_server(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("accumulator")
    assert [t.name for t in meta.inputs] == ["INPUT"]
    assert [t.name for t in meta.outputs] == ["OUTPUT"]
    result = _send(client, "accumulator", 3100, 4, start=True, end=True)
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT"]


def test_requests_without_a_correlation_id_are_refused(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("accumulator", _input(1))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "correlation ID" in str(info.value.message())


def test_a_sequence_must_start(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        _send(client, "accumulator", 4000, 1)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "START flag" in str(info.value.message())
    # An ended sequence is gone too.
    _send(client, "accumulator", 4001, 1, start=True, end=True)
    with pytest.raises(InferenceServerException) as info:
        _send(client, "accumulator", 4001, 1)
    assert "START flag" in str(info.value.message())


def test_an_idle_sequence_times_out(client: tc.InferenceServerClient) -> None:
    _send(client, "accumulator_short", 5000, 1, start=True)
    # max_sequence_idle_microseconds is 0.2 s for this model.
    time.sleep(1.0)
    with pytest.raises(InferenceServerException) as info:
        _send(client, "accumulator_short", 5000, 1)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "timed out" in str(info.value.message())
    assert _value(_send(client, "accumulator_short", 5000, 3, start=True, end=True)) == 3


def test_many_sequences_at_once_keep_their_own_state(sequence_server: ServerProcess) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def run(sequence_id: int) -> list[int]:
        with tc.InferenceServerClient(sequence_server.url) as own:
            last = len(VALUES) - 1
            return [
                int(
                    _value(
                        _send(own, "accumulator", sequence_id, sequence_id * v, i == 0, i == last)
                    )
                )
                for i, v in enumerate(VALUES)
            ]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(1, 9)))
    for sequence_id, result in enumerate(results, start=1):
        assert result == _expected([sequence_id * v for v in VALUES])


def test_bad_sequence_configs_are_refused_at_load(client: tc.InferenceServerClient) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["bad_state"].state == "UNAVAILABLE"
    assert "state 'MEMORY' input 'MEMORY' is not an input of the ONNX model" in (
        index["bad_state"].reason
    )
    assert index["bad_control"].state == "UNAVAILABLE"
    assert "control input 'IS_READY'" in index["bad_control"].reason
    assert index["accumulator"].state == "READY"


def test_sequences_and_ensembles_across_front_ends(
    tmp_path: Path, start_server: StartServer
) -> None:
    """With --frontends 2 the state lives in the engine: each request of a
    sequence may reach any front end, and ensembles run their steps there too."""
    from models.build import build_digits

    build_accumulator(tmp_path)
    build_digits(tmp_path)
    proc = start_server(tmp_path, "--frontends", "2")
    clients = [tc.InferenceServerClient(proc.url) for _ in range(3)]
    try:
        last = len(VALUES) - 1
        sums = [
            int(_value(_send(clients[i % 3], "accumulator", 7000, v, i == 0, i == last)))
            for i, v in enumerate(VALUES)
        ]
        assert sums == _expected(VALUES)
        pixels = tc.InferInput("PIXELS", [2, 64], "UINT8")
        pixels.set_data_from_numpy(np.arange(128, dtype=np.uint8).reshape(2, 64))
        label = clients[0].infer("digits", [pixels]).as_numpy("LABEL")
        assert label is not None and label.shape == (2, 1)
    finally:
        for client in clients:
            client.close()
