"""The run report: a markdown document (also a Prefect artifact) and a machine-readable summary.json."""

from __future__ import annotations

from typing import Any


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f} MB"


def render_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# clip-fp8 run `{summary['run']}`", ""]
    lines.append(f"Model `{summary.get('model', {}).get('source', '?')}`; "
                 f"promotable: **{summary.get('promotable')}**; status: **{summary['status']}**.")
    if summary.get("error"):
        lines += ["", f"> {summary['error']}"]
    lines += ["", "## Stages", "", "| stage | status | seconds | note |", "|---|---|---|---|"]
    for name, stage in summary["stages"].items():
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']:.2f} | {stage.get('note', '')} |")
    if summary.get("all_cached"):
        lines += ["", "Nothing changed since the last run: every stage came from the cache."]

    if summary.get("audit_markdown"):
        lines += ["", summary["audit_markdown"].split("\n| module |")[0].rstrip()]
    if summary.get("metrics_markdown"):
        lines += ["", summary["metrics_markdown"].rstrip()]

    onnx = summary.get("onnx") or {}
    if onnx:
        lines += ["", "## ONNX encoders (after surgery)", "",
                  "| encoder | FP16 | FP8 | FP8/FP16 | FP8 GEMMs with FP8 inputs | softmax outputs quantized | ORT cosine (min) | TensorRT-RTX pre-flight (raw → repaired) |",
                  "|---|---|---|---|---|---|---|---|"]
        for enc in ("text", "image"):
            fp16, fp8 = onnx.get(f"fp16_{enc}"), onnx.get(f"fp8_{enc}")
            if not fp16 or not fp8:
                continue
            c = fp8["census"]
            pf_raw = fp8.get("preflight_raw", {})
            pf = fp8.get("preflight", {})
            verdict = "skipped" if "skipped" in pf else (
                f"{'accepted' if pf_raw.get('parsed') else 'rejected'} → {'built' if pf.get('built') else 'FAILED'}")
            lines.append(
                f"| {enc} | {_mb(fp16['bytes'])} | {_mb(fp8['bytes'])} | {fp8['bytes'] / fp16['bytes']:.2f} | "
                f"{c['gemms_fp8_inputs']} / {c['gemms']} | {c['softmax_quantized']} / {c['softmax']} | "
                f"{fp8['onnxruntime']['min_cosine']:.4f} | {verdict} |")
        not_fp8 = sorted({g for k, v in onnx.items() if k.startswith("fp8") for g in v["census"]["gemms_not_fp8"]})
        if not_fp8:
            lines += ["", "GEMMs left in FP16 in the FP8 graphs: " + ", ".join(f"`{g}`" for g in not_fp8)]
    lines += ["", "## Artifacts", ""] + [f"- {k}: `{v}`" for k, v in summary.get("artifacts", {}).items()]
    return "\n".join(lines) + "\n"
