"""Export: graphs exported in worker processes are the same as those exported in this one; set_scales writes a
checkpoint's scales into the placeholder FP8 export and ships the bytes ModelOpt exports from that checkpoint."""

from __future__ import annotations

import hashlib

import pytest

from clip_fp8.artifacts import ArtifactStore
from clip_fp8.config import PipelineConfig
from clip_fp8.stage import execute
from clip_fp8.tasks.export import ENCODERS, export, export_graphs, export_workers
from clip_fp8.tasks.set_scales import set_scales


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


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp16", "fp8"])
def test_export_in_processes_writes_the_same_graphs_as_in_process(refs, tmp_path, variant):
    model, quantized = refs
    cfg = PipelineConfig()
    digests = {}
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        out.mkdir()
        export_cfg = cfg.export.model_copy(update={"workers": workers})
        result = export(variant, model, cfg.model, cfg.quantization if variant == "fp8" else None, export_cfg, out)
        assert sorted(n for n in result.files if not n.endswith(".amax")) == [f"{variant}_image", f"{variant}_text"]
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


def _digests(directory, names) -> dict[str, str]:
    return {name: hashlib.sha256((directory / f"{name}.onnx").read_bytes()).hexdigest() for name in names}


@pytest.fixture(scope="module")
def placeholder_export(refs, tmp_path_factory):
    model, _ = refs
    cfg = PipelineConfig()
    store = ArtifactStore(tmp_path_factory.mktemp("placeholder"))
    return execute(export, store, "e", {"variant": "fp8", "model_source": model, "model_cfg": cfg.model,
                                        "quantization": cfg.quantization, "cfg": cfg.export})


@pytest.fixture(scope="module")
def fresh_export(refs, tmp_path_factory):
    """What ModelOpt exports from the calibrated checkpoint itself: what set_scales must ship."""
    model, quantized = refs
    cfg, out = PipelineConfig(), tmp_path_factory.mktemp("fresh")
    export_graphs("fp8", ENCODERS, model.path, cfg.model, cfg.export, out, checkpoint=str(quantized.file("checkpoint")))
    return _digests(out, [f"fp8_{e}" for e in ENCODERS])


def test_set_scales_ships_the_graphs_modelopt_exports_from_the_checkpoint(refs, placeholder_export, fresh_export, tmp_path):
    model, quantized = refs
    cfg = PipelineConfig()
    placeholder = _digests(placeholder_export.local_dir(), fresh_export)
    assert placeholder != fresh_export  # the placeholder scales differ: there is something to write
    result = set_scales(placeholder_export, quantized, model, cfg.model, cfg.export, tmp_path)
    assert result.meta["method"] == "rescaled" and all(n > 0 for n in result.meta["scales_replaced"].values())
    assert _digests(tmp_path, fresh_export) == fresh_export


@pytest.mark.parametrize("defect", ["placeholder scale", "weights", "quantizers"])
def test_set_scales_exports_afresh_when_the_export_does_not_match_the_checkpoint(
        refs, placeholder_export, fresh_export, tmp_path, defect):
    """The arithmetic check, the weight check and the quantizer check each fire, and the stage still ships the
    right bytes, by exporting the checkpoint."""
    import json
    import shutil

    model, quantized = refs
    cfg = PipelineConfig()

    def damaged_copy(ref, file, change):
        copy = tmp_path / ref.stage
        shutil.copytree(ref.local_dir(), copy)
        path = copy / ref.files[file]
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
        return ref.model_copy(update={"path": str(copy), "digest": "damaged"})

    exported = placeholder_export
    fc1 = "vision_model.encoder.layers.0.mlp.fc1"
    if defect == "placeholder scale":  # the graph's scale no longer follows from the amax recorded beside it
        exported = damaged_copy(placeholder_export, "fp8_image.amax",
                                lambda a: {**a, "amax": {**a["amax"], f"{fc1}.input_quantizer": 2 * a["amax"][f"{fc1}.input_quantizer"]}})
    elif defect == "weights":  # the checkpoint's weights are not the ones the graph holds in FP8
        quantized = damaged_copy(quantized, "quantizers", lambda rows: [
            {**r, "amax": 2 * r["amax"]} if r["name"] == f"{fc1}.weight_quantizer" else r for r in rows])
    else:  # the checkpoint quantizes something the export does not
        quantized = damaged_copy(quantized, "quantizers", lambda rows: [*rows, {**rows[-1], "name": "extra.input_quantizer"}])
    out = tmp_path / "out"
    out.mkdir()
    result = set_scales(exported, quantized, model, cfg.model, cfg.export, out)
    assert result.meta["method"] == "exported", result.meta
    expected = {"placeholder scale": "is not the scale", "weights": "weight amax", "quantizers": "quantizers differ"}[defect]
    assert any(expected in why for why in result.meta["why"]), result.meta["why"]
    assert _digests(out, fresh_export) == fresh_export
