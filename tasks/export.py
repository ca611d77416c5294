"""Stage export: ONNX graphs of the text and image encoders of one variant, FP16 (the baseline) or FP8.

FP8 goes through ModelOpt's ``get_onnx_bytes_and_metadata`` with ``weights_dtype="fp16"``: FP16 compute,
FP8 Q/DQ around every quantized op with weights stored in FP8 (DQ-only chains), dynamic batch axis. It exports
the model quantized with the run's quantization settings but *placeholder* activation scales (one dummy batch,
``quantize.quantize_placeholder``): the graph's structure and its FP8 weights depend on the model and those
settings alone, so the FP8 export starts with the run beside calibration instead of after quantize, and new
calibration data re-exports nothing. ``set_scales`` writes the checkpoint's calibrated scales into it. Each graph
gets ``<graph>.amax.json``, the placeholder scales it was exported with, which ``set_scales`` checks its
arithmetic against before it replaces them.
FP16 is the FP32 model traced by the same TorchScript exporter (``torch.onnx.export``, which ModelOpt calls)
and converted by the same FP16 converter ModelOpt's FP8 path uses (onnxconverter-common), so both variants are
FP16 graphs made the same way. ModelOpt's own path for an unquantized model is a graph-wide conversion
(``modelopt.onnx.autocast``), mostly repeated shape inference and size checks at ViT-L/14 (docs/benchmarks.md).
The variants are separate stage runs keyed on the model (and, for FP8, the quantization settings), never on
calibration. Outputs are the raw exports; ``surgery`` makes them buildable. The graph output is named
``text_embeds``/``image_embeds`` so serving code binds by meaning.

An export is a traced forward, and two process-global switches are set while it runs: torch.onnx's
"exporting" flag (which every fake-quant forward in the process reads) and ModelOpt's patched attention
function (see ``clip_fp8.model_locks.CLIP_FORWARD_LOCK``). A small model exports in this process holding
that lock, so no other stage's forward sees either; a large one exports each graph in a spawned process
of its own, where it runs beside the other stages instead of waiting for them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Literal

from clip_fp8.artifacts import ArtifactRef, scratch_directory
from clip_fp8.model_locks import CLIP_FORWARD_LOCK
from clip_fp8.config import ExportConfig, ModelConfig, QuantizationConfig
from clip_fp8.errors import PipelineInputError
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.checkpoints import ModelSettings, load_clip, load_quantized
from clip_fp8.tasks.quantize import QuantSettings

VARIANTS = ("fp16", "fp8")
ExportSettings = Reads[ExportConfig, "opset", "export_batch_size", "workers"]  # what ``export_graphs`` reads
ENCODERS = ("text", "image")
Variant = Literal["fp16", "fp8"]


def export_encoder(encoder, dummy, path: Path, opset: int) -> int:
    """Export one encoder wrapper of a fake-quantized model through ModelOpt to ``path``; return its size in bytes."""
    import onnx
    from modelopt.torch._deploy.utils import OnnxBytes, get_onnx_bytes_and_metadata

    from clip_fp8.console import quiet_onnx_tools
    from clip_fp8.tasks.onnx_passes import rename_tensor

    quiet_onnx_tools()

    onnx_bytes, _ = get_onnx_bytes_and_metadata(
        model=encoder, dummy_input=(dummy,), model_name=path.stem,
        dynamic_axes={encoder.input_name: {0: "batch"}, "out": {0: "batch"}},
        onnx_opset=opset, weights_dtype="fp16",
    )
    with scratch_directory(prefix="clip-fp8-export-") as scratch:  # ModelOpt writes a folder
        OnnxBytes.from_bytes(onnx_bytes).write_to_disk(scratch, clean_dir=True)
        model = onnx.load(str(Path(scratch) / f"{path.stem}.onnx"))
    rename_tensor(model, model.graph.output[0].name, encoder.output_name)
    onnx.save(model, str(path))
    return path.stat().st_size


def export_fp16_encoder(encoder, dummy, path: Path, opset: int) -> int:
    """Trace one encoder wrapper of the FP32 model, convert the graph to FP16 with the converter ModelOpt's FP8
    export uses (onnxconverter-common, inputs and outputs included), write it to ``path``; return its size."""
    import onnx
    import torch
    from onnxconverter_common.float16 import convert_float_to_float16

    with scratch_directory(prefix="clip-fp8-export-") as scratch, torch.inference_mode():
        traced = Path(scratch) / path.name
        torch.onnx.export(encoder, (dummy,), str(traced), input_names=[encoder.input_name],
                          output_names=[encoder.output_name], opset_version=opset, dynamo=False,
                          dynamic_axes={encoder.input_name: {0: "batch"}, encoder.output_name: {0: "batch"}})
        model = onnx.load(str(traced))
    model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    onnx.save(model, str(path))
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


def export_graphs(variant: str, encoders: tuple[str, ...], baseline_path: str, model_cfg: ModelConfig,
                  cfg: ExportConfig, out_dir: Path, checkpoint: str | None = None,
                  placeholder: tuple[QuantizationConfig, list[str]] | None = None) -> dict[str, int]:
    """Load the variant's model once and export the given encoders (seeded dummy inputs). FP8 is the quantized
    ``checkpoint`` or, given ``placeholder`` (settings, recovered exclusions), the model quantized with
    placeholder activation scales, whose values go beside each graph as ``<graph>.amax.json``."""
    import torch

    from clip_fp8.encoders import ImageEncoder, TextEncoder
    from clip_fp8.tasks.quantize import quantize_placeholder, quantizer_table

    amax = None
    if variant == "fp16":
        model = load_clip(baseline_path, model_cfg).float()  # traced in FP32 (a traced FP16 graph mixes types)
    elif placeholder is not None:
        model = load_clip(baseline_path, model_cfg)
        torch.manual_seed(0)
        model = quantize_placeholder(model, *placeholder, dummy=dummy_inputs(model, cfg.export_batch_size))
        amax = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "amax": {r["name"]: r["amax"] for r in quantizer_table(model) if r["enabled"]}}
    else:
        model = load_quantized(checkpoint, model_cfg)
    export_one = export_fp16_encoder if variant == "fp16" else export_encoder
    sizes = {}
    for encoder_name in encoders:
        torch.manual_seed(0)
        dummy = dummy_inputs(model, cfg.export_batch_size)[encoder_name]
        wrapper = TextEncoder(model) if encoder_name == "text" else ImageEncoder(model)
        name = f"{variant}_{encoder_name}.onnx"
        sizes[name] = export_one(wrapper.eval(), dummy, out_dir / name, cfg.opset)
        if amax is not None:
            (out_dir / f"{variant}_{encoder_name}.amax.json").write_text(json.dumps(amax, indent=1))
    return sizes


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
    """``export.workers``, or for 0: one process per graph (2) for models over 50 M parameters, as CPUs and
    memory allow; 1 (in this process) for a small model, where a process's start-up outweighs its export."""
    if cfg.workers:
        return min(cfg.workers, len(ENCODERS))
    if parameters <= 50_000_000:
        return 1
    memory = available_memory_bytes() if memory is None else memory
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    by_memory = memory // (EXPORT_RSS_PER_FP32_WEIGHT * 4 * parameters)
    return int(max(1, min(len(ENCODERS), cpus, by_memory)))


def parameter_count(model_path: str) -> int:
    """~12 h^2 weights per transformer layer, summed over both towers: no need to load the model to decide."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return sum(12 * c.get("hidden_size", 0) ** 2 * c.get("num_hidden_layers", 0)
               for c in (config.get("text_config", {}), config.get("vision_config", {})))


@stage(retries=1)
def export(variant: Variant, model_source: ArtifactRef, model_cfg: ModelSettings, quantization: QuantSettings | None,
           cfg: ExportSettings, out_dir: Path, recovered: list[str] = ()) -> StageOutput:
    """Write ``<variant>_{text,image}.onnx`` into ``out_dir``; FP8 takes the quantization settings (and the
    exclusions recovery added), FP16 none, so that a change to them re-exports only the FP8 graphs."""
    if (variant == "fp8") != (quantization is not None):
        raise PipelineInputError(f"export variant '{variant}' {'needs' if variant == 'fp8' else 'takes no'} quantization settings")
    placeholder = (quantization, list(recovered)) if quantization is not None else None
    sizes, processes = export_both(variant, model_source.path, model_cfg, cfg, out_dir, placeholder=placeholder)
    files = {name.removesuffix(".onnx"): name for name in sizes}
    if placeholder is not None:
        files |= {f"{graph}.amax": f"{graph}.amax.json" for graph in list(files)}
    return StageOutput(files=files, meta={"variant": variant, "bytes": sizes, "processes": processes},
                       shown={f"raw_onnx_{variant}": ""})


def export_both(variant: str, model_path: str, model_cfg: ModelConfig, cfg: ExportConfig, out_dir: Path,
                checkpoint: str | None = None,
                placeholder: tuple[QuantizationConfig, list[str]] | None = None) -> tuple[dict[str, int], int]:
    """Both encoders' graphs (``export_graphs``), here under the forward lock for a small model or one spawned
    process per graph for a large one (``export_workers``); returns their sizes and the processes used."""
    if export_workers(cfg, parameter_count(model_path)) == 1:
        with CLIP_FORWARD_LOCK:
            return export_graphs(variant, ENCODERS, model_path, model_cfg, cfg, out_dir, checkpoint, placeholder), 0
    return export_in_processes(variant, model_path, model_cfg, cfg, out_dir, checkpoint, placeholder), len(ENCODERS)


# Exporters compete for CPU with the critical path; the FP16 export has the run's slack, so it gets what is left.
# Measured: docs/benchmarks.md ("export contention").
EXPORT_NICENESS = {"fp8": 10, "fp16": 19}


def _start_worker(threads: int, niceness: int, eager_fp8: bool) -> None:
    """Worker start-up: a bounded share of the host's cores at a lower priority. Every torch process defaults
    to one OpenMP thread per core, and numpy's BLAS and the OpenMP runtimes ModelOpt's ONNX passes load do the
    same; two exports and the stages beside them then oversubscribe the host several times over.

    ``eager_fp8``: ModelOpt's FP8 fake quantization through its eager path (the same E4M3 rounding). An export's
    forwards only trace, and the values they compute are not in the graph; ModelOpt's CUDA kernels for them are
    built once per host, a minute on a fresh one, and the FP8 export, which starts with the run, would wait for it."""
    import torch
    from threadpoolctl import threadpool_limits

    from clip_fp8.console import quiet_libraries

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # libraries loaded from here on
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)
    threadpool_limits(threads)  # and those already loaded
    try:
        os.nice(niceness)
    except OSError:  # not permitted here: the export still runs, at the same priority
        pass
    quiet_libraries()  # a quiet CLI run stays quiet in its export workers
    if eager_fp8:
        from modelopt.torch.quantization import extensions

        extensions.get_cuda_ext_fp8.extension = None


def export_in_processes(variant: str, baseline_path: str, model_cfg: ModelConfig, cfg: ExportConfig, out_dir: Path,
                        checkpoint: str | None = None,
                        placeholder: tuple[QuantizationConfig, list[str]] | None = None) -> dict[str, int]:
    """Each graph in a spawned process of its own (spawn, not fork: a forked CUDA context is unusable)."""
    context = multiprocessing.get_context("spawn")
    # Both variants export at once beside the stages running in the parent: four exports and the parent.
    threads = max(1, (os.cpu_count() or 1) // (2 * len(ENCODERS) + 1))
    source = {"checkpoint": checkpoint, "placeholder": placeholder}
    try:
        with ProcessPoolExecutor(max_workers=len(ENCODERS), mp_context=context, initializer=_start_worker,
                                 initargs=(threads, EXPORT_NICENESS[variant], variant == "fp8")) as pool:
            jobs = [pool.submit(export_graphs, variant, (e,), baseline_path, model_cfg, cfg, out_dir, **source)
                    for e in ENCODERS]
            return {name: size for job in jobs for name, size in job.result().items()}
    except BrokenProcessPool:
        # A worker was killed, most likely for memory: export one graph at a time, and say so.
        print(f"export {variant}: a worker died (out of memory?); exporting one graph at a time")
        for leftover in out_dir.iterdir():
            leftover.unlink()
        with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_start_worker,
                                 initargs=(threads, EXPORT_NICENESS[variant], variant == "fp8")) as pool:
            return pool.submit(export_graphs, variant, ENCODERS, baseline_path, model_cfg, cfg, out_dir, **source).result()
