"""Load on a promoted repository served by a real tritonserver: throughput and latency at fixed concurrency.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/bench_serving_load.py --repository /tmp/triton \
        --concurrency 1 4 16 --duration 30 --out load.json

Starts ``tritonserver`` on the repository (``clip_fp8.triton_server``, loopback ports), then per model and
concurrency runs that many closed-loop clients (tritonclient's asyncio gRPC client), each sending one
single-row request after the other for ``--duration`` seconds. Every request is counted when sent and when
answered: ``lost`` = sent - answered - errors must be 0. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from clip_fp8.triton_server import TritonServer

DTYPES = {"FP16": np.float16, "FP32": np.float32, "INT64": np.int64, "INT32": np.int32}


def _row(spec: dict) -> np.ndarray:
    """One valid input row: random pixels; token ids of a short caption's shape (start, zeros, end)."""
    dims = [1, *[int(d) for d in spec["shape"][1:]]]
    if spec["datatype"].startswith("INT"):
        return np.zeros(dims, DTYPES[spec["datatype"]])
    return np.random.default_rng(0).standard_normal(dims).astype(DTYPES[spec["datatype"]])


async def _load(url: str, model: str, concurrency: int, duration: float) -> dict:
    import tritonclient.grpc.aio as grpc

    client = grpc.InferenceServerClient(url)
    metadata = await client.get_model_metadata(model, as_json=True)
    (spec,) = metadata["inputs"]
    row = _row(spec)
    output = metadata["outputs"][0]["name"]
    counts = {"sent": 0, "answered": 0, "errors": 0}
    latencies: list[float] = []
    first_error: list[str] = []
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        tensor = grpc.InferInput(spec["name"], list(row.shape), spec["datatype"])
        tensor.set_data_from_numpy(row)
        while time.perf_counter() < stop_at:
            counts["sent"] += 1
            started = time.perf_counter()
            try:
                result = await client.infer(model, [tensor], outputs=[grpc.InferRequestedOutput(output)])
                if result.as_numpy(output).shape[0] != 1:
                    raise ValueError("answer without its row")
                counts["answered"] += 1
                latencies.append(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                counts["errors"] += 1
                first_error[:] = first_error or [str(exc)[:200]]

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - began
    await client.close()
    ms = np.array(latencies) * 1e3
    return {"model": model, "concurrency": concurrency, "duration_s": round(wall, 2), **counts,
            "lost": counts["sent"] - counts["answered"] - counts["errors"],
            "throughput_per_s": round(counts["answered"] / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
            "first_error": first_error[0] if first_error else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--models", nargs="+", default=["clip_image_fp8", "clip_text_fp8"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("serving_load.json"))
    args = parser.parse_args()

    rows = []
    log = args.out.with_suffix(".tritonserver.log")
    with TritonServer(args.repository, http_port=0, grpc_port=0, metrics_port=0, log=log) as server:
        for model in args.models:
            for concurrency in args.concurrency:
                rows.append(asyncio.run(_load(server.grpc_url, model, concurrency, args.duration)))
                r = rows[-1]
                print(f"{model} c={concurrency}: {r['throughput_per_s']}/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms "
                      f"errors {r['errors']} lost {r['lost']}", flush=True)
    from importlib.metadata import version

    result = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
              "repository": str(args.repository), "tritonclient": version("tritonclient"),
              "nvidia-pytriton": version("nvidia-pytriton"), "duration_s": args.duration, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    print("\n| model | concurrency | requests/s | p50 ms | p99 ms | errors | lost |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['concurrency']} | {r['throughput_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['errors']} | {r['lost']} |")


if __name__ == "__main__":
    main()
