"""quantization.recovery on a checkpoint with one outlier GEMM: off fails, suggest names it, auto leaves it in FP16."""

from __future__ import annotations

import re

import pytest

from clip_fp8.caching import stage_key
from clip_fp8.config import PipelineConfig
from clip_fp8.errors import QualityGateError
from clip_fp8.flows.pipeline import clip_fp8_pipeline
from data_fixtures import write_outlier_checkpoint

OUTLIER_MATMUL = "/vision_model/encoder/layers.1/mlp/fc1/MatMul"  # the exported graph's node for that fc1


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    """The outlier checkpoint and one output root for every mode, so each run reuses what the others computed.
    Recovery decides on the fake-quant evaluation, so here the gate judges that model too: these tests are about
    recovery's choices (the gate on what ships, after recovery, is test_pipeline_e2e's)."""
    base = tmp_path_factory.mktemp("recovery")
    fc1 = write_outlier_checkpoint(base / "model")
    config = PipelineConfig().with_overrides([
        f"model.source={base / 'model'}", f"output.root={base / 'out'}", "calibration.num_samples=256",
        "calibration.batch_size=128", "evaluation.num_samples=200", "quantization.sensitivity_samples=128",
        "build.enabled=false", "evaluation.gate_runtime=fakequant"])
    return config, fc1


def run(config: PipelineConfig, overrides: list[str]):
    try:
        return clip_fp8_pipeline(config.with_overrides(overrides)), None
    except QualityGateError as exc:
        return exc.run_summary, exc


@pytest.fixture(scope="module")
def off(outlier):
    config, _ = outlier
    return run(config, ["quantization.recovery=off"])


@pytest.mark.slow
def test_recovery_off_fails_the_gate_without_computing_sensitivity(off):
    summary, error = off
    assert error is not None and summary["stages"]["gate"]["status"] == "failed"
    assert summary["stages"]["evaluate"]["status"] == "completed"  # it measures; the gate judges
    assert "sensitivity" not in summary["stages"] and "recovery" not in summary["stages"]


@pytest.mark.slow
def test_suggest_names_the_outlier_first_as_a_ready_set(outlier, off):
    config, fc1 = outlier
    summary, error = run(config, ["quantization.recovery=suggest", "quantization.max_fp16_fraction=0.2"])
    assert error is not None and str(error).startswith("quality gate failed: ") and "\n" not in str(error)
    assert f"leave in FP16, most sensitive first: {fc1}.*" in str(error)
    (flag,) = re.findall(r"--set '([^']*)'", str(error))
    suggested = config.with_overrides([flag]).quantization.exclude  # what the user pastes parses as it reads
    assert suggested[0] == "*patch_embedding*" and suggested[1] == f"{fc1}.*"
    assert summary["stages"]["sensitivity"]["status"] in ("completed", "cached")
    assert summary["stages"]["recovery"]["status"] == "completed" and "quantize~1" not in summary["stages"]
    assert summary["stages"]["gate"]["status"] == "failed"  # with recovery's words
    report = open(summary["artifacts"]["report"]).read()
    assert f"| 1 | `{fc1}` | image | linear |" in report  # the sensitivity table, rank 1
    assert "## Recovery" in report and "data:image/png;base64," in report.split("## Recovery")[1]


@pytest.mark.slow
def test_auto_leaves_exactly_the_outlier_gemm_in_fp16_and_passes(outlier, off):
    config, fc1 = outlier
    summary, error = run(config, ["quantization.recovery=auto", "quantization.max_fp16_fraction=0.2"])
    assert error is None and summary["status"] == "completed" and summary["quality_gate"]["passed"]
    assert summary["recovery"]["passed"] and summary["promotable"]
    assert 2 <= summary["recovery"]["attempts"] <= 4  # that layer, and at most a few others
    for stage in ("quantize~1", "audit~1", "evaluate~1"):
        assert summary["stages"][stage]["status"] in ("completed", "cached")
    # The audit tells the user's exclusions from recovery's, with the reason.
    exclusions = summary["audit"]["exclusions"]
    assert exclusions["user"] == ["*patch_embedding*"]
    assert list(exclusions["recovery"])[0] == f"{fc1}.*" and exclusions["recovery"][f"{fc1}.*"].startswith("sensitivity rank 1")
    audited = open(summary["artifacts"]["audit"]).read()
    assert f"quantization.recovery '{fc1}.*' (sensitivity rank 1" in audited
    # The shipped FP8 graph: the outlier's GEMM is the one more left in FP16 than without recovery.
    before = set(off[0]["onnx"]["fp8_image"]["census"]["gemms_not_fp8"])
    after = set(summary["onnx"]["fp8_image"]["census"]["gemms_not_fp8"])
    if len(exclusions["recovery"]) == 1:
        assert after - before == {OUTLIER_MATMUL}
    else:
        assert OUTLIER_MATMUL in after - before
    assert summary["onnx"]["fp8_text"]["census"]["gemms_not_fp8"] == off[0]["onnx"]["fp8_text"]["census"]["gemms_not_fp8"]
    assert open(summary["artifacts"]["tradeoff_plot"], "rb").read(4) == b"\x89PNG"


@pytest.mark.slow
def test_a_gate_out_of_budget_ends_with_the_best_reached(outlier, off):
    config, _ = outlier
    # The user's patch embedding alone is 9 % of the tiny model's GEMM work, the outlier's fc1 another 6.4 %.
    _, error = run(config, ["quantization.recovery=auto", "quantization.max_fp16_fraction=0.12"])
    assert error is not None and "\n" not in str(error)
    assert str(error).startswith("quality gate not met within quantization.max_fp16_fraction 0.12: best ")
    assert "8.99% FP16 after 0 exclusion(s)" in str(error)


@pytest.mark.slow
def test_a_model_that_passes_computes_no_sensitivity(tmp_path):
    summary = clip_fp8_pipeline(PipelineConfig().with_overrides([
        f"output.root={tmp_path}", "calibration.num_samples=256", "calibration.batch_size=128",
        "evaluation.num_samples=200", "quantization.recovery=auto", "build.enabled=false"]))
    assert summary["status"] == "completed" and summary["quality_gate"]["passed"]
    assert not {"sensitivity", "recovery", "quantize~1"} & summary["stages"].keys()


def test_recovery_settings_do_not_key_quantization_but_key_sensitivity():
    """Switching recovery on reuses the quantization; the sensitivity sample count re-keys the sensitivity stage."""
    from clip_fp8.tasks.quantize import quantize
    from clip_fp8.tasks.sensitivity import sensitivity

    off, auto = PipelineConfig(), PipelineConfig().with_overrides(["quantization.recovery=auto",
                                                                   "quantization.max_fp16_fraction=0.5"])
    assert off.quantization.recovery == "off"  # YAML's bare `off` is false; the config reads it as the mode
    inputs = {"model_source": None, "calibration": None, "data_source": None, "model_cfg": off.model,
              "calib_cfg": off.calibration, "recovered": None}
    assert stage_key(quantize, {**inputs, "cfg": off.quantization}) == stage_key(quantize, {**inputs, "cfg": auto.quantization})
    assert stage_key(quantize, {**inputs, "cfg": off.quantization}) != stage_key(
        quantize, {**inputs, "cfg": off.quantization, "recovered": {"text_projection.*": "rank 1"}})
    inputs = {"model_source": None, "quantized": None, "calibration": None, "data_source": None, "model_cfg": off.model,
              "cfg": off.quantization, "batch_size": 64}
    assert stage_key(sensitivity, {**inputs, "samples": 128}) != stage_key(sensitivity, {**inputs, "samples": 256})


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_an_impossible_fp16_budget_is_refused(value):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_fp16_fraction"):
        PipelineConfig().with_overrides([f"quantization.max_fp16_fraction={value}"])


def test_suggest_out_of_budget_names_the_units_and_the_budget_that_admits_the_first(tmp_path):
    """No unit fits the FP16 budget: the verdict names the most sensitive units and the max_fp16_fraction that would
    admit the first, not just "raise it"."""
    import json

    from clip_fp8.artifacts import ArtifactRef
    from clip_fp8.tasks.recovery import recovery

    ranking = {"total_macs": 1000, "fp16_units": [{"unit": "patch", "macs": 90}], "units": [
        {"unit": "vision_model.encoder.layers.1.mlp.fc1", "exclude": "vision_model.encoder.layers.1.mlp.fc1.*",
         "macs": 64, "score": 0.9},
        {"unit": "text_projection", "exclude": "text_projection.*", "macs": 10, "score": 0.2}]}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sensitivity.json").write_text(json.dumps(ranking))
    (tmp_path / "e").mkdir()
    metric = "embedded:shapes/zeroshot_classification/acc1"
    (tmp_path / "e" / "metrics.json").write_text(json.dumps({"baseline": {metric: 0.95}, "fp8": {metric: 0.90}}))
    refs = [ArtifactRef(stage=n, path=str(tmp_path / d), digest=n, files={k: f"{k}.json"})
            for n, d, k in (("sensitivity", "s", "sensitivity"), ("evaluate", "e", "metrics"))]
    (tmp_path / "out").mkdir()
    output = recovery(refs[0], [refs[1]], [], "suggest", 0.12, ["*patch_embedding*"], {"*": 0.02}, tmp_path / "out")
    message = output.meta["message"]
    assert message.startswith(f"quality gate failed: {metric}: 0.9500 -> 0.9000 (drop 0.0500 > max_drop 0.02); "), message
    assert ("no unit fits in quantization.max_fp16_fraction 0.12 (the user's exclusions alone leave 9.00% of the GEMM "
            "work in FP16); the most sensitive: vision_model.encoder.layers.1.mlp.fc1.*, text_projection.*; "
            "quantization.max_fp16_fraction=0.1540 admits the first") in message, message
    assert output.meta["passed"] is False and output.meta["suggestion"] == ["*patch_embedding*"]  # nothing added
