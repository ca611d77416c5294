"""Stage quantize: FP8 post-training quantization with NVIDIA ModelOpt, and the restorable checkpoint it leaves.

ModelOpt's ``FP8_DEFAULT_CFG`` disables every quantizer under ``*vision_model*``/``*visual*`` and
leaves attention's ``*_bmm_quantizer``s off: on CLIP it silently quantizes the text tower only. This
stage builds its own ordered config (0.47 semantics: the last matching entry wins), so the image
tower and attention are covered on purpose, and the audit stage proves it. Attention quantizers come
from ModelOpt's Hugging Face plugin (``checkpoints.register_quantized_attention``).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.model_locks import CLIP_FORWARD_LOCK
from clip_fp8.config import CalibrationConfig, ModelConfig, QuantizationConfig
from clip_fp8.errors import PipelineInputError
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.checkpoints import ModelSettings, load_clip, load_processor, register_quantized_attention
from clip_fp8.tasks.quantizer_names import QUANTIZER_SUFFIXES

FP8_E4M3 = {"num_bits": (4, 3), "axis": None}  # per-tensor, static (calibrated amax)


# What ModelOpt's configuration is made of (``fp8_quant_config``): every stage that quantizes reads these.
QuantSettings = Reads[QuantizationConfig, "format", "algorithm", "quantize_attention", "quantize_layernorm", "exclude"]


def fp8_quant_config(cfg: QuantizationConfig, recovered: list[str] = ()) -> dict:
    """ModelOpt config: enable FP8 everywhere it belongs, then carve out; user and recovery exclusions come last."""
    entries: list[dict] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": dict(FP8_E4M3)},
        {"quantizer_name": "*input_quantizer", "cfg": dict(FP8_E4M3)},
    ]
    if cfg.quantize_attention:
        entries.append({"quantizer_name": "*[qkv]_bmm_quantizer", "cfg": dict(FP8_E4M3)})
    # Embedding lookups have no GEMM to speed up.
    entries.append({"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False})
    if not cfg.quantize_layernorm:
        # ModelOpt >= 0.44 gives LayerNorm an input quantizer; TensorRT gains nothing from it here.
        entries.append({"quantizer_name": "*", "parent_class": "nn.LayerNorm", "enable": False})
    # Exclusions last: an entry inserted earlier is silently overridden by the enabling entries.
    entries += [{"quantizer_name": pattern, "enable": False} for pattern in [*cfg.exclude, *recovered]]
    return {"quant_cfg": entries, "algorithm": cfg.algorithm}


def check_exclusions_match(model, patterns: list[str], field: str = "quantization.exclude") -> None:
    """Every exclusion pattern must match some module or quantizer name: a typo must not pass silently."""
    names = [name for name, _ in model.named_modules() if name]
    candidates = names + [f"{n}.{suffix}" for n in names for suffix in QUANTIZER_SUFFIXES]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            raise PipelineInputError(
                f"{field} pattern '{pattern}' matches no module of this model "
                f"(module names look like '{names[len(names) // 2]}'); fix or remove it"
            )


def quantizer_table(model) -> list[dict]:
    """Every TensorQuantizer: name, owning module, enabled, FP format, amax (the audit's raw material)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    modules = dict(model.named_modules())
    rows = []
    for name, q in model.named_modules():
        if not isinstance(q, TensorQuantizer):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = modules.get(parent_name)
        amax = getattr(q, "amax", None)
        rows.append({
            "name": name,
            "module": parent_name,
            "module_class": type(parent).__name__ if parent is not None else "",
            "module_base": next((c.__name__ for c in type(parent).__mro__ if c.__module__.startswith(("torch.nn", "transformers"))), "") if parent is not None else "",
            "quantizer": attr,
            "enabled": bool(q.is_enabled),
            "hard_disabled": type(q).__name__ == "HardDisabledTensorQuantizer",
            "num_bits": list(q.num_bits) if isinstance(q.num_bits, tuple) else q.num_bits,
            "amax": None if amax is None else float(amax.float().max()),
        })
    return rows


def build_fp8_kernels() -> bool:
    """Compile (the first time on a host) and load ModelOpt's FP8 fake-quant CUDA kernels; True if they loaded.

    ModelOpt JIT-builds them (``torch.utils.cpp_extension``) on the first fake-quantized forward of a process
    and keeps the build per host (``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``). Calibration
    does not need them; evaluate, torch_fp8 and the FP8 export do, and on a fresh host all three waited for that
    one build in the middle of a cold run (docs/benchmarks.md). Called when the run starts,
    beside calibration, the build is done before they begin; a process that starts meanwhile waits on torch's
    build lock and then loads it. Without CUDA ModelOpt skips it and this returns False."""
    from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

    return get_cuda_ext_fp8() is not None


def quantize_placeholder(model, cfg: QuantizationConfig, recovered: list[str], dummy: dict):
    """The model quantized as ``quantize`` would (same config, same quantizers, the same weight scales: max
    calibration of a weight is its largest magnitude) with activation scales from one dummy batch: what the
    FP8 graph's structure and FP8 weights depend on, without the calibration data (``set_scales`` writes the
    calibrated activation scales into its export). ``model``: the loaded baseline, quantized in place and returned.
    The caller holds ``CLIP_FORWARD_LOCK`` or is a process of its own."""
    import modelopt.torch.quantization as mtq
    import torch

    check_exclusions_match(model, cfg.exclude)
    check_exclusions_match(model, recovered, "recovery")
    register_quantized_attention(model)

    def forward_loop(m) -> None:
        with torch.no_grad():
            m(input_ids=dummy["text"], pixel_values=dummy["image"])

    mtq.quantize(model, fp8_quant_config(cfg, recovered), forward_loop)
    return model


@stage(retries=1)
def quantize(model_source: ArtifactRef, calibration: ArtifactRef, data_source: ArtifactRef, model_cfg: ModelSettings,
             calib_cfg: Reads[CalibrationConfig, "batch_size"], cfg: QuantSettings, out_dir: Path,
             recovered: dict[str, str] | None = None) -> StageOutput:
    """Calibrate and FP8-quantize; write the ModelOpt checkpoint and quantizers.json into ``out_dir``.

    ``recovered``: exclusion pattern -> why recovery added it (a unit's sensitivity rank), kept in the
    artifact's meta so the audit can tell them from the user's ``quantization.exclude``."""
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq
    import torch

    from clip_fp8.tasks.calibration_sources import iter_calibration_batches

    manifest = json.loads(calibration.file("manifest").read_text())
    data_root = data_source.path
    model_path = model_source.path
    model = load_clip(model_path, model_cfg)
    processor = load_processor(model_path)
    recovered = dict(recovered or {})
    check_exclusions_match(model, cfg.exclude)
    check_exclusions_match(model, list(recovered), "recovery")
    register_quantized_attention(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch_size = calib_cfg.batch_size
    seen = {"rows": [], "batch_size": batch_size}  # rows of every forward the model actually ran

    def forward_loop(m) -> None:
        nonlocal batch_size
        with torch.no_grad():
            for batch in iter_calibration_batches(manifest, data_root, processor, calib_cfg.batch_size):
                # A batch that does not fit is split rather than crashing the stage; max calibration
                # is order- and batch-independent, so the scales come out the same.
                for start in range(0, len(batch["input_ids"]), batch_size):
                    while True:
                        try:
                            ids = batch["input_ids"][start:start + batch_size]
                            m(input_ids=ids.to(device),
                              pixel_values=batch["pixel_values"][start:start + batch_size].to(device, dtype))
                            seen["rows"].append(len(ids))
                            break
                        except torch.OutOfMemoryError:
                            if batch_size == 1:
                                raise
                            batch_size //= 2
                            seen["batch_size"] = batch_size
                            torch.cuda.empty_cache()

    # The whole of ModelOpt's quantize holds the lock, not only the calibration batches: a quantizer forward
    # that ran while an in-process export had torch.onnx's flag set failed "Quantizer has not been calibrated".
    with CLIP_FORWARD_LOCK:
        mtq.quantize(model, fp8_quant_config(cfg, list(recovered)), forward_loop)

    mto.enable_huggingface_checkpointing()
    checkpoint = out_dir / "checkpoint"
    model.save_pretrained(checkpoint, safe_serialization=True)
    processor.save_pretrained(checkpoint)
    rows = quantizer_table(model)
    (out_dir / "quantizers.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "quant_config.json").write_text(json.dumps(fp8_quant_config(cfg, list(recovered)), indent=1, default=list))
    info = {
        "calibration_samples": sum(seen["rows"]),  # counted as fed, so a pair the loop skips shows here
        "calibration_forward_rows": seen["rows"],
        "calibration_batch_size": seen["batch_size"],
        "requested_batch_size": calib_cfg.batch_size,
        "quantizers_enabled": sum(r["enabled"] for r in rows),
        "quantizers_total": len(rows),
        "recovered": recovered,
    }
    return StageOutput(files={"checkpoint": "checkpoint", "quantizers": "quantizers.json", "config": "quant_config.json"},
                       meta=info, shown={"checkpoint": "checkpoint"})
