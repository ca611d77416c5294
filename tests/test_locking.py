"""Cache-key locks: a live holder keeps its lock past the lease, a killed one loses it within a lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.locking.filesystem import FileSystemLockManager

from clip_fp8.locking import LeasedFileLockManager

HOLD = """
import sys, time
from pathlib import Path
from {module} import {cls}
manager = {cls}(Path(sys.argv[1]){extra})
assert manager.acquire_lock("stage-key", holder="run-a")
print("held", flush=True)
time.sleep(600)
"""


def hold_in_subprocess(lock_dir: Path, module: str, cls: str, extra: str = "") -> subprocess.Popen:
    code = HOLD.format(module=module, cls=cls, extra=extra)
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_live_holder_keeps_the_lock_and_a_killed_one_loses_it(tmp_path):
    proc = hold_in_subprocess(tmp_path, "clip_fp8.locking", "LeasedFileLockManager", ", lease_seconds=1.0")
    waiter = LeasedFileLockManager(tmp_path, lease_seconds=1.0)
    try:
        time.sleep(2.5)  # well past the first lease: only renewal keeps it
        assert waiter.is_locked("stage-key")
        assert not waiter.acquire_lock("stage-key", holder="run-b", acquire_timeout=0.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    t0 = time.monotonic()
    assert waiter.acquire_lock("stage-key", holder="run-b", acquire_timeout=5)
    assert time.monotonic() - t0 < 2.0  # at most one lease after the kill
    assert waiter.is_lock_holder("stage-key", "run-b")
    waiter.release_lock("stage-key", "run-b")
    assert not waiter.is_locked("stage-key")


@pytest.mark.slow
def test_prefects_own_file_lock_outlives_a_killed_holder(tmp_path):
    """Why the lease exists: Prefect's transactions pass no hold timeout, so this lock never expires."""
    proc = hold_in_subprocess(tmp_path, "prefect.locking.filesystem", "FileSystemLockManager")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not FileSystemLockManager(tmp_path).acquire_lock("stage-key", holder="run-b", acquire_timeout=2)


def test_lease_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_FP8_LOCK_LEASE_S", "7")
    assert LeasedFileLockManager(tmp_path).lease_seconds == 7.0


def test_a_lock_file_torn_by_a_killed_writer_expires_like_a_lease(tmp_path):
    """A SIGKILL while the lock file is being written leaves it empty (seen in the kill-and-resume test):
    it is read as a lease from when it was written, so it blocks for at most one lease and then goes."""
    import pytest

    (tmp_path / "stage-key.lock").write_bytes(b"")
    with pytest.raises(ValueError):  # what Prefect's own manager does with it: every later run fails
        FileSystemLockManager(tmp_path).is_locked("stage-key")
    manager = LeasedFileLockManager(tmp_path, lease_seconds=1.0)
    assert manager.is_locked("stage-key")  # a writer may still be mid-write: not taken yet
    time.sleep(1.5)
    assert manager.acquire_lock("stage-key", holder="run-b", acquire_timeout=5)
    manager.release_lock("stage-key", holder="run-b")
