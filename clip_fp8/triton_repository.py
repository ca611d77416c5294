"""Promotion: a run's encoders as the next version of a Triton model repository.

Layout (what Triton's model repository expects), under ``promotion.repository`` (a path or fsspec URL):

    clip_image_fp8/config.pbtxt          platform, max batch, inputs/outputs, dynamic batching, GPU instances,
    clip_image_fp8/<version>/model.plan  version_policy naming the served version
        (or model.onnx), processor_config.json (image preprocessing), provenance.json
    clip_text_fp8/<version>/model.*      + the tokenizer (tokenizer.json, tokenizer_config.json)
    latest.json                          {"version", "run", "models"}: written last

A version is written whole before anything points at it: first every model's ``<version>/`` (each file
one atomic write; nothing serves a version no config names), then each ``config.pbtxt`` naming that
version (``version_policy { specific }``), then ``latest.json``. A crash leaves ``latest.json`` on the
previous complete version; the next promotion first puts every ``config.pbtxt`` back in line with it.
At most ``keep_versions`` versions are kept (never the one ``latest.json`` names).

Engines are used where one was built for this GPU type by TensorRT proper (``tensorrt_plan``); otherwise
the repaired ONNX (``onnxruntime_onnx``). TensorRT-RTX engines are not Triton plans, so they are not used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from clip_fp8.artifacts import atomic_write, is_remote
from clip_fp8.integrity import file_digest

LATEST = "latest.json"
# TensorRT-RTX builds engines for RTX GPUs that Triton's TensorRT backend cannot load.
PLAN_BACKENDS = ("tensorrt", "trtexec")
# What the encoders expect of their inputs, as the quantized checkpoint's processor saved it (transformers 5
# writes tokenizer.json and processor_config.json; 4.x wrote vocab/merges and preprocessor_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
PREPROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 6: "TYPE_INT32", 7: "TYPE_INT64", 16: "TYPE_BF16"}


class PromotionError(Exception):
    """The run cannot be promoted (and why)."""


class Repository:
    """A Triton model repository on a local path or an fsspec URL: whole-file writes, listings, removals."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        if is_remote(self.url):
            self.fs, self.base = fsspec.core.url_to_fs(self.url)
        else:
            self.fs, self.base = None, str(Path(self.url.removeprefix("file://")))

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def write(self, rel: str, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        if self.fs is None:
            atomic_write(Path(self.path(rel)), data)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def put(self, local: Path, rel: str) -> None:
        if self.fs is None:
            target = Path(self.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(local, tmp)
            tmp.replace(target)
        else:
            self.fs.put_file(str(local), self.path(rel))

    def read(self, rel: str) -> str | None:
        try:
            if self.fs is None:
                return Path(self.path(rel)).read_text()
            return self.fs.cat_file(self.path(rel)).decode()
        except FileNotFoundError:
            return None

    def versions(self, model: str) -> list[int]:
        if self.fs is None:
            folder = Path(self.path(model))
            names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        else:
            folder = self.path(model)
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)] \
                if self.fs.exists(folder) else []
        return sorted(int(n) for n in names if n.isdigit())

    def remove(self, rel: str) -> None:
        if self.fs is None:
            shutil.rmtree(self.path(rel), ignore_errors=True)
        elif self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)


def graph_io(onnx_path: Path) -> tuple[list[dict], list[dict]]:
    """Triton inputs/outputs of an ONNX graph: name, data type, dims without the batch axis."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def spec(value) -> dict:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.dim_value else -1 for d in tensor.shape.dim][1:]
        return {"name": value.name, "data_type": _ONNX_TO_TRITON[tensor.elem_type], "dims": dims}

    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]


def model_config(name: str, platform: str, version: int, max_batch: int, inputs: list[dict], outputs: list[dict],
                 preferred: list[int]) -> str:
    """``config.pbtxt`` in protobuf text format (tests parse it with Triton's own ``model_config_pb2``)."""

    def tensors(kind: str, specs: list[dict]) -> str:
        body = ",\n".join(f'  {{ name: "{s["name"]}" data_type: {s["data_type"]} dims: [ {", ".join(map(str, s["dims"]))} ] }}'
                          for s in specs)
        return f"{kind} [\n{body}\n]"

    preferred = sorted({b for b in preferred if 1 <= b <= max_batch}) or [max_batch]
    return "\n".join([
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}",
        tensors("input", inputs),
        tensors("output", outputs),
        f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, preferred))} ] max_queue_delay_microseconds: 1000 }}",
        "instance_group [ { count: 1 kind: KIND_GPU } ]",
        "",
    ])


def _plan_for(summary: dict[str, Any], graph: str) -> Path | None:
    """The engine built for ``graph`` (e.g. ``fp8_image``) by TensorRT proper in this run, if any."""
    engines = summary.get("engines") or {}
    if (engines.get("target") or {}).get("backend") not in PLAN_BACKENDS:
        return None
    entry = (engines.get("engines") or {}).get(graph)
    key = f"engine_{graph}"
    if not entry or key not in summary.get("artifacts", {}):
        return None
    return Path(summary["artifacts"][key])


def reconcile(repo: Repository) -> int | None:
    """Put every model's config back on the version ``latest.json`` names (after a crash between the
    config writes of two models); return that version."""
    latest = repo.read(LATEST)
    if latest is None:
        return None
    state = json.loads(latest)
    for model, config in state.get("configs", {}).items():
        if repo.read(f"{model}/config.pbtxt") != config:
            repo.write(f"{model}/config.pbtxt", config)
    return state["version"]


def promote(summary: dict[str, Any], provenance: dict[str, Any], repository: str, keep_versions: int = 3,
            include_fp16: bool = False, batch_sizes: list[int] | None = None, max_batch: int = 128) -> dict[str, Any]:
    """Publish the run's encoders as the next version; return what was written. A run whose speed gate chose
    FP16 (``promote_form``, ``promotion.on_slower=promote_fp16``) publishes the FP16 pair alone."""
    repo = Repository(repository)
    reconcile(repo)
    artifacts = summary.get("artifacts", {})
    fp8 = summary.get("promote_form", "fp8") == "fp8"
    variants = [*(["fp8"] if fp8 else []), *(["fp16"] if include_fp16 or not fp8 else [])]
    graphs = [f"{v}_{e}" for v in variants for e in ("image", "text")]
    missing = [g for g in graphs if f"onnx_{g}" not in artifacts]
    if missing:
        raise PromotionError(f"run {summary.get('run')} has no repaired ONNX for {', '.join(missing)}")
    checkpoint = Path(artifacts["checkpoint"]) if "checkpoint" in artifacts else None
    models = {f"clip_{g.split('_')[1]}_{g.split('_')[0]}": g for g in graphs}  # clip_image_fp8 <- fp8_image
    version = max((v for m in models for v in repo.versions(m)), default=0) + 1
    written: dict[str, Any] = {}
    configs: dict[str, str] = {}
    for model, graph in models.items():
        onnx_path = Path(artifacts[f"onnx_{graph}"])
        inputs, outputs = graph_io(onnx_path)
        plan = _plan_for(summary, graph)
        platform, file, source = ("tensorrt_plan", "model.plan", plan) if plan else ("onnxruntime_onnx", "model.onnx", onnx_path)
        repo.put(source, f"{model}/{version}/{file}")
        sent = {file: Path(source)}
        extras = TOKENIZER_FILES if graph.endswith("text") else PREPROCESSOR_FILES
        for name in extras:  # what the encoder expects of its inputs, from the quantized checkpoint's processor
            if checkpoint is not None and (checkpoint / name).is_file():
                repo.put(checkpoint / name, f"{model}/{version}/{name}")
                sent[name] = checkpoint / name
        files = {name: {"sha256": file_digest(path), "bytes": path.stat().st_size} for name, path in sent.items()}
        repo.write(f"{model}/{version}/provenance.json",  # the digests: what clip-fp8 verify --repository checks
                   json.dumps({**provenance, "graph": graph, "file": file, "files": files}, indent=1))
        configs[model] = model_config(model, platform, version, max_batch, inputs, outputs, batch_sizes or [max_batch])
        written[model] = {"platform": platform, "file": f"{model}/{version}/{file}"}
    for model, config in configs.items():
        repo.write(f"{model}/config.pbtxt", config)
    repo.write(LATEST, json.dumps({"version": version, "run": summary.get("run"), "models": written,
                                   "configs": configs}, indent=1))
    for model in models:  # keep the newest keep_versions (the one just promoted among them)
        for old in repo.versions(model)[:-keep_versions]:
            repo.remove(f"{model}/{old}")
    return {"version": version, "repository": repo.url, "models": written}
