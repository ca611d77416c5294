"""Shared fixtures: a real Prefect test server and a cut-down default config (data writers: data_fixtures.py)."""

from __future__ import annotations

import os
import signal

import pytest

# No run ever reaches a hub: the loaders must work (and fail clearly) offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The test server is offline too: its telemetry could only fail, with an ERROR line in every log.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """A fresh Prefect database for the session. Result storage is not part of the harness, so every
    test gives the flow its own ``output.root``: cache records live there, beside the artifacts."""
    try:
        from prefect.testing.utilities import prefect_test_harness
    except ImportError:  # GPU hosts run only the `gpu` tests, which need no Prefect
        yield
        return
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def fast_config(tmp_path):
    """The embedded default with calibration and evaluation cut down for tests that probe one behaviour."""
    from clip_fp8.config import PipelineConfig

    return PipelineConfig().with_overrides([
        f"output.root={tmp_path / 'out'}",
        "calibration.num_samples=256", "calibration.batch_size=128",
        "evaluation.num_samples=200", "evaluation.batch_size=100",
    ])


def sigint_as_ctrl_c() -> None:
    """``preexec_fn`` for a process a test will send SIGINT: a runner started in the background (``cmd &`` in a
    script, ``nohup``) hands its children SIGINT ignored, and such a child would never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
