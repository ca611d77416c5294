"""ONNX export of the text and image encoders: FP8 (from the ModelOpt checkpoint) and the FP16 baseline.

Both go through ModelOpt's ``get_onnx_bytes_and_metadata`` with ``weights_dtype="fp16"``: FP16
compute, FP8 Q/DQ around every quantized op with weights stored in FP8 (DQ-only chains), dynamic
batch axis. The baseline takes the same path so the engines compare like with like. Outputs are the
raw exports; ``surgery`` makes them buildable. The graph output ``out`` is renamed to
``text_embeds``/``image_embeds`` so serving code binds by meaning.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx

from clip_fp8.config import ExportConfig, ModelConfig
from clip_fp8.encoders import ImageEncoder, TextEncoder

VARIANTS = ("fp16", "fp8")
ENCODERS = ("text", "image")


def rename_output(model: onnx.ModelProto, new_name: str) -> None:
    from tasks.surgery import rename_tensor

    rename_tensor(model, model.graph.output[0].name, new_name)


def export_encoder(encoder, dummy, path: Path, opset: int) -> int:
    """Export one encoder wrapper to ``path``; return the file size in bytes."""
    from modelopt.torch._deploy.utils import OnnxBytes, get_onnx_bytes_and_metadata

    onnx_bytes, _ = get_onnx_bytes_and_metadata(
        model=encoder, dummy_input=(dummy,), model_name=path.stem,
        dynamic_axes={encoder.input_name: {0: "batch"}, "out": {0: "batch"}},
        onnx_opset=opset, weights_dtype="fp16",
    )
    staged = path.parent / f".{path.stem}.export"
    OnnxBytes.from_bytes(onnx_bytes).write_to_disk(str(staged), clean_dir=True)
    model = onnx.load(str(staged / f"{path.stem}.onnx"))
    rename_output(model, encoder.output_name)
    onnx.save(model, str(path))
    for leftover in staged.iterdir():
        leftover.unlink()
    staged.rmdir()
    return path.stat().st_size


def dummy_inputs(model, batch: int):
    import torch

    vision, text = model.config.vision_config, model.config.text_config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)
    ids = torch.randint(0, text.vocab_size, (batch, text.max_position_embeddings), device=device)
    ids[:, -1] = text.eos_token_id  # CLIP pools at the first EOS
    return {"text": ids, "image": pixels}


def _load(variant: str, baseline_path: str, checkpoint: str, model_cfg: ModelConfig):
    from tasks.model import load_clip
    from tasks.quantize import load_quantized

    return load_clip(baseline_path, model_cfg) if variant == "fp16" else load_quantized(checkpoint, model_cfg)


def _export_one(variant: str, encoder_name: str, baseline_path: str, checkpoint: str, model_cfg: ModelConfig,
                cfg: ExportConfig, out_dir: Path) -> tuple[str, int]:
    """One graph in a worker process: load its model, export it (the dummy input is seeded: same in any order)."""
    import torch

    model = _load(variant, baseline_path, checkpoint, model_cfg)
    torch.manual_seed(0)
    dummies = dummy_inputs(model, cfg.export_batch_size)
    wrapper = TextEncoder(model) if encoder_name == "text" else ImageEncoder(model)
    name = f"{variant}_{encoder_name}.onnx"
    return name, export_encoder(wrapper.eval(), dummies[encoder_name], out_dir / name, cfg.opset)


# Peak host memory of one export process, in multiples of the model's FP32 weights (the model, the
# traced graph, ModelOpt's intermediate ONNX copies). Four ViT-L/14 exports at once were OOM-killed on
# a 24 GB host; a 128 GB host ran them.
EXPORT_RSS_PER_FP32_WEIGHT = 6


def available_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def export_workers(cfg: ExportConfig, parameters: int, memory: int | None = None, cpus: int | None = None) -> int:
    """``export.workers``, or for 0: 4 for models over 50 M parameters, as many as CPUs and memory allow."""
    if cfg.workers:
        return cfg.workers
    if parameters <= 50_000_000:
        return 1
    memory = available_memory_bytes() if memory is None else memory
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    by_memory = memory // (EXPORT_RSS_PER_FP32_WEIGHT * 4 * parameters)
    return int(max(1, min(4, cpus, by_memory)))


def export_all(baseline_path: str, checkpoint: str, model_cfg: ModelConfig, cfg: ExportConfig, out_dir: Path) -> dict[str, int]:
    """Write ``{fp16,fp8}_{text,image}.onnx`` into ``out_dir``; return their sizes.

    ModelOpt's export (tracing, shape inference, weight compression, protobuf serialisation) is
    single-threaded Python: at ViT-L/14 size the four graphs take ~3 minutes one after another, so
    large models export them in parallel processes (``export.workers``).
    """
    import json

    import torch

    config = json.loads((Path(baseline_path) / "config.json").read_text())
    # ~12 h^2 weights per transformer layer, summed over both towers: no need to load the model to decide.
    parameters = sum(12 * c.get("hidden_size", 0) ** 2 * c.get("num_hidden_layers", 0)
                     for c in (config.get("text_config", {}), config.get("vision_config", {})))
    workers = export_workers(cfg, parameters)
    jobs = [(variant, encoder) for variant in VARIANTS for encoder in ENCODERS]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # Spawn, not fork: a forked CUDA context is unusable, and ModelOpt's registries are per process.
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_export_one, v, e, baseline_path, checkpoint, model_cfg, cfg, out_dir) for v, e in jobs]
                return dict(f.result() for f in futures)
        except BrokenProcessPool:
            # A worker was killed, most likely for memory: fall back to one export at a time, and say so.
            print(f"export: a worker of {workers} died (out of memory?); exporting the graphs one at a time")
            for leftover in out_dir.iterdir():
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
    sizes: dict[str, int] = {}
    for variant in VARIANTS:
        model = _load(variant, baseline_path, checkpoint, model_cfg)
        torch.manual_seed(0)
        dummies = dummy_inputs(model, cfg.export_batch_size)
        for encoder_name, wrapper in (("text", TextEncoder(model)), ("image", ImageEncoder(model))):
            name = f"{variant}_{encoder_name}.onnx"
            sizes[name] = export_encoder(wrapper.eval(), dummies[encoder_name], out_dir / name, cfg.opset)
        del model
    return sizes
