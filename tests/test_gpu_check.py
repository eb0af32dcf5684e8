"""``make gpu-check``'s script where there is no GPU: the dry run, the refusal, the wheels.

The GPU run itself needs a GPU host; these prove the script's own code paths
(every step on the CPU provider, the report, the exit status, reassembling
split wheels) so that the one run on a GPU host does not fail on a typo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.gpu_check import reassemble
from lockgate.runner import cuda_device_count

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=240
    )


def test_cpu_dry_run_passes_and_reports(tmp_path: Path) -> None:
    result = run_script("--device", "cpu", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("found: GPU none;")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] is True
    steps = {c["step"] for c in report["checks"]}
    assert {"1", "2", "3", "4", "5"} <= steps
    assert not [c for c in report["checks"] if c["ok"] is False]
    # The GPU-only checks say so rather than passing.
    assert any(c["ok"] is None and "GPU only" in c["detail"] for c in report["checks"])
    targets = {r["target"] for r in report["performance"]}
    assert {"in-process", "batched, 2 instances", "unbatched, 1 instance"} <= targets
    assert "| step | check | result | detail |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.skipif(cuda_device_count() > 0, reason="this host has a GPU")
def test_gpu_run_without_a_gpu_fails_at_once(tmp_path: Path) -> None:
    result = run_script("--device", "cuda", "--quick", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "CUDA provider and a GPU present" in result.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] is False


def test_requirements_list_what_the_wheel_directory_must_hold() -> None:
    result = run_script("--requirements")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "onnxruntime-gpu"
    assert any(line.startswith("grpcio>=") for line in lines) and "onnx" in lines


def wheel(path: Path, size: int) -> bytes:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pkg/data.bin", bytes(range(256)) * (size // 256))
    return path.read_bytes()


@pytest.mark.parametrize(
    "suffix",
    [
        lambda i: f".part-{i:02d}",  # split -d
        lambda i: ".part-" + "abcdefghijklmnopqrstuvwxyz"[i // 26] + "abcdefghijklm"[i % 13],
        lambda i: f".part{i + 1}",  # unpadded: part10 comes after part9
        lambda i: f".{i + 1:03d}",
    ],
)
def test_split_wheels_are_reassembled_in_order(
    tmp_path: Path, suffix: Callable[[int], str]
) -> None:
    source, into = tmp_path / "wheels", tmp_path / "into"
    source.mkdir()
    name = "onnxruntime_gpu-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    data = wheel(tmp_path / name, 1 << 16)
    size = len(data) // 11 + 1
    for i in range(11):
        (source / f"{name}{suffix(i)}").write_bytes(data[i * size : (i + 1) * size])
    (source / f"{name}.sha256").write_text("not a part\n")
    whole = wheel(source / "numpy-2.0-cp312-cp312-linux_x86_64.whl", 1024)
    found = reassemble(source, into)
    assert sorted(p.name for p in found) == sorted([name, "numpy-2.0-cp312-cp312-linux_x86_64.whl"])
    assert (into / name).read_bytes() == data
    assert (into / "numpy-2.0-cp312-cp312-linux_x86_64.whl").read_bytes() == whole


def test_a_missing_part_is_named(tmp_path: Path) -> None:
    source = tmp_path / "wheels"
    source.mkdir()
    name = "big-1.0-py3-none-any.whl"
    data = wheel(tmp_path / name, 1 << 16)
    half = len(data) // 2
    (source / f"{name}.part-00").write_bytes(data[:half])  # part-01 never arrived
    with pytest.raises(SystemExit, match=f"{name}: .*part missing"):
        reassemble(source, tmp_path / "into")
