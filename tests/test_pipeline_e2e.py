"""The whole flow on the embedded default, then the cache: everything reused, then only what changed."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from clip_fp8.config import PipelineConfig
from flows.pipeline import STAGES, clip_fp8_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    config = PipelineConfig().with_overrides([f"output.root={root}"])  # the real default otherwise
    return config, clip_fp8_pipeline(config)


def test_default_flow_completes_every_stage(first_run):
    config, summary = first_run
    assert summary["status"] == "completed"
    for name in STAGES[:7]:
        assert summary["stages"][name]["status"] == "completed", name
        assert summary["stages"][name]["seconds"] > 0
    # No TensorRT on this machine: both engine stages say so, nothing is invented.
    for name in ("build", "benchmark"):
        assert summary["stages"][name]["status"] == "skipped"
        assert "TensorRT" in summary["stages"][name]["note"]

    # The embedded model is good enough for the gate to mean something, and FP8 keeps it there.
    baseline, fp8 = summary["metrics"]["baseline"], summary["metrics"]["fp8"]
    acc1 = "embedded:shapes/zeroshot_classification/acc1"
    assert baseline[acc1] >= 0.90
    assert fp8[acc1] >= baseline[acc1] - 0.02
    assert summary["promotable"] is True


def test_summary_and_report_on_disk(first_run):
    config, summary = first_run
    on_disk = json.loads(Path(summary["artifacts"]["summary"]).read_text())
    assert set(on_disk["stages"]) == set(STAGES)
    assert {"baseline", "fp8"} <= set(on_disk["metrics"])
    report = Path(summary["artifacts"]["report"]).read_text()
    assert "## Quantization audit" in report and "## ONNX encoders" in report
    for name in ("onnx_fp8_text", "onnx_fp8_image", "onnx_fp16_text", "onnx_fp16_image", "checkpoint"):
        assert Path(on_disk["artifacts"][name]).exists(), name


def test_audit_covers_both_towers_and_attention(first_run):
    _, summary = first_run
    towers = summary["audit"]["towers"]
    for tower in ("text", "image"):
        assert towers[tower]["linear_quantized"] == towers[tower]["linear_in_scope"] > 0
        assert towers[tower]["attention_quantized"] == towers[tower]["attention_total"] > 0


def test_exported_fp8_graphs_are_repaired_checked_and_preflighted(first_run):
    _, summary = first_run
    for encoder in ("text", "image"):
        fp8, fp16 = summary["onnx"][f"fp8_{encoder}"], summary["onnx"][f"fp16_{encoder}"]
        # The raw export is what a strongly typed TensorRT rejects; the repaired one builds.
        assert fp8["preflight_raw"]["parsed"] is False
        assert fp8["preflight"]["parsed"] and fp8["preflight"]["built"]
        assert fp16["preflight"]["built"]
        assert fp8["onnxruntime"]["min_cosine"] >= 0.99
        census = fp8["census"]
        assert census["fp8_initializers"] > 0 and census["fp32_initializers"] == 0
        assert census["softmax_quantized"] == census["softmax"] > 0
        assert fp8["bytes"] < fp16["bytes"]

    model = onnx.load(summary["artifacts"]["onnx_fp8_image"])
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 20
    assert not any(n.domain == "trt" for n in model.graph.node)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param, "batch axis must be dynamic"


def test_second_run_is_served_from_cache(first_run):
    config, first = first_run
    again = clip_fp8_pipeline(config)
    for name in STAGES[:7]:
        assert again["stages"][name]["status"] == "cached", name
    assert again["all_cached"] is True
    assert again["metrics"] == first["metrics"]
    assert again["artifacts"]["checkpoint"] == first["artifacts"]["checkpoint"]


def test_changing_an_evaluation_setting_reruns_only_evaluation(first_run):
    config, _ = first_run
    changed = config.with_overrides(["evaluation.num_samples=500"])
    summary = clip_fp8_pipeline(changed)
    status = {name: summary["stages"][name]["status"] for name in STAGES}
    assert status["evaluate"] == "completed"
    for name in ("calibration_data", "baseline_model", "quantize", "audit", "export", "surgery"):
        assert status[name] == "cached", name


def test_adding_an_evaluation_dataset_reruns_only_evaluation_and_reports_both(first_run, tmp_path):
    from tests.test_eval_datasets import write_wds_classification

    config, _ = first_run
    root = write_wds_classification(tmp_path / "wds_shapes")
    changed = config.with_overrides([f"evaluation.datasets=[{{name: 'embedded:shapes'}}, {{name: wds/shapes, root: '{root}'}}]"])
    summary = clip_fp8_pipeline(changed)
    assert summary["stages"]["evaluate"]["status"] == "completed"
    assert all(summary["stages"][name]["status"] == "cached" for name in ("quantize", "export", "surgery"))
    datasets = {metric.split("/zeroshot_")[0] for metric in summary["metrics"]["fp8"]}
    assert datasets == {"embedded:shapes", "wds/shapes"}
    report = Path(summary["artifacts"]["report"]).read_text()
    assert "wds/shapes/zeroshot_classification/acc1" in report
    # Only the path moved: the same data elsewhere is the same evaluation, served from the cache.
    import shutil

    moved = shutil.copytree(root, tmp_path / "moved")
    again = clip_fp8_pipeline(config.with_overrides(
        [f"evaluation.datasets=[{{name: 'embedded:shapes'}}, {{name: wds/shapes, root: '{moved}'}}]"]))
    assert again["stages"]["evaluate"]["status"] == "cached"
