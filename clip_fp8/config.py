"""The pipeline's one configuration model.

The CLI (``clip-fp8 run --set section.field=value``), config files (``--config FILE``, YAML or JSON)
and the Prefect UI's run form (the flow's parameter schema) all use ``PipelineConfig``: every field
has a default and a description, and the defaults are the embedded, CPU-only, offline run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_MODEL = "embedded:tiny-clip-shapes"
EMBEDDED_DATA = "embedded:shapes"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def read_mapping(path: str | Path, what: str, expected: str) -> dict:
    """A YAML or JSON file holding a mapping; a syntax error is one line with the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:  # one line: the file, the position, what the parser saw
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ValueError(f"{what} {where}: {getattr(exc, 'problem', None) or exc} (YAML; indent with "
                             "spaces, not tabs)") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} {path}:{exc.lineno}:{exc.colno}: {exc.msg} (JSON)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected {expected}, got {type(data).__name__}")
    return data


def yaml_off_is_off(value: Any) -> Any:
    """YAML 1.1 reads a bare `off` (in a config file or a --set) as false: for a setting whose choices include 'off'."""
    return "off" if value is False else value


class ModelConfig(Section):
    source: str = Field(
        EMBEDDED_MODEL,
        json_schema_extra={"locator": True},
        description="CLIP checkpoint: a local transformers directory, a Hugging Face Hub id "
        "(e.g. laion/CLIP-ViT-L-14-laion2B-s32B-b82K), `open_clip:<model name or model-config JSON>` "
        "(e.g. `open_clip:ViT-L-14`, weights from model.pretrained), or 'embedded:tiny-clip-shapes'.",
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) to pin; ignored for local paths.")
    pretrained: str | None = Field(
        None, json_schema_extra={"locator": True},
        description="open_clip weights: a checkpoint file (.safetensors; pickles need allow_pickle) or an open_clip "
        "pretrained tag (e.g. laion2b_s32b_b82k, downloaded by open_clip).",
    )
    allow_pickle: bool = Field(
        False, description="Accept a pickle (.pt/.bin) open_clip checkpoint; pickles can run code when loaded."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to run PyTorch stages; 'auto' picks CUDA when available."
    )
    dtype: Literal["auto", "float16", "float32"] = Field(
        "auto", description="Baseline precision; 'auto' is float16 on GPU and float32 on CPU."
    )


class CalibrationConfig(Section):
    source: str = Field(
        EMBEDDED_DATA,
        json_schema_extra={"locator": True},
        description="Image-caption pairs: 'embedded:shapes' (generated), `coco:<folder>` (images + captions JSON), "
        "`folder:<folder>` (images + captions.csv/.jsonl), `wds:<folder of .tar shards>` (WebDataset) or "
        "`hf:<save_to_disk folder or Hub id>` (datasets).",
    )
    captions_file: str | None = Field(
        None, json_schema_extra={"locator": True},
        description="Captions file: COCO JSON (default `annotations/captions_*.json`) or a folder's CSV/JSONL (default captions.csv/.jsonl).",
    )
    split: str = Field("train", description="hf: dataset split.")
    image_column: str = Field("image", description="hf: image column.")
    caption_column: str = Field("caption", description="hf: caption column (a string or a list of strings per row).")
    num_samples: int = Field(8192, ge=1, description="Number of calibration pairs (the reference uses 8,192).")
    batch_size: int = Field(512, ge=1, description="Calibration forward batch size (the reference uses 512).")
    seed: int = Field(0, description="Seed for the deterministic subset selection.")
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="Unreadable images are skipped and counted; more than this fraction fails the run."
    )


class QuantizationConfig(Section):
    format: Literal["fp8_e4m3"] = Field("fp8_e4m3", description="W8A8 FP8 E4M3, per-tensor, static scales.")
    algorithm: Literal["max"] = Field("max", description="Calibration algorithm (max = AbsMax).")
    quantize_attention: bool = Field(
        True, description="Quantize attention: Q, K, V (and softmax output in the exported graph)."
    )
    quantize_layernorm: bool = Field(False, description="Give LayerNorm inputs quantizers (ModelOpt >= 0.44 would).")
    exclude: list[str] = Field(
        default=["*patch_embedding*"],
        description="Wildcard patterns of modules/quantizers to leave unquantized; each must match something.",
    )
    # The fields below decide which stages the flow runs when the gate fails, not what quantize computes: they are
    # not part of quantize's or audit's cache key ("flow"); the stages that use them take them as parameters.
    recovery: Literal["off", "suggest", "auto"] = Field(
        "off", json_schema_extra={"flow": True},
        description="When the quality gate fails: 'off' fails (or marks) the run; 'suggest' also scores every unit's "
        "FP8 sensitivity and names the exclusions to try, most sensitive first, as a ready --set; 'auto' re-quantizes "
        "with the most sensitive units in FP16, one more per attempt, until the gate passes or max_fp16_fraction is reached.",
    )
    max_fp16_fraction: float = Field(
        0.1, ge=0, le=1, json_schema_extra={"flow": True},
        description="recovery=auto's budget: the largest share of the GEMM multiply-accumulates per image-caption pair "
        "(user exclusions included) that may stay in FP16.",
    )
    sensitivity_samples: int = Field(
        256, ge=1, json_schema_extra={"flow": True},
        description="Calibration pairs the sensitivity stage scores each unit on (recovery suggest/auto).",
    )
    sensitivity_batch_size: int = Field(
        64, ge=2, json_schema_extra={"flow": True},
        description="Pairs per scored batch: the in-batch image->text distribution compared is over this many captions.",
    )


    _recovery_off = field_validator("recovery", mode="before")(lambda cls, value: yaml_off_is_off(value))


class EvalDataset(Section):
    name: str = Field(
        EMBEDDED_DATA,
        description="'embedded:shapes', or a CLIP_benchmark dataset read from root: 'cifar100', 'imagenet1k', "
        "'mscoco_captions' or `wds/<name>` (any other CLIP_benchmark name works the same way).",
    )
    root: str | None = Field(
        None, json_schema_extra={"locator": True},
        description="Local root of the dataset, in CLIP_benchmark's layout (nothing is downloaded).",
    )
    split: str = Field("test", description="CLIP_benchmark split ('test'; mscoco_captions reads val2014 for it).")
    annotation_file: str | None = Field(
        None, json_schema_extra={"locator": True},
        description="mscoco_captions: captions JSON in COCO format (default `<root>/coco_<split>_karpathy.json`).",
    )


class EvaluationConfig(Section):
    datasets: list[EvalDataset] = Field(
        default=[EvalDataset()], min_length=1,
        description="Datasets to evaluate on, each with its own task (the recipe: cifar100, imagenet1k and "
        "mscoco_captions); metrics are named `<dataset>/<task>/<metric>`.",
    )
    tasks: list[Literal["zeroshot_classification", "zeroshot_retrieval"]] = Field(
        default=["zeroshot_classification", "zeroshot_retrieval"],
        description="CLIP_benchmark tasks to run on baseline and fake-quantized FP8 models (embedded:shapes runs "
        "both; every other dataset's task must be listed).",
    )
    num_samples: int = Field(1000, ge=1, description="Images per dataset and task (a seeded subset; a limit for quick runs).")
    batch_size: int = Field(256, ge=1, description="Evaluation batch size.")
    seed: int = Field(1, description="Seed of the evaluation split (distinct from calibration).")
    recall_k: list[int] = Field(default=[1, 5], description="Retrieval recall@k values.")
    max_drop: dict[str, float] = Field(
        default={"*": 0.02},
        description="Quality gate: largest allowed drop (baseline - FP8, absolute) per metric, by wildcard over "
        "`<dataset>/<task>/<metric>` names (e.g. `imagenet1k/*`); the most specific pattern wins, `*` is the default.",
    )
    on_gate_failure: Literal["fail", "mark"] = Field(
        "fail", description="'fail' stops the flow; 'mark' completes it but marks the result not promotable."
    )
    # Which runtimes run and which one the gate judges decide the evaluate_deployed stage's work only: they
    # are "flow" fields (not part of evaluate's key), passed to that stage as parameters of its own.
    runtimes: list[Literal["fakequant", "onnxruntime", "torch-fp8", "tensorrt"]] = Field(
        default=["fakequant", "onnxruntime", "torch-fp8", "tensorrt"], min_length=1, json_schema_extra={"flow": True},
        description="FP8 runtimes evaluated beside the baseline on every metric, each where it can run (the others "
        "are reported skipped, with the reason): fakequant (ModelOpt's simulated FP8), onnxruntime (the repaired "
        "graphs), torch-fp8 (FP8 GEMMs in PyTorch, on GPUs of compute capability >= 8.9), "
        "tensorrt (the engines).",
    )
    gate_runtime: Literal["auto", "fakequant", "onnxruntime", "torch-fp8", "tensorrt"] = Field(
        "auto", json_schema_extra={"flow": True},
        description="The runtime the quality gate judges: 'auto' = the first of tensorrt, torch-fp8, onnxruntime, "
        "fakequant that is listed in runtimes and can run here (what will be deployed).",
    )

    @model_validator(mode="after")
    def _gate_runtime_is_evaluated(self):
        if self.gate_runtime != "auto" and self.gate_runtime not in self.runtimes:
            raise ValueError(f"evaluation.gate_runtime '{self.gate_runtime}' is not in evaluation.runtimes "
                             f"{self.runtimes}; add it there or use gate_runtime=auto")
        return self

    @field_validator("datasets")
    @classmethod
    def _names_are_unique(cls, datasets: list[EvalDataset]) -> list[EvalDataset]:
        # Metrics are keyed by dataset name: two entries of one name would overwrite each other's.
        names = [d.name for d in datasets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"evaluation.datasets names {', '.join(repr(n) for n in twice)} more than once")
        return datasets


class ExportConfig(Section):
    opset: int = Field(20, ge=20, description="ONNX opset (>= 20 for FP8 QuantizeLinear/DequantizeLinear).")
    export_batch_size: int = Field(2, ge=1, description="Batch size of the dummy input; the batch axis is dynamic.")
    check_samples: int = Field(16, ge=1, description="Samples compared between ONNX Runtime and PyTorch.")
    min_cosine: float = Field(
        0.99, description="Smallest cosine similarity allowed between ONNX Runtime FP8 and PyTorch fake-quant embeddings."
    )
    preflight: bool = Field(True, description="Parse and build every ONNX with TensorRT-RTX (strongly typed) as a pre-flight.")
    workers: int = Field(
        0, ge=0, le=4, json_schema_extra={"execution": True},
        description="Processes exporting the four graphs at once (ModelOpt's export is single-threaded Python); "
        "0 = auto: 4 for models over 50 M parameters, else 1 (process start-up outweighs a small export).",
    )


class BuildTarget(Section):
    """A GPU type engines are built for, and the work pool whose workers have it (``build.targets``)."""

    gpu: str = Field(
        min_length=1, description="GPU type as its workers' `nvidia-smi` names it (e.g. 'NVIDIA H100 80GB HBM3'): the "
        "engines' label, the benchmark's concurrency limit `gpu:<gpu>` and the engines deployment's name.")
    work_pool: str = Field(min_length=1, description="Work pool whose workers have this GPU type.")
    work_queue: str | None = Field(None, description="Queue of that pool, where one pool holds several GPU types.")

    @property
    def slug(self) -> str:
        """The GPU type as a deployment and flow-run name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
        return re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-") or "gpu"


class BuildConfig(Section):
    enabled: bool = Field(True, description="Build TensorRT engines (skipped with a reason where TensorRT is absent).")
    backend: Literal["auto", "tensorrt", "trtexec", "tensorrt-rtx"] = Field(
        "auto", description="'auto': the TensorRT Python API if it imports, else trtexec on PATH. "
        "'tensorrt-rtx' builds RTX-GPU engines (also without a GPU).",
    )
    static_shapes: bool = Field(False, description="Build for opt_batch only instead of the min..max profile.")
    workspace_mb: int = Field(4096, ge=64, description="Builder workspace memory pool (MiB).")
    optimization_level: int = Field(3, ge=0, le=5, description="Builder optimization level (TensorRT default 3).")
    min_batch: int = Field(1, ge=1, description="Optimization profile: minimum batch.")
    opt_batch: int = Field(128, ge=1, description="Optimization profile: optimal batch.")
    max_batch: int = Field(128, ge=1, description="Optimization profile: maximum batch.")
    # Where engines are built decides which runs start, not what an engine is (the target's GPU is in the key):
    # "flow" fields, not part of any stage's key.
    targets: list[BuildTarget] = Field(
        default=[], json_schema_extra={"flow": True},
        description="GPU types to build and time engines for, each on its own work pool (one engines sub-run per "
        "target, `clip-fp8 deploy --target` creates them); empty: build where the flow runs.")
    target_timeout: float = Field(
        1800, gt=0, json_schema_extra={"flow": True},
        description="Seconds a target's engines run may wait for a worker; then the target is reported pending "
        "(its run cancelled) and the pipeline completes without it.")
    target_run_timeout: float = Field(
        4 * 3600, gt=0, json_schema_extra={"flow": True},
        description="Seconds a target's engines run may take once a worker picked it up.")

    @field_validator("targets")
    @classmethod
    def _distinct_gpus(cls, targets: list[BuildTarget]) -> list[BuildTarget]:
        slugs = [t.slug for t in targets]
        if dupes := sorted({t.gpu for t in targets if slugs.count(t.slug) > 1}):
            raise ValueError(f"build.targets names a GPU type twice: {', '.join(dupes)}; one target per GPU type")
        return targets


class BenchmarkConfig(Section):
    enabled: bool = Field(True, description="Benchmark the engines, the PyTorch baselines and torch-fp8 (where a CUDA GPU is).")
    batch_sizes: list[int] = Field(default=[1, 8, 32, 128], description="Batch sizes to time.")
    warmup_ms: int = Field(1000, ge=0, description="Warm-up before each timed case (ms).")
    duration_s: int = Field(10, ge=1, description="Timed duration of each case (s).")
    pytorch_baselines: list[Literal["eager", "compile"]] = Field(
        default=["eager", "compile"], description="PyTorch FP16 baselines timed the same way on any CUDA GPU: "
        "eager (SDPA attention, what users run today) and compile (torch.compile, CUDA graphs: what torch-fp8 is "
        "compiled like, so their ratio is the FP8 speedup).",
    )
    torch_fp8: bool = Field(
        True, description="Time the torch-fp8 encoders (compiled, CUDA graphs) beside the baselines, on GPUs of "
        "compute capability >= 8.9.",
    )


class ServingConfig(Section):
    batch_sizes: list[int] = Field(
        default=[1, 8, 32, 128], min_length=1,
        description="Batch sizes a serving host compiles; the benchmark times FP8 as served against FP16 compiled at "
        "each (interleaved rounds) and writes, per GPU type and encoder, the sizes FP8 wins (serving.json).")
    small_batch: Literal["auto", "fp8", "fp16"] = Field(
        "auto", description="Which form serves each size: 'auto' FP8 where it won every round, else FP16 (never slower "
        "than FP16); 'fp8' FP8 at every size; 'fp16' FP16 below the largest size.")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if bad := [b for b in sizes if b < 1]:
            raise ValueError(f"serving.batch_sizes {bad} must be >= 1")
        return sorted(set(sizes))


class OutputConfig(Section):
    root: str = Field("clip-fp8-output", json_schema_extra={"destination": True}, description="Directory, or fsspec URL (e.g. s3://bucket/prefix, credentials from the `AWS_*` environment), for runs, the artifact store and Prefect cache records.")
    run_name: str | None = Field(None, description="Name of this run's report folder; default: the flow run's name.")


class PromotionConfig(Section):
    repository: str | None = Field(
        None, json_schema_extra={"locator": True, "destination": True},
        description="Triton model repository (a path or fsspec URL) that a promotable, non-regressed run that changed "
        "something publishes its encoders to, as the next version of `clip_image_fp8` / `clip_text_fp8`. Empty: no promotion.",
    )
    max_latency_increase: float = Field(
        0.05, ge=0, description="Regression check against the last promoted run on the same GPU type: the most a batch "
        "latency may grow (0.05 = 5 %).",
    )
    keep_versions: int = Field(3, ge=1, description="Versions kept per model in the repository (the oldest go first).")
    include_fp16: bool = Field(False, description="Also publish the FP16 pair (`clip_image_fp16`, `clip_text_fp16`).")
    trend_runs: int = Field(30, ge=2, description="Runs of the same model in the report's history table and trend plot.")
    min_speedup: float = Field(
        1.0, gt=0, description="The speed gate: the FP8 form as served must be at least this times FP16 compiled at every "
        "serving.batch_sizes, measured in the same run on the same GPU type (skipped where no GPU timed it).")
    smoke_check: Literal["auto", "required", "off"] = Field(
        "auto", description="Before latest.json moves, a real tritonserver loads the new version and must answer with the "
        "run's own embeddings. 'auto': where a tritonserver is found (else skipped, and the promotion says why); "
        "'required': a promotion without one fails; 'off': not checked.")
    _smoke_check_off = field_validator("smoke_check", mode="before")(lambda cls, value: yaml_off_is_off(value))
    on_slower: Literal["fail", "mark", "promote_fp16"] = Field(
        "mark", description="When the speed gate fails: 'fail' the run, 'mark' it not promotable, or 'promote_fp16' "
        "(promote the FP16 encoders instead of the FP8 ones).")


class PipelineConfig(Section):
    """Everything a run of the clip-fp8 pipeline depends on."""

    model: ModelConfig = Field(ModelConfig(), description="The CLIP checkpoint to quantize.")
    calibration: CalibrationConfig = Field(CalibrationConfig(), description="Calibration data.")
    quantization: QuantizationConfig = Field(QuantizationConfig(), description="ModelOpt FP8 PTQ.")
    evaluation: EvaluationConfig = Field(EvaluationConfig(), description="CLIP_benchmark quality check.")
    export: ExportConfig = Field(ExportConfig(), description="ONNX export, surgery and pre-flight.")
    build: BuildConfig = Field(BuildConfig(), description="TensorRT engine build.")
    benchmark: BenchmarkConfig = Field(BenchmarkConfig(), description="Engine benchmark.")
    serving: ServingConfig = Field(ServingConfig(), description="How the FP8 encoders are served: batch sizes and FP8/FP16 dispatch.")
    output: OutputConfig = Field(OutputConfig(), description="Where results go.")
    promotion: PromotionConfig = Field(PromotionConfig(), description="Run history, regression check and promotion to a Triton model repository.")

    @classmethod
    def from_file(cls, path: str | Path) -> "PipelineConfig":
        return cls.model_validate(read_mapping(path, "config file", "sections (model, calibration, ...)"))

    def with_overrides(self, assignments: list[str]) -> "PipelineConfig":
        """Apply ``section.field=value`` overrides; values are parsed as YAML (lists, numbers, bools)."""
        import yaml

        data: dict[str, Any] = self.model_dump()
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep or "." not in key:
                raise ValueError(f"override '{assignment}' is not of the form section.field=value")
            section, field = key.split(".", 1)
            if section not in data or not isinstance(data[section], dict):
                raise ValueError(f"override '{assignment}': unknown section '{section}' (one of {', '.join(data)})")
            data[section][field] = yaml.safe_load(raw)
        return type(self).model_validate(data)


class ModelEntry(Section):
    """One model of a models file (``clip-fp8 deploy --models``): its own pipeline run each night."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Short name: the model's row in the night's table and its run's name prefix.")
    source: str = Field(description="Its model.source (any form model.source takes).")
    revision: str | None = Field(None, description="Its model.revision (a Hub commit, tag or branch) to pin.")
    overrides: list[str] = Field(default=[], description="Its own `section.field=value` overrides, over the night's config.")

    def config(self, base: PipelineConfig) -> PipelineConfig:
        """The night's config with this model and its overrides; a bad override raises naming this entry."""
        data = base.model_dump()
        data["model"].update(source=self.source, revision=self.revision)
        try:
            return PipelineConfig.model_validate(data).with_overrides(self.overrides)
        except ValueError as exc:
            detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3] if line.strip()) or str(exc)
            raise ValueError(f"models entry '{self.name}': {detail}") from None


class ModelsFile(Section):
    """The models a night re-quantizes, each as its own pipeline run."""

    models: list[ModelEntry] = Field(min_length=1, description="The models, each with a unique name.")

    @field_validator("models")
    @classmethod
    def _names_are_unique(cls, models: list[ModelEntry]) -> list[ModelEntry]:
        names = [m.name for m in models]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"models file names {', '.join(repr(n) for n in twice)} more than once")
        return models

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelsFile":
        from pydantic import ValidationError

        data = read_mapping(path, "models file", "a `models:` list")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:  # one line: where in the file, and what
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"models file {path}: {where}: {first['msg']}") from None
