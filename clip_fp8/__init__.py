"""clip-fp8: CLIP checkpoints to FP8 TensorRT engines, as a Prefect pipeline."""

from pathlib import Path

__version__ = "0.1.0"

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
