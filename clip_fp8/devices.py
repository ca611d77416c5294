"""What this host's devices can run, answered without importing torch where no GPU driver could answer.

The flow asks before any stage starts (the device, the runtime the gate judges); importing torch to learn that
a CPU host has no GPU was a large share of a cached run (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import sys

# Where a GPU driver shows itself: NVIDIA's control node, ROCm's kernel driver (torch.cuda on AMD), WSL's GPU.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def cuda_available() -> bool:
    """``torch.cuda.is_available()``; False without importing torch on a host with no GPU driver."""
    if "torch" not in sys.modules and not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return False
    import torch

    return torch.cuda.is_available()


def pick_device(cfg) -> str:
    """The torch device of ``model.device`` (a ``ModelConfig``): 'auto' is CUDA where a GPU is visible."""
    if cfg.device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if cfg.device == "cuda" and not cuda_available():
        from clip_fp8.errors import PipelineInputError

        raise PipelineInputError("model.device 'cuda' was asked for but no CUDA device is visible; use model.device=auto")
    return cfg.device


def fp8_support(device: str) -> str | None:
    """None when FP8 GEMMs run on ``device``; else why not (one line)."""
    if not device.startswith("cuda"):
        return f"FP8 GEMMs need a CUDA GPU of compute capability >= 8.9 (this is {device})"
    if not cuda_available():
        return "FP8 GEMMs need a CUDA GPU of compute capability >= 8.9; no CUDA device is visible"
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    return None
