"""One GPU timing method for everything this project measures: TensorRT engines and PyTorch baselines.

Warm-up for a fixed time, then timed iterations for a fixed duration (at least ``min_iterations``),
each bracketed by CUDA events on the stream it runs on, inputs already on the device (no host-device
copy is timed). Where the work can be captured as a CUDA graph it is replayed from the graph, as
trtexec does by default, so launch overhead is not what is measured; a capture that fails (some
engines and modules cannot be captured) falls back to direct launches and says why.

Needs only torch, so the benchmark scripts run on GPU hosts without the rest of the project.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def capture_graph(launch: Callable[[], None], stream) -> tuple[object | None, str]:
    """``launch`` captured as a CUDA graph on ``stream`` (after one plain launch, which TensorRT needs to
    settle its state for the current shapes), or None and the reason the capture failed."""
    import torch

    with torch.cuda.stream(stream):
        launch()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            launch()
    except Exception as exc:  # capture is best effort; the reason goes into the result
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"
    return graph, ""


def time_cuda(launch: Callable[[int], None], *, warmup_s: float, duration_s: float, stream=None,
              min_iterations: int = 10) -> dict:
    """Time ``launch(i)`` (which enqueues iteration ``i`` on the current stream) with CUDA events."""
    import torch

    stream = stream or torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        t_end, i = time.perf_counter() + warmup_s, 0
        while time.perf_counter() < t_end or i < 3:
            launch(i)
            i += 1
        stream.synchronize()
        times: list[float] = []
        t_end = time.perf_counter() + duration_s
        while time.perf_counter() < t_end or len(times) < min_iterations:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            launch(len(times))
            stop.record(stream)
            stop.synchronize()
            times.append(start.elapsed_time(stop))
    mean = statistics.fmean(times)
    return {"iterations": len(times), "median_ms": statistics.median(times), "p90_ms": percentile(times, 90),
            "p95_ms": percentile(times, 95), "p99_ms": percentile(times, 99), "mean_ms": mean,
            "cv": statistics.pstdev(times) / mean if mean else 0.0}


def block_ms(launch: Callable[[], None], iterations: int) -> float:
    """Mean milliseconds per ``launch()`` over one block of back-to-back iterations, between two CUDA events."""
    import torch

    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        launch()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / iterations


def verdict(ratios: list[float], threshold: float = 1.0) -> str:
    """``win`` when every round's ratio (reference time / candidate time) is over ``threshold``, ``loss`` when
    every one is under it, else ``tie``: a difference within the rounds' spread is not called either way."""
    return "win" if min(ratios) > threshold else "loss" if max(ratios) < threshold else "tie"


def interleaved(launches: dict[str, Callable[[], None]], rounds: int = 7, block_target_ms: float = 150.0) -> dict:
    """Time several warmed-up forms of one computation in interleaved rounds (the order rotates each round, so
    clock or thermal drift falls on every form alike). The first form is the reference: each other form gets its
    per-round ratio (reference / form), median, extremes and ``verdict``. Returns ``{"forms": {name: {median_ms,
    min_ms, max_ms, spread, rounds_ms}}, "versus": {name: {median, min, max, verdict}}}``."""
    names = list(launches)
    iterations = {n: max(5, min(2000, int(block_target_ms / max(block_ms(launches[n], 5), 1e-3)))) for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            per_round[name].append(block_ms(launches[name], iterations[name]))
    forms = {n: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t),
                 "spread": (max(t) - min(t)) / statistics.median(t), "rounds_ms": list(t)}
             for n, t in per_round.items()}
    return {"forms": forms, "versus": {name: compare(forms, names[0], name) for name in names[1:]}}


def compare(forms: dict, reference: str, candidate: str) -> dict:
    """``candidate`` against ``reference`` round by round (``interleaved``'s ``forms``): the ratios' median, extremes
    and ``verdict``. Rounds are paired because the forms ran in the same round, minutes of drift apart at most."""
    ratios = [a / b for a, b in zip(forms[reference]["rounds_ms"], forms[candidate]["rounds_ms"])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "verdict": verdict(ratios)}
