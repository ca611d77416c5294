"""set_scales on a GPU, where the model is FP16 and ModelOpt writes the FP8 scales in FP16 as it traces (the CPU
path traces in FP32 and converts afterwards): the placeholder export with the checkpoint's scales written in is,
byte for byte, ModelOpt's export of the checkpoint.

Run through the device tool: ``python -m pytest -m gpu tests/test_gpu_export.py`` (with ModelOpt installed there).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_set_scales_on_the_fp16_gpu_path_ships_modelopt_bytes(tmp_path):
    from clip_fp8.artifacts import ArtifactStore
    from clip_fp8.config import PipelineConfig
    from clip_fp8.stage import execute
    from clip_fp8.tasks.calibration_data import calibration_data
    from clip_fp8.tasks.calibration_sources import resolve_data_source
    from clip_fp8.tasks.checkpoints import resolve_model_source
    from clip_fp8.tasks.export import ENCODERS, export, export_graphs
    from clip_fp8.tasks.quantize import quantize
    from clip_fp8.tasks.set_scales import set_scales

    cfg = PipelineConfig().with_overrides(["calibration.num_samples=64", "calibration.batch_size=64"])
    store = ArtifactStore(tmp_path / "store")
    model, data = resolve_model_source(cfg.model), resolve_data_source(cfg.calibration)
    calibration = execute(calibration_data, store, "c", {"data_source": data, "cfg": cfg.calibration})
    quantized = execute(quantize, store, "q", {"model_source": model, "calibration": calibration, "data_source": data,
                                               "model_cfg": cfg.model, "calib_cfg": cfg.calibration, "cfg": cfg.quantization})
    exported = execute(export, store, "e", {"variant": "fp8", "model_source": model, "model_cfg": cfg.model,
                                            "quantization": cfg.quantization, "cfg": cfg.export})
    placeholder = json_of(exported.file("fp8_image.amax"))
    assert placeholder["dtype"] == "float16"  # the GPU path, not the CPU one tests/test_export.py covers
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    export_graphs("fp8", ENCODERS, model.path, cfg.model, cfg.export, fresh, checkpoint=str(quantized.file("checkpoint")))
    out = tmp_path / "out"
    out.mkdir()
    result = set_scales(exported, quantized, model, cfg.model, cfg.export, out)
    assert result.meta["method"] == "rescaled", result.meta
    for graph in (f"fp8_{e}" for e in ENCODERS):
        assert digest(out / f"{graph}.onnx") == digest(fresh / f"{graph}.onnx"), graph


def json_of(path):
    import json

    return json.loads(path.read_text())


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
