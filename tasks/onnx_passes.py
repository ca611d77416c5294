"""ONNX surgery: make ModelOpt's FP8 export buildable by a strongly typed TensorRT, and nothing more.

Each pass fixes one defect seen in ModelOpt 0.47's ``get_onnx_bytes_and_metadata`` output and
reports how many places it touched:

1. ``retype_float32``: FP32 initializers and ``Cast(to=FLOAT)`` in an FP16 graph become FP16. A strongly
   typed build takes types as written, so an FP32 round trip meeting FP16 math is an error
   (Half/Float mismatch; on CLIP's image tower a Conv with Float input and Half kernel).
2. ``fix_moved_transpose_shapes``: the exporter's attention rewrite moves K's ``Transpose`` (last two
   axes) in front of the K quantizer, but the causal mask's ``Shape`` still reads the quantizer's
   output, which is now K transposed: the mask comes out ``[L, head_dim]`` instead of ``[L, L]`` and
   TensorRT rejects the ``Add`` ("broadcast dimensions must be conformable"). The ``Shape`` is rewired
   to the transpose's input, which is the tensor it read before the rewrite.
3. ``standardize_qdq``: ``trt``-domain ``QuantizeLinear``/``DequantizeLinear`` become the standard ONNX
   ops (opset >= 19 defines FP8 Q/DQ; the FP8 zero point sets the output type). TensorRT parses both
   forms; ONNX Runtime only the standard one, so the file we ship is the file we check numerically.
4. ``drop_identity_casts``: exported from an FP16 model (the GPU path), the text graph carries
   ``Cast(to=FLOAT)`` after weight dequantization; once re-typed they cast FP16 to FP16 and hide the
   DQ -> MatMul pattern that TensorRT fuses into an FP8 GEMM. They are removed.
5. ``fold_weight_transposes``: ``DQ(W) -> Transpose`` with an FP8 initializer and a per-tensor scale is
   ``DQ(W^T)``: the transpose is applied to the stored weight, so every GEMM reads its weight straight
   from a DequantizeLinear (ModelOpt folds most of these itself, not all of them on the FP16 path).
6. ``quantize_safe_softmax``: on the GPU (torch 2.11) a masked SDPA exports as
   ``Softmax -> IsNaN -> Where(nan, 0, p)`` ("safe softmax"); ModelOpt only quantizes a Softmax whose
   consumers are all MatMuls, so the text tower's P.V GEMMs stayed FP16 (0 of 12 on ViT-L/14). The same
   fixed-scale FP8 Q/DQ ModelOpt uses (1/448: probabilities lie in [0, 1]) goes on the ``Where`` output.
7. ``restore_fp16_weights``: ModelOpt's exporter FP8-rounds every Conv weight, also the patch embedding that
   ``quantization.exclude`` keeps in FP16 (its input is not quantized, so the layer runs in FP16 on FP8-rounded
   weights that neither the fake-quant model nor the recipe has). A GEMM or Conv whose module the model keeps in
   FP16 gets its weight back from the model, unrounded, in the graph's type.
8. Stale ``value_info`` is dropped and shapes are re-inferred.

``graph_audit`` then checks the result against the model: every GEMM and Conv of a quantized module reads an
FP8 weight, and none of a module the model keeps in FP16 reads an FP8 weight or a quantized input.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"}


def compute_type(model: onnx.ModelProto) -> int | None:
    """The graph's float type, read off its outputs (the text encoder's input is int64 token ids)."""
    for value in [*model.graph.output, *model.graph.input]:
        t = value.type.tensor_type.elem_type
        if t in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return t
    return None


def retype_float32(model: onnx.ModelProto) -> dict[str, int]:
    """FP32 initializers and Cast(to=FLOAT) -> FP16, only when the graph computes in FP16."""
    counts = {"initializers": 0, "casts": 0}
    if compute_type(model) != TensorProto.FLOAT16:
        return counts
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name=init.name))
            counts["initializers"] += 1
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), name=attr.t.name))
                    counts["initializers"] += 1
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
                    counts["casts"] += 1
    return counts


def _swaps_last_two_axes(node: onnx.NodeProto) -> bool:
    perm = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"), None)
    return perm is not None and len(perm) >= 2 and list(perm[-2:]) == [len(perm) - 1, len(perm) - 2] \
        and list(perm[:-2]) == list(range(len(perm) - 2))


def fix_moved_transpose_shapes(model: onnx.ModelProto) -> int:
    """Rewire Shape nodes that read K through a Transpose the exporter moved in front of K's Q/DQ."""
    producer = {out: node for node in model.graph.node for out in node.output}
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Shape":
            continue
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type in QDQ_OPS else None
        tr = producer.get(q.input[0]) if q is not None and q.op_type in QDQ_OPS else None
        if tr is not None and tr.op_type == "Transpose" and tr.name.endswith("_moved") and _swaps_last_two_axes(tr):
            node.input[0] = tr.input[0]
            fixed += 1
    return fixed


def standardize_qdq(model: onnx.ModelProto) -> int:
    """trt-domain FP8 Q/DQ -> standard ONNX Q/DQ with an FP8 zero point shaped like the scale."""
    inits = {i.name: i for i in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.domain != "trt" or node.op_type not in QDQ_OPS:
            continue
        node.domain = ""
        node.op_type = "DequantizeLinear" if "Dequantize" in node.op_type else "QuantizeLinear"
        scale = inits.get(node.input[1])
        scale_dims = list(scale.dims) if scale is not None else []
        zp_name = f"{node.name}_fp8_zero_point"
        zp = helper.make_tensor(zp_name, TensorProto.FLOAT8E4M3FN, scale_dims, [0.0] * int(np.prod(scale_dims or [1])))
        model.graph.initializer.append(zp)
        inits[zp_name] = zp
        if len(node.input) >= 3:
            node.input[2] = zp_name
        else:
            node.input.append(zp_name)
        changed += 1
    used = {i for n in model.graph.node for i in n.input}
    stale = [i for i in model.graph.initializer if i.name not in used]
    for init in stale:  # the trt ops' own zero points, now replaced
        model.graph.initializer.remove(init)
    if changed and not any(n.domain == "trt" for n in model.graph.node):
        kept = [o for o in model.opset_import if o.domain != "trt"]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return changed


def rename_tensor(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a tensor everywhere it is produced or consumed, and among the graph outputs."""
    for node in model.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
    for out in model.graph.output:
        if out.name == old:
            out.name = new


def consumers_of(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return consumers


def _bypass(model: onnx.ModelProto, node: onnx.NodeProto, replacement: str) -> None:
    """Remove ``node`` (single output) and point its consumers, or the graph output, at ``replacement``."""
    old = node.output[0]
    model.graph.node.remove(node)
    if any(out.name == old for out in model.graph.output):
        rename_tensor(model, replacement, old)  # keep the graph's output name: the producer takes it over
    else:
        rename_tensor(model, old, replacement)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = shape_inference.infer_shapes(model, data_prop=False)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def drop_identity_casts(model: onnx.ModelProto) -> int:
    """Remove Casts whose input already has the target type (needs standard Q/DQ for type inference)."""
    types = _elem_types(model)
    dropped = 0
    for node in list(model.graph.node):
        if node.op_type != "Cast":
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        if types.get(node.input[0]) == to:
            _bypass(model, node, node.input[0])
            dropped += 1
    return dropped


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """DQ(W_fp8, per-tensor scale) -> Transpose  ==>  DQ(W_fp8 transposed), when W feeds nothing else."""
    inits = {i.name: i for i in model.graph.initializer}
    consumers = consumers_of(model)
    folded = 0
    for dq in list(model.graph.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        weight, scale = inits[dq.input[0]], inits.get(dq.input[1])
        users = consumers.get(dq.output[0], [])
        if weight.data_type != TensorProto.FLOAT8E4M3FN or scale is None or int(np.prod(scale.dims)) != 1 \
                or len(users) != 1 or users[0].op_type != "Transpose" or len(consumers.get(weight.name, [])) != 1:
            continue
        transpose = users[0]
        perm = next((helper.get_attribute_value(a) for a in transpose.attribute if a.name == "perm"), None)
        array = numpy_helper.to_array(weight)  # ml_dtypes float8, transposes losslessly
        weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.transpose(array, perm)), name=weight.name))
        _bypass(model, transpose, dq.output[0])
        folded += 1
    return folded


FP8_E4M3_MAX = 448.0


def _safe_softmax_output(node: onnx.NodeProto, consumers: dict[str, list]) -> onnx.NodeProto | None:
    """The ``Where`` of ``Where(IsNaN(softmax), c, softmax)`` if ``node`` is such a Softmax, else None."""
    users = consumers.get(node.output[0], [])
    isnan = [u for u in users if u.op_type == "IsNaN"]
    where = [u for u in users if u.op_type == "Where"]
    if len(users) != 2 or len(isnan) != 1 or len(where) != 1:
        return None
    w = where[0]
    return w if w.input[0] == isnan[0].output[0] and w.input[2] == node.output[0] else None


def quantize_safe_softmax(model: onnx.ModelProto) -> int:
    """FP8 Q/DQ (scale 1/448) after a safe-softmax ``Where`` that feeds only MatMuls, in FP8 graphs."""
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return 0  # an FP16 baseline graph stays FP16
    dtype = compute_type(model) or TensorProto.FLOAT
    consumers = consumers_of(model)
    inserted = 0
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        where = _safe_softmax_output(softmax, consumers)
        users = consumers.get(where.output[0], []) if where is not None else []
        if not users or not all(u.op_type == "MatMul" for u in users):
            continue
        base = softmax.name or softmax.output[0]
        scale = helper.make_tensor(f"{base}/softmax_scale", dtype, [], [1.0 / FP8_E4M3_MAX])
        zero = helper.make_tensor(f"{base}/softmax_zero_point", TensorProto.FLOAT8E4M3FN, [], [0.0])
        model.graph.initializer.extend([scale, zero])
        q_out, dq_out = f"{base}/softmax_q", f"{base}/softmax_dq"
        q = helper.make_node("QuantizeLinear", [where.output[0], scale.name, zero.name], [q_out],
                             name=f"{base}/QuantizeLinear", saturate=1)
        dq = helper.make_node("DequantizeLinear", [q_out, scale.name, zero.name], [dq_out], name=f"{base}/DequantizeLinear")
        for user in users:
            for i, name in enumerate(user.input):
                if name == where.output[0]:
                    user.input[i] = dq_out
        position = list(model.graph.node).index(where) + 1  # keep the node list topologically sorted
        model.graph.node.insert(position, q)
        model.graph.node.insert(position + 1, dq)
        inserted += 1
    return inserted


# module path -> (is it quantized in the model, its weight as stored in torch's layout); None: no such weighted module.
Precision = Callable[[str], "tuple[bool, np.ndarray] | None"]
WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")


def module_of(node: onnx.NodeProto) -> str:
    """The module a node was exported from: ``/vision_model/embeddings/patch_embedding/Conv`` ->
    ``vision_model.embeddings.patch_embedding``."""
    return ".".join(node.name.strip("/").split("/")[:-1])


def _fp8_weight_dq(model: onnx.ModelProto, node: onnx.NodeProto, producer: dict) -> onnx.NodeProto | None:
    """The DequantizeLinear of an FP8 initializer that feeds ``node``'s weight input, if any."""
    inits = {i.name: i for i in model.graph.initializer}
    dq = producer.get(node.input[1]) if len(node.input) > 1 else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    weight = inits.get(dq.input[0])
    return dq if weight is not None and weight.data_type == TensorProto.FLOAT8E4M3FN else None


def restore_fp16_weights(model: onnx.ModelProto, precision: Precision) -> int:
    """Give every GEMM/Conv of a module the model keeps in FP16 its unrounded weight instead of an FP8 one."""
    producer = {out: n for n in model.graph.node for out in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    restored = 0
    for node in list(model.graph.node):
        found = precision(module_of(node)) if node.op_type in WEIGHTED_OPS else None
        if found is None or found[0] or (dq := _fp8_weight_dq(model, node, producer)) is None:
            continue
        weight = found[1]
        if node.op_type == "MatMul" or (node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute)):
            weight = weight.T
        dtype = helper.tensor_dtype_to_np_dtype(inits[dq.input[1]].data_type)  # the DQ's output type: its scale's
        name = f"{module_of(node)}.weight"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight).astype(dtype), name))
        node.input[1] = name
        restored += 1
    _drop_unused(model)
    return restored


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads (the weight DQs restore_fp16_weights bypassed) and unread initializers."""
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if n.output and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    read = {i for n in model.graph.node for i in n.input}
    for init in [i for i in model.graph.initializer if i.name not in read]:
        model.graph.initializer.remove(init)


def graph_audit(model: onnx.ModelProto, precision: Precision) -> list[str]:
    """Where the graph's precision differs from the model's, one line per module (empty: they agree)."""
    producer = {out: n for n in model.graph.node for out in n.output}
    problems = []
    for node in model.graph.node:
        found = precision(module_of(node)) if node.op_type in WEIGHTED_OPS else None
        if found is None:
            continue  # attention's Q.K and P.V, or no module: nothing the model stores a weight for
        quantized, fp8_weight = found[0], _fp8_weight_dq(model, node, producer) is not None
        source = producer.get(node.input[0])
        quantized_input = source is not None and source.op_type == "DequantizeLinear"
        if quantized and not fp8_weight:
            problems.append(f"{module_of(node)}: FP8 in the model, but {node.name} reads no FP8 weight")
        elif not quantized and (fp8_weight or quantized_input):
            what = "an FP8 weight" if fp8_weight else "a quantized input"
            problems.append(f"{module_of(node)}: FP16 in the model, but {node.name} reads {what}")
    return problems


def repair_for_strong_typing(model: onnx.ModelProto, precision: Precision | None = None) -> tuple[onnx.ModelProto, dict]:
    """Apply every pass; return the repaired model and what each pass changed. ``precision`` (the model's, per
    module) enables ``restore_fp16_weights``."""
    report = {"retyped": retype_float32(model), "moved_transpose_shapes": fix_moved_transpose_shapes(model),
              "qdq_standardized": standardize_qdq(model)}
    del model.graph.value_info[:]
    report["identity_casts_dropped"] = drop_identity_casts(model)
    report["weight_transposes_folded"] = fold_weight_transposes(model)
    report["safe_softmax_quantized"] = quantize_safe_softmax(model)
    if precision is not None:
        report["fp16_weights_restored"] = restore_fp16_weights(model, precision)
    model = shape_inference.infer_shapes(model, data_prop=True)
    onnx.checker.check_model(model, full_check=False)
    return model, report


def qdq_census(model: onnx.ModelProto) -> dict:
    """What the graph quantizes: Q/DQ counts, FP8 weights, MatMuls/Convs fed by DQ, Softmax outputs quantized."""
    producer = {out: n for n in model.graph.node for out in n.output}
    consumers = consumers_of(model)
    ops = Counter(n.op_type for n in model.graph.node)
    gemms = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    fp8_gemms = [n for n in gemms if all((p := producer.get(i)) is not None and p.op_type == "DequantizeLinear"
                                         for i in n.input[:2])]
    def quantized(tensor: str) -> bool:
        return any(c.op_type == "QuantizeLinear" for c in consumers.get(tensor, []))

    softmax_q = 0
    for n in model.graph.node:
        if n.op_type == "Softmax":
            where = _safe_softmax_output(n, consumers)
            softmax_q += quantized(n.output[0]) or (where is not None and quantized(where.output[0]))
    return {
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "fp8_initializers": sum(1 for i in model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN),
        "fp32_initializers": sum(1 for i in model.graph.initializer if i.data_type == TensorProto.FLOAT),
        "gemms": len(gemms),
        "gemms_fp8_inputs": len(fp8_gemms),
        "gemms_not_fp8": sorted(n.name for n in gemms if n not in fp8_gemms),
        "softmax": ops.get("Softmax", 0),
        "softmax_quantized": softmax_q,
    }
