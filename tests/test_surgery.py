"""Surgery on a real ModelOpt FP8 export: each pass is needed, the result builds and computes the same thing."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from clip_fp8.config import PipelineConfig, QuantizationConfig
from clip_fp8.encoders import ImageEncoder, TextEncoder
from tasks.export import dummy_inputs, export_encoder
from tasks.model import EMBEDDED_MODELS, load_clip
from tasks.preflight import preflight
from tasks.quantize import fp8_quant_config, register_quantized_attention
from tasks.surgery import fix_moved_transpose_shapes, qdq_census, repair_for_strong_typing, retype_float32, standardize_qdq
from tasks.validate import cosine, onnx_embeddings, torch_embeddings


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory):
    import modelopt.torch.quantization as mtq

    out = tmp_path_factory.mktemp("fp8")
    model = load_clip(EMBEDDED_MODELS["tiny-clip-shapes"], PipelineConfig().model)
    register_quantized_attention(model)
    torch.manual_seed(0)
    calib = dummy_inputs(model, 16)
    mtq.quantize(model, fp8_quant_config(QuantizationConfig()),
                 lambda m: m(input_ids=calib["text"], pixel_values=calib["image"]))
    dummies = dummy_inputs(model, 2)
    paths = {}
    for name, wrapper in (("text", TextEncoder(model)), ("image", ImageEncoder(model))):
        paths[name] = out / f"fp8_{name}.onnx"
        export_encoder(wrapper.eval(), dummies[name], paths[name], opset=20)
    return model, paths


def test_raw_export_is_rejected_by_the_strongly_typed_parser(fp8_export):
    _, paths = fp8_export
    image = preflight(paths["image"], 1, 2, 4)
    assert not image["parsed"] and "patch_embedding/Conv" in image["errors"][0]
    text = preflight(paths["text"], 1, 2, 4)
    assert not text["parsed"] and "self_attn/Add" in text["errors"][0]


def test_each_pass_fixes_what_it_claims(fp8_export, tmp_path):
    _, paths = fp8_export
    image = onnx.load(str(paths["image"]))
    assert retype_float32(image)["casts"] >= 1  # the Float input meeting the Half patch-embedding kernel
    onnx.save(image, str(tmp_path / "image_retyped.onnx"))
    assert preflight(tmp_path / "image_retyped.onnx", 1, 2, 4, build=False)["parsed"]

    text = onnx.load(str(paths["text"]))
    retype_float32(text)
    onnx.save(text, str(tmp_path / "text_retyped.onnx"))
    assert not preflight(tmp_path / "text_retyped.onnx", 1, 2, 4, build=False)["parsed"]  # retyping alone is not enough
    assert fix_moved_transpose_shapes(text) == 2  # one causal mask per text layer
    onnx.save(text, str(tmp_path / "text_fixed.onnx"))
    assert preflight(tmp_path / "text_fixed.onnx", 1, 2, 4, build=False)["parsed"]


def test_repair_touches_nothing_else(fp8_export):
    _, paths = fp8_export
    raw = onnx.load(str(paths["text"]))
    repaired, report = repair_for_strong_typing(copy.deepcopy(raw))
    assert [n.op_type for n in raw.graph.node] == [n.op_type for n in repaired.graph.node]
    def fp8_weights(model):
        return {i.name: i.raw_data for i in model.graph.initializer
                if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and not i.name.endswith("zero_point")}

    assert fp8_weights(raw) == fp8_weights(repaired) and fp8_weights(raw)
    assert report["qdq_standardized"] == sum(1 for n in raw.graph.node if n.domain == "trt")


@pytest.mark.parametrize("encoder", ["text", "image"])
def test_repaired_graph_builds_and_matches_fake_quant(fp8_export, tmp_path, encoder):
    model, paths = fp8_export
    repaired, _ = repair_for_strong_typing(onnx.load(str(paths[encoder])))
    path = tmp_path / f"{encoder}.onnx"
    onnx.save(repaired, str(path))
    verdict = preflight(path, 1, 4, 8)
    assert verdict["parsed"] and verdict["built"] and verdict["engine_bytes"] > 0

    torch.manual_seed(1)
    inputs = dummy_inputs(model, 8)[encoder].numpy()
    sims = cosine(onnx_embeddings(path, inputs), torch_embeddings(model, encoder, inputs))
    assert sims.min() >= 0.99, sims
    # A different model must not pass the same check: the comparison has teeth.
    other = torch_embeddings(load_clip(EMBEDDED_MODELS["tiny-clip-shapes"], PipelineConfig().model), encoder,
                             np.roll(inputs, 1, axis=0))
    assert cosine(onnx_embeddings(path, inputs), other).min() < 0.99


def test_standardize_qdq_leaves_no_trt_domain(fp8_export):
    _, paths = fp8_export
    model = onnx.load(str(paths["image"]))
    assert any(n.domain == "trt" for n in model.graph.node)
    assert standardize_qdq(model) > 0
    assert not any(n.domain == "trt" for n in model.graph.node)
    assert all(o.domain != "trt" for o in model.opset_import)
