"""The pipeline at production size, end to end through the real flow: wall time, stage spans, peak GPU memory.

CLIP ViT-L/14 (laion2B-s32B-b82K architecture) with random weights, and the generated shapes data
resized by the model's own processor to 224x224 (the real checkpoint and COCO cannot be downloaded
where this runs; shapes, batch sizes and sample counts are the production ones: 8,192 calibration
pairs at batch 512). It runs ``clip_fp8_pipeline`` itself, the Prefect flow with its DAG and cache
(a temporary Prefect server, as ``clip-fp8 run`` uses, started before the first timed run as a deployed
server would be), three times on one store:

- ``cold``: an empty store;
- ``requantize``: new calibration data (another seed), same model: only the FP8 side is recomputed;
- ``unchanged``: the same parameters again, every stage from the cache;
- ``reevaluate`` (ask for it with ``--runs``): another evaluation seed, so evaluate runs alone.

Each run also records, once a second, how many cores the host and the flow's own process kept busy, and
each stage's mean of those over its span: whether stages that run side by side wait for the CPU;
``--stacks`` adds where each stage's thread is, once a second (what a stage that uses no CPU waits for).

    python benchmarks/bench_pipeline.py --work /tmp/vitl --out pipeline.json [--calibration 8192] [--batch 512] \
        [--set evaluation.runtimes=[fakequant]] [--runs cold,requantize] [--stacks]

Targets (docs/benchmarks.md): cold run at least 25 % below the sequential pipeline's sum of stage times;
re-quantization at most 60 % of the cold run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
from bench_encoders import VIT_L_14  # this folder is on sys.path when the script runs

def make_checkpoint(path: Path) -> None:
    """A transformers CLIP directory of ViT-L/14 shape: random weights, the embedded tokenizer, a 224 processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from clip_fp8.tasks.checkpoints import EMBEDDED_MODELS, load_processor

    tokenizer = load_processor(EMBEDDED_MODELS["tiny-clip-shapes"]).tokenizer
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"))}
    text = dict(VIT_L_14["text_config"], bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["eos"])
    config = CLIPConfig(text_config=text, vision_config=VIT_L_14["vision_config"], projection_dim=VIT_L_14["projection_dim"])
    torch.manual_seed(0)
    model = CLIPModel(config)
    model.save_pretrained(path, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])  # laion2b's normalisation
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)


# The project's own modules (clip_fp8/, flows/, tasks/, deployments/ of this checkout), not libraries or this script.
PROJECT_CODE = tuple(str(Path(__file__).resolve().parents[1] / d) + os.sep for d in ("clip_fp8", "flows", "tasks", "deployments"))


class CpuSampler(threading.Thread):
    """Once a second: cores busy on the whole host and in this process (the flow's own stages; export
    workers are other processes), cores' worth of I/O wait, from /proc. Says whether stages that run side
    by side wait for the CPU. With ``stacks``, also where each stage's thread is at that moment (its
    innermost frame and innermost frame of this project): what a stage that uses no CPU waits for."""

    def __init__(self, interval: float = 1.0, stacks: bool = False):
        super().__init__(daemon=True)
        self.interval, self.want_stacks, self.stopped = interval, stacks, threading.Event()
        self.samples: list[list[float]] = []
        self.stacks: list[list] = []

    @staticmethod
    def _host() -> tuple[int, int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], fields[4], sum(fields)  # busy, iowait, total

    @staticmethod
    def _self() -> int:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads

    @staticmethod
    def _stage_frames() -> dict[str, str]:
        names = {t.ident: t.name for t in threading.enumerate()}
        where = {}
        for ident, frame in sys._current_frames().items():
            inner, ours = frame, None
            while frame is not None:
                if ours is None and frame.f_code.co_filename.startswith(PROJECT_CODE):
                    ours = frame
                frame = frame.f_back
            if ours is not None and ident != threading.get_ident():
                fmt = lambda f: f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {f.f_code.co_name}"  # noqa: E731
                where[names.get(ident, str(ident))] = f"{fmt(inner)} <- {fmt(ours)}"
        return where

    def run(self) -> None:
        t0 = time.perf_counter()
        busy0, wait0, total0 = self._host()
        own0 = self._self()
        while not self.stopped.wait(self.interval):
            busy, wait, total = self._host()
            own = self._self()
            core = max(1, total - total0) / (os.cpu_count() or 1)  # ticks of one core in this interval
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            t = round(time.perf_counter() - t0, 1)
            self.samples.append([t, round((busy - busy0) / core, 2), round((own - own0) / core, 2),
                                 round((wait - wait0) / core, 2), running])
            if self.want_stacks:
                self.stacks.append([t, self._stage_frames()])
            busy0, wait0, total0, own0 = busy, wait, total, own

    def stop(self) -> list[list[float]]:
        self.stopped.set()
        self.join()
        return self.samples


def busy_cores(samples: list[list[float]], start: float, end: float) -> dict:
    """Mean cores busy (host, this process) and waiting for I/O over [start, end] seconds of a run."""
    inside = [s for s in samples if start <= s[0] <= end + 1]
    if not inside:
        return {}
    return {"host": round(sum(s[1] for s in inside) / len(inside), 1),
            "flow_process": round(sum(s[2] for s in inside) / len(inside), 1),
            "iowait": round(sum(s[3] for s in inside) / len(inside), 1)}


def start_prefect_server() -> float:
    """The temporary Prefect server, started (and its database created) before any timed run: a deployed
    server is up before a run starts, and a first start on a fresh host (its database migrations) took 16-19 s
    on the H200 host, 18 s on the 2-core machine; the time is in the output's meta, not in any run's wall."""
    from prefect import flow

    @flow(name="bench-pipeline-warm-up")
    def warm_up() -> None:
        return None

    t0 = time.perf_counter()
    warm_up()
    return time.perf_counter() - t0


def run_once(label: str, config, runs: list[dict], out: Path, meta: dict, stacks: bool = False) -> dict:
    from clip_fp8.flows.pipeline import clip_fp8_pipeline

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sampler = CpuSampler(stacks=stacks)
    sampler.start()
    t0 = time.perf_counter()
    try:
        summary, error = clip_fp8_pipeline(config), None
    except Exception as exc:  # keep the numbers of what ran: the run folder has its summary
        summary, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    wall = time.perf_counter() - t0
    cpu = sampler.stop()
    if summary is None:
        latest = Path(config.output.root) / "runs" / "latest" / "summary.json"
        summary = json.loads(latest.read_text()) if latest.exists() else {"stages": {}}
    row = {"run": label, "wall_s": wall, "error": error, "status": summary.get("status"),
           "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
           "stages": summary["stages"],
           "stage_seconds_sum": sum(s.get("seconds", 0.0) for s in summary["stages"].values()),
           "cpu_samples": cpu,
           "cpu_columns": ["s", "host_cores_busy", "flow_process_cores_busy", "host_cores_iowait", "running_threads"]}
    if stacks:
        row["stage_stacks"] = sampler.stacks
    # Stage spans are from the flow's start, the samples from the call's: close enough at 1 s resolution.
    for stage in row["stages"].values():
        if "start_s" in stage:
            stage["cores_busy"] = busy_cores(cpu, stage["start_s"], stage["end_s"])
    for key in ("audit", "onnx"):
        if key in summary:
            row[key] = summary[key]
    runs.append(row)
    print(f"{label:11} {wall:8.1f} s wall, {row['stage_seconds_sum']:8.1f} s of stage work  {error or summary.get('status')}",
          flush=True)
    for name, stage in summary["stages"].items():
        span = f"{stage.get('start_s', 0):7.1f} .. {stage.get('end_s', 0):7.1f}" if "start_s" in stage else " " * 18
        busy = stage.get("cores_busy", {})
        cores = (f"cores busy {busy['host']:4.1f} (flow {busy['flow_process']:4.1f}, iowait {busy['iowait']:4.1f})"
                 if busy else " " * 42)
        print(f"    {name:16} {stage['status']:10} {stage.get('seconds', 0):8.1f} s  {span}  {cores}  {stage.get('note', '')[:60]}")
    out.write_text(json.dumps({"runs": runs, "meta": meta}, indent=1, default=str))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clip-fp8-vitl"))
    parser.add_argument("--out", type=Path, default=Path("bench_pipeline.json"))
    parser.add_argument("--calibration", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--check-samples", type=int, default=4)
    parser.add_argument("--model", default="vit-l-14",
                        help="vit-l-14 (random weights, built here) or any model.source, e.g. embedded:tiny-clip-shapes")
    parser.add_argument("--runs", default="cold,requantize,unchanged", help="which runs, in order (cold, requantize, unchanged, reevaluate)")
    parser.add_argument("--stacks", action="store_true",
                        help="record where each stage's thread is once a second (what a stage that uses no CPU waits on)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="more PipelineConfig overrides, as `clip-fp8 run --set` takes them (repeatable)")
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from clip_fp8.config import PipelineConfig

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    source = str(args.work / "vit-l-14") if args.model == "vit-l-14" else args.model
    config = PipelineConfig().with_overrides([
        f"model.source={source}", f"calibration.num_samples={args.calibration}", f"calibration.batch_size={args.batch}",
        f"evaluation.num_samples={args.eval_samples}", "evaluation.batch_size=250", f"export.check_samples={args.check_samples}",
        f"output.root={args.work / 'out'}", "evaluation.on_gate_failure=mark",  # random weights: the gate means nothing
        *args.overrides,
    ])
    meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "modelopt": __import__("importlib.metadata").metadata.version("nvidia-modelopt"),
            "prefect": __import__("prefect").__version__, "onnx_version": __import__("onnx").__version__,
            "onnxruntime": __import__("onnxruntime").__version__, "command": " ".join(sys.argv),
            "config": config.model_dump(mode="json")}
    if args.model == "vit-l-14":
        t0 = time.perf_counter()
        make_checkpoint(args.work / "vit-l-14")
        meta["make_checkpoint_s"] = time.perf_counter() - t0
    meta["prefect_server_start_s"] = start_prefect_server()
    print(f"temporary Prefect server started in {meta['prefect_server_start_s']:.1f} s (not in any run's wall)")
    runs: list[dict] = []
    variants = {"cold": config, "requantize": config.with_overrides(["calibration.seed=1"]),
                "unchanged": config.with_overrides(["calibration.seed=1"]),
                # Only the evaluation changes: evaluate (baseline + fake-quant) runs alone, the sequential pipeline's
                # evaluate step as it would take on this host.
                "reevaluate": config.with_overrides(["calibration.seed=1", "evaluation.seed=2"])}
    for label in args.runs.split(","):
        run_once(label, variants[label], runs, args.out, meta, stacks=args.stacks)
    by = {r["run"]: r for r in runs}
    if "cold" in by and "requantize" in by:
        meta["requantize_over_cold"] = by["requantize"]["wall_s"] / by["cold"]["wall_s"]
    if "cold" in by:
        meta["cold_wall_over_stage_sum"] = by["cold"]["wall_s"] / max(1e-9, by["cold"]["stage_seconds_sum"])
    args.out.write_text(json.dumps({"runs": runs, "meta": meta}, indent=1, default=str))
    print(json.dumps({k: v for k, v in meta.items() if k.endswith(("_over_cold", "_over_stage_sum", "_s"))}, indent=1))


if __name__ == "__main__":
    main()
