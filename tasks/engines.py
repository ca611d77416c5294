"""TensorRT engine build and benchmark: which driver can run here, or why none can.

The Python API (``import tensorrt``) is preferred, ``trtexec`` on PATH is the fallback. Where neither
exists both stages report ``skipped`` with the reason and how to get TensorRT: nothing is invented.
"""

from __future__ import annotations

import shutil

INSTALL_HINT = ("install TensorRT (NVIDIA's TensorRT container, or `pip install tensorrt` from NVIDIA's index) "
                "or put trtexec on PATH")


def tensorrt_driver() -> tuple[str | None, str]:
    """(driver, detail): ``("api", version)``, ``("trtexec", path)`` or ``(None, reason)``."""
    try:
        import tensorrt

        return "api", tensorrt.__version__
    except ImportError:
        pass
    trtexec = shutil.which("trtexec")
    if trtexec:
        return "trtexec", trtexec
    return None, f"no TensorRT: `import tensorrt` failed and trtexec is not on PATH; {INSTALL_HINT}"
