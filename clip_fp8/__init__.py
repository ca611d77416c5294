"""clip-fp8: CLIP checkpoints to FP8 TensorRT engines, as a Prefect pipeline."""

from pathlib import Path

__version__ = "0.1.0"

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def check_same_tree(package: str, init_file: str) -> None:
    """Refuse a sub-package (``clip_fp8.tasks``, ``.flows``, ``.deployments``) from another tree than ``clip_fp8``.

    A checkout installed editable maps those names to its own folders; another checkout put first on
    ``PYTHONPATH`` then brings its ``clip_fp8`` but not them, and an edit made there silently does not run."""
    here = Path(init_file).resolve().parent
    core = Path(__file__).resolve().parent
    if here.parent not in (core, core.parent):  # a wheel (inside clip_fp8/) or one checkout (beside it)
        raise ImportError(f"{package} comes from {here} but clip_fp8 from {core}: two checkouts are mixed (an editable "
                          "install of one and the other on PYTHONPATH); pip install -e the one you mean, or drop it "
                          "from PYTHONPATH")
