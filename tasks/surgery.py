"""Stage surgery: repair the exported graphs of one variant (``onnx_passes``), then prove them twice.

(a) numerically: ONNX Runtime (CPU) runs the repaired graph and its embeddings must match PyTorch's
    (the fake-quant model for FP8, the baseline for FP16) with cosine similarity >= ``export.min_cosine``.
    FP8 graphs are checked on calibration inputs (the ranges their scales were calibrated on); FP16
    graphs on generated shapes samples, so that they, like their export, depend on the model alone.
    Cosine, not element tolerance: the FP16 graph and the FP32 fake-quant model round differently,
    and a value near an FP8 step can land on the other side.
(b) structurally: TensorRT-RTX parses and builds the repaired graph strongly typed. The raw FP8
    export is pre-flighted too, and its verdict recorded, so the report shows what surgery fixed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clip_fp8 import synthetic
from clip_fp8.artifacts import ArtifactRef
from clip_fp8.model_locks import CLIP_FORWARD_LOCK
from clip_fp8.config import BuildConfig, ExportConfig, ModelConfig
from clip_fp8.errors import GraphCheckError, collected
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks import preflight as rtx
from clip_fp8.tasks.calibration_sources import iter_calibration_batches
from clip_fp8.tasks.checkpoints import ModelSettings, load_processor, load_variant
from clip_fp8.tasks.export import ENCODERS, Variant


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
    """The first ``n`` pairs of a calibration manifest, preprocessed by the model's own processor."""
    batch = next(iter_calibration_batches({**manifest, "pairs": manifest["pairs"][:n]}, data_root,
                                          load_processor(baseline_path), n))
    return {"text": batch["input_ids"].numpy(), "image": batch["pixel_values"].numpy()}


def generated_manifest(n: int, seed: int = 0) -> dict:
    """A manifest of ``n`` generated shapes pairs: check inputs that depend on nothing but this code."""
    return {"kind": "embedded", "seed": seed,
            "pairs": [{"index": i, "caption": synthetic.make_sample(seed, i).caption} for i in range(n)]}


def module_precision(model):
    """The model's precision per module, for ``onnx_passes``: (quantized, weight) of a module with a weight
    (quantized: its weight quantizer is enabled, as the fake-quant evaluation ran it), None for any other name."""
    def lookup(path: str):
        try:
            module = model.get_submodule(path) if path else None
        except AttributeError:
            return None
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(weight, "detach"):
            return None
        quantizer = getattr(module, "weight_quantizer", None)
        return bool(quantizer is not None and quantizer.is_enabled), weight.detach().float().cpu().numpy()

    return lookup


def torch_embeddings(model, encoder: str, inputs: np.ndarray) -> np.ndarray:
    import torch

    from clip_fp8.encoders import image_embeds, text_embeds

    param = next(model.parameters())
    x = torch.from_numpy(inputs).to(param.device)
    with torch.no_grad(), CLIP_FORWARD_LOCK:
        out = text_embeds(model, x) if encoder == "text" else image_embeds(model, x.to(param.dtype))
    return out.float().cpu().numpy()


@stage()
def surgery(variant: Variant, exported: ArtifactRef, model_source: ArtifactRef, quantized: ArtifactRef | None,
            calibration: ArtifactRef | None, data_source: ArtifactRef | None, model_cfg: ModelSettings,
            cfg: Reads[ExportConfig, "check_samples", "min_cosine", "preflight"], build_cfg: Reads[BuildConfig, "min_batch", "opt_batch", "max_batch"], out_dir: Path) -> StageOutput:
    """Repair, check and pre-flight ``<variant>_{text,image}``; raise ``GraphCheckError`` naming every failed graph."""
    import onnx

    from clip_fp8.tasks.onnx_passes import graph_audit, qdq_census, repair_for_strong_typing

    if calibration is not None:
        manifest, root = json.loads(calibration.file("manifest").read_text()), data_source.path
    else:
        manifest, root = generated_manifest(cfg.check_samples), ""
    inputs = check_inputs(model_source.path, manifest, root, cfg.check_samples)
    checkpoint = quantized.file("checkpoint") if quantized is not None else None
    model = load_variant(variant, model_source.path, checkpoint, model_cfg)
    raw_dir = exported.local_dir()
    ok, why_not = rtx.available()
    results: dict[str, dict] = {}
    failures: list[str] = []
    for encoder in ENCODERS:
        name = f"{variant}_{encoder}"
        raw_path = raw_dir / exported.files[name]
        precision = module_precision(model)
        repaired, changes = repair_for_strong_typing(onnx.load(str(raw_path)), precision)
        path = out_dir / f"{name}.onnx"
        onnx.save(repaired, str(path))
        entry: dict = {"changes": changes, "bytes": path.stat().st_size, "census": qdq_census(repaired),
                       "graph_audit": graph_audit(repaired, precision)}
        if entry["graph_audit"]:  # the graph's precision is not the model's: what was evaluated is not what ships
            more = f" (and {len(entry['graph_audit']) - 1} more)" if len(entry["graph_audit"]) > 1 else ""
            failures.append(f"{name}: graph audit: {entry['graph_audit'][0]}{more}")

        sims = cosine(onnx_embeddings(path, inputs[encoder]), torch_embeddings(model, encoder, inputs[encoder]))
        entry["onnxruntime"] = {"min_cosine": float(sims.min()), "mean_cosine": float(sims.mean()),
                                "samples": int(len(sims)),
                                "reference": "fake-quant PyTorch" if variant == "fp8" else "baseline PyTorch"}
        if not sims.min() >= cfg.min_cosine:
            failures.append(f"{name}: ONNX Runtime vs PyTorch cosine {sims.min():.4f} < export.min_cosine {cfg.min_cosine}")

        if cfg.preflight and ok:
            args = (build_cfg.min_batch, build_cfg.opt_batch, build_cfg.max_batch)
            raw_verdict = rtx.preflight(raw_path, *args, build=False)
            raw_verdict.pop("log")
            entry["preflight_raw"] = {**raw_verdict, "built": None, "note": "raw export: parsed only, not built"}
            verdict = rtx.preflight(path, *args)
            (out_dir / f"{name}.preflight.log").write_text("\n".join(verdict.pop("log")))
            entry["preflight"] = verdict
            if not verdict["built"]:
                failures.append(f"{name}: TensorRT-RTX strongly typed pre-flight failed: {verdict['errors'][:1]}")
        else:
            entry["preflight"] = {"skipped": why_not or "export.preflight=false"}
        results[name] = entry
    (out_dir / "validation.json").write_text(json.dumps(results, indent=1))
    if failures:
        raise collected(GraphCheckError, f"{variant} graphs failed their checks", failures)
    return StageOutput(files={name: f"{name}.onnx" for name in results} | {"validation": "validation.json"},
                       meta={"variant": variant, "validation": results}, summary={"onnx": results},
                       shown={f"onnx_{name}": name for name in results})
