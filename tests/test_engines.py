"""Engine build through the one interface: TensorRT-RTX for real on CPU, trtexec commands and parsing, skips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.caching import stage_key
from clip_fp8.model_locks import CLIP_VOCAB_SIZE
from clip_fp8.config import BuildConfig
from clip_fp8.flows.pipeline import clip_fp8_pipeline
from clip_fp8.tasks.build import build
from clip_fp8.tasks.tensorrt import (
    Target, fp8_supported, parse_trtexec_performance, resolve_target, trtexec_benchmark_command, trtexec_build_command,
)

# A trtexec performance summary in the format TensorRT 10 prints (values invented for the parser test).
TRTEXEC_SUMMARY = """\
[11/23/2026-02:10:01] [I] === Performance summary ===
[11/23/2026-02:10:01] [I] Throughput: 8.34721 qps
[11/23/2026-02:10:01] [I] Latency: min = 118.2 ms, max = 121.9 ms, mean = 119.8 ms, median = 119.75 ms, percentile(90%) = 120.6 ms, percentile(95%) = 120.9 ms, percentile(99%) = 121.5 ms
[11/23/2026-02:10:01] [I] Enqueue Time: min = 0.01 ms, max = 0.05 ms, mean = 0.02 ms, median = 0.02 ms, percentile(90%) = 0.03 ms, percentile(95%) = 0.03 ms, percentile(99%) = 0.04 ms
[11/23/2026-02:10:01] [I] H2D Latency: min = 0 ms, max = 0 ms, mean = 0 ms, median = 0 ms, percentile(90%) = 0 ms, percentile(95%) = 0 ms, percentile(99%) = 0 ms
[11/23/2026-02:10:01] [I] GPU Compute Time: min = 118.1 ms, max = 121.8 ms, mean = 119.7 ms, median = 119.6 ms, percentile(90%) = 120.5 ms, percentile(95%) = 120.8 ms, percentile(99%) = 121.4 ms
[11/23/2026-02:10:01] [I] D2H Latency: min = 0 ms, max = 0 ms, mean = 0 ms, median = 0 ms, percentile(90%) = 0 ms, percentile(95%) = 0 ms, percentile(99%) = 0 ms
[11/23/2026-02:10:01] [I] Total Host Walltime: 10.0153 s
[11/23/2026-02:10:01] [I] Total GPU Compute Time: 9.99 s
[11/23/2026-02:10:01] [W] * GPU compute time is unstable, with coefficient of variance = 6.25%.
&&&& PASSED TensorRT.trtexec [TensorRT v101600] # trtexec --loadEngine=image.plan
"""


@pytest.fixture(scope="module")
def rtx_run(tmp_path_factory):
    from clip_fp8.config import PipelineConfig

    root = tmp_path_factory.mktemp("rtx")
    config = PipelineConfig().with_overrides([
        f"output.root={root}", "build.backend=tensorrt-rtx", "build.opt_batch=8", "build.max_batch=16",
        "calibration.num_samples=256", "calibration.batch_size=128", "evaluation.num_samples=200",
    ])
    return clip_fp8_pipeline(config)


@pytest.mark.slow
def test_flow_builds_fp16_and_fp8_engines_with_tensorrt_rtx(rtx_run):
    assert rtx_run["stages"]["build_fp16"]["status"] == rtx_run["stages"]["build_fp8"]["status"] == "completed"
    engines = rtx_run["engines"]["engines"]
    assert set(engines) == {"fp16_text", "fp16_image", "fp8_text", "fp8_image"}
    for entry in engines.values():
        assert entry["engine_bytes"] > 0 and entry["build_seconds"] > 0
    # RTX engines are not timed on this machine, and the report says why instead of inventing numbers.
    assert rtx_run["stages"]["benchmark"]["status"] == "skipped"
    assert "RTX GPUs only" in rtx_run["stages"]["benchmark"]["note"]


@pytest.mark.slow
def test_benchmark_inputs_stay_inside_the_exported_vocabulary(rtx_run):
    # Token ids for timing are drawn below the embedding table's rows, read off each text graph (FP16 and FP8).
    from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS
    from clip_fp8.tasks.tensorrt import onnx_vocab_size

    vocab = json.loads((EMBEDDED_MODELS["tiny-clip-shapes"] / "config.json").read_text())["text_config"]["vocab_size"]
    for name in ("fp16_text", "fp8_text"):
        assert onnx_vocab_size(Path(rtx_run["artifacts"][f"onnx_{name}"])) == vocab != CLIP_VOCAB_SIZE


@pytest.mark.slow
def test_older_gpu_skips_fp8_but_builds_fp16(rtx_run, tmp_path):
    def repaired(variant: str) -> ArtifactRef:
        onnx = Path(rtx_run["artifacts"][f"onnx_{variant}_text"])
        return ArtifactRef(stage="surgery", path=str(onnx.parent), digest=variant,
                           files={f"{variant}_text": onnx.name}, meta={"variant": variant})

    a10 = Target(backend="tensorrt-rtx", version="1.7.1.116", gpu="NVIDIA A10", compute_capability="8.6")
    cfg = BuildConfig(opt_batch=4, max_batch=8)
    (tmp_path / "fp8").mkdir(), (tmp_path / "fp16").mkdir()
    assert "compute capability >= 8.9" in build(repaired("fp8"), cfg, a10, tmp_path / "fp8").skip_reason
    built = build(repaired("fp16"), cfg, a10, tmp_path / "fp16")
    assert built.skip_reason is None and (tmp_path / "fp16" / "fp16_text.engine").stat().st_size > 0


def test_fp8_needs_ada_or_newer():
    assert not fp8_supported("8.6") and not fp8_supported("8.0")
    assert fp8_supported("8.9") and fp8_supported("9.0") and fp8_supported("12.0")


def test_engine_cache_key_changes_with_the_gpu():
    cfg = BuildConfig()
    h100 = Target(backend="tensorrt", version="10.16.0", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    l40s = Target(backend="tensorrt", version="10.16.0", gpu="NVIDIA L40S", compute_capability="8.9")
    newer = Target(backend="tensorrt", version="11.0.0", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    keys = {stage_key(build, {"repaired": None, "cfg": cfg, "target": t}) for t in (h100, l40s, newer)}
    assert len(keys) == 3


def test_missing_tensorrt_is_a_reported_skip():
    if shutil.which("trtexec"):
        pytest.skip("trtexec is installed here")
    pytest.importorskip("tensorrt_rtx_bindings")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    target = resolve_target(BuildConfig())
    assert target.backend == "none" and "trtexec" in target.unavailable and "install TensorRT" in target.unavailable
    target = resolve_target(BuildConfig(backend="trtexec"))
    assert target.backend == "none" and "build.backend=trtexec" in target.unavailable


@pytest.mark.slow
def test_trtexec_build_command_per_version(rtx_run, tmp_path):
    onnx = Path(rtx_run["artifacts"]["onnx_fp8_image"])
    cfg = BuildConfig(min_batch=1, opt_batch=128, max_batch=128)
    v10 = trtexec_build_command("trtexec", "10.16.0", onnx, tmp_path / "e.plan", cfg, tmp_path / "t.cache", tmp_path / "l.json")
    assert "--stronglyTyped" in v10
    assert "--minShapes=pixel_values:1x3x64x64" in v10 and "--maxShapes=pixel_values:128x3x64x64" in v10
    assert f"--timingCacheFile={tmp_path / 't.cache'}" in v10 and f"--exportLayerInfo={tmp_path / 'l.json'}" in v10
    v11 = trtexec_build_command("trtexec", "11.0.0", onnx, tmp_path / "e.plan", cfg, tmp_path / "t.cache", tmp_path / "l.json")
    assert "--stronglyTyped" not in v11 and not any(f in v11 for f in ("--fp16", "--fp8"))
    static = trtexec_build_command("trtexec", "10.16.0", onnx, tmp_path / "e.plan", BuildConfig(static_shapes=True, opt_batch=32),
                                   tmp_path / "t.cache", tmp_path / "l.json")
    assert "--minShapes=pixel_values:32x3x64x64" in static and "--maxShapes=pixel_values:32x3x64x64" in static

    bench10 = trtexec_benchmark_command("trtexec", "10.16.0", tmp_path / "e.plan", "pixel_values", (8, 3, 64, 64), 500, 5)
    assert "--useCudaGraph" in bench10 and "--noDataTransfers" in bench10 and "--shapes=pixel_values:8x3x64x64" in bench10
    bench11 = trtexec_benchmark_command("trtexec", "11.0.0", tmp_path / "e.plan", "pixel_values", (8, 3, 64, 64), 500, 5)
    assert "--useCudaGraph" not in bench11


def test_parse_trtexec_performance_summary():
    stats = parse_trtexec_performance(TRTEXEC_SUMMARY, batch=128)
    assert stats["throughput_qps"] == pytest.approx(8.34721)
    assert stats["throughput_samples_s"] == pytest.approx(8.34721 * 128)  # qps counts batches
    assert stats["latency_median_ms"] == 119.75 and stats["latency_p99_ms"] == 121.5
    assert stats["gpu_compute_median_ms"] == 119.6 and stats["gpu_compute_p95_ms"] == 120.8
    assert stats["cv"] == pytest.approx(0.0625) and stats["unstable"] is True
    with pytest.raises(ValueError):
        parse_trtexec_performance("&&&& FAILED TensorRT.trtexec", batch=1)


def test_benchmark_plot_renders_measured_rows(tmp_path):
    # Real measurements (the H100 PyTorch baselines in docs/), reshaped to the benchmark stage's rows: the eager
    # rows stand in for the FP16 engine and for the PyTorch baseline, the compiled ones for the FP8 engine.
    from clip_fp8.flows.report import plot_benchmark, render_markdown

    measured = json.loads((Path(__file__).parent.parent / "docs/results/2026-11-23-h100-pytorch-encoders.json").read_text())
    rows = []
    for r in measured["rows"]:
        for variant in (["fp16", "pytorch-eager"] if r["variant"] == "pytorch-eager" else ["fp8"]):
            rows.append({"encoder": r["encoder"], "variant": variant, "batch": r["batch"], "latency_median_ms": r["median_ms"],
                         "latency_p99_ms": r["p99_ms"], "cv": r["cv"], "throughput_samples_s": r["throughput_samples_s"],
                         "weights_bytes": 246_000_000, "activation_bytes": int(r["peak_memory_mb"] * 2**20)})
    png = plot_benchmark(rows, tmp_path / "plot.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    markdown = render_markdown({"run": "r", "status": "completed", "promotable": True, "stages": {},
                                "benchmark": {"rows": rows}, "benchmark_png": "AAAA"})
    assert "## Benchmark" in markdown and "data:image/png;base64,AAAA" in markdown
    eager = {(r["encoder"], r["batch"]): r["median_ms"] for r in measured["rows"] if r["variant"] == "pytorch-eager"}
    compiled = next(r for r in measured["rows"] if r["variant"] == "pytorch-compile" and r["encoder"] == "image" and r["batch"] == 128)
    speedup = f"{eager[('image', 128)] / compiled['median_ms']:.2f}x"
    fp8_row = next(line for line in markdown.splitlines() if line.startswith("| image | fp8 | 128 |"))
    assert fp8_row.endswith(f"| {speedup} | {speedup} |")  # vs the FP16 engine and vs PyTorch eager
    assert "246.00 MB" in fp8_row


def test_a_benchmark_rows_throughput_is_samples_per_second_of_its_median():
    """The arithmetic the report, history and speed verdicts read, on recorded timings (only GPUs produce real ones)."""
    from clip_fp8.tasks.tensorrt import UNSTABLE_CV, timing_row

    stats = {"iterations": 50, "median_ms": 4.0, "p90_ms": 4.4, "p95_ms": 4.6, "p99_ms": 5.0, "mean_ms": 4.1, "cv": 0.02}
    row = timing_row(stats, batch=128)
    assert row["throughput_samples_s"] == pytest.approx(32000.0)  # 128 samples per 4 ms
    assert row["latency_median_ms"] == 4.0 and row["latency_p99_ms"] == 5.0 and row["iterations"] == 50
    assert row["unstable"] is False and timing_row({**stats, "cv": UNSTABLE_CV * 2}, 1)["unstable"] is True
