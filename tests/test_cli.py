"""The CLI as a person meets it, run as a subprocess: bad files, --version, pipes, Ctrl-C, a quiet console."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_as_ctrl_c

CLI = [sys.executable, "-m", "clip_fp8.cli"]
# Small counts, the embedded model otherwise: quantize still takes several seconds (a window for Ctrl-C).
SMALL = ["--set", "calibration.num_samples=2048", "--set", "calibration.batch_size=256", "--set", "evaluation.num_samples=200"]


def cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.parametrize("name, text, where", [
    ("bad.yaml", "model:\n  source: embedded:tiny-clip-shapes\ncalibration:\n  num_samples: [1, 2\n", "bad.yaml:5:1"),
    ("tabs.yaml", "calibration:\n\tnum_samples: 16\n", "tabs.yaml:2:1"),
    ("bad.json", '{"calibration": {"num_samples": 16,}}', "bad.json:1:36"),
])
def test_a_config_file_syntax_error_is_one_line_with_file_and_position(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    result = cli("run", "--config", str(path), "-o", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: bad configuration: config file ") and where in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_version_help_and_schema_in_a_pipe():
    from clip_fp8 import __version__

    assert cli("--version").stdout.strip() == f"clip-fp8 {__version__}"
    help_text = cli("run", "--help").stdout
    assert "clip-fp8 schema" in help_text and "calibration" in help_text and "--verbose" in help_text
    # `clip-fp8 schema | head -3`: the reader stops early; the writer exits 0 and says nothing.
    pipe = subprocess.run(f"{' '.join(CLI)} schema | head -3", shell=True, capture_output=True, text=True, timeout=120,
                          executable="/bin/bash")
    assert len(pipe.stdout.splitlines()) == 3 and pipe.stderr == "", pipe.stderr
    status = subprocess.run(f"set -o pipefail; {' '.join(CLI)} schema | head -1 >/dev/null", shell=True,
                            executable="/bin/bash", timeout=120)
    assert status.returncode == 0
    assert json.loads(cli("schema").stdout)["title"] == "PipelineConfig"


def test_every_help_exits_0_and_prints_its_options_as_written():
    """A help text is text: `deploy --help` once crashed on Rich markup (its `[/queue]`), in the README's second step."""
    from typer.testing import CliRunner

    from clip_fp8.cli import app

    runner = CliRunner()
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"run", "deploy", "history", "promote", "schema"} <= set(commands)
    for args in ([], *([name] for name in commands)):
        result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and result.exception is None, (args, result.output[-500:])
    deploy = runner.invoke(app, ["deploy", "--help"], env={"COLUMNS": "200"}).output
    assert "work pool[/queue]" in deploy, deploy


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """One output root for this module's pipeline runs: whichever runs second finds the stages the two have in
    common (the FP16 branch, calibration) in the cache. Each test holds in either order."""
    return tmp_path_factory.mktemp("cli-runs") / "out"


@pytest.mark.slow
def test_ctrl_c_stops_within_seconds_leaves_nothing_and_the_same_command_resumes(tmp_path, shared_root):
    """SIGINT in the middle of a stage: one line naming the stage, exit 130 within 15 s, no lock, no staging
    or scratch directory; the same command then resumes from what was published, with a quiet console."""
    root, scratch = shared_root, tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    args = [*CLI, "run", "-o", str(root), *SMALL]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=sigint_as_ctrl_c)
    deadline = time.time() + 300
    # quantize is executing once its private staging directory exists (it publishes by renaming it).
    while time.time() < deadline and not list((root / "store").glob("quantize/.tmp-*")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 130, err[-3000:]
    assert took < 15, took
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted during ") and last.endswith("; re-run the same command to resume"), last
    assert "quantize" in last, last
    assert "Traceback" not in err, err[-3000:]
    assert not list((root / "locks").glob("*.lock"))
    assert not list((root / "store").glob("*/.tmp-*"))
    assert not [p for p in scratch.iterdir() if p.name.startswith("clip-fp8-")]
    assert not list((root / "store").glob("quantize/[0-9a-f]*"))  # the interrupted stage published nothing

    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(Path(again.stdout.strip().splitlines()[-1].removeprefix("summary: ")).read_text())
    assert summary["stages"]["calibration_data"]["status"] == "cached"
    assert summary["stages"]["quantize"]["status"] == "completed"

    # What the person saw: Prefect's progress lines and the stage table, nothing to puzzle over.
    output = again.stdout + again.stderr
    # ModelOpt's own prints inside a stage ("Inserted 128 quantizers", "ModelOpt save/restore enabled ...") arrive
    # on Prefect's task-run logger: the console tells them apart by where they were printed.
    # And a run all from the cache, over in seconds: its temporary server is stopped while its services still flush
    # events, which they log as cancelled (tracebacks); that log is the server's, not the console's.
    cached = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert cached.returncode == 0, cached.stderr[-3000:]
    for noise in ("WARNING", "ERROR", "Warning", "Traceback", "[W]", "it/s]", "Error", "quantizers", "ModelOpt",
                  "Registered <class", "Removing existing directory", "Writing ONNX model"):
        for shown in (output, cached.stdout + cached.stderr):
            assert noise not in shown, (noise, [line for line in shown.splitlines() if noise in line][:3])
    # Each note whole: the TensorRT note's last words are on the console, wrapped under its column.
    table = again.stdout[again.stdout.index("stage "):]
    note = summary["stages"]["build_fp16"]["note"]
    assert " ".join(table.split()).count(" ".join(note.split())) >= 1, (note, table)


@pytest.mark.slow
def test_a_failing_stage_prints_the_table_one_error_line_and_the_report(shared_root):
    result = cli("run", "-o", str(shared_root), *SMALL, "--set", "quantization.exclude=['*patch_embedding*', '*nope*']",
                 timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "'*nope*'" in error
    assert "quantize          failed" in result.stdout and "audit             not run" in result.stdout
    (report,) = [line for line in result.stderr.splitlines() if line.startswith("report: ")]
    assert Path(report.removeprefix("report: ")).is_file()
    # --verbose adds Prefect's traceback for whoever asks; a locator that does not exist fails the same way before
    # any stage starts, so this run costs seconds, not a second pipeline.
    verbose = cli("run", "-o", str(shared_root), "--verbose", "--set", "model.source=/nonexistent", timeout=600)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert [line for line in verbose.stderr.splitlines() if line.startswith("error:")][-1].count("'/nonexistent'") == 1


def test_the_temporary_servers_output_goes_to_its_log_and_a_failed_start_names_it(tmp_path, monkeypatch, capfd):
    """A bare `clip-fp8 run` starts a temporary Prefect server: what it prints (tracebacks when stopped mid-flush, or
    a failed start) is its log's, not the console's; a start that fails says why in one line and names the log."""
    from clip_fp8.cli import TemporaryServer

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/missing/dir/prefect.db")
    # It sets PREFECT_API_URL for the run it would serve: that must not outlive this test (a later CLI would
    # take the dead server's URL as the one to use).
    before = os.environ.pop("PREFECT_API_URL", None)
    server = TemporaryServer()
    try:
        with pytest.raises(RuntimeError, match=r"the temporary Prefect server exited with code \d+: .+ \(log: ") as failed:
            server.wait(timeout=120)
    finally:
        server.stop()
        os.environ.pop("PREFECT_API_URL", None)
        if before is not None:
            os.environ["PREFECT_API_URL"] = before
    assert "\n" not in str(failed.value)
    console = capfd.readouterr()
    assert "Traceback" not in console.err + console.out, console.err[-2000:]
