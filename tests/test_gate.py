"""The gate as its own step, and keys that hold only what a stage reads (early cutoff). Fast: no flow runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip_fp8.artifacts import ArtifactRef, ArtifactStore
from clip_fp8.caching import stage_key
from clip_fp8.config import EvaluationConfig, PipelineConfig, PromotionConfig, ServingConfig
from clip_fp8.errors import QualityGateError, SpeedGateError
from clip_fp8.stage import Reads, StageOutput, execute, stage
from clip_fp8.tasks.gate import gate

ACC = "embedded:shapes/zeroshot_classification/acc1"
R1 = "embedded:shapes/zeroshot_retrieval/image_retrieval_recall@1"
BASELINE = {ACC: 0.95, R1: 0.80}


def metrics_ref(tmp_path: Path, name: str, content: dict, meta: dict | None = None) -> ArtifactRef:
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(content))
    return ArtifactRef(stage=name, path=str(folder), digest=name, files={"metrics": "metrics.json"}, meta=meta or {})


def judge(tmp_path: Path, fakequant: dict, shipped: dict | None = None, recovery: ArtifactRef | None = None,
          benchmark: ArtifactRef | None = None, serving: dict | None = None, promotion: dict | None = None, **settings):
    evaluated = metrics_ref(tmp_path, "evaluate", {"baseline": BASELINE, "fp8": fakequant})
    deployed = None if shipped is None else metrics_ref(
        tmp_path, "evaluate_deployed", {"baseline": BASELINE, "runtimes": {"fakequant": fakequant, "onnxruntime": shipped},
                                        "skipped": {}})
    out = tmp_path / "gate"
    out.mkdir(parents=True)
    return gate(evaluated, deployed, recovery, benchmark, "fakequant" if shipped is None else "onnxruntime",
                EvaluationConfig(**settings), ServingConfig(**(serving or {})), PromotionConfig(**(promotion or {})), out)


def test_the_gate_passes_within_the_limits_and_names_the_worst_metric_when_it_fails(tmp_path):
    passed = judge(tmp_path / "a", {ACC: 0.94, R1: 0.79})
    assert passed.summary["promotable"] is True and passed.summary["metrics"]["fp8"] == {ACC: 0.94, R1: 0.79}
    with pytest.raises(QualityGateError) as info:  # acc1 drops 0.03, recall 0.05: the worst first
        judge(tmp_path / "b", {ACC: 0.92, R1: 0.75})
    assert str(info.value) == (f"quality gate failed: {R1}: 0.8000 -> 0.7500 (drop 0.0500 > max_drop 0.02) (+1 more)")
    # A metric that rose is never a failure; the most specific pattern wins.
    limits = {"*": 0.0, "embedded:shapes/zeroshot_classification/*": 0.05}
    assert judge(tmp_path / "c", {ACC: 0.92, R1: 0.81}, max_drop=limits).summary["promotable"] is True


def test_what_ships_is_judged_and_marking_keeps_the_run_not_promotable(tmp_path):
    with pytest.raises(QualityGateError, match=r"^quality gate failed on runtime onnxruntime: "):
        judge(tmp_path / "a", {ACC: 0.95, R1: 0.80}, {ACC: 0.90, R1: 0.80})
    marked = judge(tmp_path / "b", {ACC: 0.95, R1: 0.80}, {ACC: 0.90, R1: 0.80}, on_gate_failure="mark")
    assert marked.summary["promotable"] is False and marked.meta["gate_runtime"] == "onnxruntime"
    assert marked.summary["metrics"]["fp8"][ACC] == 0.90  # what the gate judged is what the summary reports
    assert marked.summary["quality_gate"]["failures"][0].startswith(f"{ACC}: 0.9500 -> 0.9000")
    # Fake-quant failing while what ships passes is not promotable either: both are judged.
    assert judge(tmp_path / "c", {ACC: 0.90, R1: 0.80}, {ACC: 0.95, R1: 0.80},
                 on_gate_failure="mark").summary["promotable"] is False


def test_after_recovery_the_gate_says_what_recovery_found(tmp_path):
    recovery = ArtifactRef(stage="recovery", path=str(tmp_path), digest="r", meta={
        "passed": False, "message": "quality gate failed: x; leave in FP16, most sensitive first: a.*"})
    with pytest.raises(QualityGateError, match="leave in FP16, most sensitive first: a"):
        judge(tmp_path / "a", {ACC: 0.90, R1: 0.80}, recovery=recovery)


def test_a_stage_is_keyed_on_the_fields_it_reads():
    """Early cutoff's second half: a setting a stage does not read leaves its key (and so everything after it)."""
    from clip_fp8.tasks.evaluate import evaluate
    from clip_fp8.tasks.quantize import quantize

    base = PipelineConfig()
    inputs = {"model_source": None, "calibration": None, "data_source": None, "model_cfg": base.model,
              "cfg": base.quantization, "recovered": None}
    key = lambda overrides: stage_key(quantize, {**inputs, "calib_cfg": base.with_overrides(overrides).calibration})
    assert key(["calibration.max_bad_fraction=0.5"]) == key([]) == key(["calibration.seed=3"])  # the manifest's
    assert key(["calibration.batch_size=64"]) != key([])
    evaluated = {"model_source": None, "quantized": None, "baseline": None, "eval_source": None, "model_cfg": base.model}
    ekey = lambda overrides: stage_key(evaluate, {**evaluated, "cfg": base.with_overrides(overrides).evaluation})
    assert ekey(['evaluation.max_drop={"*": 0.5}']) == ekey(["evaluation.on_gate_failure=mark"]) == ekey([])
    assert ekey(["evaluation.num_samples=10"]) != ekey([])
    gated = {"evaluated": None, "deployed": None, "recovery": None, "benchmark": None, "gate_runtime": "onnxruntime",
             "serving": base.serving, "speed_cfg": base.promotion}
    gkey = lambda overrides: stage_key(gate, {**gated, "cfg": base.with_overrides(overrides).evaluation})
    assert gkey(['evaluation.max_drop={"*": 0.5}']) != gkey([]) != gkey(["evaluation.on_gate_failure=mark"])
    assert gkey(["evaluation.num_samples=10"]) == gkey([])


UNDECLARED = '''
from pathlib import Path

from clip_fp8.config import CalibrationConfig
from clip_fp8.stage import Reads, StageOutput, stage


@stage()
def reader(cfg: Reads[CalibrationConfig, "batch_size"], out_dir: Path) -> StageOutput:
    return StageOutput(meta={"seed": cfg.seed})
'''


def test_a_stage_that_reads_a_field_it_did_not_declare_fails_naming_it(tmp_path, monkeypatch):
    (tmp_path / "reader.py").write_text(UNDECLARED)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    reader = importlib.import_module("reader").reader
    with pytest.raises(AttributeError, match=r"stage reader: cfg reads field 'seed', which its signature does not declare"):
        execute(reader, ArtifactStore(tmp_path / "out"), "k", {"cfg": PipelineConfig().calibration})
    assert not (tmp_path / "out" / "store" / "reader" / "k").exists()  # nothing published


def test_reads_refuses_a_field_the_section_does_not_have():
    from clip_fp8.config import ExportConfig

    with pytest.raises(TypeError, match="ExportConfig has no field min_cos"):
        Reads[ExportConfig, "min_cos"]

    with pytest.raises(TypeError, match="must be named after its module"):
        @stage(retries=3)
        def gate_like(out_dir: Path) -> StageOutput:  # named after no module: refused at declaration
            return StageOutput()


# The serving table the benchmark stage records: FP16 compiled and FP8 as served (Q/K/V fused), interleaved rounds.
# Timings from the H100 run of 2026-12-07 (docs/benchmarks.md); text batch 8 made a loss to exercise the gate.
H100 = "NVIDIA H100 80GB HBM3"
TABLE = {"gpu": H100, "rounds": 7, "towers": {
    "image": {"1": (1.518, 1.204, "win"), "8": (3.544, 2.867, "win"), "32": (12.425, 9.473, "win"),
              "128": (49.843, 36.616, "win")},
    "text": {"1": (0.623, 0.494, "win"), "8": (0.765, 0.801, "loss"), "32": (1.542, 1.330, "win"),
             "128": (5.092, 4.335, "win")}}}


def timed(tmp_path: Path) -> ArtifactRef:
    towers = {t: {b: {"fp16_ms": f16, "fp8_ms": f8, "verdict": v, "served_by": "fp8" if v == "win" else "fp16"}
                  for b, (f16, f8, v) in sizes.items()} for t, sizes in TABLE["towers"].items()}
    return ArtifactRef(stage="benchmark", path=str(tmp_path), digest="b",
                       meta={"rows": [{}], "serving": {**TABLE, "towers": towers}})


PASS = {ACC: 0.95, R1: 0.80}


def test_the_speed_gate_passes_what_is_served_fp16_where_fp8_loses(tmp_path):
    """As served (auto), text batch 8 is FP16: 1.0x, which meets min_speedup 1.0; the table says which form serves."""
    output = judge(tmp_path, PASS, benchmark=timed(tmp_path))
    speed = output.summary["speed_gate"]
    assert speed["status"] == "passed" and output.summary["promotable"] is True
    served = {(r["tower"], r["batch"]): (r["served_by"], round(r["speedup"], 2)) for r in speed["rows"]}
    assert served[("text", 8)] == ("fp16", 1.0) and served[("image", 128)] == ("fp8", round(49.843 / 36.616, 2))
    assert "| text | 8 | 0.765 | 0.801 | loss | fp16 | 1.00x |" in output.reports["speed-gate"]


@pytest.mark.parametrize("on_slower", ["mark", "fail", "promote_fp16"])
def test_fp8_forced_at_a_losing_size_is_marked_failed_or_promoted_as_fp16_naming_the_size(tmp_path, on_slower):
    """serving.small_batch=fp8 serves text batch 8 in FP8, 0.96x FP16: each on_slower names it with both timings."""
    losing = "text batch 8: fp8 as served 0.801 ms vs FP16 compiled 0.765 ms (0.96x < promotion.min_speedup 1.0)"
    run = lambda: judge(tmp_path, PASS, benchmark=timed(tmp_path), serving={"small_batch": "fp8"},
                        promotion={"on_slower": on_slower})
    if on_slower == "fail":
        with pytest.raises(SpeedGateError) as info:
            run()
        assert str(info.value).startswith(f"speed gate failed on {H100}: {losing}"), str(info.value)
        return
    output = run()
    assert output.summary["speed_gate"]["losing"] == [losing]
    assert output.summary["promotable"] is (on_slower == "promote_fp16")
    assert output.summary["promote_form"] == ("fp16" if on_slower == "promote_fp16" else "fp8")
    assert "**SLOWER**" in output.reports["speed-gate"]


def test_a_higher_bar_fails_every_size_under_it_and_no_gpu_skips_the_gate_saying_why(tmp_path):
    output = judge(tmp_path / "a", PASS, benchmark=timed(tmp_path), promotion={"min_speedup": 1.25})
    losing = [line.split(":")[0] for line in output.summary["speed_gate"]["losing"]]
    assert losing == ["image batch 8", "text batch 8", "text batch 32", "text batch 128"]  # image 1, 32, 128 and text 1 clear it
    assert output.summary["promotable"] is False
    cpu = ArtifactRef(stage="benchmark", path=str(tmp_path), digest="c", meta={
        "rows": [], "skipped": {"pytorch": "no CUDA GPU: the PyTorch and torch-fp8 runtimes are timed on GPUs only"},
        "skip_reason": "no CUDA GPU: the PyTorch and torch-fp8 runtimes are timed on GPUs only"})
    skipped = judge(tmp_path / "b", PASS, benchmark=cpu, promotion={"min_speedup": 5.0})
    assert skipped.summary["speed_gate"] == {"status": "skipped", "reason": cpu.meta["skip_reason"], "rows": [], "losing": []}
    assert skipped.summary["promotable"] is True
