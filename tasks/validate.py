"""The surgery stage end to end: repair every exported graph, then prove it twice.

(a) numerically: ONNX Runtime (CPU) runs the repaired graph on real calibration inputs and its
    embeddings must match PyTorch's (the fake-quant model for FP8, the baseline for FP16) with cosine
    similarity >= ``export.min_cosine``. Cosine, not element tolerance: the FP16 graph and the FP32
    fake-quant model round differently, and a value near an FP8 step can land on the other side.
(b) structurally: TensorRT-RTX parses and builds the repaired graph strongly typed. The raw FP8
    export is pre-flighted too, and its verdict recorded, so the report shows what surgery fixed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from clip_fp8.config import BuildConfig, CalibrationConfig, ExportConfig, ModelConfig
from clip_fp8.errors import ValidationError
from tasks import preflight as rtx
from tasks.export import ENCODERS, VARIANTS
from tasks.surgery import qdq_census, repair_for_strong_typing


def onnx_embeddings(path: Path, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The check is of the graph as written, not of ORT's rewrite of it: some ORT versions' transpose
    # optimizer pushes a Transpose below an FP8 QuantizeLinear and then rejects its own FP8 Transpose
    # (opset 20 has none), failing a graph that TensorRT builds.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    if "float16" in feed.type:
        inputs = inputs.astype(np.float16)
    elif "float" in feed.type:
        inputs = inputs.astype(np.float32)
    return session.run(None, {feed.name: inputs})[0].astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def check_inputs(baseline_path: str, manifest: dict, data_root: str, n: int) -> dict[str, np.ndarray]:
    from tasks.calibration import iter_calibration_batches
    from tasks.model import load_processor

    batch = next(iter_calibration_batches({**manifest, "pairs": manifest["pairs"][:n]}, data_root,
                                          load_processor(baseline_path), n))
    return {"text": batch["input_ids"].numpy(), "image": batch["pixel_values"].numpy()}


def torch_embeddings(model, encoder: str, inputs: np.ndarray) -> np.ndarray:
    import torch

    from clip_fp8.encoders import image_embeds, text_embeds

    param = next(model.parameters())
    x = torch.from_numpy(inputs).to(param.device)
    with torch.no_grad():
        out = text_embeds(model, x) if encoder == "text" else image_embeds(model, x.to(param.dtype))
    return out.float().cpu().numpy()


def repair_and_validate(
    raw_dir: Path, baseline_path: str, checkpoint: str, manifest: dict, data_root: str,
    model_cfg: ModelConfig, cfg: ExportConfig, build_cfg: BuildConfig, out_dir: Path,
) -> dict:
    from tasks.model import load_clip
    from tasks.quantize import load_quantized

    inputs = check_inputs(baseline_path, manifest, data_root, cfg.check_samples)
    ok, why_not = rtx.available()
    results: dict[str, dict] = {}
    failures: list[str] = []
    for variant in VARIANTS:
        model = load_clip(baseline_path, model_cfg) if variant == "fp16" else load_quantized(checkpoint, model_cfg)
        for encoder in ENCODERS:
            name = f"{variant}_{encoder}"
            raw_path = raw_dir / f"{name}.onnx"
            repaired, changes = repair_for_strong_typing(onnx.load(str(raw_path)))
            path = out_dir / f"{name}.onnx"
            onnx.save(repaired, str(path))
            entry: dict = {"changes": changes, "bytes": path.stat().st_size, "census": qdq_census(repaired)}

            sims = cosine(onnx_embeddings(path, inputs[encoder]), torch_embeddings(model, encoder, inputs[encoder]))
            entry["onnxruntime"] = {"min_cosine": float(sims.min()), "mean_cosine": float(sims.mean()),
                                    "samples": int(len(sims)), "reference": "fake-quant PyTorch" if variant == "fp8" else "baseline PyTorch"}
            if not sims.min() >= cfg.min_cosine:
                failures.append(f"{name}: ONNX Runtime vs PyTorch cosine {sims.min():.4f} < export.min_cosine {cfg.min_cosine}")

            if cfg.preflight and ok:
                args = (build_cfg.min_batch, build_cfg.opt_batch, build_cfg.max_batch)
                entry["preflight_raw"] = {k: v for k, v in rtx.preflight(raw_path, *args, build=False).items() if k != "log"}
                verdict = rtx.preflight(path, *args)
                (out_dir / f"{name}.preflight.log").write_text("\n".join(verdict.pop("log")))
                entry["preflight"] = verdict
                if not verdict["built"]:
                    failures.append(f"{name}: TensorRT-RTX strongly typed pre-flight failed: {verdict['errors'][:1]}")
            else:
                entry["preflight"] = {"skipped": why_not or "export.preflight=false"}
            results[name] = entry
        del model
    (out_dir / "validation.json").write_text(json.dumps(results, indent=1))
    if failures:
        raise ValidationError("; ".join(failures))
    return results
