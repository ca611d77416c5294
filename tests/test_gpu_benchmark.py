"""The benchmark's timing on a real GPU: the shared CUDA-event timer, CUDA-graph capture, the PyTorch baselines.

Run through the device tool: ``python -m pytest -m gpu tests/test_gpu_benchmark.py``. TensorRT engines are
not timed here: no TensorRT is installed on the GPU hosts this project is lent.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run it through the device tool)")]


def test_timer_measures_work_and_graph_replay_repeats_it():
    from clip_fp8.timing import capture_graph, time_cuda

    stream = torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    out = torch.empty_like(a)

    def launch() -> None:
        torch.matmul(a, a, out=out)

    graph, why_not = capture_graph(launch, stream)
    assert graph is not None, why_not
    expected = out.clone()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)  # the replay did the captured work

    small = time_cuda(lambda i: torch.matmul(a[:256, :256], a[:256, :256]), warmup_s=0.2, duration_s=0.5)
    large = time_cuda(lambda i: graph.replay(), warmup_s=0.2, duration_s=0.5, stream=stream)
    for stats in (small, large):
        assert stats["iterations"] >= 10 and 0 < stats["median_ms"] <= stats["p90_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
    # 8192^3 vs 256^3 multiply-adds (~1.5 ms vs launch-bound microseconds): the timer sees the work.
    assert large["median_ms"] > 5 * small["median_ms"]


def test_a_failed_capture_is_reported_not_raised():
    from clip_fp8.timing import capture_graph

    def syncs() -> None:
        torch.ones(8, device="cuda").sum().item()  # a device-to-host sync cannot be captured

    graph, why_not = capture_graph(syncs, torch.cuda.Stream())
    assert graph is None and why_not


def test_pytorch_baseline_rows_on_the_embedded_model(tmp_path):
    from clip_fp8.config import BenchmarkConfig, ModelConfig
    from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS
    from clip_fp8.tasks.benchmark import benchmark_pytorch
    from clip_fp8.tasks.tensorrt import bench_inputs

    # The input dims the build stage reads off each engine's ONNX (dim 0 is the dynamic batch).
    dims = {"text": [0, 77], "image": [0, 3, 64, 64]}
    cfg = BenchmarkConfig(batch_sizes=[1, 8], warmup_ms=100, duration_s=1, pytorch_baselines=["eager"])
    rows = benchmark_pytorch(str(EMBEDDED_MODELS["tiny-clip-shapes"]), ModelConfig(), dims, cfg)
    assert [(r["encoder"], r["batch"]) for r in rows] == [("text", 1), ("text", 8), ("image", 1), ("image", 8)]
    for r in rows:
        assert r["variant"] == "pytorch-eager" and r["latency_median_ms"] > 0 and r["iterations"] >= 10
        assert r["throughput_samples_s"] == pytest.approx(r["batch"] * 1000 / r["latency_median_ms"])
        assert r["weights_bytes"] > 0 and r["activation_bytes"] >= 0
    # FP16 weights of the tower alone: 2 bytes per parameter.
    from clip_fp8.tasks.checkpoints import load_clip

    model = load_clip(str(EMBEDDED_MODELS["tiny-clip-shapes"]), ModelConfig(device="cuda", dtype="float16"))
    text_params = sum(p.numel() for part in (model.text_model, model.text_projection) for p in part.parameters())
    assert rows[0]["weights_bytes"] == 2 * text_params
    # Every variant gets the same inputs at a batch size.
    assert torch.equal(bench_inputs((8, 77), torch.int64, 8), bench_inputs((8, 77), torch.int64, 8))
    assert int(bench_inputs((8, 77), torch.int64, 8, vocab=100).max()) < 100
    assert torch.equal(bench_inputs((8, 3, 4, 4), torch.float16, 8), bench_inputs((8, 3, 4, 4), torch.float32, 8).half())
