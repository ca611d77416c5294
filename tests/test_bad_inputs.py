"""Bad input stops where it can first be known (a locator before any stage starts, content in the stage that
reads it), with one line naming the value; nothing earlier is lost."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clip_fp8.errors import PipelineInputError
from clip_fp8.flows.pipeline import clip_fp8_pipeline
from data_fixtures import write_coco_folder


def _run_expecting(config, stage: str, *needles: str) -> dict:
    with pytest.raises(PipelineInputError) as info:
        clip_fp8_pipeline(config)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    summary_files = [p for p in Path(config.output.root, "runs").glob("*/summary.json") if not p.parent.is_symlink()]
    assert len(summary_files) == 1
    summary = json.loads(summary_files[0].read_text())
    assert summary["status"] == "failed"
    assert summary["stages"][stage]["status"] == "failed"
    return summary


def test_missing_model_path_is_refused_before_any_stage_starts(fast_config, tmp_path):
    missing = tmp_path / "no-such-model"
    config = fast_config.with_overrides([f"model.source={missing}"])
    summary = _run_expecting(config, "inputs", str(missing), "open_clip:", "embedded:tiny-clip-shapes")
    assert list(summary["stages"]) == ["inputs"]
    assert not (Path(config.output.root) / "store").exists()


def test_non_clip_checkpoint(fast_config, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "model.safetensors").write_bytes(b"")
    _run_expecting(fast_config.with_overrides([f"model.source={bert}"]), "inputs", "'bert'", "not CLIP")


def test_pickle_only_checkpoint_is_refused(fast_config, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    _run_expecting(fast_config.with_overrides([f"model.source={pickled}"]), "inputs", "safetensors")


def test_empty_dataset_folder(fast_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _run_expecting(fast_config.with_overrides([f"calibration.source=coco:{empty}"]), "inputs", str(empty))


@pytest.mark.slow
def test_unreadable_dataset_images_name_the_limit_hit_and_the_change_that_fixes_it(fast_config, tmp_path):
    # 6 usable of 12 for 8 samples: no max_bad_fraction can help, only fewer samples.
    coco = write_coco_folder(tmp_path / "coco", n_images=12, corrupt=6)
    summary = _run_expecting(
        fast_config.with_overrides([f"calibration.source=coco:{coco}", "calibration.num_samples=8",
                                    "calibration.max_bad_fraction=1.0"]),
        "calibration_data", "only 6 usable images", "lower calibration.num_samples to 6", "unreadable")
    assert "max_bad_fraction" not in summary["stages"]["calibration_data"]["note"]
    # 9 usable of 12 for 9 samples (so every image is tried), but a quarter was bad: the fraction is the limit hit.
    coco = write_coco_folder(tmp_path / "coco2", n_images=12, corrupt=3)
    config = fast_config.with_overrides([f"calibration.source=coco:{coco}", "calibration.num_samples=9",
                                         "calibration.max_bad_fraction=0.1", f"output.root={tmp_path / 'out2'}"])
    with pytest.raises(PipelineInputError) as info:
        clip_fp8_pipeline(config)
    # The seeded selection stops at 9 usable pairs, so it meets 2 or 3 of the bad images: read which.
    found = re.search(r"(\d+) of (\d+) images tried .* more than calibration.max_bad_fraction=0.1; "
                      r"raise calibration.max_bad_fraction to (0\.\d\d) to skip them", str(info.value))
    assert found, str(info.value)
    bad, tried, suggested = int(found[1]), int(found[2]), float(found[3])
    assert tried - bad == 9 and suggested == math.ceil(100 * bad / tried) / 100 >= bad / tried


@pytest.mark.slow
def test_a_run_that_skips_images_says_how_many_and_names_some(tmp_path):
    """A captions file that names a missing image and one corrupt image: the stage completes, and its note (the
    stage table's line) counts both and names them; missing and unreadable are told apart."""
    from clip_fp8.config import CalibrationConfig
    from clip_fp8.tasks.calibration_data import calibration_data
    from clip_fp8.tasks.calibration_sources import resolve_data_source

    coco = write_coco_folder(tmp_path / "coco", n_images=12, corrupt=1)
    (coco / "train2017" / "000000000012.jpg").unlink()
    cfg = CalibrationConfig(source=f"coco:{coco}", num_samples=10, max_bad_fraction=0.5)
    out = tmp_path / "out"
    out.mkdir()
    result = calibration_data(resolve_data_source(cfg), cfg, out)
    # The seeded selection stops at 10 usable pairs, so it may not reach both bad images: read what it met.
    skipped = json.loads((out / "manifest.json").read_text())["skipped_examples"]
    assert result.meta["pairs"] == 10 and result.meta["skipped_images"] == len(skipped) >= 1
    assert result.meta["note"].startswith(f"{len(skipped)} images skipped (")
    expected = {"train2017/000000000001.jpg (unreadable)", "train2017/000000000012.jpg (missing)"}
    assert set(skipped) <= expected and all(s in result.meta["note"] for s in skipped)


def test_calibration_larger_than_dataset(fast_config, tmp_path):
    coco = write_coco_folder(tmp_path / "coco", n_images=4)
    _run_expecting(fast_config.with_overrides([f"calibration.source=coco:{coco}", "calibration.num_samples=10"]),
                   "calibration_data", "num_samples=10", "4 captioned images")


def test_exclusion_pattern_matching_nothing(fast_config):
    config = fast_config.with_overrides(["quantization.exclude=['*patch_embedding*', '*no_such_layer*']"])
    summary = _run_expecting(config, "quantize", "'*no_such_layer*'")
    for earlier in ("calibration_data", "baseline_model"):
        assert summary["stages"][earlier]["status"] == "completed"
    # The failed stage published nothing: no half-written checkpoint a later run could trust.
    quantize_dir = Path(config.output.root) / "store" / "quantize"
    assert not quantize_dir.exists() or not any(quantize_dir.iterdir())


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "clip_fp8.cli", "run", "-o", str(tmp_path / "out"), "--set",
         f"model.source={tmp_path / 'nope'}", "--set", "calibration.num_samples=16"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "nope") in errors[0]


def test_cli_rejects_a_bad_override(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clip_fp8.cli", "run", "--set", "calibration.num_samples=-3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "num_samples" in result.stderr


@pytest.mark.parametrize("field, value", [
    ("model.source", "{outside}/model"),                  # a checkpoint folder the worker may not read
    ("calibration.source", "coco:{outside}/coco"),         # a dataset behind a source prefix
    ("evaluation.datasets", '[{{"name": "cifar100", "root": "{outside}/cifar"}}]'),  # inside a list entry
    ("output.root", "{outside}/out"),                      # a destination that does not exist yet
    ("promotion.repository", "{outside}/triton"),
])
def test_a_path_outside_the_workers_allowed_roots_fails_in_one_line_before_anything_is_written(
        fast_config, tmp_path, monkeypatch, field, value):
    """CLIP_FP8_ALLOWED_ROOTS is the worker's setting: a run naming any local path outside it (whichever field,
    derived from the config's locator and destination marks) fails before any stage, writing nothing."""
    allowed, outside = tmp_path / "allowed", tmp_path / "elsewhere"
    for folder in (allowed, outside / "model", outside / "coco", outside / "cifar"):
        folder.mkdir(parents=True)
    monkeypatch.setenv("CLIP_FP8_ALLOWED_ROOTS", str(allowed))
    config = fast_config.with_overrides([f"output.root={allowed / 'out'}", f"{field}={value.format(outside=outside)}"])
    with pytest.raises(PipelineInputError) as info:
        clip_fp8_pipeline(config)
    message = str(info.value)
    assert "\n" not in message and message.startswith(field) and "outside this worker's allowed roots" in message, message
    assert str(allowed) in message and "CLIP_FP8_ALLOWED_ROOTS" in message
    assert not (allowed / "out").exists() and not (outside / "out").exists()
    # The same run with every path under the allowed root is not refused by it (the embedded default runs).
    monkeypatch.setenv("CLIP_FP8_ALLOWED_ROOTS", f"{outside}{os.pathsep}{allowed}")
    from clip_fp8.security import check_allowed_roots

    check_allowed_roots(config)
