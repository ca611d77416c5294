"""Export: graphs exported in worker processes are the same as those exported in this one."""

from __future__ import annotations

import hashlib

import pytest

from clip_fp8.artifacts import ArtifactStore
from clip_fp8.config import PipelineConfig
from clip_fp8.stage import execute
from clip_fp8.tasks.export import export, export_workers


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """The model, and its FP8 checkpoint from the real calibration_data and quantize stages."""
    from clip_fp8.tasks.calibration_data import calibration_data
    from clip_fp8.tasks.calibration_sources import resolve_data_source
    from clip_fp8.tasks.checkpoints import resolve_model_source
    from clip_fp8.tasks.quantize import quantize

    cfg = PipelineConfig().with_overrides(["calibration.num_samples=64", "calibration.batch_size=64"])
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    model, data = resolve_model_source(cfg.model), resolve_data_source(cfg.calibration)
    calibration = execute(calibration_data, store, "c", {"data_source": data, "cfg": cfg.calibration})
    quantized = execute(quantize, store, "q", {"model_source": model, "calibration": calibration, "data_source": data,
                                               "model_cfg": cfg.model, "calib_cfg": cfg.calibration, "cfg": cfg.quantization})
    return model, quantized


@pytest.mark.parametrize("variant", ["fp16", "fp8"])
def test_export_in_processes_writes_the_same_graphs_as_in_process(refs, tmp_path, variant):
    model, quantized = refs
    cfg = PipelineConfig()
    digests = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        out.mkdir()
        export_cfg = cfg.export.model_copy(update={"workers": workers})
        result = export(variant, model, quantized if variant == "fp8" else None, cfg.model, export_cfg, out)
        assert sorted(result.files) == [f"{variant}_image", f"{variant}_text"]
        assert result.meta["processes"] == (0 if workers == 1 else 2)
        digests[workers] = {name: hashlib.sha256((out / f).read_bytes()).hexdigest() for name, f in result.files.items()}
    assert digests[1] == digests[2]


def test_export_workers_auto():
    export = PipelineConfig().export  # noqa: F811 - the section, not the stage
    vit_l = 428_000_000
    assert export_workers(export, parameters=650_000) == 1
    assert export_workers(export, parameters=vit_l, memory=128 * 2**30, cpus=16) == 2  # one process per graph
    assert export_workers(export, parameters=vit_l, memory=21 * 2**30, cpus=2) == 2
    assert export_workers(export, parameters=vit_l, memory=8 * 2**30, cpus=16) == 1  # 4 were OOM-killed on 24 GB
    assert export_workers(export.model_copy(update={"workers": 2}), parameters=650_000) == 2


def test_worker_count_is_not_part_of_the_cache_key():
    from clip_fp8.caching import canonical

    export = PipelineConfig().export
    assert canonical(export.model_copy(update={"workers": 4})) == canonical(export)
    assert canonical(export.model_copy(update={"opset": 21})) != canonical(export)
