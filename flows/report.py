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
    lines += ["", "## Stages", "", "Stages of independent branches run at the same time; `start` and `end` are seconds "
              "since the run began.", "", "| stage | status | seconds | start | end | note |", "|---|---|---|---|---|---|"]
    for name, stage in summary["stages"].items():
        span = [f"{stage[k]:.1f}" if k in stage else "—" for k in ("start_s", "end_s")]
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']:.2f} | {span[0]} | {span[1]} | {stage.get('note', '')} |")
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
    engines = summary.get("engines")
    if engines:
        t = engines["target"]
        lines += ["", "## TensorRT engines", "",
                  f"Built with {t['backend']} {t['version']} for {t['gpu']} (compute capability {t['compute_capability'] or 'n/a'}).",
                  "", "| engine | size | build s | layers by precision |", "|---|---|---|---|"]
        for name, e in sorted(engines["engines"].items()):
            if "skip_reason" in e:
                lines.append(f"| {name} | — | — | skipped: {e['skip_reason']} |")
            else:
                precision = e["precision"] if isinstance(e["precision"], str) else \
                    ", ".join(f"{k} {v}" for k, v in sorted(e["precision"].items()))
                lines.append(f"| {name} | {_mb(e['engine_bytes'])} | {e['build_seconds']:.1f} | {precision} |")
    bench = summary.get("benchmark")
    if bench and bench.get("rows"):
        lines += ["", "## Benchmark", "",
                  "| encoder | variant | batch | median ms | p99 ms | samples/s | cv | weights | activations | "
                  "FP8 vs FP16 | FP8 vs PyTorch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        median = {(r["encoder"], r["variant"], r["batch"]): r["latency_median_ms"] for r in bench["rows"]}
        for r in sorted(bench["rows"], key=lambda r: (r["encoder"], r["batch"], r["variant"])):
            speedups = []
            for reference in ("fp16", "pytorch-eager"):
                ref = median.get((r["encoder"], reference, r["batch"]))
                speedups.append(f"{ref / r['latency_median_ms']:.2f}x" if r["variant"] == "fp8" and ref else "")
            cv = f"{r['cv']:.3f}{' unstable' if r.get('unstable') else ''}" if r.get("cv") is not None else "—"
            memory = [_mb(r[k]) if r.get(k) is not None else "—" for k in ("weights_bytes", "activation_bytes")]
            lines.append(f"| {r['encoder']} | {r['variant']} | {r['batch']} | {r['latency_median_ms']:.3f} | "
                         f"{r.get('latency_p99_ms', float('nan')):.3f} | {r['throughput_samples_s']:.1f} | {cv} | "
                         f"{memory[0]} | {memory[1]} | {speedups[0]} | {speedups[1]} |")
        if summary.get("benchmark_png"):
            lines += ["", f"![latency and throughput](data:image/png;base64,{summary['benchmark_png']})"]
    lines += ["", "## Artifacts", ""] + [f"- {k}: `{v}`" for k, v in summary.get("artifacts", {}).items()]
    return "\n".join(lines) + "\n"


def plot_benchmark(rows: list[dict], path) -> bytes:
    """Latency and throughput against batch size, one line per (encoder, variant); PNG bytes, also written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return open(path, "rb").read()
