"""What every night leaves behind: history records, the regression check, events, a Triton repository."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clip_fp8 import history
from clip_fp8.config import PipelineConfig
from clip_fp8.flows.pipeline import clip_fp8_pipeline
from clip_fp8.triton_repository import LATEST, Repository, promote, reconcile

# A change that makes FP8 worse on the embedded model: LayerNorm inputs and the patch embedding quantized too
# (the reference recipe keeps the latter in FP16), calibrated on one pair. The tiny model is robust, so its FP8
# retrieval recall falls by about 0.01 to 0.015 against the first night's FP8. That night's gate allows no drop
# at all (`mark`: the run completes either way), and the regression check uses the same limits.
WORSE = ["quantization.quantize_layernorm=true", "quantization.exclude=[]", "calibration.num_samples=1",
         "calibration.batch_size=1", 'evaluation.max_drop={"*": 0.0}', "evaluation.on_gate_failure=mark"]


def model_config_pb2():
    """Triton's own model configuration schema, from the tritonclient wheel (setup.sh --test installs it
    without its gRPC dependencies: only this generated protobuf module is needed, loaded from its file)."""
    package = importlib.util.find_spec("tritonclient")
    path = Path(package.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2().ModelConfig())


async def _events(name: str):
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    async with get_client() as client:
        return (await client.read_events(filter=EventFilter(event=EventNameFilter(name=[name])), limit=50)).events


def events_named(name: str, run: str, tries: int = 100) -> list:
    import time

    for _ in range(tries):  # events reach the server through Prefect's events worker, shortly after emission
        found = [e for e in asyncio.run(_events(name)) if e.payload.get("run") == run]
        if found:
            return found
        time.sleep(0.2)
    return []


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Three nights of the embedded model: the first, an unchanged one, one that a config change made worse."""
    base = tmp_path_factory.mktemp("nights")
    config = PipelineConfig().with_overrides([
        f"output.root={base / 'out'}", f"promotion.repository={base / 'triton'}",
        "calibration.num_samples=256", "calibration.batch_size=128", "evaluation.num_samples=200",
        "promotion.smoke_check=off"])  # history and promotion's bookkeeping here; test_serving.py serves them
    runs = [clip_fp8_pipeline(config), clip_fp8_pipeline(config), clip_fp8_pipeline(config.with_overrides(WORSE))]
    return config, runs


@pytest.mark.slow
def test_three_nights_are_recorded_unchanged_and_regressed_and_only_the_first_is_promoted(nights):
    config, (first, unchanged, worse) = nights
    records = history.read(config.output.root)
    assert [r["run"] for r in records] == [first["run"], unchanged["run"], worse["run"]]
    r1, r2, r3 = records
    assert (r1["unchanged"], r2["unchanged"], r3["unchanged"]) == (False, True, False)
    assert r1["promotion"]["version"] == 1 and r2["promotion"]["version"] is None and r3["promotion"]["version"] is None
    assert r2["promotion"]["skipped"] == "nothing changed since the last run"
    assert r2["regression"] == {"against": first["run"], "reasons": []}
    fell = {m for m, v in worse["metrics"]["fp8"].items() if v < first["metrics"]["fp8"][m]}
    assert fell, "the worse config must make some FP8 metric worse"  # the premise of this test
    assert r3["regression"]["against"] == first["run"]
    assert {reason.split(": ")[0] for reason in r3["regression"]["reasons"]} == fell, r3["regression"]
    # Whether the worse night's own gate fails depends on where its FP8 lands against its baseline (CPUs differ
    # in the last bits); the regression against the promoted night is what this test is about.
    skipped = r3["promotion"]["skipped"]
    assert f"it regressed against {first['run']}: " in skipped, skipped
    assert ("its quality gate failed" in skipped) == (not r3["promotable"]), skipped
    for r in records:  # what a record keeps
        assert r["model"]["digest"] and r["calibration_digest"] and r["config_digest"] and r["flow_run_id"]
        assert r["libraries"]["nvidia-modelopt"] and r["libraries"]["torch"] and r["onnx_bytes"]["fp8_text"] > 0
        assert r["gate_runtime"] == "onnxruntime" and {"fakequant", "onnxruntime"} <= r["runtime_metrics"].keys()
        assert r["metrics"]["fp8"] == r["runtime_metrics"]["onnxruntime"]  # what the gate and the regression judge
    assert r1["calibration_digest"] != r3["calibration_digest"] and r1["config_digest"] != r3["config_digest"]
    # The events carry the numbers, read back from the server's events API.
    (regressed,) = events_named("clip-fp8.run.regressed", worse["run"])
    assert regressed.payload["against"] == first["run"] and regressed.payload["reasons"] == r3["regression"]["reasons"]
    assert regressed.resource.id == "clip-fp8.model.embedded:tiny-clip-shapes"
    (promoted,) = events_named("clip-fp8.run.promoted", first["run"])
    assert promoted.payload["version"] == 1
    assert not events_named("clip-fp8.run.promoted", worse["run"], tries=5)


@pytest.mark.slow
def test_the_promoted_repository_is_what_triton_loads(nights):
    config, (first, _, _) = nights
    repo = Path(config.promotion.repository)
    latest = json.loads((repo / LATEST).read_text())
    assert latest["version"] == 1 and latest["run"] == first["run"]
    for model, encoder in (("clip_image_fp8", "image"), ("clip_text_fp8", "text")):
        parsed = parse_config((repo / model / "config.pbtxt").read_text())
        assert parsed.name == model and parsed.backend == "python"  # test_serving.py serves it
        assert list(parsed.version_policy.specific.versions) == [1]
        assert parsed.max_batch_size == config.build.max_batch
        assert list(parsed.dynamic_batching.preferred_batch_size) == [1, 8, 32, 128]
        assert parsed.instance_group[0].kind == model_config_pb2().ModelInstanceGroup.KIND_AUTO
        (output,) = parsed.output
        assert output.name == f"{encoder}_embeds" and list(output.dims) == [first["model"]["projection_dim"]]
        version = repo / model / "1"
        assert (version / "model.onnx").read_bytes() == Path(first["artifacts"][f"onnx_fp8_{encoder}"]).read_bytes()
        provenance = json.loads((version / "provenance.json").read_text())
        assert provenance["run"] == first["run"] and provenance["forced"] is False and provenance["metrics"]["fp8"]
    (image_input,) = parse_config((repo / "clip_image_fp8" / "config.pbtxt").read_text()).input
    assert list(image_input.dims) == [3, first["model"]["image_size"], first["model"]["image_size"]]
    tokenizer = json.loads((repo / "clip_text_fp8" / "1" / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE"
    preprocessing = json.loads((repo / "clip_image_fp8" / "1" / "processor_config.json").read_text())["image_processor"]
    assert preprocessing["crop_size"]["height"] == first["model"]["image_size"] and preprocessing["image_mean"]


@pytest.mark.slow
def test_history_cli_report_and_promotion_by_hand(nights):
    config, (first, _, worse) = nights
    cli = [sys.executable, "-m", "clip_fp8.cli"]
    shown = subprocess.run([*cli, "history", "-o", config.output.root, "--last", "2"], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.strip().splitlines()
    assert len(lines) == 3 and "unchanged" in lines[1] and worse["run"] in lines[2] and "v1" not in lines[2]
    # The report of the regressed night says so, with the trend over the model's runs.
    report = Path(worse["artifacts"]["report"]).read_text()
    assert "## History" in report and "regressed" in report and Path(worse["artifacts"]["trend_plot"]).is_file()
    # By hand: the same checks refuse it; --force promotes it and says so in the repository and the history.
    refused = subprocess.run([*cli, "promote", worse["run"], "-o", config.output.root], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and f"it regressed against {first['run']}" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1 and "--force" in refused.stderr
    forced = subprocess.run([*cli, "promote", worse["run"], "-o", config.output.root, "--force"], capture_output=True,
                            text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr
    repo = Path(config.promotion.repository)
    assert json.loads((repo / LATEST).read_text())["run"] == worse["run"]
    assert json.loads((repo / "clip_text_fp8" / "2" / "provenance.json").read_text())["forced"] is True
    last = history.read(config.output.root)[-1]
    assert last["kind"] == "promotion" and last["run"] == worse["run"] and last["promotion"]["forced"] is True


@pytest.mark.slow
def test_a_crash_in_the_middle_of_promotion_leaves_latest_on_the_previous_version(nights, tmp_path, monkeypatch):
    config, (first, _, _) = nights
    repo_dir = tmp_path / "repo"
    promote(first, {"run": first["run"]}, str(repo_dir), keep_versions=2, smoke="off")  # the crash is the point here
    before = {m: (repo_dir / m / "config.pbtxt").read_text() for m in ("clip_image_fp8", "clip_text_fp8")}

    real_write = Repository.write

    def dies_after_the_first_config(self, rel, data):
        real_write(self, rel, data)
        if rel.endswith("config.pbtxt"):
            raise KeyboardInterrupt("killed after writing one model's config")

    monkeypatch.setattr(Repository, "write", dies_after_the_first_config)
    with pytest.raises(KeyboardInterrupt):
        promote(first, {"run": first["run"]}, str(repo_dir), keep_versions=2, smoke="off")
    monkeypatch.undo()
    assert json.loads((repo_dir / LATEST).read_text())["version"] == 1  # the pointer never moved
    assert (repo_dir / "clip_image_fp8" / "2" / "model.onnx").is_file()  # the new version was written, not served
    assert reconcile(Repository(str(repo_dir))) == 1
    assert {m: (repo_dir / m / "config.pbtxt").read_text() for m in before} == before
    # The next promotion is version 3 (2 is never reused), and keep_versions=2 drops the oldest.
    assert promote(first, {"run": first["run"]}, str(repo_dir), keep_versions=2, smoke="off")["version"] == 3
    assert Repository(str(repo_dir)).versions("clip_text_fp8") == [2, 3]


def _append_many(root: str, tag: str, n: int) -> None:
    for i in range(n):
        history.append(root, {"kind": "run", "run": f"{tag}-{i}", "model_key": "m"})


def test_two_workers_appending_at_once_both_land(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(tmp_path), tag, 50)) for tag in ("a", "b")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    runs = {r["run"] for r in history.read(str(tmp_path))}
    assert runs == {f"{t}-{i}" for t in "ab" for i in range(50)}
    assert not list((tmp_path / "history").glob(".*"))  # no temporary file left


def test_latency_regression_needs_the_same_gpu_and_the_budget_exceeded():
    from clip_fp8.flows.regression_and_promotion import regression_reasons

    config = PipelineConfig()
    promoted = {"metrics": {"fp8": {}}, "gpu": "NVIDIA H100",
                "benchmark": {"rows": [{"engine": "fp8_image", "batch": 128, "median_ms": 100.0}]}}

    def record(ms: float, gpu: str = "NVIDIA H100") -> dict:
        return {"metrics": {"fp8": {}}, "gpu": gpu, "benchmark": {"rows": [{"engine": "fp8_image", "batch": 128, "median_ms": ms}]}}

    assert regression_reasons(record(104.0), promoted, config) == []
    (reason,) = regression_reasons(record(110.0), promoted, config)
    assert "fp8_image batch 128 100.000 -> 110.000 ms (+10.0% > max_latency_increase 5%)" == reason
    assert regression_reasons(record(110.0, gpu="NVIDIA L40S"), promoted, config) == []
    # The build matrix: each target's timings against the same GPU type's, whichever pool built the promoted run's.
    matrix = {"metrics": {"fp8": {}}, "gpu": None, "benchmark": {"rows": []}, "targets": {
        "NVIDIA H100": {"status": "completed", "benchmark": {"rows": [{"engine": "fp8_image", "batch": 128, "median_ms": 120.0}]}},
        "NVIDIA L40S": {"status": "completed", "benchmark": {"rows": [{"engine": "fp8_image", "batch": 128, "median_ms": 900.0}]}}}}
    (reason,) = regression_reasons(matrix, promoted, config)
    assert reason.startswith("fp8_image batch 128 on NVIDIA H100 100.000 -> 120.000 ms (+20.0%")


def test_speedups_as_served_are_recorded_and_a_drop_on_the_same_gpu_regresses():
    """The speed gate's per-size speedups go into the record, and the regression check compares them per GPU type."""
    from clip_fp8.flows.regression_and_promotion import _serving_speedups, regression_reasons

    def speed(gpu: str, text_b1: float) -> dict:
        return {"status": "passed", "gpu": gpu, "rows": [{"tower": "text", "batch": 1, "speedup": text_b1},
                                                         {"tower": "image", "batch": 128, "speedup": 1.35}]}

    promoted = {"metrics": {"fp8": {}}, "serving": _serving_speedups(speed("NVIDIA H100", 1.26))}
    assert promoted["serving"] == {"NVIDIA H100": {"text/1": 1.26, "image/128": 1.35}}
    assert _serving_speedups({"status": "skipped", "reason": "no GPU", "rows": [], "losing": []}) == {}
    config = PipelineConfig()
    now = lambda gpu, x: {"metrics": {"fp8": {}}, "serving": _serving_speedups(speed(gpu, x))}
    assert regression_reasons(now("NVIDIA H100", 1.22), promoted, config) == []  # within 5 %
    (reason,) = regression_reasons(now("NVIDIA H100", 1.10), promoted, config)
    assert reason == "text batch 1 on NVIDIA H100: speedup as served 1.26x -> 1.10x (> max_latency_increase 5% slower)"
    assert regression_reasons(now("NVIDIA H200", 1.00), promoted, config) == []  # another GPU type: nothing to compare


def test_promotion_settings_are_checked():
    from pydantic import ValidationError

    for bad in ("promotion.max_latency_increase=-0.1", "promotion.keep_versions=0"):
        with pytest.raises(ValidationError):
            PipelineConfig().with_overrides([bad])


def test_the_regression_check_compares_with_the_newest_promoted_run_of_the_same_model():
    """Several promoted runs: the newest of this model is the reference, not the first, nor another model's."""
    from clip_fp8.history import last_promoted

    def record(run: str, model: str, version):
        return {"run": run, "model_key": model, "promotion": {"version": version}}

    records = [record("a", "vit", 1), record("b", "vit", 2), record("c", "vit", None), record("d", "b32", 3)]
    assert last_promoted(records, "vit")["run"] == "b"
    assert last_promoted(records, "b32")["run"] == "d"
    assert last_promoted(records, "rn50") is None
