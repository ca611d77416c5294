"""Store atomicity, content-keyed caching, configuration, and the COCO calibration source."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from clip_fp8.artifacts import ArtifactStore
from clip_fp8.caching import canonical, stage_key
from clip_fp8.config import CalibrationConfig, ModelConfig, PipelineConfig
from clip_fp8.errors import PipelineInputError
from clip_fp8.tasks.calibration_data import select_pairs
from clip_fp8.tasks.calibration_sources import iter_calibration_batches, resolve_data_source
from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, load_processor, resolve_model_source
from data_fixtures import write_coco_folder


def test_failed_stage_publishes_nothing_and_keeps_the_previous_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.staging("quantize", "k1") as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with store.staging("quantize", "k1") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (store.final_dir("quantize", "k1") / "a.txt").read_text() == "first"
    assert [p.name for p in (tmp_path / "store" / "quantize").iterdir()] == ["k1"]  # no temp dir left behind


def test_cache_key_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(EMBEDDED_MODELS["tiny-clip-shapes"], a)
    shutil.copytree(EMBEDDED_MODELS["tiny-clip-shapes"], b)
    ref_a = resolve_model_source(ModelConfig(source=str(a)))
    ref_b = resolve_model_source(ModelConfig(source=str(b)))
    from clip_fp8.tasks.baseline_model import baseline_model

    key = lambda ref, cfg: stage_key(baseline_model, {"model_source": ref, "cfg": cfg})
    assert ref_a.path != ref_b.path and ref_a.digest == ref_b.digest
    assert key(ref_a, ModelConfig(source=str(a))) == key(ref_b, ModelConfig(source=str(b)))

    config = json.loads((b / "config.json").read_text())
    config["logit_scale_init_value"] = 3.0
    (b / "config.json").write_text(json.dumps(config))
    assert resolve_model_source(ModelConfig(source=str(b))).digest != ref_a.digest
    # Settings that change the result do change the key.
    assert key(ref_a, ModelConfig(source=str(a))) != key(ref_a, ModelConfig(source=str(a), dtype="float16"))


def test_paths_cannot_sneak_into_a_cache_key():
    with pytest.raises(TypeError):
        canonical({"where": Path("/tmp")})
    # Locator fields of nested models stay out too: an evaluation dataset's root arrives as a content digest.
    from clip_fp8.config import EvalDataset, EvaluationConfig

    here = EvaluationConfig(datasets=[EvalDataset(name="imagenet1k", root="/data/a")])
    assert canonical(here) == canonical(EvaluationConfig(datasets=[EvalDataset(name="imagenet1k", root="/mnt/b")]))
    assert canonical(here) != canonical(EvaluationConfig(datasets=[EvalDataset(name="imagenet1k", root="/data/a", split="val")]))
    assert "/data/a" not in json.dumps(canonical(PipelineConfig(evaluation=here)))


def test_every_config_field_has_a_default_and_description():
    schema = PipelineConfig.model_json_schema()

    def walk(model_schema):
        for name, prop in model_schema["properties"].items():
            if "$ref" in prop or "allOf" in prop:
                continue
            assert prop.get("description"), name
            # A build target is an item the form adds; its GPU type and pool have no sensible default.
            assert "default" in prop or (model_schema["title"] == "BuildTarget" and name in model_schema["required"]), name

    for section in schema["$defs"].values():
        walk(section)
    assert PipelineConfig() == PipelineConfig.model_validate({})


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("calibration:\n  num_samples: 64\nquantization:\n  exclude: ['*patch_embedding*', '*fc2*']\n")
    config = PipelineConfig.from_file(path).with_overrides(["evaluation.max_drop={'*': 0.05}"])
    assert config.calibration.num_samples == 64
    assert config.quantization.exclude[-1] == "*fc2*"
    assert config.evaluation.max_drop == {"*": 0.05}
    with pytest.raises(ValueError, match="unknown section 'calib'"):
        config.with_overrides(["calib.num_samples=3"])


def test_coco_folder_selection_is_seeded_and_preprocessed_by_the_models_processor(tmp_path):
    coco = write_coco_folder(tmp_path / "coco", n_images=20)
    cfg = CalibrationConfig(source=f"coco:{coco}", num_samples=8, seed=3)
    source = resolve_data_source(cfg)
    first, again = select_pairs(source, cfg), select_pairs(source, cfg)
    assert first == again and len(first["pairs"]) == 8
    assert select_pairs(source, cfg.model_copy(update={"seed": 4}))["pairs"] != first["pairs"]
    assert all(p["image"].startswith("train2017/") and len(p["sha256"]) == 64 for p in first["pairs"])

    processor = load_processor(EMBEDDED_MODELS["tiny-clip-shapes"])
    batches = list(iter_calibration_batches(first, source.path, processor, batch_size=5))
    assert [b["pixel_values"].shape[0] for b in batches] == [5, 3]
    assert batches[0]["pixel_values"].shape[1:] == (3, 64, 64)
    assert batches[0]["input_ids"].shape[1] == 77


def test_missing_captions_file_is_named(tmp_path):
    coco = write_coco_folder(tmp_path / "coco", n_images=3)
    with pytest.raises(PipelineInputError, match="captions_file 'nope.json'"):
        resolve_data_source(CalibrationConfig(source=f"coco:{coco}", captions_file="nope.json"))


def test_retries_are_for_transient_failures_only():
    from prefect.states import Failed

    from clip_fp8.errors import AuditError, GraphCheckError, QualityGateError
    from clip_fp8.flows.stage_task import retry_transient_only, stage_task
    from clip_fp8.tasks.calibration_data import calibration_data
    from clip_fp8.tasks.evaluate import evaluate

    for deterministic in (PipelineInputError("bad path"), AuditError("gap"), QualityGateError("drop"), GraphCheckError("cos")):
        assert retry_transient_only(None, None, Failed(data=deterministic)) is False
    for transient in (OSError("connection reset"), RuntimeError("CUDA error: unspecified launch failure")):
        assert retry_transient_only(None, None, Failed(data=transient)) is True
    assert stage_task(calibration_data).retries == 2 and stage_task(calibration_data).retry_jitter_factor == 0.5
    assert stage_task(evaluate).retries == 1


FLAKY_STAGE = """
from pathlib import Path

from clip_fp8.errors import PipelineInputError
from clip_fp8.stage import StageOutput, stage


@stage(retries=2)
def flaky(marker: str, error: str, out_dir: Path) -> StageOutput:
    attempts = int(Path(marker).read_text()) + 1 if Path(marker).exists() else 1
    Path(marker).write_text(str(attempts))
    if attempts == 1:
        raise {"transient": OSError, "bad input": PipelineInputError}[error](f"{error} on attempt 1")
    return StageOutput(meta={"attempts": attempts})
"""


@pytest.mark.parametrize("error, attempts", [("transient", 2), ("bad input", 1)])
def test_prefect_retries_a_transient_failure_and_never_a_deterministic_one(tmp_path, monkeypatch, error, attempts):
    """A real stage module through the generic Prefect wrapper: an OSError is retried and the run completes;
    bad input fails on the first attempt, however many retries the stage allows."""
    import importlib

    from prefect import flow

    from clip_fp8.flows.stage_task import stage_results, stage_task

    (tmp_path / "flaky.py").write_text(FLAKY_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    flaky = stage_task(importlib.import_module("flaky").flaky).with_options(retry_delay_seconds=0)
    store, marker = ArtifactStore(tmp_path / "out"), tmp_path / "attempts"

    @flow
    def run():
        with stage_results(store):
            return flaky(str(marker), error, store=store)

    if attempts == 1:
        with pytest.raises(PipelineInputError, match="bad input on attempt 1"):
            run()
    else:
        assert run().meta["attempts"] == 2
    assert int(marker.read_text()) == attempts


def test_model_revision_keys_the_cache_and_an_offline_hub_id_says_what_to_do(tmp_path):
    import shutil

    from clip_fp8.caching import canonical
    from clip_fp8.config import ModelConfig
    from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, resolve_model_source

    pinned = ModelConfig(source="laion/CLIP-ViT-L-14-laion2B-s32B-b82K", revision="1a2b3c")
    assert canonical(pinned) != canonical(pinned.model_copy(update={"revision": "4d5e6f"}))
    assert canonical(pinned) == canonical(pinned.model_copy(update={"source": "/elsewhere/same-model"}))
    with pytest.raises(PipelineInputError, match="huggingface-cli download laion/CLIP-ViT-L-14-laion2B-s32B-b82K"):
        resolve_model_source(pinned)
    # An unpinned Hub download lands in .../snapshots/<commit>: the commit it resolved is recorded.
    snapshot = tmp_path / "models--laion--clip" / "snapshots" / "0123456789abcdef"
    shutil.copytree(EMBEDDED_MODELS["tiny-clip-shapes"], snapshot)
    ref = resolve_model_source(ModelConfig(source=str(snapshot)))
    assert ref.meta["resolved_revision"] == "0123456789abcdef"
    assert ref.digest == resolve_model_source(ModelConfig()).digest  # same files, other path: same content key


def test_a_baseline_loaded_while_a_quantized_checkpoint_restores_stays_a_baseline(tmp_path, monkeypatch):
    """ModelOpt's from_pretrained swaps CLIPModel.__init__ for one that restores its checkpoint's quantizers, for
    the length of the call. A baseline load that builds its model inside that window (here: its config read is
    slowed down, and the quantized restore too, so the window surely overlaps) came out fake-quantized with the
    other checkpoint's quantizers; every CLIPModel construction holds one lock (``clip_model_construction``)."""
    import threading
    import time

    import modelopt.torch.opt as mto
    import modelopt.torch.opt.plugins.huggingface as hf_checkpointing
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer
    from transformers import CLIPConfig

    from clip_fp8.tasks.checkpoints import load_clip, load_quantized, register_quantized_attention
    from clip_fp8.tasks.export import dummy_inputs
    from clip_fp8.tasks.quantize import fp8_quant_config

    model_cfg, baseline_path = ModelConfig(), EMBEDDED_MODELS["tiny-clip-shapes"]
    model = load_clip(baseline_path, model_cfg)
    register_quantized_attention(model)
    calib = dummy_inputs(model, 4)
    mtq.quantize(model, fp8_quant_config(PipelineConfig().quantization),
                 lambda m: m(input_ids=calib["text"], pixel_values=calib["image"]))
    mto.enable_huggingface_checkpointing()
    model.save_pretrained(tmp_path / "quantized")

    read_config, restore = CLIPConfig.from_pretrained.__func__, hf_checkpointing.restore_from_modelopt_state

    def slow_baseline_config(cls, path, *args, **kwargs):
        if Path(str(path)) == Path(baseline_path):
            time.sleep(1.0)  # the baseline load is between its own patch and its construction
        return read_config(cls, path, *args, **kwargs)

    def slow_restore(*args, **kwargs):
        time.sleep(2.0)  # the quantized load's patch stays in place
        return restore(*args, **kwargs)

    monkeypatch.setattr(CLIPConfig, "from_pretrained", classmethod(slow_baseline_config))
    monkeypatch.setattr(hf_checkpointing, "restore_from_modelopt_state", slow_restore)
    loaded = {}
    threads = [threading.Thread(target=lambda: loaded.update(baseline=load_clip(baseline_path, model_cfg))),
               threading.Thread(target=lambda: loaded.update(fp8=load_quantized(tmp_path / "quantized", model_cfg)))]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    for thread in threads:
        thread.join()
    assert any(isinstance(m, TensorQuantizer) for m in loaded["fp8"].modules())
    assert not any(isinstance(m, TensorQuantizer) for m in loaded["baseline"].modules())


def test_flow_threads_are_bounded_on_a_gpu_host_only():
    """On a GPU host the flow's stages share the CPU with export workers: a quarter of the cores each
    (at least 2); a CPU run does its math in this process and keeps every thread."""
    import torch

    from clip_fp8.flows.pipeline import bound_flow_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)  # more than a quarter of this machine's cores, so the bound shows
        assert bound_flow_threads("cpu") is None and torch.get_num_threads() == 8
        expected = min(8, max(2, (os.cpu_count() or 1) // 4))
        assert bound_flow_threads("cuda") == expected == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_after_an_interrupt_removes_the_scratch_directories_no_new_one_is_made(tmp_path):
    """The interrupted CLI removes its scratch directories, then stops its server and exits while the stage
    threads run on: a directory one of them made meanwhile (the next graph's export) was left behind."""
    import subprocess
    import sys

    code = """
from clip_fp8.artifacts import remove_scratch, scratch_directory
with scratch_directory(prefix="clip-fp8-first-"):
    assert len(remove_scratch()) == 1
    try:
        with scratch_directory(prefix="clip-fp8-next-"):
            raise SystemExit("made a scratch directory after the interrupt")
    except RuntimeError as exc:
        print(exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0 and "interrupted" in done.stdout, done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []


def test_picking_the_device_imports_torch_only_where_a_gpu_driver_could_answer(tmp_path):
    """A cached run on a CPU host does not pay for importing torch to learn there is no GPU; where a driver's
    device node exists, torch is asked."""
    import subprocess
    import sys

    code = ("import sys; from clip_fp8 import devices; from clip_fp8.config import ModelConfig; "
            "from clip_fp8.devices import pick_device; from clip_fp8.tasks.runtimes import unavailable; "
            "devices.GPU_DEVICE_NODES = (sys.argv[1],); "
            "print(pick_device(ModelConfig()), bool(unavailable('torch-fp8', 'cpu')), 'torch' in sys.modules)")
    node = tmp_path / "nvidiactl"
    node.touch()
    answers = {}
    for case, path in (("no driver", tmp_path / "absent"), ("driver", node)):
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120, check=True)
        answers[case] = out.stdout.split()
    assert answers["no driver"] == ["cpu", "True", "False"]
    assert answers["driver"][2] == "True"


def test_no_stage_parses_source_once_the_flow_has_entered_stage_results(tmp_path, monkeypatch):
    """Python 3.11.7's AST builder is not safe beside another thread's parse (CPython gh-106905): CI lost a
    stage's cache key to "AST constructor recursion depth mismatch" while the ONNX exporter ran beside it.
    The flow parses everything before it submits a stage, so no key and no preload parses afterwards."""
    from prefect import flow

    import clip_fp8.flows.pipeline  # noqa: F401 - registers every stage, as a flow run's import does
    from clip_fp8 import caching, imports
    from clip_fp8.flows.stage_task import stage_results
    from clip_fp8.stage import pipeline_stages

    for cached in (caching.stage_code_digest, imports._imported_names_of_file, imports._statements):
        cached.cache_clear()

    def refuse(source):
        raise AssertionError("parsed source after stage_results was entered")

    @flow
    def run():
        with stage_results(ArtifactStore(tmp_path / "out")):
            monkeypatch.setattr(imports, "_parse", refuse)
            return {fn.__name__: (caching.stage_key(fn, {}), imports._statements(fn.__module__))
                    for fn in pipeline_stages()}

    assert len(run()) == len(pipeline_stages()) > 10


def test_a_parse_that_meets_the_interpreter_wide_counter_race_is_retried(monkeypatch):
    """The race's SystemError is retried (the builder resets its counter per parse); any other is raised."""
    from clip_fp8 import imports

    real, calls = imports.ast.parse, []

    def racy(source, *args, **kwargs):  # pytest parses too, while the patch is on: only "import os" races
        if source == "import os" and len(calls.append(source) or calls) < 3:
            raise SystemError("AST constructor recursion depth mismatch (before=63, after=95)")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(imports.ast, "parse", racy)
    assert isinstance(imports._parse("import os"), imports.ast.Module) and len(calls) == 3

    def broken(source, *args, **kwargs):
        if source == "import os":
            raise SystemError("something else")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(imports.ast, "parse", broken)
    with pytest.raises(SystemError, match="something else"):
        imports._parse("import os")


def test_quantize_feeds_every_manifest_pair_in_batches_of_the_configured_size(tmp_path):
    """What quantize's forward loop fed the model, counted forward by forward: every pair of the manifest, in
    batches of calibration.batch_size, the last one partial (200 pairs in 64s: 64, 64, 64, 8)."""
    import json

    from clip_fp8.config import PipelineConfig
    from clip_fp8.stage import execute
    from clip_fp8.tasks.calibration_data import calibration_data
    from clip_fp8.tasks.calibration_sources import resolve_data_source
    from clip_fp8.tasks.checkpoints import resolve_model_source
    from clip_fp8.tasks.quantize import quantize

    config = PipelineConfig().with_overrides(["calibration.num_samples=200", "calibration.batch_size=64"])
    store = ArtifactStore(str(tmp_path / "store"))
    model_source, data_source = resolve_model_source(config.model), resolve_data_source(config.calibration)
    calibration = execute(calibration_data, store, "c", {"data_source": data_source, "cfg": config.calibration})
    pairs = len(json.loads(calibration.file("manifest").read_text())["pairs"])
    quantized = execute(quantize, store, "q", {"model_source": model_source, "calibration": calibration,
                                               "data_source": data_source, "model_cfg": config.model,
                                               "calib_cfg": config.calibration, "cfg": config.quantization})
    assert pairs == 200
    assert quantized.meta["calibration_forward_rows"] == [64, 64, 64, 8]
    assert quantized.meta["calibration_samples"] == pairs


def test_every_setting_with_an_off_choice_takes_a_bare_off():
    """YAML reads a bare `off` as false: every Literal setting offering 'off' (found in the schema, not listed)
    takes `--set section.field=off` as 'off'."""
    import typing

    from clip_fp8.config import PipelineConfig

    found = []
    for section, info in PipelineConfig.model_fields.items():
        for name, field in info.annotation.model_fields.items():
            if typing.get_origin(field.annotation) is typing.Literal and "off" in typing.get_args(field.annotation):
                found.append(f"{section}.{name}")
    assert {"quantization.recovery", "promotion.smoke_check"} <= set(found), found
    for dotted in found:
        section, name = dotted.split(".")
        assert getattr(getattr(PipelineConfig().with_overrides([f"{dotted}=off"]), section), name) == "off", dotted


def test_a_speedup_is_a_win_or_a_loss_only_when_every_paired_round_says_so():
    """The verdicts the serving table and the speed gate act on, from recorded rounds (only GPUs produce real ones)."""
    from clip_fp8.timing import compare

    def forms(**rounds):
        return {name: {"rounds_ms": list(ms)} for name, ms in rounds.items()}

    # FP8 faster in every round, though one FP8 round is slower than another round's FP16: paired by round.
    drift = forms(fp16=[1.00, 1.30, 1.02], fp8=[0.90, 1.05, 0.95])
    assert compare(drift, "fp16", "fp8") == pytest.approx(
        {"median": 1.00 / 0.90, "min": 1.02 / 0.95, "max": 1.30 / 1.05, "verdict": "win"})
    assert compare(drift, "fp8", "fp16")["verdict"] == "loss"  # the same rounds, the other way round
    # FP16's slow second round does not buy FP8 its slow third one: rounds are compared with their own round.
    assert compare(forms(fp16=[1.00, 1.30, 1.02], fp8=[0.98, 0.99, 1.05]), "fp16", "fp8")["verdict"] == "tie"
    # One round against: a tie, however good the median.
    assert compare(forms(fp16=[1.0, 1.0, 1.0], fp8=[0.5, 0.5, 1.01]), "fp16", "fp8")["verdict"] == "tie"
    assert compare(forms(fp16=[1.0, 1.0], fp8=[1.0, 0.9]), "fp16", "fp8")["verdict"] == "tie"  # equal is not faster

