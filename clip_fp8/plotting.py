"""Matplotlib for the report's and the stages' plots: headless, and every figure ends as PNG bytes."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive backend (workers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi: int = 100) -> bytes:
    """Lay ``fig`` out, write it to ``path``, close it; return the PNG's bytes (for a markdown data URI)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path).read_bytes()
