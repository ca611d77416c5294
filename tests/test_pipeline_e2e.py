"""The whole flow on the embedded default, then the cache: everything reused, then only what changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

from clip_fp8.config import PipelineConfig
from clip_fp8.flows.pipeline import clip_fp8_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    config = PipelineConfig().with_overrides([f"output.root={root}"])  # the real default otherwise
    return config, clip_fp8_pipeline(config)


def declared_labels(summary: dict) -> dict[str, str]:
    """The run's stage labels -> the declared stage each ran (``export_fp16`` -> export, ``quantize~1`` -> quantize)."""
    from clip_fp8.stage import pipeline_stages, stage_name

    names = {stage_name(fn) for fn in pipeline_stages()}
    found = {label: next((n for n in names if label.partition("~")[0] in (n, f"{n}_fp16", f"{n}_fp8")), None)
             for label in summary["stages"]}
    assert None not in found.values(), found  # every label is a declared stage
    return found


def computed(summary: dict) -> list[str]:
    """The labels of the stages that did work on this host (not skipped for want of TensorRT or a GPU)."""
    return [label for label, record in summary["stages"].items() if record["status"] != "skipped"]


def test_default_flow_completes_every_stage(first_run):
    from clip_fp8.stage import pipeline_stages, stage_name
    from clip_fp8.tasks.benchmark import benchmark
    from clip_fp8.tasks.build import build
    from clip_fp8.tasks.recovery import recovery
    from clip_fp8.tasks.sensitivity import sensitivity

    config, summary = first_run
    assert summary["status"] == "completed"
    ran = declared_labels(summary)
    # Every declared stage ran, but the two that only a failed gate with recovery on starts.
    assert set(ran.values()) == {stage_name(fn) for fn in pipeline_stages()} - {stage_name(sensitivity), stage_name(recovery)}
    for name in computed(summary):
        assert summary["stages"][name]["status"] == "completed", name
        assert summary["stages"][name]["seconds"] > 0
    # No TensorRT and no GPU on this machine: the engine stages say so, nothing is invented.
    engine_stages = [label for label, name in ran.items() if name in (stage_name(build), stage_name(benchmark))]
    assert sorted(engine_stages) == sorted(set(ran) - set(computed(summary))) == ["benchmark", "build_fp16", "build_fp8"]
    for name in engine_stages:
        assert "TensorRT" in summary["stages"][name]["note"]
    assert "no CUDA GPU" in summary["stages"]["benchmark"]["note"]

    # The embedded model is good enough for the gate to mean something, and FP8 keeps it there.
    baseline, fp8 = summary["metrics"]["baseline"], summary["metrics"]["fp8"]
    acc1 = "embedded:shapes/zeroshot_classification/acc1"
    assert baseline[acc1] >= 0.90
    assert fp8[acc1] >= baseline[acc1] - 0.02
    assert summary["promotable"] is True


def test_summary_and_report_on_disk(first_run):
    config, summary = first_run
    on_disk = json.loads(Path(summary["artifacts"]["summary"]).read_text())
    assert set(on_disk["stages"]) == set(summary["stages"])
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
        # The raw graphs are parsed only, on purpose, and the record says so (not a swallowed build failure).
        for raw in (fp8["preflight_raw"], fp16["preflight_raw"]):
            assert raw["built"] is None and raw["note"] == "raw export: parsed only, not built"
        # Both variants go through onnxconverter-common's FP16 conversion, which keeps CLIP's own cast of the
        # pixels to the (traced) FP32 dtype: each raw image graph feeds a Float input to a Half patch Conv, and
        # surgery's first pass fixes both. The raw FP16 text graph parses as exported.
        if encoder == "text":
            assert fp16["preflight_raw"]["parsed"] is True and fp16["preflight_raw"]["errors"] == []
        else:
            assert fp16["preflight_raw"]["parsed"] is False and "patch_embedding/Conv" in fp16["preflight_raw"]["errors"][0]
            assert fp16["changes"]["retyped"]["casts"] == 1
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
    for name in computed(first):
        assert again["stages"][name]["status"] == "cached", name
    assert again["all_cached"] is True
    assert again["metrics"] == first["metrics"]
    assert again["artifacts"]["checkpoint"] == first["artifacts"]["checkpoint"]


def test_published_artifacts_are_reused_without_prefects_records(first_run, tmp_path):
    """A run killed after a stage published its artifact but before Prefect wrote the result record: the
    artifact under its key is the stage's output, so the next run reuses it. Here the store alone is moved
    to a new root (no Prefect records at all); an artifact missing its ref file is not trusted."""
    import shutil

    from clip_fp8.artifacts import REF_FILE

    config, first = first_run
    moved = tmp_path / "moved"
    shutil.copytree(Path(config.output.root) / "store", moved / "store", symlinks=True)
    (audit_dir,) = (moved / "store" / "audit").iterdir()
    (audit_dir / REF_FILE).unlink()  # as if the publisher died between the rename and the ref
    again = clip_fp8_pipeline(config.with_overrides([f"output.root={moved}"]))
    status = {name: again["stages"][name]["status"] for name in computed(first)}
    assert status == {**{name: "cached" for name in computed(first)}, "audit": "completed"}, status
    assert again["metrics"] == first["metrics"]
    assert again["artifacts"]["checkpoint"].startswith(str(moved))
    assert (audit_dir / REF_FILE).is_file()


def test_changing_an_evaluation_setting_reruns_only_evaluation(first_run):
    config, first = first_run
    changed = config.with_overrides(["evaluation.num_samples=500"])
    summary = clip_fp8_pipeline(changed)
    status = {name: stage["status"] for name, stage in summary["stages"].items()}
    assert status["evaluate_baseline"] == status["evaluate"] == status["evaluate_deployed"] == "completed"
    for name in set(computed(first)) - {"evaluate_baseline", "evaluate", "evaluate_deployed", "gate"}:
        assert status[name] == "cached", name


def test_a_new_gate_threshold_reruns_only_the_gate(first_run):
    """Early cutoff: the thresholds are the gate's alone, so the evaluations' keys stay and only the gate runs."""
    config, first = first_run
    summary = clip_fp8_pipeline(config.with_overrides(['evaluation.max_drop={"*": 0.03}', "evaluation.on_gate_failure=mark"]))
    status = {name: stage["status"] for name, stage in summary["stages"].items()}
    assert [name for name in computed(first) if status[name] != "cached"] == ["gate"], status
    assert summary["promotable"] is True and {r["max_drop"] for r in summary["quality_gate"]["rows"]} == {0.03}


def test_a_calibration_field_that_changes_no_pair_stops_at_the_manifest(first_run):
    """Early cutoff: ``max_bad_fraction`` re-runs the selection, which writes the same manifest on data with no
    unreadable image; quantize reads the manifest's digest and the batch size only, so it and all after it are cached."""
    config, first = first_run
    summary = clip_fp8_pipeline(config.with_overrides(["calibration.max_bad_fraction=0.5"]))
    status = {name: stage["status"] for name, stage in summary["stages"].items()}
    assert status["calibration_data"] == "completed"
    assert [name for name in computed(first) if status[name] != "cached"] == ["calibration_data"], status


def test_adding_an_evaluation_dataset_reruns_only_evaluation_and_reports_both(first_run, tmp_path):
    from data_fixtures import write_wds_classification

    config, _ = first_run
    root = write_wds_classification(tmp_path / "wds_shapes")
    changed = config.with_overrides([f"evaluation.datasets=[{{name: 'embedded:shapes'}}, {{name: wds/shapes, root: '{root}'}}]"])
    summary = clip_fp8_pipeline(changed)
    assert summary["stages"]["evaluate"]["status"] == "completed"
    assert all(summary["stages"][name]["status"] == "cached" for name in ("quantize", "set_scales", "surgery_fp8"))
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


def test_independent_branches_overlap_in_time(first_run):
    """Both exports and the baseline's evaluation start with the run, beside calibration and each other: read
    from the task runs Prefect recorded on the server, not from the flow's own notes."""
    import asyncio
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, summary = first_run

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[summary["flow_run_id"]])))

    spans: dict[str, list] = {}
    for _ in range(50):  # task run records reach the server as events, shortly after the flow returns
        spans = {}
        for r in asyncio.run(task_runs()):
            if r.start_time and r.end_time:
                spans.setdefault(r.name.rsplit("-", 1)[0], []).append((r.start_time, r.end_time))
        if len(spans.get("export", [])) == 2 and {"evaluate", "calibration_data", "set_scales"} <= spans.keys():
            break
        time.sleep(0.2)
    (evaluate,) = spans["evaluate"]
    (calibration,) = spans["calibration_data"]

    def overlap(a, b):
        return a[0] < b[1] and b[0] < a[1]

    t0 = min(start for runs in spans.values() for start, _ in runs)
    timeline = {name: [(round((a - t0).total_seconds(), 2), round((b - t0).total_seconds(), 2)) for a, b in runs]
                for name, runs in spans.items()}
    for export in spans["export"]:  # FP16 and FP8: neither waits for calibration
        assert overlap(export, calibration), timeline
    (baseline,) = spans["evaluate_baseline"]  # evaluation beside the exports and calibration
    assert overlap(baseline, calibration) and all(overlap(baseline, export) for export in spans["export"]), timeline
    assert evaluate[0] >= baseline[1], timeline  # the FP8 evaluation compares with the baseline's metrics


def test_new_calibration_data_reexports_nothing_and_rewrites_the_fp8_scales(first_run):
    config, first = first_run
    summary = clip_fp8_pipeline(config.with_overrides(["calibration.seed=7"]))
    status = {name: stage["status"] for name, stage in summary["stages"].items()}
    for name in ("baseline_model", "evaluate_baseline", "export_fp16", "export_fp8", "surgery_fp16"):
        assert status[name] == "cached", name
    for name in ("calibration_data", "quantize", "audit", "evaluate", "set_scales", "surgery_fp8", "torch_fp8",
                 "evaluate_deployed"):
        assert status[name] == "completed", name
    # The new scales are in the graphs that ship: same structure, other values.
    import onnx

    shipped = [onnx.load(s["artifacts"]["onnx_fp8_image"]) for s in (first, summary)]
    assert [n.op_type for n in shipped[0].graph.node] == [n.op_type for n in shipped[1].graph.node]
    assert any(a.raw_data != b.raw_data for a, b in zip(shipped[0].graph.initializer, shipped[1].graph.initializer))


def test_run_folder_links_every_artifact_and_latest_points_at_the_newest_run(first_run):
    config, summary = first_run
    runs = Path(config.output.root) / "runs"
    latest = runs / "latest"
    assert latest.is_symlink() and not Path(os.readlink(latest)).is_absolute()
    newest = max((p for p in runs.iterdir() if not p.is_symlink()), key=lambda p: (p / "summary.json").stat().st_mtime)
    assert latest.resolve() == newest.resolve()
    links = Path(summary["artifacts"]["report"]).parent / "artifacts"
    assert {p.name for p in links.iterdir()} == set(summary["stages"])
    for link in links.iterdir():
        assert not Path(os.readlink(link)).is_absolute() and link.resolve().is_dir(), link
    onnx = links / "surgery_fp8" / "fp8_image.onnx"
    assert onnx.is_file() and onnx.resolve() == Path(summary["artifacts"]["onnx_fp8_image"]).resolve()


# Guards seen firing: each test below fails if its guard is removed or turned round (see README, Tests).

def test_quality_gate_fails_marks_and_honours_a_pattern_limit(first_run):
    from clip_fp8.errors import QualityGateError

    config, first = first_run
    # On this CPU host the gate judges the repaired ONNX graphs through ONNX Runtime (what ships here).
    assert first["gate_runtime"] == "onnxruntime"
    baseline, fp8 = first["metrics"]["baseline"], first["metrics"]["fp8"]
    assert fp8 == first["runtime_metrics"]["onnxruntime"]
    worse = {m for m in baseline if fp8[m] < baseline[m]}
    assert any("classification" in m for m in worse) and any("retrieval" in m for m in worse)
    with pytest.raises(QualityGateError) as info:
        clip_fp8_pipeline(config.with_overrides(['evaluation.max_drop={"*": 0.0}']))
    worst = max(worse, key=lambda m: baseline[m] - fp8[m])
    assert str(info.value).startswith(f"quality gate failed on runtime onnxruntime: {worst}:"), str(info.value)
    marked = clip_fp8_pipeline(config.with_overrides(['evaluation.max_drop={"*": 0.0}', "evaluation.on_gate_failure=mark"]))
    assert marked["status"] == "completed" and marked["promotable"] is False
    assert {r["metric"] for r in marked["quality_gate"]["rows"] if not r["passed"]} == worse
    # The most specific pattern wins: classification may drop 0.02 here, every other metric nothing.
    limits = '{"embedded:shapes/zeroshot_classification/*": 0.02, "*": 0.0}'
    pattern = clip_fp8_pipeline(config.with_overrides([f"evaluation.max_drop={limits}", "evaluation.on_gate_failure=mark"]))
    assert {r["metric"] for r in pattern["quality_gate"]["rows"] if not r["passed"]} == {m for m in worse if "retrieval" in m}


def damage_one_weight_scale(graph: Path, out: Path) -> None:
    """The first MLP weight's DequantizeLinear scale times 10: a graph ONNX Runtime still runs, with wrong numbers."""
    import numpy as np
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    inits = {i.name: i for i in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and "mlp" in n.input[0])
    scale = inits[dq.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float16(10), name=scale.name))
    onnx.save(model, str(out))


def test_onnx_runtime_check_is_against_pytorch_and_fires_on_a_damaged_graph(first_run, tmp_path):
    """One weight scale of the shipped FP8 image graph times 10: ONNX Runtime still runs it, and the check
    against the fake-quant PyTorch model catches it (a graph compared with itself would not)."""
    from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, load_quantized
    from clip_fp8.tasks.surgery import check_inputs, cosine, onnx_embeddings, torch_embeddings

    config, summary = first_run
    shipped = Path(summary["artifacts"]["onnx_fp8_image"])
    manifest = json.loads((Path(summary["artifacts"]["report"]).parent / "artifacts/calibration_data/manifest.json").read_text())
    pixels = check_inputs(str(EMBEDDED_MODELS["tiny-clip-shapes"]), manifest, "", 16)["image"]
    reference = torch_embeddings(load_quantized(summary["artifacts"]["checkpoint"], config.model), "image", pixels)
    assert cosine(onnx_embeddings(shipped, pixels), reference).min() >= config.export.min_cosine

    damaged = tmp_path / "damaged.onnx"
    damage_one_weight_scale(shipped, damaged)
    assert cosine(onnx_embeddings(damaged, pixels), reference).min() < config.export.min_cosine


def test_cli_gate_and_onnx_check_exit_2_naming_what_failed(first_run):
    """One run, two guards firing in independent branches: the gate (judging fake-quant, so it needs no graph)
    and the ONNX Runtime check. Exit 2, one error line, and the stage table names both."""
    import os
    import re
    import subprocess
    import sys

    config, first = first_run
    run = subprocess.run([sys.executable, "-m", "clip_fp8.cli", "run", "-o", config.output.root,
                          "--set", 'evaluation.max_drop={"*": 0.0}', "--set", "evaluation.gate_runtime=fakequant",
                          "--set", "export.min_cosine=0.99999"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "1000"})
    assert run.returncode == 2, run.stderr[-2000:]
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("error:")]
    gate = re.compile(r"quality gate failed.*max_drop 0\.0")
    check = re.compile(r"fp(8|16)_(text|image): ONNX Runtime vs PyTorch cosine 0\.\d{4} < export\.min_cosine 0\.99999")
    assert gate.search(line) or check.search(line), line
    table = {row.split()[0]: row for row in run.stdout.splitlines() if row.split()[1:2] == ["failed"]}
    assert gate.search(table["gate"]), table
    assert any(check.search(row) for name, row in table.items() if name.startswith("surgery")), table


# What ships, evaluated (issue 11): every runtime that can run here, beside the fake-quant model.

RUNTIME_TOLERANCE = 0.02  # |onnxruntime - fakequant| per metric on the embedded model (README, Runtimes)


def run_artifact(summary: dict, stage: str):
    """A stage's ArtifactRef, read back from the run folder's link to it."""
    from clip_fp8.artifacts import REF_FILE, ArtifactRef

    folder = Path(summary["artifacts"]["report"]).parent / "artifacts" / stage
    return ArtifactRef.model_validate_json((folder / REF_FILE).read_text()).model_copy(update={"path": str(folder.resolve())})


def test_every_runtime_is_evaluated_or_says_why_and_onnxruntime_agrees_with_fakequant(first_run):
    config, summary = first_run
    metrics, skipped = summary["runtime_metrics"], summary["runtimes_skipped"]
    assert set(metrics) == {"fakequant", "onnxruntime"}
    assert set(skipped) == {"torch-fp8", "tensorrt"}
    assert "compute capability >= 8.9" in skipped["torch-fp8"]
    assert "TensorRT" in skipped["tensorrt"]
    assert set(metrics["onnxruntime"]) == set(metrics["fakequant"]) == set(summary["metrics"]["baseline"])
    for metric, value in metrics["onnxruntime"].items():
        assert abs(value - metrics["fakequant"][metric]) <= RUNTIME_TOLERANCE, metric
    # The choice is on disk, and the report shows every runtime side by side with the delta.
    on_disk = json.loads(Path(summary["artifacts"]["summary"]).read_text())
    assert on_disk["gate_runtime"] == "onnxruntime"
    report = Path(summary["artifacts"]["report"]).read_text()
    assert "what ships: `onnxruntime`" in report and "| onnxruntime - fakequant |" in report
    assert "`torch-fp8`: FP8 GEMMs need a CUDA GPU" in report


def test_damaged_fp8_graph_passes_the_fakequant_gate_and_fails_the_deployed_one(first_run, tmp_path):
    """One DequantizeLinear scale of the shipped image graph times 10: the fake-quant model never sees it,
    so a gate on fakequant passes; the gate on what ships (the repaired graph through ONNX Runtime) fails,
    naming the runtime and the metric."""
    import shutil

    from clip_fp8.errors import QualityGateError
    from clip_fp8.tasks.checkpoints import resolve_model_source
    from clip_fp8.tasks.eval_datasets import resolve_eval_source
    from clip_fp8.tasks.evaluate_deployed import evaluate_deployed
    from clip_fp8.tasks.gate import gate

    config, summary = first_run
    shipped = run_artifact(summary, "surgery_fp8")
    damaged = shipped.model_copy(update={"path": str(shutil.copytree(shipped.path, tmp_path / "damaged"))})
    damage_one_weight_scale(damaged.file("fp8_image"), damaged.file("fp8_image"))
    (tmp_path / "deployed").mkdir()
    output = evaluate_deployed(run_artifact(summary, "evaluate"), resolve_model_source(config.model), damaged, None,
                               None, resolve_eval_source(config.evaluation), config.model, config.evaluation,
                               ["fakequant", "onnxruntime"], tmp_path / "deployed")
    deployed = run_artifact(summary, "evaluate_deployed").model_copy(
        update={"path": str(tmp_path / "deployed"), "files": output.files})

    def gate_on(gate_runtime: str, out: Path, evaluation=config.evaluation):
        out.mkdir(exist_ok=True)
        return gate(run_artifact(summary, "evaluate"), deployed, None, None, gate_runtime, evaluation, config.serving,
                    config.promotion, out)

    passed = gate_on("fakequant", tmp_path / "fakequant")
    assert passed.meta["promotable"] is True and passed.meta["gate_runtime"] == "fakequant"
    assert "**FAIL**" not in passed.reports["quality-gate"]
    with pytest.raises(QualityGateError) as info:
        gate_on("onnxruntime", tmp_path / "onnxruntime")
    message = str(info.value)
    assert message.startswith("quality gate failed on runtime onnxruntime: embedded:shapes/"), message
    assert "max_drop 0.02" in message
    assert "**FAIL**" in info.value.reports["quality-gate"]
    # Marked instead of failed: the deployed runtime's verdict still makes the run not promotable.
    marked = gate_on("onnxruntime", tmp_path / "marked", config.evaluation.model_copy(update={"on_gate_failure": "mark"}))
    assert marked.meta["promotable"] is False and marked.summary["promotable"] is False


def test_torch_fp8_artifact_holds_fp8_weights_and_matches_fakequant(first_run):
    """The artifact a serving host loads (``clip_fp8.fp8_runtime.load``), checked on this CPU: FP8 weights in
    memory, smaller than FP16, and the same embeddings as the fake-quant model on calibration images."""
    import torch

    from clip_fp8.fp8_runtime import FP8, load
    from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, load_quantized
    from clip_fp8.tasks.surgery import check_inputs, torch_embeddings

    config, summary = first_run
    artifact = run_artifact(summary, "torch_fp8")
    assert summary["stages"]["torch_fp8"]["status"] == "completed"
    clip = load(artifact.path, device="cpu", dtype=torch.float32, fuse=False)  # the artifact's layers as written
    assert clip.fp8_weights() == artifact.meta["fp8_tensors"] > 0
    assert any(p.dtype == FP8 for p in clip.model.parameters())
    assert artifact.meta["weights_bytes"] < 0.75 * artifact.meta["fp16_weights_bytes"]
    manifest = json.loads(run_artifact(summary, "calibration_data").file("manifest").read_text())
    inputs = check_inputs(str(EMBEDDED_MODELS["tiny-clip-shapes"]), manifest, "", 32)
    fake = load_quantized(summary["artifacts"]["checkpoint"], config.model)
    for encoder, encode in (("image", clip.encode_image), ("text", clip.encode_text)):
        reference = torch.from_numpy(torch_embeddings(fake, encoder, inputs[encoder]))
        got = encode(torch.from_numpy(inputs[encoder])).float()
        assert torch.nn.functional.cosine_similarity(got, reference).min() >= 0.99, encoder


def test_torch_fp8_fuses_qkv_exactly_and_serves_each_size_by_the_form_its_table_names(first_run, tmp_path):
    """On this CPU, the artifact as a serving host loads it: Q/K/V in one GEMM gives the unfused embeddings (the
    scales are folded, no weight re-rounded); a serving.json beside it sends image batch 1 to the FP16 twin and
    batch 8 to FP8, both agreeing with the fake-quant model; small_batch=fp8 overrides the table."""
    import shutil

    import torch

    from clip_fp8.fp8_runtime import FP8, LAYOUT, SERVING, FP8Linear, FusedQKVAttention, load
    from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, load_quantized
    from clip_fp8.tasks.surgery import check_inputs, torch_embeddings

    config, summary = first_run
    artifact = Path(shutil.copytree(run_artifact(summary, "torch_fp8").path, tmp_path / "torch_fp8"))
    manifest = json.loads(run_artifact(summary, "calibration_data").file("manifest").read_text())
    inputs = check_inputs(str(EMBEDDED_MODELS["tiny-clip-shapes"]), manifest, "", 8)
    pixels, ids = torch.from_numpy(inputs["image"]), torch.from_numpy(inputs["text"])
    unfused = load(artifact, device="cpu", dtype=torch.float32, fuse=False)
    fused = load(artifact, device="cpu", dtype=torch.float32)
    assert sum(isinstance(m, FusedQKVAttention) for m in fused.model.modules()) == 4  # 2 layers per tower
    # Every FP8 Linear of the layout is held once (Q, K and V as their attention's qkv), in FP8, and nothing else is.
    layout = json.loads((artifact / LAYOUT).read_text())["fp8_linears"]
    held = [m for m in fused.model.modules() if isinstance(m, FP8Linear)]
    assert {id(m) for m in held} == {id(fused.linear(name)) for name in layout}
    assert len(held) == len(layout) - 2 * 4 and all(m.weight.dtype == FP8 for m in held)
    cos = torch.nn.functional.cosine_similarity
    for encode in ("encode_image", "encode_text"):
        x = pixels if encode == "encode_image" else ids
        assert cos(getattr(fused, encode)(x), getattr(unfused, encode)(x)).min() >= 0.9999, encode

    table = {"gpus": {"cpu": {"image": {"1": {"served_by": "fp16"}, "8": {"served_by": "fp8"}},
                              "text": {"1": {"served_by": "fp8"}, "8": {"served_by": "fp8"}}}}}
    (artifact / SERVING).write_text(json.dumps(table))
    served = load(artifact, device="cpu", dtype=torch.float32, batch_sizes=(1, 8))
    assert [served.served_by("image", b) for b in (1, 8)] == ["fp16", "fp8"]
    assert [served.served_by("text", b) for b in (1, 8)] == ["fp8", "fp8"]
    assert set(served.twins) == {"image"} and 0 < served.fp16_fallback_bytes < 4 * served.weights_bytes
    fake = load_quantized(summary["artifacts"]["checkpoint"], config.model)
    reference = torch.from_numpy(torch_embeddings(fake, "image", inputs["image"]))
    one = served.encode_image(pixels[:1]).float()  # FP16 twin
    eight = served.encode_image(pixels).float()  # FP8
    assert cos(one, reference[:1]).min() >= 0.99 and cos(eight, reference).min() >= 0.99
    assert not torch.equal(one[0], eight[0])  # two forms, really: the same image through each
    forced = load(artifact, device="cpu", dtype=torch.float32, batch_sizes=(1, 8), small_batch="fp8")
    assert forced.served_by("image", 1) == "fp8" and not forced.twins


def test_the_onnx_check_judges_the_worst_input_not_the_average(first_run):
    """export.min_cosine between the FP8 image graph's worst and mean cosine over the check inputs: the check fails,
    naming that graph and its worst cosine (an average would have let it through)."""
    from clip_fp8.errors import PipelineError

    config, first = first_run
    check = first["onnx"]["fp8_image"]["onnxruntime"]
    assert check["min_cosine"] < check["mean_cosine"], check  # the premise: the inputs do not all agree equally
    between = round((check["min_cosine"] + check["mean_cosine"]) / 2, 6)
    with pytest.raises(PipelineError) as failure:
        clip_fp8_pipeline(config.with_overrides([f"export.min_cosine={between}"]))
    assert f"fp8_image: ONNX Runtime vs PyTorch cosine {check['min_cosine']:.4f} < export.min_cosine {between}" \
        in str(failure.value), str(failure.value)
