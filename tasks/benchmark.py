"""Stage benchmark: time what ships at every batch size: TensorRT engines, torch-fp8, beside PyTorch FP16.

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
from clip_fp8.config import BenchmarkConfig, ModelConfig, ServingConfig
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.checkpoints import ModelSettings
from clip_fp8.tasks.tensorrt import (
    Target, bench_inputs, gpu_limit_name, parse_trtexec_performance, time_engine, timing_row, trtexec_benchmark_command,
)


def tower_bytes(model, encoder: str) -> int:
    parts = ("text_model", "text_projection") if encoder == "text" else ("vision_model", "visual_projection")
    return sum(p.numel() * p.element_size() for part in parts for p in getattr(model, part).parameters())


def model_dims(model_path: str) -> dict[str, list[int]]:
    """Each encoder's input dims at batch 0 from the model config: what engines read off their ONNX."""
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(model_path)
    size = config.vision_config.image_size
    return {"text": [0, config.text_config.max_position_embeddings], "image": [0, 3, size, size]}


def _time_encoder(label: str, encoder_name: str, run, dims: list[int], vocab: int, cfg, weights_bytes: int | None,
                  cuda_graph: bool) -> list[dict]:
    import torch

    from clip_fp8.timing import time_cuda

    rows = []
    for batch in cfg.batch_sizes:
        x = bench_inputs((batch, *dims[1:]), torch.int64 if encoder_name == "text" else torch.float16, batch, vocab)
        with torch.inference_mode():
            run(x)  # compiles and records this shape outside the measured window
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            stats = time_cuda(lambda i: run(x), warmup_s=cfg.warmup_ms / 1000, duration_s=cfg.duration_s)
        rows.append({"engine": f"{label}_{encoder_name}", "variant": label, "encoder": encoder_name, "batch": batch,
                     **timing_row(stats, batch), "cuda_graph": cuda_graph,
                     "activation_bytes": torch.cuda.max_memory_allocated() - base, "weights_bytes": weights_bytes})
    return rows


def benchmark_pytorch(model_path: str, model_cfg, dims: dict[str, list[int]], cfg) -> list[dict]:
    """The FP16 baselines users run today, timed the same way on the same inputs as the engines (``dims``:
    encoder -> input dims): eager with SDPA attention, and (``compile``) ``torch.compile`` with CUDA graphs,
    as torch-fp8 runs. GPU only."""
    import torch

    from clip_fp8.encoders import ImageEncoder, TextEncoder
    from clip_fp8.fp8_runtime import compiled
    from clip_fp8.tasks.checkpoints import load_clip

    model = load_clip(model_path, model_cfg.model_copy(update={"device": "cuda", "dtype": "float16"}))
    rows = []
    for encoder_name, wrap in (("text", TextEncoder), ("image", ImageEncoder)):
        if encoder_name not in dims:
            continue
        module = wrap(model).eval()
        for variant in cfg.pytorch_baselines:
            runner = module if variant == "eager" else compiled(module)  # as torch-fp8 is compiled: like for like
            run = (lambda x, r=runner: r(x)) if variant == "eager" else (lambda x, r=runner: r(x).clone())
            rows += _time_encoder(f"pytorch-{variant}", encoder_name, run, dims[encoder_name],
                                  model.config.text_config.vocab_size, cfg, tower_bytes(model, encoder_name),
                                  cuda_graph=variant != "eager")
    del model
    torch.cuda.empty_cache()
    return rows


def benchmark_torch_fp8(artifact: ArtifactRef, dims: dict[str, list[int]], cfg) -> list[dict]:
    """torch-fp8 as it serves (``clip_fp8.fp8_runtime.load``: compiled, one CUDA graph per batch size)."""
    import torch

    from clip_fp8.fp8_runtime import load

    clip = load(artifact.local_dir(), device="cuda", batch_sizes=cfg.batch_sizes)
    rows = []
    for encoder_name, run in (("text", clip.encode_text), ("image", clip.encode_image)):
        if encoder_name in dims:
            rows += _time_encoder("torch-fp8", encoder_name, run, dims[encoder_name],
                                  clip.model.config.text_config.vocab_size, cfg, tower_bytes(clip.model, encoder_name),
                                  cuda_graph=True)
    del clip
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


def serving_table(model_path: str, model_cfg, artifact: ArtifactRef, batch_sizes: list[int], rounds: int = 7) -> dict:
    """FP8 as a serving host runs it (``fp8_runtime.load``: Q/K/V fused, compiled, CUDA graphs) against FP16
    compiled the same way, per tower and batch size, in interleaved rounds (``clip_fp8.timing.interleaved``): each
    size's verdict, and the form that serves it (FP8 where it won every round, else FP16). GPU only."""
    import torch

    from clip_fp8.encoders import ImageEncoder, TextEncoder
    from clip_fp8.fp8_runtime import compiled as compile_as_served
    from clip_fp8.fp8_runtime import load
    from clip_fp8.tasks.checkpoints import load_clip
    from clip_fp8.timing import interleaved

    fp16 = load_clip(model_path, model_cfg.model_copy(update={"device": "cuda", "dtype": "float16"}))
    fp8 = load(artifact.local_dir(), device="cuda", batch_sizes=batch_sizes, small_batch="fp8")  # FP8 is what is measured
    dims, vocab = model_dims(model_path), fp16.config.text_config.vocab_size
    towers: dict[str, dict] = {}
    for tower, wrap, encode in (("image", ImageEncoder, fp8.encode_image), ("text", TextEncoder, fp8.encode_text)):
        compiled = compile_as_served(wrap(fp16).eval())  # FP16 compiled as the FP8 forms are: like for like
        for batch in batch_sizes:
            x = bench_inputs((batch, *dims[tower][1:]), torch.int64 if tower == "text" else torch.float16, batch, vocab)

            def as_fp16(x=x, compiled=compiled):
                with torch.inference_mode():
                    compiled(x).clone()

            def as_fp8(x=x, encode=encode):
                encode(x)
            for _ in range(3):  # compile, record, replay: outside the measured rounds
                as_fp16()
                as_fp8()
            timed = interleaved({"fp16": as_fp16, "fp8": as_fp8}, rounds=rounds)
            forms, versus = timed["forms"], timed["versus"]["fp8"]
            served_by = "fp8" if versus["verdict"] == "win" else "fp16"
            towers.setdefault(tower, {})[str(batch)] = {
                "fp16_ms": forms["fp16"]["median_ms"], "fp8_ms": forms["fp8"]["median_ms"],
                "served_by": served_by, "served_ms": forms[served_by]["median_ms"],
                "speedup": versus["median"], "speedup_min": versus["min"], "speedup_max": versus["max"],
                "verdict": versus["verdict"], "spread": {f: forms[f]["spread"] for f in forms}}
    del fp16, fp8
    torch.cuda.empty_cache()
    return {"gpu": torch.cuda.get_device_name(), "rounds": rounds, "towers": towers}


# One timing per GPU type at a time (the limit `clip-fp8 deploy` creates).
@stage(retries=2, limit=lambda inputs: None if inputs["target"].unavailable else gpu_limit_name(inputs["target"].gpu))
def benchmark(engines: list[ArtifactRef], model_source: ArtifactRef, torch_fp8: ArtifactRef | None,
              model_cfg: ModelSettings, cfg: Reads[BenchmarkConfig, "enabled", "batch_sizes", "warmup_ms", "duration_s",
                                                   "pytorch_baselines", "torch_fp8"],
              serving: Reads[ServingConfig, "batch_sizes"], target: Target, out_dir: Path) -> StageOutput:
    """Engines where TensorRT built them; on any CUDA GPU also the PyTorch FP16 baselines and torch-fp8, and the
    serving table (``serving.json``: where FP8 beats FP16, per GPU type, tower and batch size)."""
    if not cfg.enabled:
        return StageOutput.skipped("benchmark.enabled=false")
    import torch

    from clip_fp8.devices import fp8_support

    built = [ref for ref in engines if "skip_reason" not in ref.meta]
    rows, skipped, files, served = [], {}, {"benchmark": "benchmark.json"}, {}
    if reasons := sorted({ref.meta["skip_reason"] for ref in engines if "skip_reason" in ref.meta}):
        skipped["engines"] = "; ".join(reasons)
    for ref in built:
        more_rows, more_skipped = time_engines(ref, target, cfg, out_dir)
        rows += more_rows
        skipped |= more_skipped
    if torch.cuda.is_available():
        # Every compiled variant wraps the same encoder classes, and Dynamo counts recompilations per code object:
        # FP16 and FP8 at four batch sizes each pass its default limit of 8 (it then runs the rest eagerly).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        dims = model_dims(model_source.path)
        if cfg.pytorch_baselines:
            rows += benchmark_pytorch(model_source.path, model_cfg, dims, cfg)
        why_not = ("benchmark.torch_fp8=false" if not cfg.torch_fp8 else "no torch_fp8 artifact" if torch_fp8 is None
                   else fp8_support("cuda"))
        if why_not:
            skipped["torch-fp8"] = why_not
        else:
            rows += benchmark_torch_fp8(torch_fp8, dims, cfg)
            from clip_fp8.fp8_runtime import SERVING

            table = serving_table(model_source.path, model_cfg, torch_fp8, list(serving.batch_sizes))
            (out_dir / SERVING).write_text(json.dumps({"gpus": {table["gpu"]: table["towers"]}}, indent=1))
            files["serving"] = SERVING
            served = {"serving": table}
    else:
        skipped["pytorch"] = "no CUDA GPU: the PyTorch and torch-fp8 runtimes are timed on GPUs only"
    result = {"target": target.model_dump(), "rows": rows, "skipped": skipped, **served}
    (out_dir / "benchmark.json").write_text(json.dumps(result, indent=1))
    if not rows:
        return StageOutput(files=files,
                           meta={**result, "skip_reason": "; ".join(sorted(set(skipped.values()))) or "nothing to time"})
    return StageOutput(files=files, meta=result, summary={"benchmark": result},
                       shown={"serving_table": "serving"} if "serving" in files else {})
