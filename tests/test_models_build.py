"""The model generators: deterministic, loadable, correct, with parseable configs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lockgate_client._proto import model_config_pb2  # noqa: E402
from models.build import (  # noqa: E402
    CONFIG_FILE,
    MODEL_FILE,
    ONNX_TYPES,
    build_identity,
    build_repository,
    identity_model_name,
)

EXAMPLE_MODELS = {
    "simple",
    "simple_string",
    "mlp",
    "image_classifier",
    "digits",
    "digits_preprocess",
    "digits_classifier",
    "accumulator",
}
TEST_MODELS = {"slow", "gather_fail", "autocomplete", "versioned", "broken", "nobatch"}


def tree(repo: Path) -> dict[str, bytes]:
    """Every file under ``repo``, by relative path."""
    return {str(p.relative_to(repo)): p.read_bytes() for p in repo.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repository")
    build_repository(path, with_test_models=True)
    return path


def session(repo: Path, model: str, version: int = 1) -> ort.InferenceSession:
    path = repo / model / str(version) / MODEL_FILE
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def parse_config(repo: Path, model: str) -> model_config_pb2.ModelConfig:
    text = (repo / model / CONFIG_FILE).read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_builds_are_byte_identical(repo: Path, tmp_path: Path) -> None:
    build_repository(tmp_path, with_test_models=True)
    assert tree(tmp_path) == tree(repo)


def test_rebuild_keeps_files_unless_forced(repo: Path, tmp_path: Path) -> None:
    build_repository(tmp_path)
    model = tmp_path / "simple" / "1" / MODEL_FILE
    before = model.stat().st_mtime_ns
    build_repository(tmp_path)
    assert model.stat().st_mtime_ns == before
    model.write_bytes(b"stale")
    build_repository(tmp_path)
    assert model.read_bytes() == (repo / "simple" / "1" / MODEL_FILE).read_bytes()


def test_repository_contents(repo: Path) -> None:
    identities = {identity_model_name(t) for t in ONNX_TYPES}
    assert len(identities) == 14
    models = {p.name for p in repo.iterdir()}
    assert models == EXAMPLE_MODELS | TEST_MODELS | identities
    assert not (repo / "autocomplete" / CONFIG_FILE).exists()
    assert sorted(p.name for p in (repo / "versioned").iterdir() if p.is_dir()) == ["1", "2", "3"]


def test_only_example_models_by_default(tmp_path: Path) -> None:
    build_repository(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == EXAMPLE_MODELS


def test_configs_parse_and_match_models(repo: Path) -> None:
    for model_dir in sorted(repo.iterdir()):
        if not (model_dir / CONFIG_FILE).exists():
            continue
        config = parse_config(repo, model_dir.name)
        assert config.name == model_dir.name
        if config.platform == "ensemble":
            assert not (model_dir / "1" / MODEL_FILE).exists()
            continue
        assert config.platform == "onnxruntime_onnx"
        if model_dir.name == "broken":
            continue
        onnx_inputs = {i.name: i for i in session(repo, model_dir.name).get_inputs()}
        # Sequence models: control and state inputs are fed by the server, not listed.
        hidden = {c.name for c in config.sequence_batching.control_input}
        hidden |= {t.input_name for t in config.sequence_batching.state}
        assert {i.name for i in config.input} == set(onnx_inputs) - hidden
        for tensor in config.input:
            shape = onnx_inputs[tensor.name].shape
            batch = ["batch"] if config.max_batch_size > 0 else []
            expected = batch + [None if d == -1 else d for d in tensor.dims]
            assert shape == expected, (model_dir.name, tensor.name)


def test_config_fields(repo: Path) -> None:
    simple = parse_config(repo, "simple")
    assert simple.max_batch_size == 8
    assert simple.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in simple.input] == [
        ("INPUT0", model_config_pb2.TYPE_INT32, [16]),
        ("INPUT1", model_config_pb2.TYPE_INT32, [16]),
    ]
    assert [g.count for g in simple.instance_group] == [1]
    assert parse_config(repo, "identity_bf16").input[0].data_type == model_config_pb2.TYPE_BF16
    assert parse_config(repo, "identity_string").input[0].data_type == model_config_pb2.TYPE_STRING
    nobatch = parse_config(repo, "nobatch")
    assert nobatch.max_batch_size == 0
    assert not nobatch.HasField("dynamic_batching")
    assert not parse_config(repo, "versioned").HasField("version_policy")


def test_every_model_loads_in_onnxruntime(repo: Path) -> None:
    for model_file in sorted(repo.glob(f"*/*/{MODEL_FILE}")):
        if model_file.parts[-3] == "broken":
            with pytest.raises(Exception, match=r"(?i)protobuf|invalid|load"):
                ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        else:
            ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])


def test_simple(repo: Path) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 5, dtype=np.int32)
    total, diff = session(repo, "simple").run(None, {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(total, a + b)
    np.testing.assert_array_equal(diff, a - b)


def test_simple_string(repo: Path) -> None:
    a = np.arange(-8, 8, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 2, dtype=np.int32)
    inputs = {
        "INPUT0": a.astype(str).astype(object),
        "INPUT1": b.astype(str).astype(object),
    }
    total, diff = session(repo, "simple_string").run(None, inputs)
    assert total.tolist() == (a + b).astype(str).tolist()
    assert diff.tolist() == (a - b).astype(str).tolist()
    assert total[0, 9] == "3" and diff[0, 9] == "-1"  # "1" and "2"


def test_numeric_models_are_finite(repo: Path) -> None:
    rng = np.random.default_rng(0)
    (mlp,) = session(repo, "mlp").run(None, {"INPUT": rng.standard_normal((2, 512), np.float32)})
    assert mlp.shape == (2, 512) and np.isfinite(mlp).all()
    image = rng.random((2, 3, 224, 224), np.float32)
    (probs,) = session(repo, "image_classifier").run(None, {"INPUT": image})
    assert probs.shape == (2, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_test_models_compute(repo: Path) -> None:
    x = np.random.default_rng(1).standard_normal((3, 256), np.float32)
    (slow,) = session(repo, "slow").run(None, {"INPUT0": x})
    np.testing.assert_array_equal(slow, x)
    for version in (1, 2, 3):
        versioned = session(repo, "versioned", version)
        (out,) = versioned.run(None, {"INPUT0": np.ones((1, 4), np.int32)})
        np.testing.assert_array_equal(out, np.full((1, 4), 1 + version, np.int32))
    ones = np.ones((2, 3), np.float32)
    (doubled,) = session(repo, "nobatch").run(None, {"INPUT0": ones})
    np.testing.assert_array_equal(doubled, 2 * ones)
    (relu,) = session(repo, "autocomplete").run(None, {"x": np.full((1, 8), -1, np.float32)})
    np.testing.assert_array_equal(relu, np.zeros((1, 8), np.float32))


def test_slow_model_is_slow(repo: Path) -> None:
    # Guards against ONNX Runtime optimising the MatMul chain away; the bound is
    # far below the ~50 ms it takes here so that fast CPUs pass too.
    sess = session(repo, "slow")
    x = np.ones((1, 256), np.float32)
    sess.run(None, {"INPUT0": x})
    start = time.perf_counter()
    sess.run(None, {"INPUT0": x})
    assert time.perf_counter() - start > 0.005


def test_gather_fail_raises_on_bad_index(repo: Path) -> None:
    gather = session(repo, "gather_fail")
    values = np.arange(8, dtype=np.float32).reshape(2, 4)
    (good,) = gather.run(None, {"INPUT": values, "INDEX": np.array([[1], [3]], np.int64)})
    np.testing.assert_array_equal(good, [[1.0], [7.0]])
    with pytest.raises(Exception, match=r"(?i)out of range"):
        gather.run(None, {"INPUT": values, "INDEX": np.array([[1], [4]], np.int64)})


@pytest.mark.parametrize("config_type", sorted(set(ONNX_TYPES) - {"TYPE_BF16"}))
def test_identity_round_trips(repo: Path, config_type: str) -> None:
    sess = session(repo, identity_model_name(config_type))
    if config_type == "TYPE_STRING":
        data = np.array([["a", "", "ü"]], dtype=object)
    else:
        dtype = np.dtype("bool" if config_type == "TYPE_BOOL" else _numpy_name(config_type))
        data = np.arange(6).reshape(2, 3).astype(dtype)
    (out,) = sess.run(None, {"INPUT0": data})
    np.testing.assert_array_equal(out, data)
    assert out.dtype == data.dtype


def test_identity_bf16_runs_through_ort_values(repo: Path) -> None:
    # numpy has no bfloat16: ORT takes and gives the raw 16-bit patterns as OrtValues.
    sess = session(repo, "identity_bf16")
    bits = np.array([[0x3F80, 0x4000, 0xC040]], np.uint16)  # 1.0, 2.0, -3.0
    bf16 = TensorProto.BFLOAT16
    value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=bf16)
    out = np.zeros_like(bits)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("INPUT0", value)
    binding.bind_ortvalue_output(
        "OUTPUT0", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(out, onnx_element_type=bf16)
    )
    sess.run_with_iobinding(binding)
    np.testing.assert_array_equal(out, bits)


def test_identity_options(tmp_path: Path) -> None:
    path = build_identity(
        tmp_path, "fixed", "TYPE_INT16", max_batch_size=0, dims=(2, -1), dynamic_batching=False
    )
    assert path == tmp_path / "fixed"
    config = parse_config(tmp_path, "fixed")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [2, -1]
    assert session(tmp_path, "fixed").get_inputs()[0].shape == [2, None]


def _numpy_name(config_type: str) -> str:
    """TYPE_FP32 -> float32, TYPE_UINT8 -> uint8."""
    kind = config_type.removeprefix("TYPE_").lower()
    return kind.replace("fp", "float")
