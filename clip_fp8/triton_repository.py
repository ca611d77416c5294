"""Promotion: a run's encoders as the next version of a Triton model repository that a real server loads.

Layout (what Triton's model repository expects), under ``promotion.repository`` (a path or fsspec URL):

    clip_image_fp8/config.pbtxt            Python backend (clip_fp8.triton_model): torch-fp8 on an FP8 GPU, the
    clip_image_fp8/configs/*.pbtxt           repaired ONNX through ONNX Runtime elsewhere; onnxruntime.pbtxt and
    clip_image_fp8/<version>/model.py        tensorrt.pbtxt for servers with those backends (--model-config-name)
        model.onnx, torch_fp8/ (FP8 runs), model.plan (where TensorRT built one), processor_config.json,
        provenance.json (the run, its metrics and every file's digest)
    clip_text_fp8/...                      the same, with the tokenizer
    clip_raw/config.pbtxt, <version>/      strings and JPEG/PNG bytes in, both embeddings out (BLS to the above)
    latest.json                            {"version", "run", "models", "configs", "smoke_check"}: written last

A version is written whole before anything points at it (``write_version``: every model's ``<version>/``, each
file one atomic write; nothing serves a version no config names). ``activate`` then starts a real
``tritonserver`` on a view of that version alone and checks that every model loads and answers with the run's
own embeddings (``smoke_check``); only then does each config name the version, and ``latest.json`` last. A
crash, or a refused version, leaves ``latest.json`` and the configs on the previous complete version (the next
promotion first puts every config back in line with it). At most ``keep_versions`` versions are kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clip_fp8.artifacts import atomic_write, is_remote
from clip_fp8.integrity import file_digest

LATEST = "latest.json"
RAW_MODEL = "clip_raw"  # strings and encoded images in (clip_fp8.triton_raw_model)
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


def _pbtxt_tensors(kind: str, specs: list[dict]) -> str:
    body = ",\n".join(f'  {{ name: "{s["name"]}" data_type: {s["data_type"]} dims: [ {", ".join(map(str, s["dims"]))} ]'
                      f'{" optional: true" if s.get("optional") else ""} }}' for s in specs)
    return f"{kind} [\n{body}\n]"


def _pbtxt_parameters(params: dict[str, str]) -> list[str]:
    return [f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()]


def _warmup(inputs: list[dict], sizes: list[int]) -> str:
    """One warm-up request per preferred size: the torch-fp8 runtime compiles and captures each before the model
    reports ready. Token ids are zeros (a valid id; random ones could exceed the vocabulary)."""
    def sample(size: int) -> str:
        data = {spec["name"]: "zero_data: true" if spec["data_type"].startswith("TYPE_INT") else "random_data: true"
                for spec in inputs}
        body = " ".join(f'inputs {{ key: "{s["name"]}" value: {{ data_type: {s["data_type"]} dims: [ '
                        f'{", ".join(map(str, s["dims"]))} ] {data[s["name"]]} }} }}' for s in inputs)
        return f'{{ name: "batch_{size}" batch_size: {size} {body} }}'

    return "model_warmup [\n  " + ",\n  ".join(sample(b) for b in sizes) + "\n]"


def model_config(name: str, platform: str, version: int, max_batch: int, inputs: list[dict], outputs: list[dict],
                 preferred: list[int], parameters: dict[str, str] | None = None) -> str:
    """``config.pbtxt`` in protobuf text format (tests parse it with Triton's own ``model_config_pb2``).
    ``platform`` ``python`` is the Python backend (``backend: "python"``, what the bundled server has)."""
    preferred = sorted({b for b in preferred if 1 <= b <= max_batch}) or [max_batch]
    engine = 'backend: "python"' if platform == "python" else f'platform: "{platform}"'
    return "\n".join([
        f'name: "{name}"',
        engine,
        f"max_batch_size: {max_batch}",
        f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}",
        _pbtxt_tensors("input", inputs),
        _pbtxt_tensors("output", outputs),
        f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, preferred))} ] max_queue_delay_microseconds: 1000 }}",
        # KIND_AUTO: an instance per GPU where there are GPUs, else one on the CPU (the same repository serves both).
        "instance_group [ { count: 1 kind: KIND_AUTO } ]",
        *_pbtxt_parameters(parameters or {}),
        _warmup(inputs, preferred),
        "",
    ])


def raw_model_config(name: str, version: int, dim: int, parameters: dict[str, str]) -> str:
    """The strings-and-images model: no batch axis of its own (it forwards to the batched tensor models)."""
    return "\n".join([
        f'name: "{name}"',
        'backend: "python"',
        "max_batch_size: 0",
        f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}",
        _pbtxt_tensors("input", [{"name": "text", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
                                 {"name": "image", "data_type": "TYPE_STRING", "dims": [-1], "optional": True}]),
        _pbtxt_tensors("output", [{"name": "text_embeds", "data_type": "TYPE_FP32", "dims": [-1, dim]},
                                  {"name": "image_embeds", "data_type": "TYPE_FP32", "dims": [-1, dim]}]),
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
        *_pbtxt_parameters(parameters),
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


def _config_files(state: dict[str, Any]) -> dict[str, str]:
    """latest.json's configs by repository path (older repositories keyed them by model: its config.pbtxt)."""
    return {(k if "/" in k else f"{k}/config.pbtxt"): v for k, v in state.get("configs", {}).items()}


def reconcile(repo: Repository) -> int | None:
    """Put every model's configs back on the version ``latest.json`` names (after a crash between the config
    writes, or a smoke check that refused a version); return that version."""
    latest = repo.read(LATEST)
    if latest is None:
        return None
    state = json.loads(latest)
    for rel, config in _config_files(state).items():
        if repo.read(rel) != config:
            repo.write(rel, config)
    return state["version"]


@dataclass
class Staged:
    """A version written whole into the repository, not yet served: what ``activate`` points the configs at."""

    version: int
    configs: dict[str, str]  # repository path of a config file -> its text
    models: dict[str, dict[str, Any]]  # model -> platform, file, graph (tensor models) or role (raw)
    inputs: dict[str, list[dict]] = field(default_factory=dict)  # tensor model -> its inputs (the smoke check feeds them)


def _put_tree(repo: Repository, local: Path, rel: str, sent: dict[str, Path], prefix: str = "") -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        name = prefix + path.relative_to(local).as_posix()
        repo.put(path, f"{rel}/{name}")
        sent[name] = path


def _write_model(repo: Repository, model: str, version: int, files: dict[str, Path], provenance: dict[str, Any],
                 trees: dict[str, Path] | None = None) -> None:
    sent: dict[str, Path] = {}
    for name, path in files.items():
        repo.put(path, f"{model}/{version}/{name}")
        sent[name] = path
    for prefix, tree in (trees or {}).items():
        _put_tree(repo, tree, f"{model}/{version}", sent, prefix=f"{prefix}/")
    digests = {name: {"sha256": file_digest(path), "bytes": path.stat().st_size} for name, path in sent.items()}
    repo.write(f"{model}/{version}/provenance.json",  # the digests: what clip-fp8 verify --repository checks
               json.dumps({**provenance, "files": digests}, indent=1))


def write_version(summary: dict[str, Any], provenance: dict[str, Any], repository: str, include_fp16: bool = False,
                  batch_sizes: list[int] | None = None, max_batch: int = 128, small_batch: str = "auto") -> Staged:
    """Write the run's encoders as the repository's next version (nothing serves it yet): per form and encoder a
    Python-backend model (``clip_fp8.triton_model``: torch-fp8 on an FP8 GPU, the repaired ONNX through ONNX
    Runtime elsewhere), with ``configs/onnxruntime.pbtxt`` for servers that have Triton's ONNX Runtime backend
    and ``configs/tensorrt.pbtxt`` where TensorRT proper built a plan for it; and ``clip_raw``, strings and
    encoded images in. A run whose speed gate chose FP16 (``promotion.on_slower=promote_fp16``) writes FP16 alone."""
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
    torch_fp8 = Path(artifacts["torch_fp8"]) if artifacts.get("torch_fp8") and Path(artifacts["torch_fp8"]).is_dir() else None
    dispatch = Path(artifacts["serving_table"]) if artifacts.get("serving_table") else None
    models = {f"clip_{g.split('_')[1]}_{g.split('_')[0]}": g for g in graphs}  # clip_image_fp8 <- fp8_image
    version = max((v for m in [*models, RAW_MODEL] for v in repo.versions(m)), default=0) + 1
    staged = Staged(version=version, configs={}, models={})
    here = Path(__file__).parent
    for model, graph in models.items():
        form, encoder = graph.split("_")
        onnx_path = Path(artifacts[f"onnx_{graph}"])
        inputs, outputs = graph_io(onnx_path)
        files = {"model.py": here / "triton_model.py", "model.onnx": onnx_path}
        for name in (TOKENIZER_FILES if encoder == "text" else PREPROCESSOR_FILES):
            if checkpoint is not None and (checkpoint / name).is_file():  # what the encoder expects of its inputs
                files[name] = checkpoint / name
        trees = {}
        if form == "fp8" and torch_fp8 is not None:
            trees["torch_fp8"] = torch_fp8
            if dispatch is not None and dispatch.is_file():
                files["torch_fp8/serving.json"] = dispatch  # the benchmark's FP8/FP16 table, read by fp8_runtime.load
        if plan := _plan_for(summary, graph):
            files["model.plan"] = plan
        _write_model(repo, model, version, files, {**provenance, "graph": graph}, trees)
        params = {"encoder": encoder, "runtime": "auto", "small_batch": small_batch}
        sizes = batch_sizes or [max_batch]
        staged.configs[f"{model}/config.pbtxt"] = model_config(model, "python", version, max_batch, inputs, outputs,
                                                               sizes, params)
        staged.configs[f"{model}/configs/onnxruntime.pbtxt"] = model_config(
            model, "onnxruntime_onnx", version, max_batch, inputs, outputs, sizes)
        if plan:
            staged.configs[f"{model}/configs/tensorrt.pbtxt"] = model_config(
                model, "tensorrt_plan", version, max_batch, inputs, outputs, sizes)
        staged.models[model] = {"platform": "python", "file": f"{model}/{version}/model.onnx", "graph": graph,
                                "torch_fp8": "torch_fp8" in trees, "plan": bool(plan)}
        staged.inputs[model] = inputs
    served = "fp8" if fp8 else "fp16"
    image, text = f"clip_image_{served}", f"clip_text_{served}"
    (text_input,), (text_output,) = graph_io(Path(artifacts[f"onnx_{served}_text"]))
    (image_input,), (image_output,) = graph_io(Path(artifacts[f"onnx_{served}_image"]))
    raw_files = {"model.py": here / "triton_raw_model.py"}
    for name in (*TOKENIZER_FILES, *PREPROCESSOR_FILES):
        if checkpoint is not None and (checkpoint / name).is_file():
            raw_files[name] = checkpoint / name
    _write_model(repo, RAW_MODEL, version, raw_files, {**provenance, "serves": [image, text]})
    staged.configs[f"{RAW_MODEL}/config.pbtxt"] = raw_model_config(RAW_MODEL, version, text_output["dims"][-1], {
        "text_model": text, "text_input": text_input["name"], "text_output": text_output["name"],
        "text_input_type": text_input["data_type"],
        "image_model": image, "image_input": image_input["name"], "image_output": image_output["name"],
        "image_input_type": image_input["data_type"],
        "context_length": str(text_input["dims"][-1]), "embedding_dim": str(text_output["dims"][-1])})
    staged.models[RAW_MODEL] = {"platform": "python", "file": f"{RAW_MODEL}/{version}/model.py", "serves": [image, text]}
    return staged


def activate(staged: Staged, summary: dict[str, Any], repository: str, keep_versions: int = 3,
             smoke: str = "auto") -> dict[str, Any]:
    """Serve a written version: the smoke check (``smoke``: auto runs it where a tritonserver is found,
    required fails without one, off skips it), then every config, then ``latest.json``; old versions pruned."""
    repo = Repository(repository)
    try:
        checked = smoke_check(repo, staged, summary, required=smoke == "required") if smoke != "off" else \
            {"skipped": "promotion.smoke_check=off"}
    except PromotionError:
        for model in staged.models:  # a refused version is not left behind (no config names it)
            repo.remove(f"{model}/{staged.version}")
        raise
    for rel, config in staged.configs.items():
        repo.write(rel, config)
    repo.write(LATEST, json.dumps({"version": staged.version, "run": summary.get("run"), "models": staged.models,
                                   "configs": staged.configs, "smoke_check": checked}, indent=1))
    for model in staged.models:  # keep the newest keep_versions (the one just promoted among them)
        for old in repo.versions(model)[:-keep_versions]:
            repo.remove(f"{model}/{old}")
    return {"version": staged.version, "repository": repo.url, "models": staged.models, "smoke_check": checked}


def promote(summary: dict[str, Any], provenance: dict[str, Any], repository: str, keep_versions: int = 3,
            include_fp16: bool = False, batch_sizes: list[int] | None = None, max_batch: int = 128,
            small_batch: str = "auto", smoke: str = "auto") -> dict[str, Any]:
    """Publish the run's encoders as the next version (``write_version``, then ``activate``); return what was written."""
    staged = write_version(summary, provenance, repository, include_fp16, batch_sizes, max_batch, small_batch)
    return activate(staged, summary, repository, keep_versions, smoke)


# The smoke check compares the server's embeddings with ONNX Runtime's on the run's own repaired graphs (what the
# pipeline's onnxruntime gate runtime evaluated). On the CPU the server runs that same graph the same way, so only
# transport and batching could differ (measured: cosine 1.0); on an FP8 GPU it serves torch-fp8, whose agreement
# with the FP8 graph is that of two FP8 implementations of one set of scales (>= 0.997 measured, docs/benchmarks.md).
SMOKE_MIN_COSINE = 0.99
SMOKE_ROWS = 3


def _reference_inputs() -> tuple[list[str], list[bytes]]:
    """Captions and PNG-encoded images of the embedded generator, and the pipeline's own preprocessing of them."""
    import io

    from clip_fp8 import synthetic

    samples = [synthetic.make_sample(7, i) for i in range(SMOKE_ROWS)]
    images = []
    for sample in samples:
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return [s.caption for s in samples], images


def _staging_view(repo: Repository, staged: Staged, into: Path) -> Path:
    """A local repository holding only the staged version: its configs, and the version folders (symlinks to a
    local repository's, or downloaded from a remote one): what the server will load once latest.json moves."""
    for rel, config in staged.configs.items():
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        (into / rel).write_text(config)
    for model in staged.models:
        target = into / model / str(staged.version)
        if repo.fs is None:
            target.symlink_to(Path(repo.path(model, str(staged.version))), target_is_directory=True)
        else:
            repo.fs.get(repo.path(model, str(staged.version)), str(target), recursive=True)
    return into


def smoke_check(repo: Repository, staged: Staged, summary: dict[str, Any], required: bool = False) -> dict[str, Any]:
    """A real ``tritonserver`` loads the staged version, answers one batch per model, and its embeddings match ONNX
    Runtime's on the run's own graphs (min cosine >= ``SMOKE_MIN_COSINE``); else ``PromotionError`` naming the model."""
    import tempfile

    from clip_fp8.triton_server import ServerError, TritonServer, bytes_inputs, find_tritonserver

    try:
        find_tritonserver()
    except ServerError as exc:
        if required:
            raise PromotionError(f"smoke check: {exc}") from None
        return {"skipped": str(exc)}
    artifacts = summary["artifacts"]
    captions, images = _reference_inputs()
    expected, feeds = _expected_embeddings(staged, artifacts, captions, images)
    import tritonclient.http as http

    with tempfile.TemporaryDirectory(prefix="clip-fp8-smoke-") as tmp:
        view = _staging_view(repo, staged, Path(tmp) / "repository")
        server = TritonServer(view, http_port=0, grpc_port=0, metrics_port=0, models=list(staged.models),
                              log=Path(tmp) / "tritonserver.log")
        try:
            server.start()
        except ServerError as exc:
            import re

            log = (Path(tmp) / "tritonserver.log").read_text(errors="replace")
            failed = dict(re.findall(r"failed to load '([^']+)' version \d+: ([^\n\"]*)", log))
            named = "; ".join(f"{m}: {why.strip()[:300]}" for m, why in failed.items()) or str(exc)
            raise PromotionError(f"smoke check: version {staged.version} did not load: {named}") from None
        try:
            client = http.InferenceServerClient(server.http_url, network_timeout=300)
            results: dict[str, float] = {}
            for model, (name, array) in feeds.items():
                tensor = http.InferInput(name, list(array.shape), _triton_dtype(array))
                tensor.set_data_from_numpy(array)
                got = client.infer(model, [tensor]).as_numpy(f"{staged.models[model]['graph'].split('_')[1]}_embeds")
                results[model] = _min_cosine(got, expected[model])
            raw = client.infer(RAW_MODEL, bytes_inputs(http, text=captions, image=images))
            text_model, image_model = staged.models[RAW_MODEL]["serves"][1], staged.models[RAW_MODEL]["serves"][0]
            results[f"{RAW_MODEL}:text"] = _min_cosine(raw.as_numpy("text_embeds"), expected[text_model])
            results[f"{RAW_MODEL}:image"] = _min_cosine(raw.as_numpy("image_embeds"), expected[image_model])
        except PromotionError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to answer is the smoke check failing
            raise PromotionError(f"smoke check: version {staged.version} failed to answer: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
        finally:
            server.stop()
    if bad := {m: c for m, c in results.items() if not c >= SMOKE_MIN_COSINE}:
        worst = min(bad, key=bad.get)
        raise PromotionError(f"smoke check: {worst} version {staged.version} answered embeddings off the run's own "
                             f"(min cosine {bad[worst]:.4f} < {SMOKE_MIN_COSINE})")
    return {"min_cosine": results, "tolerance": SMOKE_MIN_COSINE}


def _triton_dtype(array) -> str:
    return {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32"}[str(array.dtype)]


def _min_cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("-inf")
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).min())


def _expected_embeddings(staged: Staged, artifacts: dict[str, str], captions: list[str], images: list[bytes]):
    """Per tensor model: (its input name, the array to send) and ONNX Runtime's embeddings of the run's graph."""
    import io

    import numpy as np
    from PIL import Image
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(artifacts["checkpoint"])
    expected, feeds = {}, {}
    for model, info in staged.models.items():
        if "graph" not in info:
            continue
        (spec,) = staged.inputs[model]
        if info["graph"].endswith("text"):
            array = processor.tokenizer(captions, padding="max_length", truncation=True, max_length=spec["dims"][-1],
                                        return_tensors="np")["input_ids"].astype(np.int64)
        else:
            pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
            array = processor.image_processor(pictures, return_tensors="np")["pixel_values"].astype(np.float32)
        array = array.astype({"TYPE_INT32": np.int32, "TYPE_FP16": np.float16}.get(spec["data_type"], array.dtype))
        feeds[model] = (spec["name"], array)
        expected[model] = _onnx_reference(Path(artifacts[f"onnx_{info['graph']}"]), array)
    return expected, feeds


def _onnx_reference(path: Path, array):
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: array})[0].astype(np.float32)
