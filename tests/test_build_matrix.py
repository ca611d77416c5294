"""The build matrix's parts that need no server: which GPU an engine is labelled for, and how a target's GPU type
reaches the job templates. The fan-out itself runs on real pools and workers in test_deployment.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip_fp8.config import BuildTarget, PipelineConfig
from clip_fp8.deployments.deploy import JOB_TEMPLATES, parse_target, target_job_variables
from clip_fp8.errors import BuildTargetError
from clip_fp8.flows.engines import engine_target
from clip_fp8.tasks.tensorrt import Target

H100 = BuildTarget(gpu="NVIDIA H100 80GB HBM3", work_pool="h100")


def test_engines_are_labelled_for_the_target_and_a_worker_with_another_gpu_is_refused():
    on_h100 = Target(backend="tensorrt", version="10.13", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    assert engine_target(on_h100, H100) == on_h100
    ahead_of_time = Target(backend="tensorrt-rtx", version="1.2", gpu="none")  # no GPU on the builder
    assert engine_target(ahead_of_time, H100).gpu == "NVIDIA H100 80GB HBM3"
    no_tensorrt = Target(backend="none", unavailable="no TensorRT")
    assert engine_target(no_tensorrt, H100) == no_tensorrt  # skipped with its own reason, not relabelled
    on_l40s = on_h100.model_copy(update={"gpu": "NVIDIA L40S", "compute_capability": "8.9"})
    with pytest.raises(BuildTargetError, match="pool 'h100' has a NVIDIA L40S.*run only NVIDIA H100 80GB HBM3 workers"):
        engine_target(on_l40s, H100)


def test_the_kubernetes_template_selects_nodes_of_the_targets_gpu_type():
    from prefect.utilities.templating import apply_values

    template = json.loads((JOB_TEMPLATES / "kubernetes-gpu.json").read_text())
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    job = apply_values(template["job_configuration"], {**defaults, **target_job_variables("kubernetes", H100)})
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    docker = target_job_variables("docker", H100)
    assert docker["container_create_kwargs"]["device_requests"][0]["Capabilities"] == [["gpu"]]
    assert docker["labels"] == {"clip-fp8.gpu": "NVIDIA H100 80GB HBM3"}
    assert target_job_variables("process", H100) == {}


def test_targets_parse_from_the_cli_and_the_config_refuses_one_gpu_type_twice():
    assert parse_target("NVIDIA L40S=gpus/l40s") == BuildTarget(gpu="NVIDIA L40S", work_pool="gpus", work_queue="l40s")
    with pytest.raises(ValueError, match="--target 'h100' is not of the form 'GPU type=work pool"):
        parse_target("h100")
    with pytest.raises(ValueError, match="names a GPU type twice: NVIDIA H100 80GB HBM3"):
        PipelineConfig().with_overrides(['build.targets=[{gpu: NVIDIA H100 80GB HBM3, work_pool: a}, '
                                         '{gpu: NVIDIA H100 80GB HBM3, work_pool: b}]'])
    # Where engines are built is not what they are: targets key no stage.
    from clip_fp8.caching import canonical

    with_targets = PipelineConfig().with_overrides(["build.targets=[{gpu: A, work_pool: a}]", "build.target_timeout=5"])
    assert canonical(with_targets.build) == canonical(PipelineConfig().build)
