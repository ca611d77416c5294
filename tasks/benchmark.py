"""Stage benchmark: time every engine built for this target at every batch size, beside PyTorch FP16.

One timer for everything (``clip_fp8.timing``): engines replayed from CUDA graphs where they capture,
CUDA events per call, inputs on the device and the same for every variant of an encoder at a batch
size. The PyTorch FP16 baselines (``benchmark.pytorch_baselines``) are timed the same way on the same
inputs. The Prefect layer holds the ``gpu:<GPU name>`` concurrency limit around this stage, so two
runs never time engines on one GPU type at once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import BenchmarkConfig, ModelConfig
from clip_fp8.stage import StageOutput
from clip_fp8.tasks.tensorrt import (
    Target, bench_inputs, parse_trtexec_performance, time_engine, timing_row, trtexec_benchmark_command,
)


def tower_bytes(model, encoder: str) -> int:
    parts = ("text_model", "text_projection") if encoder == "text" else ("vision_model", "visual_projection")
    return sum(p.numel() * p.element_size() for part in parts for p in getattr(model, part).parameters())


def benchmark_pytorch(model_path: str, model_cfg, dims: dict[str, list[int]], cfg) -> list[dict]:
    """The baselines users run today, timed the same way: the FP16 model with SDPA attention, eager (and
    ``torch.compile`` when asked), on the same inputs as the engines (``dims``: encoder -> input dims). GPU only."""
    import torch

    from clip_fp8.encoders import ImageEncoder, TextEncoder
    from clip_fp8.tasks.checkpoints import load_clip
    from clip_fp8.timing import time_cuda

    model = load_clip(model_path, model_cfg.model_copy(update={"device": "cuda", "dtype": "float16"}))
    rows = []
    for encoder_name, wrap in (("text", TextEncoder), ("image", ImageEncoder)):
        if encoder_name not in dims:
            continue
        module = wrap(model).eval()
        for variant in cfg.pytorch_baselines:
            runner = module if variant == "eager" else torch.compile(module, dynamic=False)
            for batch in cfg.batch_sizes:
                shape = (batch, *dims[encoder_name][1:])
                x = bench_inputs(shape, torch.int64 if encoder_name == "text" else torch.float16, batch,
                                 model.config.text_config.vocab_size)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.inference_mode():
                    stats = time_cuda(lambda i: runner(x), warmup_s=cfg.warmup_ms / 1000, duration_s=cfg.duration_s)
                rows.append({"engine": f"pytorch-{variant}_{encoder_name}", "variant": f"pytorch-{variant}",
                             "encoder": encoder_name, "batch": batch,
                             **timing_row(stats, batch), "cuda_graph": False,
                             "activation_bytes": torch.cuda.max_memory_allocated() - base,
                             "weights_bytes": tower_bytes(model, encoder_name)})
    del model
    torch.cuda.empty_cache()
    return rows


def time_engines(built: ArtifactRef, target: Target, cfg: BenchmarkConfig, out_dir: Path) -> tuple[list[dict], dict]:
    """Rows (one per engine and batch) and skip reasons of one build artifact's engines."""
    rows, skipped = [], {}
    for name, entry in sorted(built.meta["engines"].items()):
        if target.backend == "tensorrt-rtx":
            skipped[name] = "TensorRT-RTX engines run on RTX GPUs only; not timed here"
            continue
        engine_path = built.file(name)
        for batch in cfg.batch_sizes:
            shape = (batch, *entry["dims"][1:])
            if target.backend == "trtexec":
                cmd = trtexec_benchmark_command(shutil.which("trtexec") or "trtexec", target.version, engine_path,
                                                entry["input"], shape, cfg.warmup_ms, cfg.duration_s)
                run = subprocess.run(cmd, capture_output=True, text=True)
                (out_dir / f"{name}.b{batch}.log").write_text(" ".join(cmd) + "\n" + run.stdout + run.stderr)
                if run.returncode != 0:
                    raise RuntimeError(f"trtexec benchmark of {name} at batch {batch} failed (see {name}.b{batch}.log)")
                stats = parse_trtexec_performance(run.stdout, batch)
            else:
                stats = time_engine(target.backend, engine_path, batch, cfg.warmup_ms, cfg.duration_s,
                                    **({"vocab": entry["vocab"]} if entry.get("vocab") else {}))
            variant, encoder = name.split("_", 1)
            rows.append({"engine": name, "variant": variant, "encoder": encoder, "batch": batch,
                         "engine_bytes": entry["engine_bytes"], **stats})
    return rows, skipped


def benchmark(engines: list[ArtifactRef], model_source: ArtifactRef, model_cfg: ModelConfig, cfg: BenchmarkConfig,
              target: Target, out_dir: Path) -> StageOutput:
    if not cfg.enabled:
        return StageOutput.skipped("benchmark.enabled=false")
    built = [ref for ref in engines if "skip_reason" not in ref.meta]
    if not built:
        reasons = sorted({ref.meta["skip_reason"] for ref in engines})
        return StageOutput.skipped(f"no engines to time ({'; '.join(reasons)})")
    rows, skipped = [], {}
    for ref in built:
        more_rows, more_skipped = time_engines(ref, target, cfg, out_dir)
        rows += more_rows
        skipped |= more_skipped
    if rows and cfg.pytorch_baselines:  # engines were timed, so this host has the GPU
        dims = {name.split("_", 1)[1]: e["dims"] for ref in built for name, e in ref.meta["engines"].items()}
        rows += benchmark_pytorch(model_source.path, model_cfg, dims, cfg)
    result = {"target": target.model_dump(), "rows": rows, "skipped": skipped}
    (out_dir / "benchmark.json").write_text(json.dumps(result, indent=1))
    if not rows:
        return StageOutput(files={"benchmark": "benchmark.json"},
                           meta={**result, "skip_reason": "; ".join(sorted(set(skipped.values()))) or "nothing to time"})
    return StageOutput(files={"benchmark": "benchmark.json"}, meta=result)
