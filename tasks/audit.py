"""Stage audit: what was really quantized, reviewed like a security policy rather than trusted.

Input is the quantizer table ``quantize`` wrote. The audit lists every module with quantizers, what
is enabled, each amax, what was excluded and by which rule, and fails when coverage differs from
what the configuration asked for: a Linear in scope left unquantized, an enabled quantizer that
calibration never reached (amax missing), or attention requested but no attention quantizer live.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict

import json
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import QuantizationConfig
from clip_fp8.errors import AuditError, collected
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.quantizer_names import ATTENTION_QUANTIZERS


def _tower(module: str) -> str:
    if module.startswith("vision_model") or module.startswith("visual_projection"):
        return "image"
    if module.startswith("text_model") or module.startswith("text_projection"):
        return "text"
    return "other"


def _exclusion_reason(row: dict, cfg: QuantizationConfig, recovered: dict[str, str]) -> str | None:
    for pattern in cfg.exclude:
        if fnmatch.fnmatchcase(row["name"], pattern) or fnmatch.fnmatchcase(row["module"], pattern):
            return f"quantization.exclude '{pattern}'"
    for pattern, why in recovered.items():
        if fnmatch.fnmatchcase(row["name"], pattern) or fnmatch.fnmatchcase(row["module"], pattern):
            return f"quantization.recovery '{pattern}' ({why})"
    if row["module_base"] == "Embedding":
        return "embedding lookup (no GEMM)"
    if row["module_base"] == "LayerNorm" and not cfg.quantize_layernorm:
        return "LayerNorm (quantization.quantize_layernorm=false)"
    if row["quantizer"] == "output_quantizer":
        return "outputs are quantized by the next layer's input quantizer"
    if row["quantizer"] == "p_bmm_quantizer":
        return "softmax output: never called on the SDPA path; the exporter quantizes it in the graph"
    if row["quantizer"] in ATTENTION_QUANTIZERS and not cfg.quantize_attention:
        return "attention (quantization.quantize_attention=false)"
    return None


def coverage(rows: list[dict], cfg: QuantizationConfig, recovered: dict[str, str] | None = None) -> dict:
    """Coverage per module and tower from the quantizer table, and every gap found (``problems``).
    ``recovered``: exclusions recovery added (pattern -> why), told apart from the user's."""
    recovered = recovered or {}
    by_module: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_module[row["module"]].append(row)

    problems: list[str] = []
    modules = []
    towers: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for module, qs in by_module.items():
        enabled = {q["quantizer"]: q["amax"] for q in qs if q["enabled"]}
        disabled = [q for q in qs if not q["enabled"] and not q["hard_disabled"]]
        reasons = sorted({r for q in disabled if (r := _exclusion_reason(q, cfg, recovered))})
        unexplained = [q["quantizer"] for q in disabled if _exclusion_reason(q, cfg, recovered) is None]
        base = qs[0]["module_base"]
        tower = _tower(module)
        entry = {"module": module, "class": qs[0]["module_class"], "base": base, "tower": tower,
                 "enabled": enabled, "excluded": reasons, "unexplained": unexplained}
        modules.append(entry)

        for q, amax in enabled.items():
            if amax is None or not amax > 0:
                problems.append(f"{module}.{q} is enabled but was never calibrated (amax {amax})")
        if base == "Linear":
            towers[tower]["linear_total"] += 1
            in_scope = not any(r.startswith(("quantization.exclude", "quantization.recovery")) for r in reasons)
            if in_scope:
                towers[tower]["linear_in_scope"] += 1
                if {"input_quantizer", "weight_quantizer"} <= enabled.keys():
                    towers[tower]["linear_quantized"] += 1
                else:
                    problems.append(f"Linear {module} is in scope but left unquantized (enabled: {sorted(enabled) or 'none'})")
        if any(q["quantizer"] in ATTENTION_QUANTIZERS for q in qs):
            towers[tower]["attention_total"] += 1
            # An attention the user or recovery left in FP16 is out of scope, like an excluded Linear.
            if not any(r.startswith(("quantization.exclude", "quantization.recovery")) for r in reasons):
                towers[tower]["attention_in_scope"] += 1
            if all(enabled.get(q) for q in ATTENTION_QUANTIZERS):
                towers[tower]["attention_quantized"] += 1
        if base == "Conv2d" and enabled:
            towers[tower]["conv_quantized"] += 1

    attention_live = sum(t["attention_quantized"] for t in towers.values())
    if cfg.quantize_attention:
        attention_total = sum(t["attention_total"] for t in towers.values())
        in_scope = sum(t["attention_in_scope"] for t in towers.values())
        if attention_total == 0:
            problems.append("quantization.quantize_attention is on but no attention module has Q/K/V quantizers "
                            "(was CLIPAttention registered with ModelOpt before quantizing?)")
        elif attention_live < in_scope:
            problems.append(f"only {attention_live} of {in_scope} attention modules in scope have calibrated Q/K/V "
                            "quantizers (SDPA path required: an eager attention is never hooked)")
    for name in ("image", "text"):
        if towers[name]["linear_in_scope"] and towers[name]["linear_quantized"] == 0:
            problems.append(f"the {name} tower has no quantized Linear")

    summary = {
        "quantizers_enabled": sum(r["enabled"] for r in rows),
        "quantizers_total": len(rows),
        "towers": {k: dict(v) for k, v in towers.items()},
        "exclusions": {"user": list(cfg.exclude), "recovery": recovered},
        "modules": modules,
        "problems": problems,
        "passed": not problems,
    }
    return summary


def audit_markdown(summary: dict) -> str:
    lines = ["## Quantization audit", ""]
    lines.append(f"Enabled quantizers: {summary['quantizers_enabled']} of {summary['quantizers_total']}. "
                 f"Result: **{'passed' if summary['passed'] else 'FAILED'}**.")
    lines += ["", "| tower | Linear quantized / in scope / total | attention Q/K/V quantized / total |", "|---|---|---|"]
    for tower, t in sorted(summary["towers"].items()):
        lines.append(f"| {tower} | {t.get('linear_quantized', 0)} / {t.get('linear_in_scope', 0)} / "
                     f"{t.get('linear_total', 0)} | {t.get('attention_quantized', 0)} / {t.get('attention_total', 0)} |")
    exclusions = summary["exclusions"]
    lines += ["", f"Exclusions from the user (quantization.exclude): {', '.join(f'`{p}`' for p in exclusions['user']) or 'none'}; "
              f"from recovery: {', '.join(f'`{p}` ({why})' for p, why in exclusions['recovery'].items()) or 'none'}."]
    if summary["problems"]:
        lines += ["", "Problems:"] + [f"- {p}" for p in summary["problems"]]
    lines += ["", "| module | class | enabled quantizers (amax) | excluded because |", "|---|---|---|---|"]
    for m in summary["modules"]:
        enabled = ", ".join(f"{q.replace('_quantizer', '')} {a:.3g}" if a is not None else f"{q} (uncalibrated)"
                            for q, a in sorted(m["enabled"].items())) or "—"
        lines.append(f"| `{m['module']}` | {m['class']} | {enabled} | {'; '.join(m['excluded']) or '—'} |")
    return "\n".join(lines) + "\n"


@stage()
def audit(quantized: ArtifactRef, cfg: Reads[QuantizationConfig, "exclude", "quantize_attention", "quantize_layernorm"],
          out_dir: Path) -> StageOutput:
    """Review the quantizer table; raise ``AuditError`` naming every gap (the table goes to the UI either way)."""
    summary = coverage(json.loads(quantized.file("quantizers").read_text()), cfg, quantized.meta.get("recovered"))
    overview, modules = audit_markdown(summary).split("\n| module |", 1)
    reports = {"quantization-audit": overview.rstrip() + "\n", "quantization-audit-details": "| module |" + modules}
    if not summary["passed"]:
        raise collected(AuditError, "quantization audit failed", summary["problems"], reports)
    (out_dir / "audit.json").write_text(json.dumps(summary, indent=1))
    facts = {k: summary[k] for k in ("towers", "exclusions", "quantizers_enabled", "quantizers_total")}
    return StageOutput(files={"audit": "audit.json"}, reports=reports, meta=facts, summary={"audit": facts},
                       shown={"audit": "audit"})
