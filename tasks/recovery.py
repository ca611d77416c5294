"""Stage recovery: after a failed quality gate, what each attempt reached and which exclusions to make.

The flow runs it when the first attempt failed its gate and ``quantization.recovery`` is ``suggest`` or
``auto``, with the sensitivity ranking and every attempt's evaluation (attempt k is re-quantized with
the k most sensitive units in FP16, in the order ``plan`` gives). It tabulates the attempts, plots the
gated metric against the share of GEMM work left in FP8 (the gate line and the chosen point marked), and
decides:

- ``suggest``: the gate failed; the error names the units to exclude, most sensitive first, as a ready
  ``--set`` (those scoring at least a tenth of the top score, at most five, within the FP16 budget);
- ``auto``: the last attempt passed: done, its checkpoint is what ships. Otherwise the budget ran out:
  the error says the best value of the gated metric reached and at what FP16 share.

It never raises: its verdict (``message``) is what the ``gate`` stage says when the last attempt still fails.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.plotting import pyplot, save_png
from clip_fp8.stage import StageOutput, stage
from clip_fp8.tasks.gate import quality_gate

SUGGESTED_MAX = 5
SUGGESTED_MIN_SCORE = 0.1  # of the top unit's score


def fp16_share(ranking: dict, excluded: list[str]) -> float:
    """Share of the GEMM multiply-accumulates per pair left in FP16: the user's exclusions plus ``excluded`` units."""
    units = {u["unit"]: u for u in ranking["units"]}
    fp16 = sum(u["macs"] for u in ranking["fp16_units"]) + sum(units[name]["macs"] for name in excluded)
    return fp16 / ranking["total_macs"]


def plan(ranking: dict, max_fp16_fraction: float) -> list[dict]:
    """The units recovery may exclude, most sensitive first, while the FP16 share stays within the budget."""
    chosen: list[dict] = []
    for unit in ranking["units"]:
        if fp16_share(ranking, [u["unit"] for u in [*chosen, unit]]) > max_fp16_fraction + 1e-12:
            break
        chosen.append(unit)
    return chosen


def exclusion_reasons(units: list[dict]) -> dict[str, str]:
    """Exclusion pattern -> why, for quantize and the audit (rank 1 is the most sensitive unit)."""
    return {u["exclude"]: f"sensitivity rank {rank}, KL {u['score']:.3g}" for rank, u in enumerate(units, 1)}


def out_of_budget(ranking: dict, max_fp16_fraction: float) -> str:
    """What to say when not even the most sensitive unit fits the FP16 budget: which units, and the budget that
    would admit the first of them."""
    top = ranking["units"][:SUGGESTED_MAX]
    if not top:
        return "no unit was scored; nothing recovery could leave in FP16"
    needed = fp16_share(ranking, [top[0]["unit"]])
    return (f"no unit fits in quantization.max_fp16_fraction {max_fp16_fraction} (the user's exclusions alone leave "
            f"{fp16_share(ranking, []):.2%} of the GEMM work in FP16); the most sensitive: "
            f"{', '.join(u['exclude'] for u in top)}; quantization.max_fp16_fraction={needed:.4f} admits the first")


def set_flag(patterns: list[str]) -> str:
    return "--set 'quantization.exclude=[" + ", ".join(f'"{p}"' for p in patterns) + "]'"


def gated_metric(gate: dict) -> dict:
    """The first attempt's metric furthest over its limit: the one the trade-off plot follows."""
    failed = [r for r in gate["rows"] if not r["passed"]]
    return max(failed, key=lambda r: (r["baseline"] - r["fp8"]) - r["max_drop"])


def plot_tradeoff(points: list[dict], metric: dict, chosen: int | None, path: Path) -> bytes:
    """The gated metric against the share of GEMM work in FP8: the baseline, each attempt, the gate line."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [100 * (1 - p["fp16_share"]) for p in points]
    ys = [p["value"] for p in points]
    ax.plot(xs, ys, marker="o", label="FP8 attempts (k most sensitive units in FP16)")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(str(p["attempt"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([0], [metric["baseline"]], marker="s", color="gray", label="baseline (no FP8)")
    ax.axhline(metric["baseline"] - metric["max_drop"], color="red", linestyle="--", label="gate")
    if chosen is not None:
        ax.scatter([xs[chosen]], [ys[chosen]], s=160, facecolors="none", edgecolors="green", linewidths=2, label="chosen")
    ax.set_xlabel("share of GEMM multiply-accumulates in FP8 (%)")
    ax.set_ylabel(metric["metric"].rsplit("/", 1)[-1])
    ax.set_title(f"FP8 coverage vs {metric['metric']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_png(fig, path, dpi=100)


def recovery_markdown(result: dict, png: bytes) -> str:
    lines = ["## Recovery", "", f"Mode `{result['mode']}`; gated metric `{result['metric']}` (gate "
             f"{result['gate_line']:.4f}); FP16 budget {result['max_fp16_fraction']:.0%} of the GEMM work.", "",
             "| attempt | units in FP16 by recovery | FP16 share | gated metric | gate |", "|---|---|---|---|---|"]
    for p in result["attempts"]:
        units = ", ".join(f"`{u}`" for u in p["units"]) or "—"
        lines.append(f"| {p['attempt']} | {units} | {p['fp16_share']:.2%} | {p['value']:.4f} | "
                     f"{'pass' if p['passed'] else 'FAIL'} |")
    lines += ["", result["verdict"], "", f"![gated metric vs FP8 share](data:image/png;base64,{base64.b64encode(png).decode()})"]
    return "\n".join(lines) + "\n"


@stage()
def recovery(sensitivity: ArtifactRef, evaluations: list[ArtifactRef], recovered: list[str], mode: str,
             max_fp16_fraction: float, user_exclude: list[str], max_drop: dict[str, float], out_dir: Path) -> StageOutput:
    """Tabulate and plot the attempts (``evaluations[k]`` had ``recovered[:k]`` in FP16); pass, or say what next."""
    ranking = json.loads(sensitivity.file("sensitivity").read_text())
    units = {u["unit"]: u for u in ranking["units"]}
    gates = [quality_gate(m["baseline"], m["fp8"], max_drop)
             for m in (json.loads(e.file("metrics").read_text()) for e in evaluations)]
    metric = gated_metric(gates[0])
    attempts = []
    for k, gate in enumerate(gates):
        row = next(r for r in gate["rows"] if r["metric"] == metric["metric"])
        attempts.append({"attempt": k, "units": recovered[:k], "fp16_share": fp16_share(ranking, recovered[:k]),
                         "value": row["fp8"], "passed": gate["passed"], "failures": gate["failures"]})
    passed = attempts[-1]["passed"]
    best = max(attempts, key=lambda a: a["value"])
    if mode == "auto" and passed:
        verdict = (f"Passed the gate at attempt {len(attempts) - 1} with {attempts[-1]['fp16_share']:.2%} of the GEMM work "
                   f"in FP16: {', '.join(recovered) or 'no unit'} left unquantized by recovery.")
        suggestion: list[str] = []
    elif mode == "auto":
        verdict = (f"quality gate not met within quantization.max_fp16_fraction {max_fp16_fraction}: best "
                   f"{metric['metric']} {best['value']:.4f} (gate {metric['baseline'] - metric['max_drop']:.4f}) at "
                   f"{best['fp16_share']:.2%} FP16 after {len(attempts) - 1} exclusion(s); raise "
                   "quantization.max_fp16_fraction or evaluation.max_drop")
        suggestion = []
    else:
        top = ranking["units"][0]["score"] if ranking["units"] else 0.0
        picks = [u for u in plan(ranking, max_fp16_fraction) if u["score"] >= SUGGESTED_MIN_SCORE * top][:SUGGESTED_MAX]
        suggestion = [*user_exclude, *(u["exclude"] for u in picks)]
        verdict = (f"leave in FP16, most sensitive first: {', '.join(u['exclude'] for u in picks)}, i.e. "
                   f"{set_flag(suggestion)} (or quantization.recovery=auto)" if picks
                   else out_of_budget(ranking, max_fp16_fraction))
    chosen = len(attempts) - 1 if passed else None
    result = {"mode": mode, "metric": metric["metric"], "gate_line": metric["baseline"] - metric["max_drop"],
              "max_fp16_fraction": max_fp16_fraction, "attempts": attempts, "passed": passed, "verdict": verdict,
              "suggestion": suggestion, "chosen": chosen,
              "units": [{"unit": name, "score": units[name]["score"], "exclude": units[name]["exclude"]} for name in recovered]}
    png = plot_tradeoff(attempts, metric, chosen, out_dir / "tradeoff.png")
    (out_dir / "recovery.json").write_text(json.dumps(result, indent=1))
    reports = {"recovery": recovery_markdown(result, png)}
    message = verdict
    if not passed and mode == "suggest":
        failures = attempts[-1]["failures"]
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        message = f"quality gate failed: {failures[0]}{more}; {verdict}"
    facts = {"passed": passed, "verdict": verdict, "message": message, "attempts": len(attempts),
             "note": f"{'passed' if passed else 'not passed'} after {len(attempts) - 1} exclusion(s), "
                     f"{attempts[-1]['fp16_share']:.2%} of the GEMM work in FP16",
             "fp16_share": attempts[-1]["fp16_share"], "suggestion": suggestion}
    return StageOutput(files={"recovery": "recovery.json", "tradeoff": "tradeoff.png"}, reports=reports, meta=facts,
                       summary={"recovery": facts}, shown={"tradeoff_plot": "tradeoff"})
