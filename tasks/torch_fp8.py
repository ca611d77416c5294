"""Stage torch_fp8: the calibrated ModelOpt checkpoint as a deployable FP8 model for plain PyTorch.

ModelOpt's own real-quantization path does the weight conversion: ``mtq.compress`` turns every FP8
weight quantizer's Linear into a ``RealQuantQuantLinear`` holding an E4M3 weight and its scale. That
model is not what ships, for two reasons measured on an H100 (docs/benchmarks.md): eagerly its GEMM
(``fp8_per_tensor_gemm``) is as slow as any unfused FP8 linear (2.2x slower than FP16 at ViT-L/14 batch
128), and whole-model ``torch.compile`` breaks inside ModelOpt's ``DynamicModule.__getattr__``. So the
smallest step past it: copy each compressed layer's FP8 weight, weight scale and calibrated input scale
into a plain ``FP8Linear`` (``clip_fp8.fp8_runtime``), every other weight into a plain FP16 ``CLIPModel``,
and save that: safetensors with FP8 tensors, the model config, the tokenizer and processor, and a layout
file naming the FP8 layers. ``clip_fp8.fp8_runtime.load`` is the one call that serves it.

Left in FP16, each with its reason in the layout file: layers the checkpoint does not quantize (patch
embedding, recovery's exclusions), layers whose shape ``_scaled_mm`` cannot take, and attention's
matmuls (their FP8 quantizers exist in the checkpoint, for the ONNX graph; SDPA has no FP8 form).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import ModelConfig
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.checkpoints import ModelSettings, load_quantized

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt")


def _fp8_e4m3_per_tensor(quantizer) -> bool:
    return (quantizer is not None and quantizer.is_enabled and tuple(getattr(quantizer, "num_bits", ())) == (4, 3)
            and quantizer.amax is not None and quantizer.amax.numel() == 1)


def convert(quantized, dtype=None):
    """A plain ``CLIPModel`` with ``FP8Linear`` layers from a calibrated (fake-quant) ModelOpt CLIP, and its layout.

    ``quantized`` is compressed in place by ``mtq.compress``. Returns ``(model, layout)``.
    """
    import modelopt.torch.quantization as mtq
    import torch
    from transformers import CLIPModel

    from clip_fp8.model_locks import clip_model_construction
    from clip_fp8.fp8_runtime import FORMAT, FP8, FP8_MAX, gemm_fits, swap_in_fp8_linears

    dtype = dtype or torch.float16
    device = next(quantized.parameters()).device
    input_scales, fp16_linears = {}, {}
    for name, module in quantized.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight_q, input_q = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
        if not (_fp8_e4m3_per_tensor(weight_q) and _fp8_e4m3_per_tensor(input_q)):
            fp16_linears[name] = "not quantized to FP8 in the checkpoint"
        elif not gemm_fits(module.in_features, module.out_features):
            fp16_linears[name] = f"shape {module.out_features}x{module.in_features} is not a multiple of 16 (_scaled_mm)"
        else:
            input_scales[name] = (input_q.amax.float() / FP8_MAX).reshape(())
    mtq.compress(quantized)  # ModelOpt's real quantization: E4M3 weights + their scales

    config = quantized.config
    config._attn_implementation = "sdpa"
    with clip_model_construction(), torch.device(device):
        plain = CLIPModel(config).to(dtype).eval()
    swap_in_fp8_linears(plain, list(input_scales), dtype, device)
    source = quantized.state_dict()
    state = {}
    for key, target in plain.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in input_scales and leaf in ("weight_scale", "input_scale"):
            compressed = quantized.get_submodule(owner)
            scale = compressed.weight_quantizer._scale if leaf == "weight_scale" else input_scales[owner]
            state[key] = scale.detach().float().reshape(())
        elif owner in input_scales and leaf == "weight":
            weight = source[key]
            if weight.dtype != FP8:
                raise RuntimeError(f"mtq.compress left {owner}.weight in {weight.dtype}, not FP8 E4M3")
            state[key] = weight
        elif key in source and source[key].dtype == FP8:  # FP8 weight, FP16 input: keep the layer in FP16
            scale = quantized.get_submodule(owner).weight_quantizer._scale
            state[key] = (source[key].float() * scale.float()).to(target.dtype)
        elif key in source:
            state[key] = source[key].to(target.dtype)
        else:  # a non-persistent buffer (position ids): the plain model's own
            state[key] = target
    plain.load_state_dict(state, strict=True)
    layout = {"format": FORMAT, "fp8_linears": sorted(input_scales), "fp16_linears": dict(sorted(fp16_linears.items())),
              "attention": "FP16 SDPA: the checkpoint's attention quantizers (Q, K, V, softmax) are for the ONNX graph",
              "dtype": str(dtype).removeprefix("torch.")}
    return plain, layout


def save(model, layout: dict, out_dir: Path) -> dict[str, str]:
    from safetensors.torch import save_file

    from clip_fp8.fp8_runtime import FORMAT, LAYOUT, WEIGHTS

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": FORMAT})
    model.config.to_json_file(str(out_dir / "config.json"))
    (out_dir / LAYOUT).write_text(json.dumps(layout, indent=1))
    return {"weights": WEIGHTS, "config": "config.json", "layout": LAYOUT}


@stage(retries=1)
def torch_fp8(quantized: ArtifactRef, model_cfg: ModelSettings, out_dir: Path) -> StageOutput:
    """Convert the quantize stage's checkpoint; runs on any host (the conversion needs no GPU)."""
    import torch

    from clip_fp8.fp8_runtime import FP8

    checkpoint = quantized.file("checkpoint")
    fake = load_quantized(checkpoint, model_cfg.model_copy(update={"device": "cpu", "dtype": "float32"}))
    model, layout = convert(fake, torch.float16)
    files = save(model, layout, out_dir)
    for name in PROCESSOR_FILES:  # the artifact serves on its own: tokenizer and image preprocessing with it
        if (Path(checkpoint) / name).is_file():
            shutil.copy2(Path(checkpoint) / name, out_dir / name)
            files[name] = name
    fp8_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    fp16_bytes = sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in model.state_dict().values())
    fp8_tensors = sum(1 for t in model.state_dict().values() if t.dtype == FP8)
    facts = {"weights_bytes": fp8_bytes, "fp16_weights_bytes": fp16_bytes, "fp8_linears": len(layout["fp8_linears"]),
             "fp16_linears": len(layout["fp16_linears"]), "fp8_tensors": fp8_tensors}
    report = (f"torch-fp8 artifact: {facts['fp8_linears']} FP8 linears, {facts['fp16_linears']} left in FP16, weights "
              f"{fp8_bytes / 1e6:.2f} MB ({fp8_bytes / fp16_bytes:.2f}x of FP16); serve it with "
              "`clip_fp8.fp8_runtime.load(<artifacts/torch_fp8>)`.\n")
    return StageOutput(files=files, reports={"torch-fp8": report}, summary={"torch_fp8": facts}, shown={"torch_fp8": ""},
                       meta={**facts, "note": f"{facts['fp8_linears']} FP8 linears, {fp8_bytes / 1e6:.2f} MB "
                                          f"({fp8_bytes / fp16_bytes:.2f}x of FP16)"})
