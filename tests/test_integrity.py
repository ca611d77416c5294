"""No corrupt artifact is reused: one flipped byte in a cached ONNX graph and a truncated checkpoint are found by
``clip-fp8 verify`` and by the next run, which quarantines both, names each, and computes them again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clip_fp8.config import PipelineConfig
from clip_fp8.flows.pipeline import clip_fp8_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity") / "out"
    config = PipelineConfig().with_overrides([f"output.root={root}", "calibration.num_samples=256",
                                              "calibration.batch_size=128", "evaluation.num_samples=200"])
    first = clip_fp8_pipeline(config)
    onnx = Path(first["artifacts"]["onnx_fp8_image"])
    original = onnx.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01  # one bit, same size
    onnx.write_bytes(bytes(flipped))
    weights = Path(first["artifacts"]["checkpoint"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy that stopped half way
    return config, first, onnx, original, weights


def verify(root: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clip_fp8.cli", "verify", "-o", root], capture_output=True, text=True,
                          timeout=300)


def test_verify_names_both_corrupt_artifacts_and_exits_2(corrupted):
    config, _, onnx, _, weights = corrupted
    run = verify(config.output.root)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert any(str(onnx.parent) in line and "fp8_image.onnx differs from its recorded SHA-256" in line for line in lines), lines
    assert any(str(weights.parent.parent) in line and "checkpoint/model.safetensors has" in line and "truncated" in line
               for line in lines), lines
    assert lines[-1].startswith("2 of ") and lines[-1].endswith("artifacts corrupt"), lines[-1]


def test_the_next_run_quarantines_names_and_recomputes_them(corrupted, caplog):
    config, first, onnx, original, weights = corrupted
    again = clip_fp8_pipeline(config)
    said = [r.getMessage() for r in caplog.records]  # through the stage's Prefect logger: the console and the UI
    assert again["status"] == "completed"
    assert again["stages"]["surgery_fp8"]["status"] == "completed" and again["stages"]["quantize"]["status"] == "completed"
    for stage, path in (("surgery_fp8", onnx.parent), ("quantize", weights.parent.parent)):
        name = stage.split("_")[0]
        (line,) = {x for x in said if x.startswith(f"{name}: cached artifact {path} is corrupt")}
        assert "moved to" in line and line.endswith("computing it again"), line
    # The right artifacts again: the same graph bytes as before the flip, a whole checkpoint, everything verified.
    assert Path(again["artifacts"]["onnx_fp8_image"]).read_bytes() == original
    assert len(list((Path(config.output.root) / "quarantine").glob("*/*"))) == 2
    assert again["metrics"] == first["metrics"]
    clean = verify(config.output.root)
    assert clean.returncode == 0 and "0 of" in clean.stdout, clean.stdout
    assert json.loads((Path(again["artifacts"]["summary"])).read_text())["status"] == "completed"
