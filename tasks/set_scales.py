"""Stage set_scales: the exported FP8 graphs with the quantized checkpoint's calibrated scales written in.

``export`` exports the FP8 graphs from the model quantized with placeholder activation scales (their structure
and FP8 weights do not depend on calibration). Each FP8 Q/DQ scale there is a constant made from one quantizer's
amax by ModelOpt's ONNX symbolic, ``1 / (448 / amax)`` in the traced dtype (the quantize scale cast from FP32,
the dequantize scale built in that dtype), then converted by onnxconverter-common's FP16 conversion when the
trace was FP32, then a zero made the smallest FP16 (``replace_zero_scale_with_smallest_nonzero``). The same
arithmetic on the checkpoint's amax gives the graph ModelOpt exports from the checkpoint, byte for byte
(tests/test_export.py). Before replacing anything this stage recomputes every placeholder scale from the amax it
was exported with and checks each weight's amax against the checkpoint's; if a scale differs (another ModelOpt,
other weights, other quantizers) or is named after no quantizer and is not one of the exporter's fixed scales,
it exports the checkpoint afresh instead and says why in its meta: slower, never stale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import ExportConfig, ModelConfig
from clip_fp8.errors import ScaleTransferError, collected
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.checkpoints import ModelSettings
from clip_fp8.tasks.export import ENCODERS, ExportSettings, export_both

FP8_E4M3_MAX = 448.0
# ModelOpt's replacement for a zero scale (modelopt.onnx.quantization.qdq_utils).
SMALLEST_FP16_SCALE = 6e-08
# A Q/DQ scale made from a quantizer's amax: /<module path>/<name>_quantizer/Constant[_k]_output_0.
QUANTIZER_SCALE = re.compile(r"^/(?P<quantizer>.+_quantizer)/Constant(?:_\d+)?_output_0$")
# Scales the exporter computes without calibration: softmax outputs (1/448) and Conv weights (from the weights).
FIXED_SCALE = re.compile(r"/(softmax_q_scale|softmax_dq_scale|weight_quantizer/scale)$")


def scale_value(amax: float, op_type: str, traced_dtype: str, stored):
    """The scale ModelOpt's export writes for ``amax`` at a Q or DQ node, in the stored dtype and shape."""
    import numpy as np
    import torch
    from onnxconverter_common.float16 import convert_np_to_float16

    dtype, inverse = getattr(torch, traced_dtype), 1.0 / (FP8_E4M3_MAX / float(amax))
    value = torch.tensor(inverse, dtype=dtype) if op_type.endswith("DequantizeLinear") else torch.tensor(inverse).to(dtype)
    array = np.atleast_1d(value.numpy())
    if stored.dtype == np.float16 and array.dtype == np.float32:
        array = convert_np_to_float16(array)
    array = np.where(array == 0, np.float16(SMALLEST_FP16_SCALE), array).astype(stored.dtype)
    return array.reshape(stored.shape)


def transfer_scales(model, placeholder: dict, calibrated: dict[str, float | None]) -> int:
    """Replace the placeholder activation scales of ``model`` (an ``onnx.ModelProto``) with the calibrated ones;
    return how many initializers changed. Raises ``ScaleTransferError`` naming every scale it cannot account for."""
    from onnx import numpy_helper

    from clip_fp8.tasks.onnx_passes import QDQ_OPS

    initializers = {init.name: init for init in model.graph.initializer}
    amax, traced = placeholder["amax"], placeholder["dtype"]
    failures, updates = [], {}
    if set(amax) != set(calibrated):
        only = sorted(set(amax) ^ set(calibrated))
        failures.append(f"enabled quantizers differ between the export and the checkpoint: {only[:3]}")
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in initializers:
            failures.append(f"{node.name}: scale {name} is not an initializer")
            continue
        match = QUANTIZER_SCALE.match(name)
        if match is None:
            if not FIXED_SCALE.search(name):
                failures.append(f"{node.name}: scale {name} is named after no quantizer")
            continue
        quantizer = match["quantizer"].strip("/").replace("/", ".")
        if amax.get(quantizer) is None or calibrated.get(quantizer) is None:
            failures.append(f"{name}: quantizer {quantizer} has no amax in the export or the checkpoint")
            continue
        stored = numpy_helper.to_array(initializers[name])
        if scale_value(amax[quantizer], node.op_type, traced, stored).tobytes() != stored.tobytes():
            failures.append(f"{name}: {stored.ravel()[:1]} is not the scale amax {amax[quantizer]} gives")
        elif quantizer.endswith("weight_quantizer"):
            if calibrated[quantizer] != amax[quantizer]:  # the FP8 weights in the graph are not the checkpoint's
                failures.append(f"{quantizer}: weight amax {calibrated[quantizer]} in the checkpoint, "
                                f"{amax[quantizer]} in the export")
        else:
            updates[name] = scale_value(calibrated[quantizer], node.op_type, traced, stored)
    if failures:
        raise collected(ScaleTransferError, "calibrated scales cannot be written into the export", failures)
    for name, value in updates.items():
        initializers[name].CopyFrom(numpy_helper.from_array(value, name))
    return len(updates)


@stage(retries=1)
def set_scales(exported: ArtifactRef, quantized: ArtifactRef, model_source: ArtifactRef, model_cfg: ModelSettings,
               cfg: ExportSettings, out_dir: Path) -> StageOutput:
    """Write ``fp8_{text,image}.onnx`` into ``out_dir``: ``exported`` (export[fp8]) with ``quantized``'s scales."""
    import onnx

    rows = json.loads(quantized.file("quantizers").read_text())
    calibrated = {row["name"]: row["amax"] for row in rows if row["enabled"]}
    source, graphs, changed = exported.local_dir(), [f"fp8_{e}" for e in ENCODERS], {}
    try:
        for graph in graphs:
            model = onnx.load(str(source / exported.files[graph]))
            placeholder = json.loads(exported.file(f"{graph}.amax").read_text())
            changed[graph] = transfer_scales(model, placeholder, calibrated)
            onnx.save(model, str(out_dir / f"{graph}.onnx"))
        meta = {"method": "rescaled", "scales_replaced": changed,
                "note": f"{sum(changed.values())} calibrated scales written into the placeholder export"}
    except ScaleTransferError as exc:
        for leftover in out_dir.iterdir():
            leftover.unlink()
        checkpoint = str(quantized.file("checkpoint"))
        print(f"set_scales: {exc.failures[0]} (+{len(exc.failures) - 1} more); exporting the checkpoint afresh")
        export_both("fp8", model_source.path, model_cfg, cfg, out_dir, checkpoint=checkpoint)
        meta = {"method": "exported", "why": exc.failures[:5], "note": f"exported afresh: {exc.failures[0]}"}
    return StageOutput(files={graph: f"{graph}.onnx" for graph in graphs}, meta=meta, shown={"raw_onnx_fp8": ""})
