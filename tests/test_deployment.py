"""Deployed for real: a Prefect server on 127.0.0.1 (SQLite), `clip-fp8 deploy`, a process worker, runs
triggered through the CLI and the API; then a run killed mid-flow and re-run, resuming from the cache."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from clip_fp8.artifacts import REF_FILE
from clip_fp8.config import PipelineConfig

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
           "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # workers poll every 2 s, not 10: each run is picked up sooner
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health", 180)
        yield {"env": {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, "url": f"http://127.0.0.1:{port}",
               "home": home}
    finally:
        _stop(proc)


# Three heartbeats (30 s apart, Prefect's minimum): a live run on a busy CI host is never taken for a dead one.
CRASH_AFTER_S = 90
# Every deploy onto the module's pool, with the same schedule and crash bounds: a deploy replaces the automations,
# and one with the defaults would leave the crashed-run test waiting 300 s for its crash.
DEPLOY = [str(BIN / "clip-fp8"), "deploy", "--work-pool", "test-pool", "--nightly-cron", "30 3 * * *",
          "--timezone", "Europe/Berlin", "--crash-after", str(CRASH_AFTER_S), "--crash-retries", "1"]


@pytest.fixture(scope="module")
def deployed(server):
    # Idempotent: the build-matrix and alert tests deploy again onto the same pool and deployments.
    out = subprocess.run([*DEPLOY, "--gpu-name", "NVIDIA H100 80GB HBM3"], env=server["env"], capture_output=True,
                         text=True, timeout=300, cwd=server["home"])
    assert out.returncode == 0, out.stderr[-3000:]
    log = open(server["home"] / "worker.log", "w")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "test-pool", "--type", "process"],
                              env=server["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              cwd=server["home"])
    server["workers"] = [worker]  # a test that kills it starts the next one here
    yield server
    for worker in server["workers"]:
        _stop(worker)


def _api(server, coro_fn):
    import asyncio

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def call():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings(updates={PREFECT_API_URL: server["env"]["PREFECT_API_URL"]}):
        return asyncio.run(call())


def _wait_for_run(server, flow_run_id, timeout: float = 600, crash_grace: float = 0):
    """The run once final; a Crashed one only after ``crash_grace`` s in that state (recovery may schedule it again)."""
    deadline, crashed_since = time.time() + timeout, None
    while time.time() < deadline:
        run = _api(server, lambda c: c.read_flow_run(flow_run_id))
        crashed = run.state is not None and run.state.is_crashed()
        crashed_since = (crashed_since or time.time()) if crashed else None
        if run.state and run.state.is_final() and (not crashed or time.time() - crashed_since >= crash_grace):
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {flow_run_id} did not finish")


# Cut down, and only the fake-quant model evaluated: these tests are about deployments, workers and runs (every
# stage still runs; the evaluation of what ships is test_pipeline_e2e's).
SMALL_CLI = ["--set", "calibration.num_samples=256", "--set", "calibration.batch_size=128",
             "--set", "evaluation.num_samples=200", "--set", "evaluation.runtimes=[fakequant]"]


def _small_config(root: Path) -> dict:
    return PipelineConfig().with_overrides([f"output.root={root}", *SMALL_CLI[1::2]]).model_dump(mode="json")


def test_nightly_schedule_and_gpu_limit_are_registered(deployed):
    deployment = _api(deployed, lambda c: c.read_deployment_by_name("clip-fp8/clip-fp8-nightly"))
    schedule = deployment.schedules[0].schedule
    assert schedule.cron == "30 3 * * *" and schedule.timezone == "Europe/Berlin"
    assert deployment.parameters["config"]["model"]["source"] == "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"
    limit = _api(deployed, lambda c: c.read_global_concurrency_limit_by_name("gpu:NVIDIA H100 80GB HBM3"))
    assert limit.limit == 1
    on_demand = _api(deployed, lambda c: c.read_deployment_by_name("clip-fp8/clip-fp8-on-demand"))
    assert not on_demand.schedules
    # The UI's run form is generated from this schema: the pipeline's sections with descriptions.
    config_schema = on_demand.parameter_openapi_schema
    assert "config" in config_schema["properties"]
    defs = config_schema.get("definitions") or config_schema.get("$defs")
    assert defs["CalibrationConfig"]["properties"]["num_samples"]["description"]


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """One output root for the on-demand runs and the build matrix's: the matrix run finds quantization,
    evaluation and export in the cache. Each test holds in either order."""
    return tmp_path_factory.mktemp("on-demand") / "out"


def test_runs_triggered_from_cli_and_api_complete_with_report(deployed, shared_root):
    params = {"config": _small_config(shared_root)}
    out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "clip-fp8/clip-fp8-on-demand",
                          "--params", json.dumps(params)], env=deployed["env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    run_id = next(line.split()[-1] for line in out.stdout.splitlines() if "UUID" in line)
    first = _wait_for_run(deployed, run_id)
    assert first.state.is_completed(), (first.state, (deployed["home"] / "worker.log").read_text()[-3000:])

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    artifacts = _api(deployed, lambda c: c.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first.id]))))
    keys = {a.key for a in artifacts}
    assert {"clip-fp8-report", "quantization-audit", "quality-gate"} <= keys

    # The same parameters through the API: a new run, served from the cache the first one left.
    deployment = _api(deployed, lambda c: c.read_deployment_by_name("clip-fp8/clip-fp8-on-demand"))
    second = _api(deployed, lambda c: c.create_flow_run_from_deployment(deployment.id, parameters=params))
    second = _wait_for_run(deployed, second.id)
    assert second.state.is_completed()
    latest = json.loads(next((shared_root / "runs").glob(f"*-{second.name}/summary.json")).read_text())
    assert latest["all_cached"] is True
    assert all(s["status"] in ("cached", "skipped") for s in latest["stages"].values())


def _shots(tmp_path: Path) -> Path:
    shots = Path(os.environ.get("CLIP_FP8_TEST_OUTPUT", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def _chromium(tmp_path: Path):
    """Debian's headless chromium, driven by selenium, with no background network traffic."""
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.fail("Debian chromium and chromium-driver are required: bash scripts/setup.sh --test installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,2400", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_custom_run_from_the_prefect_ui_in_chromium(deployed, tmp_path, request):
    """A person's path: open the deployment's run form, change parameters, submit, watch it complete."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    shots = _shots(tmp_path)
    driver = _chromium(tmp_path)
    try:
        deployment = _api(deployed, lambda c: c.read_deployment_by_name("clip-fp8/clip-fp8-on-demand"))
        driver.get(f"{deployed['url']}/deployments/deployment/{deployment.id}/run")
        wait = WebDriverWait(driver, 60)
        wait.until(EC.presence_of_element_located((By.XPATH, "//label[contains(., 'Num Samples')]")))

        def set_value(element, value: str) -> None:
            element.send_keys(Keys.CONTROL, "a")
            element.send_keys(value)

        numbers = driver.find_elements(By.CSS_SELECTOR, "input[type=number]")
        calibration_samples = next(e for e in numbers if e.get_attribute("value") == "8192")
        evaluation_samples = next(e for e in numbers if e.get_attribute("value") == "1000")  # first: evaluation's
        set_value(calibration_samples, "256")
        set_value(evaluation_samples, "200")
        # evaluation.datasets renders as a list of {name, root, split, annotation_file} forms, the default entry shown.
        datasets = driver.find_element(By.XPATH, "//label[contains(., 'Datasets')]")
        driver.execute_script("arguments[0].scrollIntoView();", datasets)
        texts = driver.find_elements(By.CSS_SELECTOR, "textarea, input")
        assert sum(e.get_attribute("value") == "embedded:shapes" for e in texts) == 2  # calibration source, dataset name
        driver.save_screenshot(str(shots / "prefect-ui-evaluation-datasets.png"))
        # quantization.recovery and its budget, with their descriptions (from PipelineConfig's fields).
        recovery = driver.find_element(By.XPATH, "//label[contains(., 'Recovery')]")
        driver.execute_script("arguments[0].scrollIntoView();", recovery)
        assert driver.find_elements(By.XPATH, "//*[contains(text(), 'one more per attempt')]")
        assert driver.find_elements(By.XPATH, "//label[contains(., 'Max Fp16 Fraction')]")
        driver.save_screenshot(str(shots / "prefect-ui-recovery-options.png"))
        root = next(e for e in driver.find_elements(By.TAG_NAME, "textarea") if e.get_attribute("value") == "clip-fp8-output")
        set_value(root, str(tmp_path / "ui-out"))
        driver.save_screenshot(str(shots / "prefect-ui-custom-run-form.png"))
        submit = driver.find_element(By.XPATH, "//button[normalize-space(.)='Submit']")
        driver.execute_script("arguments[0].scrollIntoView();", submit)
        submit.click()
        # The UI goes back to the deployment's page, where the new run is listed.
        wait.until(lambda d: not d.current_url.rstrip("/").endswith("/run"))
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        runs = _api(deployed, lambda c: c.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1))
        run = _wait_for_run(deployed, runs[0].id)
        assert run.state.is_completed(), run.state
        assert run.parameters["config"]["calibration"]["num_samples"] == 256
        assert run.parameters["config"]["evaluation"]["num_samples"] == 200
        driver.get(f"{deployed['url']}/runs/flow-run/{run.id}")
        WebDriverWait(driver, 60).until(EC.presence_of_element_located((By.XPATH, "//*[normalize-space(.)='Completed']")))
        driver.save_screenshot(str(shots / "prefect-ui-run-completed.png"))
        assert list((tmp_path / "ui-out" / "runs").glob("*/summary.json"))
    finally:
        driver.quit()


def test_killed_run_resumes_from_the_last_completed_stage(tmp_path):
    """A run killed mid-flow, then re-run with the same parameters, executes only what did not finish."""
    root = tmp_path / "out"
    args = [str(BIN / "clip-fp8"), "run", "-o", str(root), *SMALL_CLI]
    # A lock the killed run held expires after one lease; keep it short so the re-run does not wait 30 s.
    env = {**os.environ, "CLIP_FP8_LOCK_LEASE_S": "3"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.time() + 300
    # The audit is done once its ref is written: its directory appears (renamed into place) a moment before.
    audited = f"audit/[0-9a-f]*/{REF_FILE}"
    while time.time() < deadline and not list((root / "store").glob(audited)):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # as an OOM killer or a lost node would
    proc.wait()
    assert list((root / "store").glob(audited)), "the run never finished the audit"

    from clip_fp8.flows.pipeline import clip_fp8_pipeline

    summary = clip_fp8_pipeline(PipelineConfig().with_overrides([
        f"output.root={root}", *SMALL_CLI[1::2]]))
    status = {name: stage["status"] for name, stage in summary["stages"].items()}
    assert [status[s] for s in ("calibration_data", "baseline_model", "quantize", "audit")] == ["cached"] * 4
    assert status["surgery_fp8"] == "completed" and summary["status"] == "completed"


def test_nightly_runs_show_their_history_and_trend_in_the_ui(deployed, tmp_path):
    """Two nights of the nightly deployment on the worker: the second's page lists the history table artifact, and
    its report artifact shows the history section with the trend plot (screenshots, looked at)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    nightly = _api(deployed, lambda c: c.read_deployment_by_name("clip-fp8/clip-fp8-nightly"))
    config = PipelineConfig.model_validate(_small_config(tmp_path / "out")).with_overrides(
        [f"promotion.repository={tmp_path / 'triton'}"])
    for _ in range(2):
        run = _api(deployed, lambda c: c.create_flow_run_from_deployment(
            nightly.id, parameters={"config": config.model_dump(mode="json")}))
        run = _wait_for_run(deployed, run.id)
        assert run.state.is_completed(), (run.state, (deployed["home"] / "worker.log").read_text()[-3000:])
    artifacts = {a.key: a for a in _api(deployed, lambda c: c.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))))}
    assert {"clip-fp8-history", "clip-fp8-report"} <= artifacts.keys()
    rows = json.loads(artifacts["clip-fp8-history"].data)  # both nights, newest last
    assert [r["changed"] for r in rows] == ["changed", "unchanged"] and rows[0]["promoted"] == "v1"
    assert "Error encountered when computing cache key" not in (deployed["home"] / "worker.log").read_text()
    report = artifacts["clip-fp8-report"].data
    assert "## History" in report and "data:image/png;base64," in report.split("## History")[1]
    assert (tmp_path / "triton" / "latest.json").is_file()  # the first night was promoted

    shots = _shots(tmp_path)
    driver = _chromium(tmp_path)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(f"{deployed['url']}/artifacts/artifact/{artifacts['clip-fp8-history'].id}")
        try:  # the table: one row per night, the second one unchanged
            wait.until(EC.presence_of_element_located((By.XPATH, f"//td[contains(., '{rows[1]['run']}')]")))
            wait.until(EC.presence_of_element_located((By.XPATH, "//td[normalize-space(.)='unchanged']")))
        finally:
            driver.save_screenshot(str(shots / "prefect-ui-nightly-history.png"))
        driver.get(f"{deployed['url']}/artifacts/artifact/{artifacts['clip-fp8-report'].id}")
        trend = wait.until(EC.presence_of_element_located((By.XPATH, "//img[contains(@alt, 'trend')]")))
        driver.execute_script("arguments[0].scrollIntoView();", trend)
        wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", trend) > 0)
        driver.save_screenshot(str(shots / "prefect-ui-nightly-report-trend.png"))
    finally:
        driver.quit()


def test_regression_alert_automation_is_created_from_the_shipped_definition(deployed):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: deployed["env"]["PREFECT_API_URL"]}):
        block_id = CustomWebhookNotificationBlock(name="clip-fp8 alerts", url="http://127.0.0.1:9/hook").save(
            "clip-fp8-alerts", overwrite=True)
    args = [*DEPLOY, "--notify-block", "clip-fp8-alerts"]
    for _ in range(2):  # idempotent: the automation is replaced, not duplicated
        out = subprocess.run(args, env=deployed["env"], capture_output=True, text=True, timeout=300, cwd=deployed["home"])
        assert out.returncode == 0, out.stderr[-3000:]
    (automation,) = _api(deployed, lambda c: c.read_automations_by_name("clip-fp8 regression alert"))
    assert automation.trigger.expect == {"clip-fp8.run.regressed"}
    assert str(automation.actions[0].block_document_id) == str(block_id)
    missing = subprocess.run([*args[:-1], "no-such-block"], env=deployed["env"], capture_output=True, text=True,
                             timeout=300, cwd=deployed["home"])
    assert missing.returncode == 2 and missing.stderr.startswith("error: no Prefect block named 'no-such-block'")


def test_a_models_file_gives_one_run_per_model_and_one_table(deployed, tmp_path):
    """`clip-fp8 deploy --models`: a nightly whose run starts one pipeline run per model on the pool's worker, a
    broken entry failing alone with its message, and one table for all of them."""
    import yaml

    from data_fixtures import write_outlier_checkpoint

    second = tmp_path / "second-model"
    write_outlier_checkpoint(second)  # a second small checkpoint (its gate fails: `mark` in its overrides)
    missing = tmp_path / "no-such-checkpoint"
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": [
        {"name": "tiny", "source": "embedded:tiny-clip-shapes"},
        {"name": "outlier", "source": str(second), "overrides": ["evaluation.on_gate_failure=mark"]},
        {"name": "broken", "source": str(missing)}]}))
    args = [*DEPLOY, "--models"]
    out = subprocess.run([*args, str(models)], env=deployed["env"], capture_output=True, text=True, timeout=300,
                         cwd=deployed["home"])
    assert out.returncode == 0, out.stderr[-3000:]
    nightly = _api(deployed, lambda c: c.read_deployment_by_name("clip-fp8-models/clip-fp8-models-nightly"))
    assert nightly.schedules[0].schedule.cron == "30 3 * * *" and [m["name"] for m in nightly.parameters["models"]] == [
        "tiny", "outlier", "broken"]
    single = _api(deployed, lambda c: c.read_deployment_by_name("clip-fp8/clip-fp8-nightly"))
    assert single.paused  # the models nightly runs the models now

    config = PipelineConfig.model_validate(_small_config(tmp_path / "out"))
    parent = _api(deployed, lambda c: c.create_flow_run_from_deployment(
        nightly.id, parameters={"config": config.model_dump(mode="json")}))
    parent = _wait_for_run(deployed, parent.id, timeout=900)
    assert parent.state.is_failed(), parent.state  # one model failed: the night says so, naming it alone
    assert parent.state.message.count(": ") >= 1 and "1 of 3 models failed: broken: " in parent.state.message
    assert str(missing) in parent.state.message

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, \
        FlowRunFilterParentFlowRunId

    (table,) = [a for a in _api(deployed, lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[parent.id])))) if a.key == "clip-fp8-models"]
    rows = {r["model"]: r for r in json.loads(table.data)}
    assert rows["tiny"]["state"] == rows["outlier"]["state"] == "Completed" and rows["broken"]["state"] == "Failed"
    assert rows["tiny"]["promotable"] and not rows["outlier"]["promotable"]  # the outlier's gate failed, marked
    assert str(missing) in rows["broken"]["error"] and "\n" not in rows["broken"]["error"]
    assert Path(rows["tiny"]["report"]).is_file() and Path(rows["outlier"]["report"]).is_file()
    children = _api(deployed, lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))))
    assert sorted(r.name.split("-")[0] for r in children) == ["broken", "outlier", "tiny"]
    # A bad models file: one line naming the entry and the field, nothing deployed differently.
    models.write_text(yaml.safe_dump({"models": [{"name": "tiny", "source": "embedded:tiny-clip-shapes", "revison": "x"}]}))
    bad = subprocess.run([*args, str(models)], env=deployed["env"], capture_output=True, text=True, timeout=300,
                         cwd=deployed["home"])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith(f"error: models file {models}: models.0.revison: ")


def test_build_matrix_builds_on_each_gpu_pool_and_reports_a_missing_one_pending(deployed, tmp_path, shared_root):
    """`build.targets`: one engines run per GPU type on its own pool's worker (TensorRT-RTX builds on the CPU), one
    report with a table per target, and a target whose pool has no worker reported pending after its timeout."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    targets = ["GPU A=pool-a", "GPU B=pool-b", "GPU C=pool-c"]
    config = PipelineConfig.model_validate(_small_config(shared_root)).with_overrides([
        "build.backend=tensorrt-rtx", "build.opt_batch=8", "build.max_batch=16", "build.target_timeout=20",
        "build.targets=" + json.dumps([{"gpu": t.split("=")[0], "work_pool": t.split("=")[1]} for t in targets])])
    # Before the engines deployments exist, a run with targets stops before any stage, naming the fix.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from clip_fp8.errors import PipelineInputError
    from clip_fp8.flows.engines import check_targets

    with temporary_settings(updates={PREFECT_API_URL: deployed["env"]["PREFECT_API_URL"]}):
        with pytest.raises(PipelineInputError, match=r"no deployment 'clip-fp8-engines/gpu-a' for GPU type 'GPU A'.*"
                                                     r"create it with `clip-fp8 deploy --target 'GPU A=pool-a'`"):
            check_targets(config.build)
    out = subprocess.run([*DEPLOY, *(a for t in targets for a in ("--target", t))], env=deployed["env"],
                         capture_output=True, text=True, timeout=300, cwd=deployed["home"])
    assert out.returncode == 0, out.stderr[-3000:]
    workers = []
    try:
        for pool in ("pool-a", "pool-b"):  # pool-c gets no worker
            log = open(deployed["home"] / f"worker-{pool}.log", "w")
            workers.append(subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", f"worker-{pool}"],
                env=deployed["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=deployed["home"]))
        on_demand = _api(deployed, lambda c: c.read_deployment_by_name("clip-fp8/clip-fp8-on-demand"))
        assert [t["work_pool"] for t in on_demand.parameters["config"]["build"]["targets"]] == ["pool-a", "pool-b", "pool-c"]
        limit = _api(deployed, lambda c: c.read_global_concurrency_limit_by_name("gpu:GPU B"))
        assert limit.limit == 1
        parent = _api(deployed, lambda c: c.create_flow_run_from_deployment(
            on_demand.id, parameters={"config": config.model_dump(mode="json")}))
        parent = _wait_for_run(deployed, parent.id, timeout=300)
        logs = "".join((deployed["home"] / f).read_text()[-2000:] for f in ("worker.log", "worker-pool-a.log"))
        assert parent.state.is_completed(), (parent.state, logs)
        runs = _api(deployed, lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))))
        children = {slug: r for r in runs for slug in ("gpu-a", "gpu-b", "gpu-c") if r.name.endswith(slug)}
        assert set(children) == {"gpu-a", "gpu-b", "gpu-c"}, list(children)
        for slug, pool in (("gpu-a", "pool-a"), ("gpu-b", "pool-b")):  # built where the GPU type's workers are
            run = children[slug]
            assert run.state.is_completed() and run.work_pool_name == pool
            assert run.labels["prefect.worker.name"] == f"worker-{pool}"
        assert children["gpu-c"].state.is_cancelled()  # never picked up: not left queued for a later night

        summary = json.loads(next((shared_root / "runs").glob(f"*-{parent.name}/summary.json")).read_text())
        found = summary["targets"]
        assert [found[g]["status"] for g in ("GPU A", "GPU B", "GPU C")] == ["completed", "completed", "pending"]
        assert "no worker of pool 'pool-c'" in found["GPU C"]["reason"] and "within 20 s" in found["GPU C"]["reason"]
        for gpu in ("GPU A", "GPU B"):
            engines = {name: b["meta"]["target"]["gpu"] for b in found[gpu]["builds"] for name in b["meta"]["engines"]}
            assert engines == dict.fromkeys(("fp16_text", "fp16_image", "fp8_text", "fp8_image"), gpu)
        report = (shared_root / "runs" / summary["run"] / "report.md").read_text()
        sections = report.split("## Build target: ")[1:]
        assert [section.splitlines()[0] for section in sections] == ["GPU A", "GPU B", "GPU C"]
        for section in sections[:2]:
            assert "### TensorRT engines" in section and "| fp8_image |" in section
        assert "**pending**" in sections[2] and "### TensorRT engines" not in sections[2]
    finally:
        for worker in workers:
            _stop(worker)
        # The deployments the other tests run keep building where they run.
        subprocess.run(DEPLOY, env=deployed["env"], capture_output=True, timeout=300, cwd=deployed["home"], check=True)


def _flow_run_processes(flow_run_id) -> list[int]:
    """PIDs of the processes running a flow run (their environment names it; Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_run_whose_worker_dies_mid_quantize_is_crashed_scheduled_again_and_completed_from_the_cache(deployed, tmp_path):
    """The worker and its flow process SIGKILLed mid-quantize (a lost node): no heartbeat for CRASH_AFTER_S marks the
    run Crashed, the recovery automation schedules it again, a new worker completes it with the stages that had
    finished cached. It replaces the module's worker: after every other test of that worker, before the
    prefect.yaml test (which moves the deployments to another pool)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    root = tmp_path / "out"
    deployment = _api(deployed, lambda c: c.read_deployment_by_name("clip-fp8/clip-fp8-on-demand"))
    run = _api(deployed, lambda c: c.create_flow_run_from_deployment(deployment.id,
                                                                     parameters={"config": _small_config(root)}))
    deadline, quantizing = time.time() + 300, False
    while time.time() < deadline and not quantizing:
        tasks = _api(deployed, lambda c: c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))))
        quantizing = any(t.name.startswith("quantize") and t.state and t.state.is_running() for t in tasks)
        time.sleep(0.5)
    assert quantizing, (deployed["home"] / "worker.log").read_text()[-3000:]
    killed = _flow_run_processes(run.id)
    assert killed, "no process runs the flow run"
    (worker,) = deployed["workers"]
    os.killpg(worker.pid, signal.SIGKILL)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.wait()
    log = open(deployed["home"] / "worker-2.log", "w")
    deployed["workers"].append(subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "test-pool", "--type", "process"], env=deployed["env"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=deployed["home"]))

    final = _wait_for_run(deployed, run.id, timeout=CRASH_AFTER_S + 420, crash_grace=60)
    history = [s.name for s in _api(deployed, lambda c: c.read_flow_run_states(run.id))]
    assert final.state.is_completed(), (history, (deployed["home"] / "worker-2.log").read_text()[-3000:])
    assert "Crashed" in history and history.index("Crashed") < len(history) - 1, history
    assert final.run_count == 2, final.run_count
    summary = json.loads(next((root / "runs").glob(f"*-{final.name}/summary.json")).read_text())
    status = {name: stage["status"] for name, stage in summary["stages"].items()}
    assert status["calibration_data"] == "cached", status  # quantize had started: its input was published
    assert status["quantize"] == "completed" and summary["status"] == "completed", status


def test_prefect_yaml_deploys_with_prefect_deploy_all(server):
    # Last in this module: it redefines the deployments the tests above ran against, on pool "gpu".
    repo = Path(__file__).resolve().parent.parent
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "gpu", "--type", "process"], env=server["env"],
                   capture_output=True, timeout=120, check=True)
    out = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=repo, env=server["env"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    nightly = _api(server, lambda c: c.read_deployment_by_name("clip-fp8/clip-fp8-nightly"))
    assert nightly.schedules[0].schedule.cron == "0 2 * * *"
    assert nightly.parameters["config"]["calibration"]["num_samples"] == 8192



def test_two_simultaneous_runs_compute_each_artifact_once(tmp_path):
    """Same parameters, same store, started together: every stage is computed by one run, cached in the other."""
    root = tmp_path / "shared"
    args = [str(BIN / "clip-fp8"), "run", "-o", str(root), *SMALL_CLI]
    procs = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    summaries = [json.loads(p.read_text()) for p in (root / "runs").glob("*/summary.json") if not p.parent.is_symlink()]
    assert len(summaries) == 2
    for stage in ("calibration_data", "quantize", "evaluate", "export_fp16", "export_fp8", "set_scales", "surgery_fp16",
                  "surgery_fp8"):
        statuses = sorted(s["stages"][stage]["status"] for s in summaries)
        assert statuses == ["cached", "completed"], (stage, statuses)
    assert not list((root / "locks").glob("*.lock"))  # every lock released

