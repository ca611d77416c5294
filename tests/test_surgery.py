"""Surgery on a real ModelOpt FP8 export: each pass is needed, the result builds and computes the same thing."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from clip_fp8.config import PipelineConfig, QuantizationConfig
from clip_fp8.encoders import ImageEncoder, TextEncoder
from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, load_clip, register_quantized_attention
from clip_fp8.tasks.export import dummy_inputs, export_encoder
from clip_fp8.tasks.onnx_passes import (
    fix_moved_transpose_shapes, qdq_census, quantize_safe_softmax, repair_for_strong_typing, retype_float32, standardize_qdq,
)
from clip_fp8.tasks.preflight import preflight
from clip_fp8.tasks.quantize import fp8_quant_config
from clip_fp8.tasks.surgery import cosine, onnx_embeddings, torch_embeddings


def quantize_and_export(out, model_cfg):
    import modelopt.torch.quantization as mtq

    model = load_clip(EMBEDDED_MODELS["tiny-clip-shapes"], model_cfg)
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


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory):
    """Exported from an FP32 model (the CPU path)."""
    return quantize_and_export(tmp_path_factory.mktemp("fp8"), PipelineConfig().model)


@pytest.fixture(scope="module")
def fp8_export_from_fp16(tmp_path_factory):
    """Exported from an FP16 model (the GPU path; FP16 runs on the CPU too, slowly, which is fine at this size)."""
    return quantize_and_export(tmp_path_factory.mktemp("fp8-fp16"), PipelineConfig().model.model_copy(update={"dtype": "float16"}))


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


def test_fp16_model_export_hides_gemms_behind_casts_and_surgery_restores_them(fp8_export_from_fp16, tmp_path):
    """From an FP16 model, ModelOpt leaves Cast(to=FLOAT) and unfolded transposes between weight DQs and MatMuls."""
    model, paths = fp8_export_from_fp16
    raw = qdq_census(onnx.load(str(paths["text"])))
    assert raw["gemms_fp8_inputs"] < raw["gemms"] == 17  # the defect this test exists for
    repaired, report = repair_for_strong_typing(onnx.load(str(paths["text"])))
    assert report["identity_casts_dropped"] > 0 and report["weight_transposes_folded"] > 0
    census = qdq_census(repaired)
    assert census["gemms_fp8_inputs"] == census["gemms"] == 17, census["gemms_not_fp8"]
    assert not any(n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT for n in repaired.graph.node)
    path = tmp_path / "text.onnx"
    onnx.save(repaired, str(path))
    assert preflight(path, 1, 4, 8)["built"]
    torch.manual_seed(1)
    inputs = dummy_inputs(model, 8)["text"].numpy()
    assert cosine(onnx_embeddings(path, inputs), torch_embeddings(model, "text", inputs)).min() >= 0.99


def safe_softmax_graph(where_feeds: str = "MatMul") -> onnx.ModelProto:
    """scores -> Softmax -> Where(IsNaN(p), 0, p) -> MatMul with an FP8 weight: torch 2.11's masked-SDPA shape."""
    from onnx import TensorProto as T
    from onnx import helper

    rng = np.random.default_rng(0)
    v = rng.standard_normal((8, 8)).astype(np.float32)
    scale = float(np.abs(v).max() / 448)
    import ml_dtypes

    inits = [
        helper.make_tensor("v_fp8", T.FLOAT8E4M3FN, [8, 8], (v / scale).astype(ml_dtypes.float8_e4m3fn).tobytes(), raw=True),
        helper.make_tensor("v_scale", T.FLOAT16, [], [scale]),
        helper.make_tensor("v_zero", T.FLOAT8E4M3FN, [], [0.0]),
        helper.make_tensor("zero", T.FLOAT16, [], [0.0]),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["v_fp8", "v_scale", "v_zero"], ["v"], name="v_dq"),
        helper.make_node("Softmax", ["scores"], ["p"], name="attn/Softmax", axis=-1),
        helper.make_node("IsNaN", ["p"], ["nan"], name="attn/IsNaN"),
        helper.make_node("Where", ["nan", "zero", "p"], ["p_safe"], name="attn/Where"),
        helper.make_node("MatMul", ["p_safe", "v"], ["out"], name="attn/MatMul") if where_feeds == "MatMul"
        else helper.make_node("Relu", ["p_safe"], ["out"], name="attn/Relu"),
    ]
    graph = helper.make_graph(nodes, "safe_softmax", [helper.make_tensor_value_info("scores", T.FLOAT16, ["batch", 8])],
                              [helper.make_tensor_value_info("out", T.FLOAT16, ["batch", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_safe_softmax_gets_the_fixed_scale_qdq(tmp_path):
    model = safe_softmax_graph()
    onnx.checker.check_model(model)
    assert qdq_census(model)["softmax_quantized"] == 0
    before = tmp_path / "before.onnx"
    onnx.save(model, str(before))
    repaired, report = repair_for_strong_typing(copy.deepcopy(model))
    assert report["safe_softmax_quantized"] == 1
    census = qdq_census(repaired)
    assert census["softmax_quantized"] == 1 and census["gemms_fp8_inputs"] == census["gemms"] == 1
    after = tmp_path / "after.onnx"
    onnx.save(repaired, str(after))
    scores = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float16) * 3
    a, b = onnx_embeddings(before, scores), onnx_embeddings(after, scores)
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 0.1  # quantized, within FP8's step at [0, 1]
    assert preflight(after, 1, 2, 4)["built"]
    # A Where that feeds anything but a MatMul is left alone.
    assert quantize_safe_softmax(safe_softmax_graph(where_feeds="Relu")) == 0


def test_the_graph_audit_finds_the_fp8_patch_embedding_weight_and_surgery_restores_it(fp8_export, tmp_path):
    """ModelOpt's exporter FP8-rounds the patch embedding's Conv weight although the model keeps that layer in FP16:
    the audit names it; restored from the model, the graph agrees with the model and its numerics are no worse."""
    from clip_fp8.tasks.onnx_passes import graph_audit
    from clip_fp8.tasks.surgery import module_precision

    model, paths = fp8_export
    precision = module_precision(model)
    assert precision("vision_model.embeddings.patch_embedding")[0] is False  # excluded by default
    assert precision("vision_model.encoder.layers.0.mlp.fc1")[0] is True
    as_before, report = repair_for_strong_typing(onnx.load(str(paths["image"])))
    assert "fp16_weights_restored" not in report
    assert graph_audit(as_before, precision) == [
        "vision_model.embeddings.patch_embedding: FP16 in the model, but /vision_model/embeddings/patch_embedding/Conv "
        "reads an FP8 weight"]
    fixed, report = repair_for_strong_typing(onnx.load(str(paths["image"])), precision)
    assert report["fp16_weights_restored"] == 1 and graph_audit(fixed, precision) == []
    assert qdq_census(fixed)["fp8_initializers"] == qdq_census(as_before)["fp8_initializers"] - 1
    torch.manual_seed(0)
    inputs = dummy_inputs(model, 64)["image"].numpy()
    sims = {}
    for label, graph in (("before", as_before), ("after", fixed)):
        onnx.save(graph, str(tmp_path / f"{label}.onnx"))
        sims[label] = cosine(onnx_embeddings(tmp_path / f"{label}.onnx", inputs), torch_embeddings(model, "image", inputs))
    # Closer to the model on average (measured: mean cosine 0.99770 -> 0.99841 here); the worst of 64 inputs moves
    # within FP8 rounding noise either way (0.987 -> 0.994 on this seed, 0.994 -> 0.994 on another).
    assert sims["after"].mean() > sims["before"].mean() and sims["after"].min() >= sims["before"].min() - 0.005, sims
    # The text tower has no excluded weighted layer: nothing restored, nothing to report.
    text, report = repair_for_strong_typing(onnx.load(str(paths["text"])), precision)
    assert report["fp16_weights_restored"] == 0 and graph_audit(text, precision) == []
    # And the audit has teeth the other way: a quantized layer made FP16 in the graph is named.
    assert graph_audit(fixed, lambda m: (True, None) if m == "vision_model.embeddings.patch_embedding" else precision(m)) == [
        "vision_model.embeddings.patch_embedding: FP8 in the model, but /vision_model/embeddings/patch_embedding/Conv "
        "reads no FP8 weight"]
