"""Export: the parallel path writes the same graphs as the serial one."""

from __future__ import annotations

import hashlib

import pytest

from clip_fp8.config import PipelineConfig
from tasks.export import export_all, export_workers
from tasks.model import EMBEDDED_MODELS


@pytest.fixture(scope="module")
def quantized_checkpoint(tmp_path_factory):
    from tasks.calibration import resolve_data_source, select_calibration_pairs
    from tasks.model import resolve_model_source
    from tasks.quantize import quantize

    cfg = PipelineConfig().with_overrides(["calibration.num_samples=64", "calibration.batch_size=64"])
    out = tmp_path_factory.mktemp("q")
    data = resolve_data_source(cfg.calibration)
    quantize(resolve_model_source(cfg.model).path, select_calibration_pairs(data, cfg.calibration), data.path,
             cfg.model, cfg.calibration, cfg.quantization, out)
    return out / "checkpoint"


def test_parallel_export_writes_the_same_graphs_as_serial(quantized_checkpoint, tmp_path):
    cfg = PipelineConfig()
    digests = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        out.mkdir()
        export = cfg.export.model_copy(update={"workers": workers})
        sizes = export_all(str(EMBEDDED_MODELS["tiny-clip-shapes"]), str(quantized_checkpoint), cfg.model, export, out)
        assert sorted(sizes) == ["fp16_image.onnx", "fp16_text.onnx", "fp8_image.onnx", "fp8_text.onnx"]
        digests[workers] = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in sizes}
    assert digests[1] == digests[2]


def test_export_workers_auto():
    export = PipelineConfig().export
    vit_l = 428_000_000
    assert export_workers(export, parameters=650_000) == 1
    assert export_workers(export, parameters=vit_l, memory=128 * 2**30, cpus=16) == 4  # the H100 host
    assert export_workers(export, parameters=vit_l, memory=21 * 2**30, cpus=2) == 2  # 4 were OOM-killed on 24 GB
    assert export_workers(export, parameters=vit_l, memory=8 * 2**30, cpus=16) == 1
    assert export_workers(export.model_copy(update={"workers": 2}), parameters=650_000) == 2


def test_worker_count_is_not_part_of_the_cache_key():
    from clip_fp8.caching import canonical

    export = PipelineConfig().export
    assert canonical(export.model_copy(update={"workers": 4})) == canonical(export)
    assert canonical(export.model_copy(update={"opset": 21})) != canonical(export)
