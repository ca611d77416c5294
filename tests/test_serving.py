"""The promoted model, served by a real ``tritonserver`` (nvidia-pytriton's bundled one, Python backend, CPU):
promotion's smoke check, ``clip-fp8 serve``, HTTP and gRPC clients, the strings-and-images model, a broken
version refused, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clip_fp8.triton_repository import LATEST, RAW_MODEL, SMOKE_MIN_COSINE, PromotionError, activate, write_version
from clip_fp8.triton_server import bytes_inputs
from conftest import sigint_as_ctrl_c

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "clip_fp8.cli"]
# Server and pipeline run the same repaired graph through ONNX Runtime on this CPU: only batching and
# transport lie between them.
SAME_RUNTIME_MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def promoted(tmp_path_factory):
    """The embedded default, run once with a promotion repository (the smoke check runs inside promotion)."""
    from clip_fp8.config import PipelineConfig
    from clip_fp8.flows.pipeline import clip_fp8_pipeline

    base = tmp_path_factory.mktemp("serving")
    config = PipelineConfig().with_overrides([
        f"output.root={base / 'out'}", f"promotion.repository={base / 'triton'}", "promotion.smoke_check=required",
        "calibration.num_samples=256", "calibration.batch_size=128", "evaluation.num_samples=200"])
    summary = clip_fp8_pipeline(config)
    return config, summary, base / "triton"


def _pipeline_embeddings(summary: dict, encoder: str, array: np.ndarray) -> np.ndarray:
    """What the pipeline's evaluated runtime (its gate judged onnxruntime here) gives for the same inputs."""
    import torch

    from clip_fp8.tasks.runtimes import OnnxRuntimeEncoders

    runtime = OnnxRuntimeEncoders({encoder: Path(summary["artifacts"][f"onnx_fp8_{encoder}"])}, "cpu")
    encode = runtime.encode_image if encoder == "image" else runtime.encode_text
    return encode(torch.from_numpy(array)).numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _inputs(summary: dict, rows: int = 5):
    """Captions and PNG bytes of generated samples, and the pipeline's own preprocessing of them."""
    import io

    from transformers import CLIPProcessor

    from clip_fp8 import synthetic

    samples = [synthetic.make_sample(11, i) for i in range(rows)]
    processor = CLIPProcessor.from_pretrained(summary["artifacts"]["checkpoint"])
    ids = processor.tokenizer([s.caption for s in samples], padding="max_length", truncation=True,
                              max_length=summary["model"]["context_length"], return_tensors="np")["input_ids"]
    pixels = processor.image_processor([s.image for s in samples], return_tensors="np")["pixel_values"]
    encoded = []
    for sample in samples:
        buffer = io.BytesIO()
        sample.image.save(buffer, format="JPEG", quality=95)
        encoded.append(buffer.getvalue())
    return [s.caption for s in samples], encoded, ids.astype(np.int64), pixels.astype(np.float32)


@pytest.fixture(scope="module")
def served(promoted):
    """``clip-fp8 serve`` on the promoted repository, on free ports; the endpoints read from what it prints."""
    _, _, repository = promoted
    process = subprocess.Popen([*CLI, "serve", str(repository), "--http-port", "0", "--grpc-port", "0",
                                "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=sigint_as_ctrl_c)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "Ctrl-C stops it" in line:
            break
    printed = "".join(lines)
    assert process.poll() is None, printed
    http = re.search(r"HTTP\s+http://(\S+)", printed).group(1)
    grpc = re.search(r"gRPC\s+(\S+)", printed).group(1)
    yield process, printed, http, grpc
    if process.poll() is None:  # a test before the Ctrl-C one failed: stop it the way a user would
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def test_promotion_smoke_checks_the_version_on_a_real_server_before_latest_moves(promoted):
    config, summary, repository = promoted
    latest = json.loads((repository / LATEST).read_text())
    assert latest["version"] == 1 and latest["run"] == summary["run"]
    checked = latest["smoke_check"]
    assert checked["tolerance"] == SMOKE_MIN_COSINE
    assert set(checked["min_cosine"]) == {"clip_image_fp8", "clip_text_fp8", f"{RAW_MODEL}:text", f"{RAW_MODEL}:image"}
    assert min(checked["min_cosine"].values()) >= SAME_RUNTIME_MIN_COSINE, checked


def test_the_repository_configs_are_python_backend_models_triton_parses(promoted):
    from test_history import model_config_pb2, parse_config

    config, summary, repository = promoted
    pb = model_config_pb2()
    for model, encoder in (("clip_image_fp8", "image"), ("clip_text_fp8", "text")):
        parsed = parse_config((repository / model / "config.pbtxt").read_text())
        assert parsed.backend == "python" and parsed.max_batch_size == config.build.max_batch
        assert list(parsed.dynamic_batching.preferred_batch_size) == config.serving.batch_sizes
        assert parsed.instance_group[0].kind == pb.ModelInstanceGroup.KIND_AUTO
        assert parsed.parameters["encoder"].string_value == encoder
        assert [w.batch_size for w in parsed.model_warmup] == config.serving.batch_sizes
        alternative = parse_config((repository / model / "configs" / "onnxruntime.pbtxt").read_text())
        assert alternative.platform == "onnxruntime_onnx" and list(alternative.version_policy.specific.versions) == [1]
        version = repository / model / "1"
        assert (version / "model.onnx").read_bytes() == Path(summary["artifacts"][f"onnx_fp8_{encoder}"]).read_bytes()
        assert (version / "torch_fp8" / "torch_fp8.json").is_file()  # the FP8-GPU runtime travels with the version
        assert (version / "model.py").read_text() == (Path(__file__).parents[1] / "clip_fp8" / "triton_model.py").read_text()
    raw = parse_config((repository / RAW_MODEL / "config.pbtxt").read_text())
    assert raw.parameters["text_model"].string_value == "clip_text_fp8"
    assert raw.parameters["image_model"].string_value == "clip_image_fp8"


def test_clip_fp8_serve_answers_over_http_and_grpc_with_the_pipelines_embeddings(promoted, served):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    _, summary, _ = promoted
    _, printed, http_url, grpc_url = served
    for model in ("clip_image_fp8", "clip_text_fp8", RAW_MODEL):
        assert re.search(rf"model {model} version 1: READY", printed), printed
    _, _, ids, pixels = _inputs(summary)
    expected = {"image": _pipeline_embeddings(summary, "image", pixels), "text": _pipeline_embeddings(summary, "text", ids)}
    http, grpc = httpclient.InferenceServerClient(http_url), grpcclient.InferenceServerClient(grpc_url)
    for encoder, array in (("image", pixels), ("text", ids)):
        model = f"clip_{encoder}_fp8"
        metadata = http.get_model_metadata(model)
        (spec,), (declared,) = metadata["inputs"], metadata["outputs"]
        array = array.astype({"FP16": np.float16, "FP32": np.float32, "INT64": np.int64, "INT32": np.int32}[spec["datatype"]])
        for module, client in ((httpclient, http), (grpcclient, grpc)):
            tensor = module.InferInput(spec["name"], list(array.shape), spec["datatype"])
            tensor.set_data_from_numpy(array)
            result = client.infer(model, [tensor])
            got = result.as_numpy(f"{encoder}_embeds")
            assert got.shape == expected[encoder].shape and got.dtype == {"FP16": np.float16, "FP32": np.float32}[
                declared["datatype"]], (got.dtype, declared)  # what the model's metadata tells clients to expect
            assert _cosines(got, expected[encoder]).min() >= SAME_RUNTIME_MIN_COSINE, (module.__name__, encoder)


def test_strings_and_jpeg_bytes_give_the_tensor_models_embeddings(promoted, served):
    import tritonclient.grpc as grpcclient

    _, summary, _ = promoted
    _, _, _, grpc_url = served
    captions, jpegs, ids, _ = _inputs(summary)
    client = grpcclient.InferenceServerClient(grpc_url)
    raw = client.infer(RAW_MODEL, bytes_inputs(grpcclient, text=captions, image=jpegs))
    assert _cosines(raw.as_numpy("text_embeds"), _pipeline_embeddings(summary, "text", ids)).min() >= SAME_RUNTIME_MIN_COSINE
    # The images: the server decodes the JPEG bytes; the reference decodes the same bytes here.
    import io

    from PIL import Image
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(summary["artifacts"]["checkpoint"])
    decoded = processor.image_processor([Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs],
                                        return_tensors="np")["pixel_values"].astype(np.float32)
    assert _cosines(raw.as_numpy("image_embeds"), _pipeline_embeddings(summary, "image", decoded)).min() \
        >= SAME_RUNTIME_MIN_COSINE
    # Text alone: no image rows.
    answer = client.infer(RAW_MODEL, bytes_inputs(grpcclient, text=captions[:1]))
    assert answer.as_numpy("text_embeds").shape[0] == 1 and answer.as_numpy("image_embeds").shape[0] == 0


def test_ctrl_c_stops_the_server_within_10_s_leaving_no_process(promoted, served):
    _, _, repository = promoted
    process, _, http_url, _ = served
    started = time.time()
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=15)
    assert process.returncode == 130, rest
    assert time.time() - started < 10
    assert "stopped tritonserver" in rest
    left = subprocess.run(["pgrep", "-f", "--", f"--model-repository={repository}"], capture_output=True, text=True)
    assert left.returncode == 1 and not left.stdout.strip(), left  # 1: nothing matched (2 would be pgrep's error)


def test_a_version_with_a_deleted_weight_file_fails_the_smoke_check_and_latest_stays(promoted):
    config, summary, repository = promoted
    before = (repository / LATEST).read_text()
    configs = {p: p.read_text() for p in repository.rglob("*.pbtxt")}
    staged = write_version(summary, {"run": summary["run"]}, str(repository), batch_sizes=config.serving.batch_sizes,
                           max_batch=config.build.max_batch)
    assert staged.version == 2
    os.remove(repository / "clip_text_fp8" / "2" / "model.onnx")
    with pytest.raises(PromotionError, match=r"smoke check: version 2 did not load: clip_text_fp8: ") as failure:
        activate(staged, summary, str(repository), smoke="required")
    assert "\n" not in str(failure.value)
    assert (repository / LATEST).read_text() == before
    assert {p: p.read_text() for p in repository.rglob("*.pbtxt")} == configs  # every config still on version 1
    assert not any((repository / model / "2").exists() for model in staged.models)  # the refused version removed


def test_a_version_that_loads_but_answers_other_embeddings_is_refused_naming_the_model(promoted, tmp_path):
    """A graph whose projection rows were shuffled (a bad copy that still loads) answers, but not with the run's
    embeddings: the smoke check names the model and the cosine."""
    import onnx
    from onnx import numpy_helper

    config, summary, repository = promoted
    before = (repository / LATEST).read_text()
    staged = write_version(summary, {"run": summary["run"]}, str(repository), batch_sizes=config.serving.batch_sizes,
                           max_batch=config.build.max_batch)
    path = repository / "clip_image_fp8" / str(staged.version) / "model.onnx"
    graph = onnx.load(str(path))
    projection = max((t for t in graph.graph.initializer if "projection" in t.name.lower()),
                     key=lambda t: np.prod(t.dims), default=None)
    assert projection is not None, [t.name for t in graph.graph.initializer][:20]
    weights = numpy_helper.to_array(projection)
    shuffled = np.ascontiguousarray(weights[..., np.random.default_rng(0).permutation(weights.shape[-1])])
    projection.CopyFrom(numpy_helper.from_array(shuffled, projection.name))
    onnx.save(graph, str(path))
    with pytest.raises(PromotionError, match=rf"smoke check: clip_image_fp8 version {staged.version} answered embeddings "
                                             rf"off the run's own \(min cosine -?\d\.\d+ < {SMOKE_MIN_COSINE}\)"):
        activate(staged, summary, str(repository), smoke="required")
    assert (repository / LATEST).read_text() == before
