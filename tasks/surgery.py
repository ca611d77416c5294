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
4. Stale ``value_info`` is dropped and shapes are re-inferred.
"""

from __future__ import annotations

from collections import Counter

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


def repair_for_strong_typing(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Apply every pass; return the repaired model and what each pass changed."""
    report = {"retyped": retype_float32(model), "moved_transpose_shapes": fix_moved_transpose_shapes(model),
              "qdq_standardized": standardize_qdq(model)}
    del model.graph.value_info[:]
    model = shape_inference.infer_shapes(model, data_prop=True)
    onnx.checker.check_model(model, full_check=False)
    return model, report


def qdq_census(model: onnx.ModelProto) -> dict:
    """What the graph quantizes: Q/DQ counts, FP8 weights, MatMuls/Convs fed by DQ, Softmax outputs quantized."""
    producer = {out: n for n in model.graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ops = Counter(n.op_type for n in model.graph.node)
    gemms = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    fp8_gemms = [n for n in gemms if all((p := producer.get(i)) is not None and p.op_type == "DequantizeLinear"
                                         for i in n.input[:2])]
    softmax_q = sum(1 for n in model.graph.node if n.op_type == "Softmax"
                    and any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], [])))
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
