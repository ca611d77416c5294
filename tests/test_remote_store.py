"""An S3-compatible store shared by two workers: one computes, the other finds every stage in the cache.

A real S3 API (moto's server on 127.0.0.1) through s3fs; the two runs are separate processes with
separate local caches and separate Prefect databases, as two worker hosts would be: all they share is
the bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
STAGES = ("calibration_data", "baseline_model", "quantize", "audit", "evaluate", "export_fp16", "export_fp8",
          "surgery_fp16", "surgery_fp8")


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    import boto3

    boto3.client("s3", **{"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": "us-east-1",
                          "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}).create_bucket(Bucket="models")
    yield env
    server.stop()


def run_on_host(host: Path, env: dict, url: str) -> dict:
    host.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [str(BIN / "clip-fp8"), "run", "-o", url, "--set", "calibration.num_samples=256", "--set", "calibration.batch_size=128",
         "--set", "evaluation.num_samples=200", "--set", f"output.run_name={host.name}"],
        env={**os.environ, **env, "CLIP_FP8_CACHE_DIR": str(host / "cache"), "PREFECT_HOME": str(host / "prefect"),
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"},  # a fresh database migrates first
        capture_output=True, text=True, timeout=900, cwd=host,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, key="testing", secret="testing")
    return json.loads(fs.cat_file(f"models/clip-fp8/runs/{host.name}/summary.json"))


def test_second_worker_reuses_everything_from_the_bucket(s3_endpoint, tmp_path):
    url = "s3://models/clip-fp8"
    first = run_on_host(tmp_path / "host-a", s3_endpoint, url)
    assert [first["stages"][s]["status"] for s in STAGES] == ["completed"] * len(STAGES)
    # host-a's disk is not host-b's: its local copies must not be visible to the second run.
    shutil.rmtree(tmp_path / "host-a" / "cache")
    second = run_on_host(tmp_path / "host-b", s3_endpoint, url)
    assert [second["stages"][s]["status"] for s in STAGES] == ["cached"] * len(STAGES)
    assert second["metrics"] == first["metrics"] and second["all_cached"]
    # host-b computed nothing, so whatever it read came down from the bucket into its own cache.
    downloaded = {p.name for p in (tmp_path / "host-b" / "cache" / "remote").glob("*/*")}
    assert {"quantization-audit.md", "metrics.json"} <= downloaded, downloaded
    assert not any(name.endswith(".onnx") for name in downloaded)  # reports name the bucket's files, fetch none
    assert second["artifacts"]["onnx_fp8_image"].startswith(url + "/store/surgery/")
    assert not list((tmp_path / "host-b" / "cache" / "stores").glob("*/store/*/*"))
