"""The codebase's own contract: one namespace, layers that import only downwards, one stage contract,
and cache keys whose code part follows the import graph."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types
import typing
import zipfile
from pathlib import Path

import pytest
from pydantic import BaseModel

from clip_fp8.caching import code_identity
from clip_fp8.imports import import_closure, imported_names, module_source
from clip_fp8.stage import StageOutput, stage_name, stage_parameters

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("core", "clip_fp8.tasks", "clip_fp8.flows", "clip_fp8.deployments", "clip_fp8.cli")


def project_modules() -> list[str]:
    """Every module of the installed package, from the package-dir mapping the build uses."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"clip_fp8": REPO / "clip_fp8", **{pkg: REPO / d for pkg, d in setuptools["package-dir"].items()}}
    modules = []
    for package, folder in folders.items():
        for path in sorted(folder.glob("*.py")):
            modules.append(package if path.stem == "__init__" else f"{package}.{path.stem}")
    return modules


def layer(module: str) -> int:
    return max([i for i, prefix in enumerate(LAYERS) if prefix != "core" and (module == prefix or module.startswith(prefix + "."))],
               default=0)


def stage_functions():
    """The flow's stages (the pipeline's and the build matrix's engines runs) -> the plain functions, by name."""
    from clip_fp8.flows import pipeline  # noqa: F401 - imports every stage the flow runs
    from clip_fp8.stage import pipeline_stages

    return {stage_name(fn): fn for fn in pipeline_stages()}


def declared_in_tasks() -> set[str]:
    """Every module of tasks/ that defines a function named after itself taking ``out_dir``: a stage by contract."""
    stages = set()
    for path in sorted((REPO / "tasks").glob("*.py")):
        source = path.read_text()
        if f"\ndef {path.stem}(" in source and "out_dir" in source.split(f"\ndef {path.stem}(", 1)[1].split(")")[0]:
            stages.add(path.stem)
    return stages


def test_modules_import_only_their_own_layer_or_below():
    upward = []
    for module in project_modules():
        project, _ = imported_names(module, module_source(module))
        upward += [f"{module} -> {target}" for target in project if layer(target) > layer(module)]
    assert not upward, upward


def test_every_stage_is_declared_once_plain_and_named_after_its_module():
    stages = stage_functions()
    # What the flow imports is what tasks/ holds: no stage module left out of the flow, none declared elsewhere.
    assert set(stages) == declared_in_tasks() and len(stages) >= 16, sorted(stages)
    for name, fn in stages.items():
        assert fn.__module__ == f"clip_fp8.tasks.{name}"
        assert inspect.signature(fn).return_annotation in (StageOutput, "StageOutput")
        assert "store" not in {p.name for p in stage_parameters(fn)}
        # Every config section it takes says which fields it reads (those, and only those, key it).
        for param, hint in typing.get_type_hints(fn, include_extras=True).items():
            options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            for option in options:
                if isinstance(option, type) and issubclass(option, BaseModel) and option.__module__ == "clip_fp8.config":
                    if option.__name__ != "BuildTarget":
                        raise AssertionError(f"{name}.{param}: a whole {option.__name__}; declare Reads[...]")
        # No Prefect below the flow layer: the stage, and everything it imports, runs without it.
        _, external = import_closure(fn.__module__)
        assert "prefect" not in external, fn.__module__


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("clip_fp8-*.whl")
    names = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {n for n in names if not n.endswith(".dist-info")} == {"clip_fp8"}, names
    members = zipfile.ZipFile(wheel).namelist()
    assert "clip_fp8/tasks/quantize.py" in members and "clip_fp8/flows/pipeline.py" in members
    assert "clip_fp8/assets/tiny-clip-shapes/model.safetensors" in members


def _changed_stages(helper: str) -> set[str]:
    """The stages whose code identity changes when ``helper``'s source changes (a comment added)."""
    edited = {helper: module_source(helper) + "\n# edited\n"}
    changed = set()
    for fn in stage_functions().values():
        if code_identity(fn.__module__) != code_identity(fn.__module__, sources=edited):
            changed.add(stage_name(fn))
    return changed


def test_editing_a_helper_rekeys_exactly_the_stages_that_import_it():
    # onnx_passes: surgery repairs with it, export renames the output tensor with it (the drift that hid), and
    # set_scales through export (and the Q/DQ op names).
    assert _changed_stages("clip_fp8.tasks.onnx_passes") == {"export", "set_scales", "surgery"}
    # tensorrt: build and benchmark directly, surgery through the pre-flight's logger, evaluate_deployed through
    # the runtimes (engines as a runtime).
    assert _changed_stages("clip_fp8.tasks.tensorrt") == {"build", "benchmark", "surgery", "evaluate_deployed"}
    # The torch-fp8 runtime: the stage that writes it, the one that evaluates it, the one that times it.
    assert _changed_stages("clip_fp8.fp8_runtime") == {"torch_fp8", "evaluate_deployed", "benchmark"}
    # The calibration readers: the stage that selects, quantize and sensitivity that read batches, surgery's FP8 check;
    # export and set_scales through the quantize module, whose placeholder quantization the FP8 export uses (a
    # module is the unit of a key: more stages re-keyed than strictly need it, never fewer).
    assert _changed_stages("clip_fp8.tasks.calibration_sources") == {"calibration_data", "quantize", "sensitivity",
                                                                     "surgery", "export", "set_scales"}
    # The core module every stage builds on; and the errors module, which build has no use for.
    every = {stage_name(fn) for fn in stage_functions().values()}
    assert _changed_stages("clip_fp8.stage") == every
    assert _changed_stages("clip_fp8.errors") == every - {"build"}
    # A module no stage imports re-keys nothing.
    assert _changed_stages("clip_fp8.locking") == set()


@pytest.mark.slow
def test_the_import_graph_covers_what_importing_a_stage_loads():
    """An independent check of the static graph: every project module that importing a stage's module
    actually loads (in a fresh interpreter) is in that stage's closure."""
    for fn in stage_functions().values():
        code = (f"import sys, json; import {fn.__module__}; "
                "print(json.dumps(sorted(m for m in sys.modules if m.startswith('clip_fp8'))))")
        loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True, timeout=120).stdout))
        closure, _ = import_closure(fn.__module__)
        packages = {m for m in loaded if m in ("clip_fp8", "clip_fp8.tasks")}  # parents Python imports on the way
        assert loaded - packages <= set(closure), (fn.__module__, loaded - set(closure))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch", "onnx", "modelopt", "transformers"])
def test_loading_the_flow_imports_no_heavy_library(name):
    """Cached runs stay fast: the stages import their libraries when they run, not when the flow loads."""
    code = f"import sys, clip_fp8.flows.pipeline; print({name!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def _identities_with(site: Path | None) -> dict[str, str]:
    """Each stage's code identity computed in a fresh interpreter, with ``site`` first on its path."""
    code = ("import json; from clip_fp8.caching import code_identity; from clip_fp8.stage import stage_name; "
            "from clip_fp8.flows import pipeline; from clip_fp8.stage import pipeline_stages; "
            "print(json.dumps({stage_name(fn): json.dumps(code_identity(fn.__module__), sort_keys=True) for fn in pipeline_stages()}))")
    env = {**__import__("os").environ, **({"PYTHONPATH": str(site)} if site else {})}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("distribution, stages", [
    ("clip-benchmark", {"evaluate_baseline", "evaluate", "evaluate_deployed"}),
    ("onnxruntime", {"surgery", "evaluate_deployed"}),
    ("nvidia-modelopt", {"baseline_model", "quantize", "evaluate_baseline", "evaluate", "export", "set_scales", "surgery",
                         "benchmark", "sensitivity", "torch_fp8", "evaluate_deployed"}),
])
def test_a_library_upgrade_rekeys_exactly_the_stages_that_import_it(tmp_path, distribution, stages):
    """What an upgrade changes for the key is the installed distribution's metadata: a copy of it with another
    version, first on the path, is what `pip install` of that version would leave."""
    import importlib.metadata

    dist = importlib.metadata.distribution(distribution)
    info = tmp_path / f"{dist.metadata['Name'].replace('-', '_')}-999.0.dist-info"
    info.mkdir()
    metadata = dist.read_text("METADATA")
    (info / "METADATA").write_text(metadata.replace(f"Version: {dist.version}", "Version: 999.0", 1))
    for name in ("top_level.txt", "RECORD"):
        if (text := dist.read_text(name)) is not None:
            (info / name).write_text(text)
    before, after = _identities_with(None), _identities_with(tmp_path)
    assert {s for s in before if before[s] != after[s]} == stages


@pytest.mark.slow
def test_a_second_checkout_on_the_path_is_refused_naming_both_trees(tmp_path):
    """The editable install maps clip_fp8.tasks to this checkout's tasks/: a clone first on PYTHONPATH brings its own
    clip_fp8 but not that, so its edits would not run. Importing fails at once instead, naming both folders."""
    import shutil

    clone = tmp_path / "clone"
    for folder in ("clip_fp8", "tasks", "flows"):
        shutil.copytree(REPO / folder, clone / folder)
    for package in ("clip_fp8.tasks", "clip_fp8.flows"):
        run = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(clone)})
        assert run.returncode == 1, run.stderr
        (line,) = [x for x in run.stderr.splitlines() if x.startswith("ImportError")]
        assert f"{REPO / package.split('.')[1]}" in line and f"{clone / 'clip_fp8'}" in line, line
