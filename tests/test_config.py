"""Unit tests of model configuration: parsing, auto-completion, validation,
version policy. Pure functions, no server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st

from lockgate.cli import build_parser, config_from_args
from lockgate.config import (
    ORT_TO_CONFIG,
    OnnxTensor,
    complete_config,
    parse_config_override,
    parse_model_config,
    read_model_config,
    validate_config,
)
from lockgate.errors import ModelLoadError
from lockgate.repository import select_versions
from lockgate_client._proto import model_config_pb2 as mc

#: A Triton config that uses much of model_config.proto, including fields
#: Lockgate does not act on (accelerators, pinned memory, cache, agents...).
TRITON_CONFIG = """
name: "densenet_onnx"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { specific: { versions: [1, 3] } }
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
  }
]
output [
  {
    name: "fc6_1"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "densenet_labels.txt"
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy {
    timeout_action: DELAY
    default_timeout_microseconds: 1000
    allow_timeout_override: true
    max_queue_size: 16
  }
}
instance_group [ { count: 2, kind: KIND_CPU } ]
optimization {
  graph { level: 1 }
  execution_accelerators {
    cpu_execution_accelerator: [ { name: "openvino" } ]
  }
  input_pinned_memory { enable: true }
  output_pinned_memory { enable: false }
}
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
parameters { key: "custom_key" value: { string_value: "anything" } }
model_warmup [
  {
    name: "zeros"
    batch_size: 1
    inputs {
      key: "data_0"
      value: { data_type: TYPE_FP32, dims: [ 3, 224, 224 ], zero_data: true }
    }
  }
]
response_cache { enable: true }
model_repository_agents {
  agents [ { name: "checksum", parameters { key: "MD5:1/model.onnx", value: "abc" } } ]
}
metric_tags { key: "team" value: "vision" }
"""

DENSENET_INPUTS = [OnnxTensor("data_0", "tensor(float)", (-1, 3, 224, 224))]
DENSENET_OUTPUTS = [OnnxTensor("fc6_1", "tensor(float)", (-1, 1000))]


def complete(
    config: mc.ModelConfig,
    inputs: list[OnnxTensor],
    outputs: list[OnnxTensor],
    name: str = "m",
    default_max_batch_size: int = 4,
) -> mc.ModelConfig:
    complete_config(config, name, inputs, outputs, default_max_batch_size)
    validate_config(config)
    return config


# --- parsing ----------------------------------------------------------------------------


def test_parse_full_triton_config() -> None:
    config = parse_model_config(TRITON_CONFIG, "densenet_onnx/config.pbtxt")
    assert config.name == "densenet_onnx"
    assert config.max_batch_size == 8
    assert list(config.version_policy.specific.versions) == [1, 3]
    assert config.input[0].format == mc.ModelInput.FORMAT_NCHW
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 16
    assert config.optimization.execution_accelerators.cpu_execution_accelerator[0].name == (
        "openvino"
    )
    assert config.parameters["custom_key"].string_value == "anything"
    assert config.model_warmup[0].inputs["data_0"].zero_data
    assert config.response_cache.enable
    assert config.metric_tags["team"] == "vision"


def test_full_triton_config_completes_and_validates() -> None:
    """Fields Lockgate does not implement neither stop a load nor get lost."""
    parsed = parse_model_config(TRITON_CONFIG, "config.pbtxt")
    config = mc.ModelConfig()
    config.CopyFrom(parsed)
    complete(config, DENSENET_INPUTS, DENSENET_OUTPUTS, name="densenet_onnx")
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    assert list(config.input[0].dims) == [3, 224, 224]
    assert config.optimization == parsed.optimization
    assert config.model_warmup == parsed.model_warmup
    assert config.parameters == parsed.parameters
    assert config.version_policy == parsed.version_policy
    assert config.instance_group[0].count == 2


def test_parse_error_names_file_and_line() -> None:
    text = 'name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: "eight"\n'
    with pytest.raises(ModelLoadError) as info:
        parse_model_config(text, "repo/m/config.pbtxt")
    assert "repo/m/config.pbtxt" in info.value.message
    assert "3:" in info.value.message


def test_parse_error_names_unknown_field() -> None:
    with pytest.raises(ModelLoadError) as info:
        parse_model_config('name: "m"\nmax_batch_sise: 4\n', "config.pbtxt")
    assert "max_batch_sise" in info.value.message


def test_read_model_config(tmp_path: Path) -> None:
    assert read_model_config(tmp_path) == mc.ModelConfig()
    (tmp_path / "config.pbtxt").write_text('name: "m"\nmax_batch_size: 2\n')
    assert read_model_config(tmp_path).max_batch_size == 2
    (tmp_path / "config.pbtxt").write_bytes(b'name: "\xff\xfe"\n')
    with pytest.raises(ModelLoadError) as info:
        read_model_config(tmp_path)
    assert "config.pbtxt" in info.value.message


def test_parse_config_override_json() -> None:
    text = json.dumps(
        {
            "max_batch_size": 2,
            "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [8]}],
            "dynamic_batching": {"max_queue_delay_microseconds": 50},
        }
    )
    config = parse_config_override(text, "load of m")
    assert config.max_batch_size == 2
    assert config.input[0].data_type == mc.TYPE_FP32
    assert config.dynamic_batching.max_queue_delay_microseconds == 50
    for bad in ("{not json", '{"max_batch_size": "many"}', '{"no_such_field": 1}'):
        with pytest.raises(ModelLoadError) as info:
            parse_config_override(bad, "load of m")
        assert "load of m" in info.value.message


# --- auto-completion ----------------------------------------------------------------------


def test_autocomplete_batchable_model() -> None:
    inputs = [
        OnnxTensor("x", "tensor(float)", (-1, 8)),
        OnnxTensor("ids", "tensor(int64)", (-1, -1)),
    ]
    outputs = [OnnxTensor("y", "tensor(float16)", (-1, 8, 2))]
    config = complete(mc.ModelConfig(), inputs, outputs, name="auto", default_max_batch_size=6)
    assert config.name == "auto"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 6
    assert config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("x", mc.TYPE_FP32, [8]),
        ("ids", mc.TYPE_INT64, [-1]),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("y", mc.TYPE_FP16, [8, 2])
    ]
    assert [g.count for g in config.instance_group] == [1]
    assert config.version_policy.latest.num_versions == 1


@pytest.mark.parametrize(
    ("first_dim", "default", "max_batch_size", "dynamic"),
    [
        (-1, 0, 0, False),  # batching switched off by --default-max-batch-size 0
        (-1, 1, 1, False),  # a batch of one: nothing to batch dynamically
        (2, 4, 0, False),  # fixed first dimension: not batchable
    ],
)
def test_autocomplete_without_batching(
    first_dim: int, default: int, max_batch_size: int, dynamic: bool
) -> None:
    inputs = [OnnxTensor("x", "tensor(float)", (first_dim, 3))]
    outputs = [OnnxTensor("y", "tensor(float)", (first_dim, 3))]
    config = complete(mc.ModelConfig(), inputs, outputs, default_max_batch_size=default)
    assert config.max_batch_size == max_batch_size
    assert config.HasField("dynamic_batching") == dynamic
    batch_dims = 1 if max_batch_size else 0
    assert list(config.input[0].dims) == [first_dim, 3][batch_dims:]


def test_autocomplete_keeps_what_the_config_says() -> None:
    config = mc.ModelConfig(max_batch_size=2)
    config.input.add(name="x")  # no data_type, no dims: both from the model
    config.output.add(name="y", data_type=mc.TYPE_FP32, dims=[-1])
    inputs = [OnnxTensor("x", "tensor(float)", (-1, 5))]
    outputs = [OnnxTensor("y", "tensor(float)", (-1, 5))]
    complete(config, inputs, outputs, default_max_batch_size=16)
    assert config.max_batch_size == 2
    assert not config.HasField("dynamic_batching")  # an explicit config is obeyed
    assert (config.input[0].data_type, list(config.input[0].dims)) == (mc.TYPE_FP32, [5])
    assert list(config.output[0].dims) == [-1]


def test_zero_instance_count_means_one() -> None:
    config = mc.ModelConfig()
    config.instance_group.add(count=0, kind=mc.ModelInstanceGroup.KIND_CPU)
    tensors = [OnnxTensor("x", "tensor(float)", (-1,))]
    complete(config, tensors, [OnnxTensor("y", "tensor(float)", (-1,))])
    assert config.instance_group[0].count == 1


def _declared(data_type: int = mc.TYPE_FP32, name: str = "x", model: str = "m") -> mc.ModelConfig:
    config = mc.ModelConfig(name=model, max_batch_size=4)
    config.input.add(name=name, data_type=data_type, dims=[3])
    return config


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        pytest.param(
            _declared(mc.TYPE_INT32), ["'x'", "TYPE_INT32", "TYPE_FP32"], id="datatype-mismatch"
        ),
        pytest.param(_declared(name="z"), ["'z'", "['x']"], id="input-not-in-model"),
        pytest.param(_declared(model="other"), ["'other'", "'m'"], id="name-mismatch"),
        pytest.param(
            mc.ModelConfig(platform="tensorrt_plan"),
            ["tensorrt_plan", "onnxruntime_onnx"],
            id="platform",
        ),
        pytest.param(mc.ModelConfig(backend="python"), ["'python'", "onnxruntime"], id="backend"),
    ],
)
def test_config_mismatch_errors(config: mc.ModelConfig, fragments: list[str]) -> None:
    inputs = [OnnxTensor("x", "tensor(float)", (-1, 3))]
    outputs = [OnnxTensor("y", "tensor(float)", (-1, 3))]
    with pytest.raises(ModelLoadError) as info:
        complete_config(config, "m", inputs, outputs, 4)
    for fragment in fragments:
        assert fragment in info.value.message


def test_tensor_type_the_protocol_cannot_carry() -> None:
    inputs = [OnnxTensor("x", "tensor(complex64)", (-1, 3))]
    with pytest.raises(ModelLoadError) as info:
        complete_config(mc.ModelConfig(), "m", inputs, [], 4)
    assert "'x'" in info.value.message
    assert "tensor(complex64)" in info.value.message


def _invalid(text: str) -> mc.ModelConfig:
    return parse_model_config('name: "m"\n' + text, "config.pbtxt")


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (_invalid("max_batch_size: -1"), "max_batch_size"),
        (
            _invalid("max_batch_size: 4\nsequence_batching {}\nresponse_cache { enable: true }"),
            "response_cache cannot be used with sequence_batching",
        ),
        (_invalid("max_batch_size: 4\nensemble_scheduling {}"), "ensemble_scheduling"),
        (_invalid("model_transaction_policy { decoupled: true }"), "decoupled"),
        (_invalid("dynamic_batching {}"), "max_batch_size > 0"),
        (_invalid("max_batch_size: 4\ndynamic_batching { preferred_batch_size: 8 }"), "8"),
        (
            _invalid(
                "max_batch_size: 4\ndynamic_batching { priority_levels: 2 "
                "default_priority_level: 3 }"
            ),
            "default_priority_level",
        ),
        (_invalid('input [{ name: "x" data_type: TYPE_FP32 dims: [0] }]'), "'x'"),
        (
            _invalid(
                'input [{ name: "x" data_type: TYPE_FP32 dims: [4] reshape { shape: [2, 3] } }]'
            ),
            "element counts differ",
        ),
        (_invalid("instance_group [{ count: -1 }]"), "count"),
        (
            _invalid(
                'output [{ name: "y" data_type: TYPE_FP32 dims: [4] },'
                ' { name: "y" data_type: TYPE_FP32 dims: [4] }]'
            ),
            "output 'y' is listed more than once",
        ),
        (
            _invalid(
                'input [{ name: "x" data_type: TYPE_FP32 dims: [4] },'
                ' { name: "x" data_type: TYPE_INT32 dims: [2] }]'
            ),
            "input 'x' is listed more than once",
        ),
    ],
)
def test_validate_config_rejects(config: mc.ModelConfig, fragment: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        validate_config(config)
    assert fragment in info.value.message


# --- auto-completion, property-based ----------------------------------------------------

ORT_TYPES = sorted(ORT_TO_CONFIG)
dims = st.lists(st.integers(1, 64) | st.just(-1), max_size=3)
tensor_lists = st.lists(
    st.tuples(st.sampled_from(ORT_TYPES), st.booleans(), dims), min_size=1, max_size=4
)


def _tensors(prefix: str, specs: list[tuple[str, bool, list[int]]]) -> list[OnnxTensor]:
    return [
        OnnxTensor(f"{prefix}{i}", ort_type, ((-1,) if batch else (2,)) + tuple(rest))
        for i, (ort_type, batch, rest) in enumerate(specs)
    ]


# No deadline: a timing check, and the shared test machine is slow at times
# (281 ms against hypothesis' 200 ms default under load, in make test).
@settings(deadline=None)
@given(inputs=tensor_lists, outputs=tensor_lists, default=st.integers(0, 32))
def test_autocomplete_properties(
    inputs: list[tuple[str, bool, list[int]]],
    outputs: list[tuple[str, bool, list[int]]],
    default: int,
) -> None:
    ins, outs = _tensors("in", inputs), _tensors("out", outputs)
    config = complete(mc.ModelConfig(), ins, outs, default_max_batch_size=default)
    batchable = all(batch for _, batch, _ in inputs + outputs)
    assert config.max_batch_size == (default if batchable else 0)
    assert config.HasField("dynamic_batching") == (batchable and default > 1)
    skip = 1 if config.max_batch_size else 0
    declared_all: list[mc.ModelInput | mc.ModelOutput] = [*config.input, *config.output]
    for declared, onnx in zip(declared_all, ins + outs, strict=True):
        assert declared.name == onnx.name
        assert declared.data_type == ORT_TO_CONFIG[onnx.ort_type]
        model_shape = onnx.shape[skip:]
        if model_shape:
            assert tuple(declared.dims) == model_shape
            assert not declared.HasField("reshape")
        else:  # Triton's form for a tensor with nothing but the batch dimension
            assert tuple(declared.dims) == (1,)
            assert declared.HasField("reshape") and not declared.reshape.shape
    # The completed config is valid config.pbtxt text: it reads back the same.
    text = text_format.MessageToString(config)
    assert parse_model_config(text, "config.pbtxt") == config
    # Completing a completed config changes nothing.
    again = mc.ModelConfig()
    again.CopyFrom(config)
    complete(again, ins, outs, default_max_batch_size=default)
    assert again == config


# --- version policy -----------------------------------------------------------------------

versions = st.sets(st.integers(1, 10_000), max_size=12)


def _found(numbers: set[int]) -> dict[int, Path]:
    return {v: Path(f"{v}/model.onnx") for v in numbers}


@given(found=versions)
def test_default_policy_is_latest_one(found: set[int]) -> None:
    selected = select_versions(_found(found), mc.ModelVersionPolicy())
    assert set(selected) == ({max(found)} if found else set())


@given(found=versions, n=st.integers(1, 15))
def test_latest_n(found: set[int], n: int) -> None:
    policy = mc.ModelVersionPolicy()
    policy.latest.num_versions = n
    selected = select_versions(_found(found), policy)
    assert set(selected) == set(sorted(found, reverse=True)[:n])
    assert all(selected[v] == Path(f"{v}/model.onnx") for v in selected)


@given(found=versions)
def test_all_versions(found: set[int]) -> None:
    policy = mc.ModelVersionPolicy()
    policy.all.SetInParent()
    assert select_versions(_found(found), policy) == _found(found)


@given(found=versions, wanted=st.lists(st.integers(1, 10_000), max_size=5))
def test_specific_versions(found: set[int], wanted: list[int]) -> None:
    policy = mc.ModelVersionPolicy()
    policy.specific.versions.extend(wanted)
    assert set(select_versions(_found(found), policy)) == found & set(wanted)


def test_version_policy_from_config_text() -> None:
    config = parse_model_config("version_policy: { all { } }", "config.pbtxt")
    assert set(select_versions(_found({1, 2, 3}), config.version_policy)) == {1, 2, 3}
    config = parse_model_config("version_policy: { latest { num_versions: 2 } }", "c")
    assert set(select_versions(_found({1, 2, 3}), config.version_policy)) == {2, 3}


# --- server flags -----------------------------------------------------------------------------


def test_default_max_batch_size_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve", "--model-repository", "repo"])
    assert config_from_args(args).default_max_batch_size == 4
    args = build_parser().parse_args(
        ["serve", "--model-repository", "repo", "--default-max-batch-size", "0"]
    )
    assert config_from_args(args).default_max_batch_size == 0
    monkeypatch.setenv("LOCKGATE_DEFAULT_MAX_BATCH_SIZE", "16")
    args = build_parser().parse_args(["serve", "model.onnx"])
    config = config_from_args(args)
    assert config.default_max_batch_size == 16
    assert config.model_repository == ["model.onnx"]
