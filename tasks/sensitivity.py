"""Stage sensitivity: what quantizing each unit of the model to FP8 costs, measured with only that unit quantized.

The objective is CLIP's own: the KL divergence from the baseline's to the quantized model's image->text
distributions within a batch (softmax over ``logits_per_image``), summed over the scored batches of
calibration pairs. Higher is more sensitive.

- Linear and Conv units (a block's Q/K/V projections as one unit, as TensorRT fuses them; its
  out-projection; each MLP layer; the two projections): ModelOpt's ``mtq.auto_quantize(method="kl_div")``,
  which calibrates FP8 for every unit and scores each with all the others unquantized. Its search result
  is not used; its per-unit scores are.
- Attention matmuls (the inputs of Q*K^T and P*V): auto_quantize searches Linear and Conv modules only,
  so they are swept here with the same objective: the first attempt's calibrated checkpoint with only
  that attention module's Q/K/V quantizers enabled.

Each unit also gets its GEMM multiply-accumulates per image-caption pair, counted by forward hooks on one
real pair at the deployed shapes (text padded to the context length), so recovery can say what share
of the work an exclusion takes back to FP16. Units the first attempt left unquantized (the user's
exclusions) are counted, not scored.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.model_locks import CLIP_FORWARD_LOCK
from clip_fp8.config import ModelConfig, QuantizationConfig
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.checkpoints import ModelSettings, load_clip, load_processor, load_quantized
from clip_fp8.tasks.quantize import QuantSettings, fp8_quant_config
from clip_fp8.tasks.quantizer_names import ATTENTION_QUANTIZERS

OBJECTIVE = "KL(baseline || FP8) of the in-batch image->text distributions (softmax of logits_per_image), summed"
SHOWN = 10  # units in the report's table


def tower_of(module: str) -> str:
    return "image" if module.startswith(("vision_model", "visual_projection")) else "text"


def unit_name(modules: list[str]) -> str:
    """One wildcard name for a group of modules that differ in one character (``...self_attn.[kqv]_proj``)."""
    if len(modules) == 1:
        return modules[0]
    first = modules[0]
    if len({len(m) for m in modules}) == 1:
        differing = [i for i in range(len(first)) if len({m[i] for m in modules}) > 1]
        if len(differing) == 1:
            i = differing[0]
            return f"{first[:i]}[{''.join(sorted({m[i] for m in modules}))}]{first[i + 1:]}"
    raise ValueError(f"no single wildcard name for the unit {modules}")


def exclusion_pattern(unit: dict) -> str:
    """The ``quantization.exclude`` pattern that leaves exactly this unit in FP16."""
    if unit["kind"] == "attention":
        return f"{unit['unit']}.*_bmm_quantizer"
    return f"{unit['unit']}.*"


def count_macs(model, pixel_values, input_ids) -> dict[str, tuple[str, int]]:
    """Module -> (kind, multiply-accumulates) for one pair: Linear, Conv2d, and each attention's two matmuls."""
    import torch

    macs: dict[str, int] = {}
    kinds: dict[str, str] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"

            def linear(mod, args, out, name=name):
                macs[name] = macs.get(name, 0) + args[0].numel() // mod.in_features * mod.in_features * mod.out_features
            hooks.append(module.register_forward_hook(linear))
        elif isinstance(module, torch.nn.Conv2d):
            kinds[name] = "conv"

            def conv(mod, args, out, name=name):
                per_output = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                macs[name] = macs.get(name, 0) + out.numel() * per_output
            hooks.append(module.register_forward_hook(conv))
        elif hasattr(module, "q_proj") and hasattr(module, "k_proj"):  # an attention block: Q*K^T and P*V
            kinds[name] = "attention"

            def attention(mod, args, kwargs, out, name=name):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                batch, seq, width = hidden.shape
                macs[name] = macs.get(name, 0) + 2 * batch * seq * seq * width
            hooks.append(module.register_forward_hook(attention, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, pixel_values=pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (kinds[name], n) for name, n in macs.items()}


def kl_sum(baseline_logits, quantized_logits):
    """ModelOpt's auto_quantize KL score: sum over the batch of KL(baseline || quantized) per image row."""
    import torch
    import torch.nn.functional as F

    return float(F.kl_div(torch.log_softmax(quantized_logits.float(), -1), torch.log_softmax(baseline_logits.float(), -1),
                          reduction="sum", log_target=True))


def enabled_quantizers(quantized: ArtifactRef) -> dict[str, set[str]]:
    """Module -> quantizers the first attempt enabled (its quantizer table)."""
    enabled: dict[str, set[str]] = {}
    for row in json.loads(quantized.file("quantizers").read_text()):
        if row["enabled"]:
            enabled.setdefault(row["module"], set()).add(row["quantizer"])
    return enabled


def linear_scores(model, batches, cfg: QuantizationConfig) -> dict[str, dict]:
    """ModelOpt auto_quantize's KL scores for every Linear/Conv unit (groups as ModelOpt forms them)."""
    import modelopt.torch.quantization as mtq

    def forward_step(m, batch):
        return m(**batch).logits_per_image

    # Attention matmuls are swept separately; auto_quantize's formats apply to Linear/Conv layers only.
    fmt = fp8_quant_config(cfg.model_copy(update={"quantize_attention": False}))
    _, state = mtq.auto_quantize(
        model, constraints={"effective_bits": 16.0}, quantization_formats=[fmt], data_loader=batches,
        forward_step=forward_step, method="kl_div", num_calib_steps=len(batches), num_score_steps=len(batches),
        disabled_layers=list(cfg.exclude), verbose=False)
    units = {}
    for stats in state["candidate_stats"].values():
        modules = sorted(stats["module_names"])
        scores = [s for f, s in zip(stats["formats"], stats["scores"]) if not str(f).startswith("NONE")]
        units[unit_name(modules)] = {"modules": modules, "score": float(scores[0]) if scores else None}
    return units


def attention_scores(checkpoint: Path, model_cfg: ModelConfig, batches, modules: list[str]) -> dict[str, float]:
    """The same objective for each attention module's Q/K/V matmul quantizers, enabled alone."""
    import torch
    from modelopt.torch.quantization.nn import TensorQuantizer

    model = load_quantized(checkpoint, model_cfg)
    quantizers = {name: q for name, q in model.named_modules() if isinstance(q, TensorQuantizer)}
    for q in quantizers.values():
        q.disable()
    scores = {}
    with torch.no_grad():
        baseline = [model(**batch).logits_per_image for batch in batches]
        for module in modules:
            mine = [quantizers[f"{module}.{attr}"] for attr in ATTENTION_QUANTIZERS]
            for q in mine:
                q.enable()
            scores[module] = sum(kl_sum(b, model(**batch).logits_per_image) for b, batch in zip(baseline, batches))
            for q in mine:
                q.disable()
    return scores


def sensitivity_markdown(result: dict) -> str:
    lines = ["## FP8 sensitivity per unit", "",
             f"Objective: {result['objective']}, over {result['samples']} calibration pairs in batches of "
             f"{result['batch_size']}; each unit quantized alone. {result['seconds']:.1f} s.", "",
             "| rank | unit | tower | kind | score | share of GEMM MACs |", "|---|---|---|---|---|---|"]
    for rank, u in enumerate(result["units"][:SHOWN], 1):
        lines.append(f"| {rank} | `{u['unit']}` | {u['tower']} | {u['kind']} | {u['score']:.4g} | "
                     f"{u['macs'] / result['total_macs']:.2%} |")
    return "\n".join(lines) + "\n"


@stage(retries=1)
def sensitivity(model_source: ArtifactRef, quantized: ArtifactRef, calibration: ArtifactRef, data_source: ArtifactRef,
                model_cfg: ModelSettings, cfg: QuantSettings, samples: int, batch_size: int,
                out_dir: Path) -> StageOutput:
    """Score every unit the first attempt quantized on ``samples`` calibration pairs; rank them, most sensitive
    first, with their MACs."""
    from clip_fp8.tasks.calibration_sources import iter_calibration_batches
    from clip_fp8.devices import pick_device

    started = time.time()
    manifest = json.loads(calibration.file("manifest").read_text())
    manifest = {**manifest, "pairs": manifest["pairs"][:samples]}
    processor = load_processor(model_source.path)
    model = load_clip(model_source.path, model_cfg)
    device, dtype = pick_device(model_cfg), next(model.parameters()).dtype
    batches = [{"input_ids": b["input_ids"].to(device), "pixel_values": b["pixel_values"].to(device, dtype)}
               for b in iter_calibration_batches(manifest, data_source.path, processor, batch_size)]
    enabled = enabled_quantizers(quantized)
    with CLIP_FORWARD_LOCK:  # ModelOpt's forwards must not meet an in-process ONNX export
        first = batches[0]
        macs = count_macs(model, first["pixel_values"][:1], first["input_ids"][:1])
        linear = linear_scores(model, batches, cfg)
        del model
        attention_modules = sorted(m for m, qs in enabled.items() if set(ATTENTION_QUANTIZERS) <= qs)
        attention = attention_scores(quantized.file("checkpoint"), model_cfg, batches, attention_modules)

    units, counted = [], set()
    for name, info in linear.items():
        kind = macs[info["modules"][0]][0]
        scored = all({"input_quantizer", "weight_quantizer"} <= enabled.get(m, set()) for m in info["modules"])
        units.append({"unit": name, "tower": tower_of(name), "kind": kind, "modules": info["modules"],
                      "macs": sum(macs[m][1] for m in info["modules"]), "candidate": scored,
                      "score": info["score"] if scored else None})
        counted.update(info["modules"])
    for module, score in attention.items():
        units.append({"unit": module, "tower": tower_of(module), "kind": "attention", "modules": [module],
                      "macs": macs[module][1], "candidate": True, "score": score})
        counted.add(module)
    # GEMM work no unit covers (attention left in FP16 by the user): in the total, never a candidate.
    for module, (kind, n) in macs.items():
        if module not in counted:
            units.append({"unit": module, "tower": tower_of(module), "kind": kind, "modules": [module], "macs": n,
                          "candidate": False, "score": None})
    for u in units:
        u["exclude"] = exclusion_pattern(u)
    units.sort(key=lambda u: (u["score"] is None, -(u["score"] or 0.0), u["unit"]))
    ranked = [u for u in units if u["candidate"]]
    result = {"objective": OBJECTIVE, "samples": len(manifest["pairs"]), "batch_size": batch_size,
              "total_macs": sum(u["macs"] for u in units), "units": ranked,
              "fp16_units": [u for u in units if not u["candidate"]], "seconds": time.time() - started}
    (out_dir / "sensitivity.json").write_text(json.dumps(result, indent=1))
    top = [{"unit": u["unit"], "score": u["score"]} for u in ranked[:3]]
    return StageOutput(files={"sensitivity": "sensitivity.json"}, reports={"sensitivity": sensitivity_markdown(result)},
                       meta={"units_scored": len(ranked), "top": top, "seconds": result["seconds"],
                             "note": f"{len(ranked)} units scored; most sensitive: {ranked[0]['unit'] if ranked else '—'}"},
                       shown={"sensitivity": "sensitivity"})

