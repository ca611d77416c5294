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
STAGES = ("calibration_data", "baseline_model", "quantize", "audit", "evaluate_baseline", "evaluate", "export_fp16",
          "export_fp8", "set_scales", "surgery_fp16", "surgery_fp8")

pytestmark = pytest.mark.slow  # a real S3 API (moto's server) and hosts in subprocesses


# The store's credential, from the environment as the hosts get it: it must appear in nothing a run writes.
PLANTED_SECRET = "planted-secret-4c1e9a7f"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    import boto3

    boto3.client("s3", **{"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": "us-east-1",
                          "aws_access_key_id": "testing", "aws_secret_access_key": PLANTED_SECRET}).create_bucket(Bucket="models")
    yield env
    server.stop()


# Cut down, and the deployed runtimes not evaluated: these tests are about where stages run and what they
# share (every stage still runs; the evaluation of what ships is test_pipeline_e2e's).
SMALL = ["--set", "calibration.num_samples=256", "--set", "calibration.batch_size=128", "--set", "evaluation.num_samples=200",
         "--set", "evaluation.runtimes=[fakequant]"]


def run_on_host(host: Path, env: dict, url: str) -> dict:
    host.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [str(BIN / "clip-fp8"), "run", "-o", url, *SMALL, "--set", f"output.run_name={host.name}"],
        env={**os.environ, **env, "CLIP_FP8_CACHE_DIR": str(host / "cache"), "PREFECT_HOME": str(host / "prefect"),
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"},  # a fresh database migrates first
        capture_output=True, text=True, timeout=900, cwd=host,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, key="testing", secret=PLANTED_SECRET)
    return json.loads(fs.cat_file(f"{url.removeprefix('s3://')}/runs/{host.name}/summary.json"))


def _s3(env: dict):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret=PLANTED_SECRET, client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})


def test_object_store_locks_admit_one_holder_and_expire_a_dead_one(s3_endpoint):
    """Two hosts' lock managers on one bucket: one holder at a time, renewed while alive, taken over once its
    lease runs out after it died, and a late release by the dead one never removes the new holder's lock."""
    import threading
    import time

    from clip_fp8.object_locks import ObjectStoreLockManager

    host_a, host_b = (ObjectStoreLockManager(_s3(s3_endpoint), "s3://models/lock-test/locks", lease_seconds=2)
                      for _ in range(2))
    assert host_a.acquire_lock("key", "a") and not host_b.acquire_lock("key", "b", acquire_timeout=3)  # renewed past 2 s
    host_a._stop_renewing("key")  # host a dies: nobody renews its lease
    died = time.monotonic()
    assert host_b.acquire_lock("key", "b", acquire_timeout=10)
    assert time.monotonic() - died < 2 + 1.5  # within one lease (and a poll)
    host_a.release_lock("key", "a")  # the dead one's late release: its object is gone, b's stays
    assert host_b.is_locked("key") and host_b.is_lock_holder("key", "b")
    host_b.release_lock("key", "b")
    assert not host_b.is_locked("key")
    # Many hosts at the same moment: exactly one creates the lock.
    managers = [ObjectStoreLockManager(_s3(s3_endpoint), "s3://models/lock-test/locks", lease_seconds=5) for _ in range(6)]
    won: list[bool] = []
    threads = [threading.Thread(target=lambda m=m, i=i: won.append(m.acquire_lock("race", f"h{i}", acquire_timeout=0)))
               for i, m in enumerate(managers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 5 + [True]
    for m in managers:
        m.release_held()


def _start_on_host(host: Path, env: dict, url: str, extra: list[str] = ()) -> subprocess.Popen:
    host.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(BIN / "clip-fp8"), "run", "-o", url, *SMALL, "--set", f"output.run_name={host.name}", *extra],
        env={**os.environ, **env, "CLIP_FP8_CACHE_DIR": str(host / "cache"), "PREFECT_HOME": str(host / "prefect"),
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "CLIP_FP8_LOCK_LEASE_S": "5"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=host, start_new_session=True)


def test_hosts_sharing_only_the_bucket_compute_each_artifact_once_reuse_it_and_survive_a_killed_holder(s3_endpoint, tmp_path):
    import signal
    import time

    url, fs = "s3://models/two-hosts", _s3(s3_endpoint)
    hosts = [_start_on_host(tmp_path / f"host-{h}", s3_endpoint, url) for h in "ab"]
    for proc in hosts:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    summaries = [json.loads(fs.cat_file(f"models/two-hosts/runs/host-{h}/summary.json")) for h in "ab"]
    for stage in STAGES:  # each computed by one host, found by the other
        assert sorted(s["stages"][stage]["status"] for s in summaries) == ["cached", "completed"], stage
    assert not fs.glob("models/two-hosts/locks/*.lock")

    # A third host, its disk empty, the same parameters: everything comes from the bucket, and it downloads only
    # what the report reads (never a graph). Hosts a and b's disks are not its disk: their local copies go.
    for h in "ab":
        shutil.rmtree(tmp_path / f"host-{h}" / "cache")
    third = run_on_host(tmp_path / "host-e", s3_endpoint, url)
    assert [third["stages"][s]["status"] for s in STAGES] == ["cached"] * len(STAGES)
    assert third["metrics"] == summaries[0]["metrics"] and third["all_cached"]
    downloaded = {p.name for p in (tmp_path / "host-e" / "cache" / "remote").glob("*/*")}
    assert {"quantization-audit.md", "metrics.json"} <= downloaded, downloaded
    assert not any(name.endswith(".onnx") for name in downloaded)
    assert third["artifacts"]["onnx_fp8_image"].startswith(url + "/store/surgery/")
    assert not list((tmp_path / "host-e" / "cache" / "stores").glob("*/store/*/*"))

    # New calibration data on both hosts at once; the one that holds quantize's lock (it is staging quantize
    # in its local cache) is killed there: the other takes the lock over once the lease runs out, and computes it.
    hosts = {h: _start_on_host(tmp_path / f"host-{h}", s3_endpoint, url, ["--set", "calibration.seed=7"]) for h in "cd"}
    victim, deadline = None, time.time() + 300
    while victim is None and time.time() < deadline:
        victim = next((h for h in "cd" if list((tmp_path / f"host-{h}" / "cache").glob("stores/*/store/quantize/.tmp-*"))),
                      None)
        time.sleep(0.05)
    assert victim is not None, "neither host started quantizing"
    os.killpg(hosts[victim].pid, signal.SIGKILL)
    survivor = "d" if victim == "c" else "c"
    _, err = hosts[survivor].communicate(timeout=900)
    assert hosts[survivor].returncode == 0, err[-3000:]
    summary = json.loads(fs.cat_file(f"models/two-hosts/runs/host-{survivor}/summary.json"))
    assert summary["status"] == "completed" and summary["stages"]["quantize"]["status"] == "completed"
    assert not fs.glob("models/two-hosts/locks/*.lock")

    # The credential is in no output: no object in the bucket (store, summaries, reports, history, Prefect's
    # result records), no file a host wrote (its cache, its Prefect database with the runs' artifacts and logs).
    leaked = [path for path in fs.find("models") if PLANTED_SECRET.encode() in fs.cat_file(path)]
    leaked += [str(p) for p in tmp_path.rglob("*") if p.is_file() and PLANTED_SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert len(fs.find("models/two-hosts/runs")) > 10  # the outputs were there to be searched
