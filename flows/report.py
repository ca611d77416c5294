"""The run report: a markdown document (also a Prefect artifact) and a machine-readable summary.json."""

from __future__ import annotations

from typing import Any

from clip_fp8.plotting import pyplot, save_png


# Each FP8 variant's FP16 counterpart in the same runtime: a TensorRT FP8 engine against the FP16 engine,
# torch-fp8 (compiled, CUDA graphs) against FP16 PyTorch compiled the same way.
FP16_COUNTERPART = {"fp8": "fp16", "torch-fp8": "pytorch-compile"}


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f} MB"


def render_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# clip-fp8 run `{summary['run']}`", ""]
    lines.append(f"Model `{summary.get('model', {}).get('source', '?')}`; "
                 f"promotable: **{summary.get('promotable')}**; status: **{summary['status']}**.")
    if summary.get("error"):
        lines += ["", f"> {summary['error']}"]
    lines += ["", "## Stages", "", "Stages of independent branches run at the same time; `start` and `end` are seconds "
              "since the run began.", "", "| stage | status | seconds | start | end | note |", "|---|---|---|---|---|---|"]
    for name, stage in summary["stages"].items():
        span = [f"{stage[k]:.1f}" if k in stage else "—" for k in ("start_s", "end_s")]
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']:.2f} | {span[0]} | {span[1]} | {stage.get('note', '')} |")
    if summary.get("all_cached"):
        lines += ["", "Nothing changed since the last run: every stage came from the cache."]

    # Each stage's own sections, in stage order (what it published), then what failing stages attached to their error.
    for markdown in [*summary.get("sections", []), *summary.get("failure_markdown", [])]:
        lines += ["", markdown.rstrip()]

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
    lines += _engines_section(summary.get("engines"), "##")
    lines += _benchmark_section(summary.get("benchmark"), "##")
    if summary.get("benchmark_png"):
        lines += ["", f"![latency and throughput](data:image/png;base64,{summary['benchmark_png']})"]
    for gpu, target in summary.get("targets", {}).items():
        lines += _target_section(gpu, target)
    lines += _history_section(summary)
    lines += ["", "## Artifacts", ""] + [f"- {k}: `{v}`" for k, v in summary.get("artifacts", {}).items()]
    return "\n".join(lines) + "\n"


def _engines_section(engines: dict | None, level: str) -> list[str]:
    """The engines of one target: ``{"target": Target, "engines": {name: facts}}``."""
    lines: list[str] = []
    if engines:
        t = engines["target"]
        lines += ["", f"{level} TensorRT engines", "",
                  f"Built with {t['backend']} {t['version']} for {t['gpu']} (compute capability {t['compute_capability'] or 'n/a'}).",
                  "", "| engine | size | build s | layers by precision |", "|---|---|---|---|"]
        for name, e in sorted(engines["engines"].items()):
            if "skip_reason" in e:
                lines.append(f"| {name} | — | — | skipped: {e['skip_reason']} |")
            else:
                precision = e["precision"] if isinstance(e["precision"], str) else \
                    ", ".join(f"{k} {v}" for k, v in sorted(e["precision"].items()))
                lines.append(f"| {name} | {_mb(e['engine_bytes'])} | {e['build_seconds']:.1f} | {precision} |")
    return lines


def _benchmark_section(bench: dict | None, level: str) -> list[str]:
    """The benchmark stage's rows: one per runtime, encoder and batch."""
    lines: list[str] = []
    if bench and bench.get("rows"):
        lines += ["", f"{level} Benchmark", "",
                  "| encoder | variant | batch | median ms | p99 ms | samples/s | cv | weights | activations | "
                  "FP8 vs FP16 (same runtime) | FP8 vs PyTorch eager |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        median = {(r["encoder"], r["variant"], r["batch"]): r["latency_median_ms"] for r in bench["rows"]}
        for r in sorted(bench["rows"], key=lambda r: (r["encoder"], r["batch"], r["variant"])):
            speedups = []
            for reference in (FP16_COUNTERPART.get(r["variant"]), "pytorch-eager"):
                ref = median.get((r["encoder"], reference, r["batch"]))
                fp8 = r["variant"] in FP16_COUNTERPART
                speedups.append(f"{ref / r['latency_median_ms']:.2f}x" if fp8 and ref else "")
            cv = f"{r['cv']:.3f}{' unstable' if r.get('unstable') else ''}" if r.get("cv") is not None else "—"
            memory = [_mb(r[k]) if r.get(k) is not None else "—" for k in ("weights_bytes", "activation_bytes")]
            lines.append(f"| {r['encoder']} | {r['variant']} | {r['batch']} | {r['latency_median_ms']:.3f} | "
                         f"{r.get('latency_p99_ms', float('nan')):.3f} | {r['throughput_samples_s']:.1f} | {cv} | "
                         f"{memory[0]} | {memory[1]} | {speedups[0]} | {speedups[1]} |")
    return lines


def _target_section(gpu: str, target: dict) -> list[str]:
    """One build target (``build.targets``): where its engines run went, its engines and their timings."""
    where = f"pool `{target['work_pool']}`" + (f", worker `{target['worker']}`" if target.get("worker") else "")
    lines = ["", f"## Build target: {gpu}", "",
             f"**{target['status']}**: engines run `{target.get('flow_run', '')}` on {where}."
             + (f" {target['reason']}" if target.get("reason") else "")]
    built = [b["meta"] for b in target.get("builds", []) if "engines" in b.get("meta", {})]
    if built:
        lines += _engines_section({"target": built[0]["target"],
                                   "engines": {k: v for meta in built for k, v in meta["engines"].items()}}, "###")
    skipped = [f"{b['meta'].get('variant', b['stage'])}: {b['meta']['skip_reason']}"
               for b in target.get("builds", []) if "skip_reason" in b.get("meta", {})]
    if skipped:
        lines += ["", "Not built: " + "; ".join(skipped)]
    bench = (target.get("benchmark") or {}).get("meta")
    lines += _benchmark_section(bench, "###")
    if bench and not bench.get("rows") and bench.get("skip_reason"):
        lines += ["", f"Not timed: {bench['skip_reason']}"]
    return lines


def warm_plotting() -> None:
    """Import matplotlib with its non-interactive backend now (the CLI does it while its server starts)."""
    pyplot()


def plot_benchmark(rows: list[dict], path) -> bytes:
    """Latency and throughput against batch size, one line per (encoder, variant); PNG bytes, also written to ``path``."""
    plt = pyplot()

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        series.setdefault((r["encoder"], r["variant"]), []).append(r)
    for (encoder, variant), points in sorted(series.items()):
        points.sort(key=lambda r: r["batch"])
        batches = [r["batch"] for r in points]
        lat.plot(batches, [r["latency_median_ms"] for r in points], marker="o", label=f"{encoder} {variant}")
        thr.plot(batches, [r["throughput_samples_s"] for r in points], marker="o", label=f"{encoder} {variant}")
    for ax, ylabel in ((lat, "median latency (ms)"), (thr, "throughput (samples/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    lat.legend(fontsize=8)
    return save_png(fig, path, dpi=110)


def _history_section(summary: dict[str, Any]) -> list[str]:
    """This run against the model's recent runs: regression verdict, promotion, history table, trend plot."""
    if "regression" not in summary:
        return []
    recent = summary.get("history_rows")
    regression, promotion = summary["regression"] or {}, summary.get("promotion") or {}
    lines = ["", "## History", ""]
    if regression.get("against") is None:
        lines.append("No promoted run of this model to compare with yet.")
    elif regression.get("reasons"):
        lines.append(f"**regressed** against the last promoted run `{regression['against']}`:")
        lines += [f"- {reason}" for reason in regression["reasons"]]
    else:
        lines.append(f"Not regressed against the last promoted run `{regression['against']}`.")
    if promotion.get("version") is not None:
        lines.append(f"\nPromoted as version **{promotion['version']}** to `{promotion['repository']}`.")
    elif promotion.get("skipped"):
        lines.append(f"\nNot promoted: {promotion['skipped']}.")
    if recent:
        columns = list(recent[0])
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in recent]
    if summary.get("trend_png"):
        lines += ["", f"![trend of the gated metrics and batch-128 latency](data:image/png;base64,{summary['trend_png']})"]
    return lines


def plot_trend(records: list[dict], path) -> bytes:
    """FP8 metrics (and batch-128 latency, where measured) over a model's runs; PNG bytes, also written to ``path``."""
    plt = pyplot()

    from clip_fp8.history import latency_b128

    runs = [r for r in records if r.get("kind", "run") == "run"]
    latency = {engine for r in runs for engine in latency_b128(r)}
    fig, axes = plt.subplots(1, 2 if latency else 1, figsize=(11 if latency else 7, 4), squeeze=False)
    x = list(range(len(runs)))
    labels = [r.get("time", "")[5:16].replace("T", " ") for r in runs]
    metrics = sorted({m for r in runs for m in r.get("metrics", {}).get("fp8", {})})
    ax = axes[0][0]
    for metric in metrics:
        ax.plot(x, [r.get("metrics", {}).get("fp8", {}).get(metric, float("nan")) for r in runs], marker="o",
                label=metric.split("/", 1)[-1])
    for i, r in enumerate(runs):
        if (r.get("regression") or {}).get("reasons"):
            ax.axvline(i, color="red", alpha=0.3)
        if (r.get("promotion") or {}).get("version") is not None:
            ax.annotate(f"v{r['promotion']['version']}", (i, ax.get_ylim()[1]), fontsize=8, ha="center", va="top")
    ax.set_title("FP8 metrics (red: regressed)")
    if latency:
        lat = axes[0][1]
        for engine in sorted(latency):
            lat.plot(x, [latency_b128(r).get(engine, float("nan")) for r in runs], marker="o", label=engine)
        lat.set_title("batch 128 median latency (ms)")
        lat.legend(fontsize=7)
    for a in axes[0]:
        a.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
        a.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    return save_png(fig, path, dpi=100)
