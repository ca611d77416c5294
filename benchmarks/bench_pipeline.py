"""The pipeline's stages at production size, timed one by one: wall time and peak GPU memory per stage.

CLIP ViT-L/14 (laion2B-s32B-b82K architecture) with random weights, and the generated shapes data
resized by the model's own processor to 224x224 (the real checkpoint and COCO cannot be downloaded
where this runs; shapes, batch sizes and sample counts are the production ones: 8,192 calibration
pairs at batch 512). Calls the same stage functions the Prefect flow calls, in the same order, without
Prefect (GPU hosts here have no Prefect); TensorRT stages are left to the flow.

    python benchmarks/bench_pipeline.py --work /tmp/vitl --out pipeline.json [--calibration 8192] [--batch 512]

Targets (docs/benchmarks.md): calibration + quantization of 8,192 pairs < 2 min on an H100;
export + surgery of both encoders < 3 min.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_encoders import VIT_L_14  # noqa: E402
from clip_fp8.config import PipelineConfig  # noqa: E402

TARGETS_S = {"calibration_data+quantize": 120.0, "export+surgery": 180.0}


def make_checkpoint(path: Path) -> None:
    """A transformers CLIP directory of ViT-L/14 shape: random weights, the embedded tokenizer, a 224 processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tasks.model import EMBEDDED_MODELS, load_processor

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


def dump_structure(raw_dir: Path, out: Path, keep_bytes: int = 4096) -> None:
    """Copy each raw ONNX with initializers above ``keep_bytes`` emptied (dims kept): small enough to ship back."""
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(raw_dir.glob("fp8_*.onnx")):
        model = onnx.load(str(path))
        for init in model.graph.initializer:
            if len(init.raw_data) > keep_bytes:
                init.raw_data = b""
        onnx.save(model, str(out / f"{path.stem}.structure.onnx"))


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
    parser.add_argument("--dtype", default="auto", choices=["auto", "float16", "float32"])
    parser.add_argument("--dump-graphs", type=Path, default=None,
                        help="write the raw FP8 ONNX graphs here with large weights stripped (structure only, for debugging surgery)")
    args = parser.parse_args()

    from tasks.audit import audit
    from tasks.calibration import resolve_data_source, select_calibration_pairs
    from tasks.evaluate import evaluate_model, quality_gate
    from tasks.export import export_all
    from tasks.model import describe_baseline, load_clip, load_processor, resolve_model_source
    from tasks.quantize import load_quantized, quantize
    from tasks.validate import repair_and_validate

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    cuda = torch.cuda.is_available()
    source = str(args.work / "vit-l-14") if args.model == "vit-l-14" else args.model
    config = PipelineConfig().with_overrides([
        f"model.source={source}", f"model.dtype={args.dtype}", f"calibration.num_samples={args.calibration}",
        f"calibration.batch_size={args.batch}", f"evaluation.num_samples={args.eval_samples}",
        "evaluation.batch_size=250", f"export.check_samples={args.check_samples}",
    ])
    rows: list[dict] = []
    state: dict = {}

    def stage(name: str, fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            state[name] = fn()
            status = "completed"
        except Exception as exc:  # keep going: one stage's failure must not hide the others' numbers
            state[name] = None
            status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if cuda:
            torch.cuda.synchronize()
        row = {"stage": name, "status": status, "seconds": time.perf_counter() - t0,
               "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
        rows.append(row)
        print(f"{name:18} {row['seconds']:8.1f} s  peak {row['peak_gpu_mb'] or 0:8.0f} MB  {status}", flush=True)
        args.out.write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))

    meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "modelopt": __import__("importlib.metadata").metadata.version("nvidia-modelopt"),
            "onnx_version": __import__("onnx").__version__, "onnxruntime": __import__("onnxruntime").__version__,
            "command": " ".join(sys.argv), "config": config.model_dump(mode="json")}

    if args.model == "vit-l-14":
        stage("make_checkpoint", lambda: make_checkpoint(args.work / "vit-l-14"))
    model_ref = resolve_model_source(config.model)
    data_ref = resolve_data_source(config.calibration)
    stage("calibration_data", lambda: select_calibration_pairs(data_ref, config.calibration))
    stage("baseline_model", lambda: describe_baseline(model_ref, config.model))
    (args.work / "q").mkdir()
    stage("quantize", lambda: quantize(model_ref.path, state["calibration_data"], data_ref.path, config.model,
                                       config.calibration, config.quantization, args.work / "q"))
    meta["quantize"] = state["quantize"]
    stage("audit", lambda: audit(json.loads((args.work / "q" / "quantizers.json").read_text()), config.quantization))
    if state["audit"]:
        meta["audit"] = {"passed": state["audit"]["passed"], "towers": state["audit"]["towers"],
                         "problems": state["audit"]["problems"][:5]}

    def evaluate():
        processor = load_processor(model_ref.path)
        device = "cuda" if cuda else "cpu"
        base = evaluate_model(load_clip(model_ref.path, config.model), processor, config.evaluation, device)
        fp8 = evaluate_model(load_quantized(args.work / "q" / "checkpoint", config.model), processor, config.evaluation, device)
        return quality_gate(base, fp8, config.evaluation)

    stage("evaluate", evaluate)
    (args.work / "raw").mkdir()
    (args.work / "repaired").mkdir()
    stage("export", lambda: export_all(model_ref.path, str(args.work / "q" / "checkpoint"), config.model,
                                       config.export, args.work / "raw"))
    meta["onnx_raw_bytes"] = state["export"]
    if args.dump_graphs and state["export"]:
        dump_structure(args.work / "raw", args.dump_graphs)
    stage("surgery", lambda: repair_and_validate(args.work / "raw", model_ref.path, str(args.work / "q" / "checkpoint"),
                                                 state["calibration_data"], data_ref.path, config.model, config.export,
                                                 config.build, args.work / "repaired"))
    if state["surgery"]:
        meta["onnx"] = {k: {"bytes": v["bytes"], "min_cosine": v["onnxruntime"]["min_cosine"],
                            "census": {c: v["census"][c] for c in ("gemms", "gemms_fp8_inputs", "softmax_quantized")},
                            "preflight": v["preflight"]} for k, v in state["surgery"].items()}

    seconds = {r["stage"]: r["seconds"] for r in rows if r["status"] == "completed"}
    meta["targets"] = {}
    for name, target in TARGETS_S.items():
        parts = name.split("+")
        measured = sum(seconds[s] for s in parts) if all(s in seconds for s in parts) else None
        meta["targets"][name] = {"target_s": target, "measured_s": measured,
                                 "met": measured is not None and measured < target}
    args.out.write_text(json.dumps({"rows": rows, "meta": meta}, indent=1, default=str))
    print(json.dumps(meta["targets"], indent=1))
    print(json.dumps(meta.get("onnx", {}), indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
