"""What a person sees on the console of a ``clip-fp8 run``: the pipeline's own lines, not the libraries'.

Every run used to print progress bars, TracerWarnings, ModelOpt's "transformers X is not tested",
polygraphy's ``[W] Inference failed ... TRT_FP8QuantizeLinear`` (its constant folder trying ONNX Runtime
on TensorRT's custom ops: harmless) and, on a failure, Prefect's traceback before the one ``error:`` line.
None of it is something a user can act on. Unless ``--verbose``:
- ``quiet_environment`` (before the libraries are imported; spawned export workers inherit it) turns off
  tqdm bars and Python warnings in child processes;
- ``quiet_libraries`` (in this process, and in each export worker) ignores third-party warnings, lowers
  ModelOpt's ONNX logger to warnings (``quiet_onnx_tools``: onnx-graphsurgeon and polygraphy to errors), and keeps the console to Prefect's own progress lines
  below ERROR: the CLI reports a failure itself, as one line with the stage table and the report path.
Nothing changes in what Prefect's API log handler sends to the UI.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path

QUIET_ENV = "CLIP_FP8_QUIET"


def quiet_environment() -> None:
    os.environ[QUIET_ENV] = "1"
    os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported (every bar: ModelOpt, HF, CLIP_benchmark)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # child processes (the export workers of a large model)


@functools.cache
def _our_code() -> tuple[str, ...]:
    """Where Prefect's and this project's own source files are (an editable checkout keeps tasks/ and flows/ beside
    clip_fp8/, a wheel inside it)."""
    import clip_fp8

    core = Path(clip_fp8.__file__).resolve().parent
    roots = [core, *(core.parent / d for d in ("tasks", "flows", "deployments"))]
    if prefect := sys.modules.get("prefect"):  # loaded wherever its loggers log; not imported here (stages run without it)
        roots.append(Path(prefect.__file__).resolve().parent)
    return tuple(str(root) + os.sep for root in roots)


class _ConsoleFilter(logging.Filter):
    """On the console only: Prefect and clip-fp8 progress lines below ERROR; no library chatter. A library's print
    inside a task arrives on Prefect's task-run logger (``log_prints``): where it was printed tells it apart."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.startswith(("prefect", "clip_fp8")) and os.path.realpath(record.pathname).startswith(_our_code())
        if ours:
            return record.levelno < logging.ERROR
        return record.levelno >= logging.ERROR and not record.exc_info


class _WarningsAndUp(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_libraries() -> None:
    if not os.environ.get(QUIET_ENV):
        return
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"clip_fp8(\.|$)")
    # The FP16 export calls torch's TorchScript exporter on purpose (ModelOpt's FP8 export calls the same one);
    # torch attributes its deprecation notice to that call site, one of ours.
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                            category=DeprecationWarning)
    for handler in logging.getLogger().handlers:  # Prefect's console handler sits on the root logger
        if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
            handler.addFilter(_ConsoleFilter())
    # ModelOpt's ONNX logger prints INFO to stdout through a handler of its own, which it re-creates on
    # import; a filter on the logger itself survives that.
    onnx_logger = logging.getLogger("modelopt.onnx")
    if not any(isinstance(f, _WarningsAndUp) for f in onnx_logger.filters):
        onnx_logger.addFilter(_WarningsAndUp())
    # torch warns "No CUDA runtime is found" on a CPU host through a glog-style handler of its own.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def quiet_onnx_tools() -> None:
    """onnx-graphsurgeon's constant folding (inside ModelOpt's FP8 export) and polygraphy print their own
    "[W] ..." lines; that ONNX Runtime cannot run TensorRT's custom Q/DQ ops there is expected. Called by
    the export itself: importing the two costs a second, which a cached run need not pay."""
    if not os.environ.get(QUIET_ENV):
        return
    try:
        from onnx_graphsurgeon.logger import G_LOGGER as gs_logger

        gs_logger.severity = gs_logger.ERROR
    except ImportError:
        pass
    try:
        from polygraphy.logger import G_LOGGER as polygraphy_logger

        polygraphy_logger.module_severity = polygraphy_logger.ERROR
    except ImportError:
        pass
