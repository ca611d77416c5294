"""The pipeline at production size, end to end through the real flow: wall time, stage spans, peak GPU memory.

CLIP ViT-L/14 (laion2B-s32B-b82K architecture) with random weights, and the generated shapes data
resized by the model's own processor to 224x224 (the real checkpoint and COCO cannot be downloaded
where this runs; shapes, batch sizes and sample counts are the production ones: 8,192 calibration
pairs at batch 512). It runs ``clip_fp8_pipeline`` itself, the Prefect flow with its DAG and cache
(a temporary Prefect server, as ``clip-fp8 run`` uses), three times on one store:

- ``cold``: an empty store;
- ``requantize``: new calibration data (another seed), same model: only the FP8 side is recomputed;
- ``unchanged``: the same parameters again, every stage from the cache;
- ``reevaluate`` (ask for it with ``--runs``): another evaluation seed, so evaluate runs alone.

    python benchmarks/bench_pipeline.py --work /tmp/vitl --out pipeline.json [--calibration 8192] [--batch 512] \
        [--set evaluation.runtimes=[fakequant]] [--runs cold,requantize]

Targets (docs/benchmarks.md): cold run at least 25 % below the sequential pipeline's sum of stage times;
re-quantization at most 60 % of the cold run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from bench_encoders import VIT_L_14  # this folder is on sys.path when the script runs

def make_checkpoint(path: Path) -> None:
    """A transformers CLIP directory of ViT-L/14 shape: random weights, the embedded tokenizer, a 224 processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, load_processor

    tokenizer = load_processor(EMBEDDED_MODELS["tiny-clip-shapes"]).tokenizer
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"))}
    text = dict(VIT_L_14["text_config"], bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["eos"])
    config = CLIPConfig(text_config=text, vision_config=VIT_L_14["vision_config"], projection_dim=VIT_L_14["projection_dim"])
    torch.manual_seed(0)
    model = CLIPModel(config)
    model.save_pretrained(path, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])  # laion2b's normalisation
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)


def run_once(label: str, config, runs: list[dict], out: Path, meta: dict) -> dict:
    from clip_fp8.flows.pipeline import clip_fp8_pipeline

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        summary, error = clip_fp8_pipeline(config), None
    except Exception as exc:  # keep the numbers of what ran: the run folder has its summary
        summary, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    wall = time.perf_counter() - t0
    if summary is None:
        latest = Path(config.output.root) / "runs" / "latest" / "summary.json"
        summary = json.loads(latest.read_text()) if latest.exists() else {"stages": {}}
    row = {"run": label, "wall_s": wall, "error": error, "status": summary.get("status"),
           "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
           "stages": summary["stages"],
           "stage_seconds_sum": sum(s.get("seconds", 0.0) for s in summary["stages"].values())}
    for key in ("audit", "onnx"):
        if key in summary:
            row[key] = summary[key]
    runs.append(row)
    print(f"{label:11} {wall:8.1f} s wall, {row['stage_seconds_sum']:8.1f} s of stage work  {error or summary.get('status')}",
          flush=True)
    for name, stage in summary["stages"].items():
        span = f"{stage.get('start_s', 0):7.1f} .. {stage.get('end_s', 0):7.1f}" if "start_s" in stage else " " * 18
        print(f"    {name:16} {stage['status']:10} {stage.get('seconds', 0):8.1f} s  {span}  {stage.get('note', '')[:80]}")
    out.write_text(json.dumps({"runs": runs, "meta": meta}, indent=1, default=str))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clip-fp8-vitl"))
    parser.add_argument("--out", type=Path, default=Path("bench_pipeline.json"))
    parser.add_argument("--calibration", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--check-samples", type=int, default=4)
    parser.add_argument("--model", default="vit-l-14",
                        help="vit-l-14 (random weights, built here) or any model.source, e.g. embedded:tiny-clip-shapes")
    parser.add_argument("--runs", default="cold,requantize,unchanged", help="which runs, in order (cold, requantize, unchanged, reevaluate)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="more PipelineConfig overrides, as `clip-fp8 run --set` takes them (repeatable)")
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from clip_fp8.config import PipelineConfig

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    source = str(args.work / "vit-l-14") if args.model == "vit-l-14" else args.model
    config = PipelineConfig().with_overrides([
        f"model.source={source}", f"calibration.num_samples={args.calibration}", f"calibration.batch_size={args.batch}",
        f"evaluation.num_samples={args.eval_samples}", "evaluation.batch_size=250", f"export.check_samples={args.check_samples}",
        f"output.root={args.work / 'out'}", "evaluation.on_gate_failure=mark",  # random weights: the gate means nothing
        *args.overrides,
    ])
    meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "modelopt": __import__("importlib.metadata").metadata.version("nvidia-modelopt"),
            "prefect": __import__("prefect").__version__, "onnx_version": __import__("onnx").__version__,
            "onnxruntime": __import__("onnxruntime").__version__, "command": " ".join(sys.argv),
            "config": config.model_dump(mode="json")}
    if args.model == "vit-l-14":
        t0 = time.perf_counter()
        make_checkpoint(args.work / "vit-l-14")
        meta["make_checkpoint_s"] = time.perf_counter() - t0
    runs: list[dict] = []
    variants = {"cold": config, "requantize": config.with_overrides(["calibration.seed=1"]),
                "unchanged": config.with_overrides(["calibration.seed=1"]),
                # Only the evaluation changes: evaluate (baseline + fake-quant) runs alone, the sequential pipeline's
                # evaluate step as it would take on this host.
                "reevaluate": config.with_overrides(["calibration.seed=1", "evaluation.seed=2"])}
    for label in args.runs.split(","):
        run_once(label, variants[label], runs, args.out, meta)
    by = {r["run"]: r for r in runs}
    if "cold" in by and "requantize" in by:
        meta["requantize_over_cold"] = by["requantize"]["wall_s"] / by["cold"]["wall_s"]
    if "cold" in by:
        meta["cold_wall_over_stage_sum"] = by["cold"]["wall_s"] / max(1e-9, by["cold"]["stage_seconds_sum"])
    args.out.write_text(json.dumps({"runs": runs, "meta": meta}, indent=1, default=str))
    print(json.dumps({k: v for k, v in meta.items() if k.endswith(("_over_cold", "_over_stage_sum", "_s"))}, indent=1))


if __name__ == "__main__":
    main()
