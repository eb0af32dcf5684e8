"""Ensembles: Triton's ensemble_scheduling over ONNX models in the same repository.

A real server over the ``digits`` pipeline (preprocess -> classifier), plus
ensembles built to fail in each way a configuration can, talked to with
tritonclient; the step planner is property-tested.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tc
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st
from support import ServerProcess, launch_server
from tritonclient.utils import InferenceServerException

from lockgate.ensemble import plan_steps
from lockgate.errors import ModelLoadError
from lockgate_client._proto import model_config_pb2 as mc
from models.build import CONFIG_HEADER, build_digits, build_gather_fail

Array = npt.NDArray[Any]
StartServer = Callable[..., ServerProcess]


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'{{ model_name: "{model}" model_version: -1{maps} }}'


def _ensemble(
    repo: Path,
    name: str,
    inputs: list[tuple[str, str, int]],
    outputs: list[tuple[str, str, int]],
    steps: list[str],
    max_batch_size: int = 16,
) -> None:
    def tensors(kind: str, items: list[tuple[str, str, int]]) -> str:
        body = ", ".join(f'{{ name: "{n}" data_type: {t} dims: [ {d} ] }}' for n, t, d in items)
        return f"{kind} [ {body} ]\n"

    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(
        CONFIG_HEADER
        + f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
        + tensors("input", inputs)
        + tensors("output", outputs)
        + "ensemble_scheduling { step [ "
        + ", ".join(steps)
        + " ] }\n"
    )


PIXELS = ("PIXELS", "TYPE_UINT8", 64)
PROBS = ("PROBS", "TYPE_FP32", 10)
PRE = _step("digits_preprocess", {"PIXELS": "PIXELS"}, {"SCALED": "scaled"})


def build_ensemble_repository(repo: Path) -> None:
    build_digits(repo)
    build_gather_fail(repo)
    # A copy of the classifier whose batcher waits for a second request, so a
    # step and a direct request deterministically share one execution.
    shutil.copytree(repo / "digits_classifier", repo / "waiting_classifier")
    config = repo / "waiting_classifier" / "config.pbtxt"
    config.write_text(
        config.read_text()
        .replace('name: "digits_classifier"', 'name: "waiting_classifier"')
        .replace(
            "dynamic_batching { }",
            "dynamic_batching { preferred_batch_size: [ 2 ] "
            "max_queue_delay_microseconds: 30000000 }",
        )
    )
    classify = {"SCALED": "scaled"}, {"PROBS": "PROBS"}
    _ensemble(repo, "waiting", [PIXELS], [PROBS], [PRE, _step("waiting_classifier", *classify)])
    # The same tensor read by two steps that run side by side.
    _ensemble(
        repo,
        "fork",
        [PIXELS],
        [PROBS, ("SCALED_COPY", "TYPE_FP32", 64)],
        [
            PRE,
            _step("digits_classifier", {"SCALED": "scaled"}, {"PROBS": "PROBS"}),
            _step("digits_preprocess", {"PIXELS": "PIXELS"}, {"SCALED": "SCALED_COPY"}),
        ],
    )
    _ensemble(
        repo,
        "gather_pipeline",
        [("INPUT", "TYPE_FP32", 4), ("INDEX", "TYPE_INT64", 1)],
        [("OUTPUT", "TYPE_FP32", 1)],
        [_step("gather_fail", {"INPUT": "INPUT", "INDEX": "INDEX"}, {"OUTPUT": "OUTPUT"})],
        max_batch_size=8,
    )
    # Refused at load, each for one reason.
    _ensemble(
        repo,
        "bad_cycle",
        [PIXELS],
        [PROBS],
        [
            _step("digits_preprocess", {"PIXELS": "a"}, {"SCALED": "b"}),
            _step("digits_classifier", {"SCALED": "b"}, {"PROBS": "a"}),
            _step("digits_classifier", {"SCALED": "b"}, {"PROBS": "PROBS"}),
        ],
    )
    _ensemble(
        repo,
        "bad_missing_model",
        [PIXELS],
        [PROBS],
        [PRE, _step("no_such_model", {"SCALED": "scaled"}, {"PROBS": "PROBS"})],
    )
    _ensemble(
        repo,
        "bad_missing_tensor",
        [PIXELS],
        [PROBS],
        [_step("digits_classifier", {"SCALED": "nowhere"}, {"PROBS": "PROBS"})],
    )
    _ensemble(repo, "bad_no_output", [PIXELS], [PROBS], [PRE])
    _ensemble(
        repo,
        "bad_input_name",
        [PIXELS],
        [PROBS],
        [PRE, _step("digits_classifier", {"IMAGE": "scaled"}, {"PROBS": "PROBS"})],
    )
    _ensemble(
        repo,
        "bad_datatype",
        [("PIXELS", "TYPE_FP32", 64)],
        [PROBS],
        [_step("digits_preprocess", {"PIXELS": "PIXELS"}, {"SCALED": "PROBS"})],
    )


@pytest.fixture(scope="module")
def ensemble_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("ensemble-repo")
    build_ensemble_repository(repo)
    return repo


@pytest.fixture(scope="module")
def ensemble_server(
    ensemble_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = launch_server(ensemble_repo, tmp_path_factory.mktemp("ensemble-logs"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(ensemble_server: ServerProcess) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(ensemble_server.url) as triton:
        yield triton


def _pixels(rows: int, seed: int = 0) -> Array:
    return np.random.default_rng(seed).integers(0, 256, (rows, 64), dtype=np.uint8)


def _infer(
    client: tc.InferenceServerClient,
    model: str,
    arrays: dict[str, Array],
    datatypes: dict[str, str],
) -> tc.InferResult:
    inputs = []
    for name, array in arrays.items():
        tensor = tc.InferInput(name, list(array.shape), datatypes[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs)


def _out(result: tc.InferResult, name: str) -> Array:
    value: Array | None = result.as_numpy(name)
    assert value is not None
    return value


def _stats(client: tc.InferenceServerClient, model: str) -> Any:
    return client.get_inference_statistics(model).model_stats[0]


def test_ensemble_equals_the_two_calls(client: tc.InferenceServerClient) -> None:
    pixels = _pixels(3)
    whole = _infer(client, "digits", {"PIXELS": pixels}, {"PIXELS": "UINT8"})
    scaled = _out(
        _infer(client, "digits_preprocess", {"PIXELS": pixels}, {"PIXELS": "UINT8"}), "SCALED"
    )
    direct = _infer(client, "digits_classifier", {"SCALED": scaled}, {"SCALED": "FP32"})
    assert _out(whole, "PROBS").tobytes() == _out(direct, "PROBS").tobytes()
    label = _out(whole, "LABEL")
    assert label.shape == (3, 1) and label.dtype == np.int64
    np.testing.assert_array_equal(label, _out(direct, "LABEL"))
    np.testing.assert_array_equal(label[:, 0], _out(whole, "PROBS").argmax(axis=1))


def test_metadata_and_config(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("digits")
    assert meta.platform == "ensemble"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("PIXELS", "UINT8", [-1, 64])
    ]
    assert [t.name for t in meta.outputs] == ["PROBS", "LABEL"]
    config = client.get_model_config("digits").config
    assert config.platform == "ensemble"
    assert [s.model_name for s in config.ensemble_scheduling.step] == [
        "digits_preprocess",
        "digits_classifier",
    ]


def test_statistics_of_the_ensemble_and_its_steps(client: tc.InferenceServerClient) -> None:
    before = {m: _stats(client, m) for m in ("digits", "digits_preprocess", "digits_classifier")}
    for seed in range(3):
        _infer(client, "digits", {"PIXELS": _pixels(2, seed)}, {"PIXELS": "UINT8"})
    after = {m: _stats(client, m) for m in before}
    ens, ens0 = after["digits"], before["digits"]
    assert ens.inference_stats.success.count - ens0.inference_stats.success.count == 3
    assert ens.inference_count - ens0.inference_count == 6
    # Each step is a request to its model, counted there as Triton counts it.
    for step in ("digits_preprocess", "digits_classifier"):
        assert after[step].inference_count - before[step].inference_count == 6
        assert (
            after[step].inference_stats.success.count - before[step].inference_stats.success.count
            == 3
        )
    # The ensemble's compute time is its steps' time, summed.
    assert ens.inference_stats.compute_infer.ns > ens0.inference_stats.compute_infer.ns


def test_steps_batch_with_other_traffic_to_the_model(
    ensemble_server: ServerProcess, client: tc.InferenceServerClient
) -> None:
    scaled = _out(
        _infer(client, "digits_preprocess", {"PIXELS": _pixels(1, 7)}, {"PIXELS": "UINT8"}),
        "SCALED",
    )

    def direct() -> None:
        with tc.InferenceServerClient(ensemble_server.url) as own:
            _infer(own, "waiting_classifier", {"SCALED": scaled}, {"SCALED": "FP32"})

    def through_ensemble() -> None:
        with tc.InferenceServerClient(ensemble_server.url) as own:
            _infer(own, "waiting", {"PIXELS": _pixels(1, 8)}, {"PIXELS": "UINT8"})

    # The classifier waits (30 s at most) for a batch of two: it can only get
    # one from the direct request and the ensemble's step together.
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(direct), pool.submit(through_ensemble)]:
            future.result(timeout=60)
    stats = _stats(client, "waiting_classifier")
    assert stats.execution_count == 1
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(2, 1)]


def test_steps_that_share_an_input_run_side_by_side(client: tc.InferenceServerClient) -> None:
    pixels = _pixels(2, 3)
    result = _infer(client, "fork", {"PIXELS": pixels}, {"PIXELS": "UINT8"})
    direct = _out(
        _infer(client, "digits_preprocess", {"PIXELS": pixels}, {"PIXELS": "UINT8"}), "SCALED"
    )
    assert _out(result, "SCALED_COPY").tobytes() == direct.tobytes()
    assert _out(result, "PROBS").shape == (2, 10)


def test_a_failing_step_is_named(client: tc.InferenceServerClient) -> None:
    arrays: dict[str, Array] = {
        "INPUT": np.ones((1, 4), np.float32),
        "INDEX": np.array([[9]], np.int64),
    }
    datatypes = {"INPUT": "FP32", "INDEX": "INT64"}
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "gather_pipeline", arrays, datatypes)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "ensemble 'gather_pipeline' step 1 (model 'gather_fail')" in str(info.value.message())
    arrays["INDEX"] = np.array([[2]], np.int64)
    out = _out(_infer(client, "gather_pipeline", arrays, datatypes), "OUTPUT")
    assert out.tolist() == [[1.0]]
    fail = _stats(client, "gather_pipeline").inference_stats.fail.count
    assert fail >= 1


def test_a_bad_request_to_the_ensemble_is_refused_before_any_step(
    client: tc.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "digits", {"PIXELS": np.zeros((1, 63), np.uint8)}, {"PIXELS": "UINT8"})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "PIXELS" in str(info.value.message())


@pytest.mark.parametrize(
    ("model", "fragments"),
    [
        ("bad_cycle", ["has a cycle", "step 1 (model 'digits_preprocess')"]),
        ("bad_missing_model", ["step 2 (model 'no_such_model')", "unknown model"]),
        ("bad_missing_tensor", ["reads 'nowhere'", "neither an ensemble input"]),
        ("bad_no_output", ["output 'PROBS' is not written by any step"]),
        ("bad_input_name", ["input_map names 'IMAGE'", "SCALED"]),
        ("bad_datatype", ["TYPE_FP32", "TYPE_UINT8", "PIXELS"]),
    ],
)
def test_bad_ensembles_are_refused_at_load(
    client: tc.InferenceServerClient, model: str, fragments: list[str]
) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index[model].state == "UNAVAILABLE"
    for fragment in fragments:
        assert fragment in index[model].reason, index[model].reason
    assert index["digits"].state == "READY"


def test_explicit_mode_loads_steps_first_and_follows_them(
    ensemble_repo: Path, start_server: StartServer
) -> None:
    proc = start_server(ensemble_repo, "--model-control-mode", "explicit")
    with tc.InferenceServerClient(proc.url) as client:
        client.load_model("digits")
        for model in ("digits", "digits_preprocess", "digits_classifier"):
            assert client.is_model_ready(model), model
        _infer(client, "digits", {"PIXELS": _pixels(1)}, {"PIXELS": "UINT8"})
        # Without a composing model the ensemble cannot serve: it goes too.
        client.unload_model("digits_classifier")
        assert not client.is_model_ready("digits")
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert "composing model 'digits_classifier' was unloaded" in index["digits"].reason
        with pytest.raises(InferenceServerException) as info:
            _infer(client, "digits", {"PIXELS": _pixels(1)}, {"PIXELS": "UINT8"})
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        # Back with its step.
        client.load_model("digits_classifier")
        assert client.is_model_ready("digits")
        _infer(client, "digits", {"PIXELS": _pixels(1)}, {"PIXELS": "UINT8"})
        # Triton's unload_dependents: the composing models go with the ensemble.
        client.unload_model("digits", unload_dependents=True)
        for model in ("digits", "digits_preprocess", "digits_classifier"):
            assert not client.is_model_ready(model), model


# --- the planner -------------------------------------------------------------------------


def _config(steps: list[tuple[list[str], list[str]]], outputs: list[str]) -> mc.ModelConfig:
    text = 'name: "e" platform: "ensemble" input { name: "IN" data_type: TYPE_FP32 dims: 1 }\n'
    text += "".join(f'output {{ name: "{o}" data_type: TYPE_FP32 dims: 1 }}\n' for o in outputs)
    body = []
    for i, (reads, writes) in enumerate(steps):
        maps = "".join(f'input_map {{ key: "i{j}" value: "{t}" }}' for j, t in enumerate(reads))
        maps += "".join(f'output_map {{ key: "o{j}" value: "{t}" }}' for j, t in enumerate(writes))
        body.append(f'step {{ model_name: "m{i}" {maps} }}')
    config = mc.ModelConfig()
    text_format.Parse(text + "ensemble_scheduling { " + " ".join(body) + " }", config)
    return config


@st.composite
def dags(draw: st.DrawFn) -> list[tuple[list[str], list[str]]]:
    """Steps where step i writes t{i} and reads IN or tensors of earlier steps, shuffled."""
    count = draw(st.integers(1, 6))
    steps = []
    for i in range(count):
        earlier = ["IN"] + [f"t{j}" for j in range(i)]
        reads = draw(st.lists(st.sampled_from(earlier), min_size=1, max_size=3, unique=True))
        steps.append((reads, [f"t{i}"]))
    return draw(st.permutations(steps))


@settings(deadline=None)
@given(dags())
def test_plans_put_every_step_after_what_it_reads(
    steps: list[tuple[list[str], list[str]]],
) -> None:
    config = _config(steps, [steps[0][1][0]])
    available = {"IN"}
    for step in plan_steps(config):
        assert step.reads <= available
        available.update(t for _, t in step.outputs)


@settings(deadline=None)
@given(dags())
def test_a_back_edge_is_a_cycle(steps: list[tuple[list[str], list[str]]]) -> None:
    ordered = sorted(steps, key=lambda s: int(s[1][0][1:]))
    # The first step also reads what the last one writes, and the last what
    # the first writes: the two wait for each other.
    first_reads, first_writes = ordered[0]
    last_reads, last_writes = ordered[-1]
    ordered[0] = ([*first_reads, last_writes[0]], first_writes)
    if len(ordered) > 1:
        ordered[-1] = (list(dict.fromkeys([*last_reads, first_writes[0]])), last_writes)
    with pytest.raises(ModelLoadError, match="cycle"):
        plan_steps(_config(ordered, [ordered[-1][1][0]]))
