"""Cache-key locks that a dead run cannot keep: Prefect's file locks with a renewed lease.

With ``isolation_level=SERIALIZABLE`` Prefect takes a lock per cache key before a task runs, so of two
runs that need the same artifact at once one computes it and the other waits, then reads it from the
cache. Prefect's ``FileSystemLockManager`` writes locks without an expiry unless it is given a hold
timeout, which its transactions never pass: a run killed while holding a lock (SIGKILL, OOM, a lost
node) leaves a lock that every later run waits on forever.

``LeasedFileLockManager`` passes a short hold timeout and renews it from a background thread while the
holder's process lives. A live holder keeps its lock however long the stage takes; a dead one stops
renewing and the lock expires within one lease, after which Prefect's own expiry check removes it.
Lock files live beside the result storage, so runs on several hosts sharing that directory coordinate
through it; runs that share only an ``s3://`` store lock through the bucket (``clip_fp8.object_locks``).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Optional

from prefect.locking.filesystem import FileSystemLockManager
from prefect.types._datetime import now

from clip_fp8.artifacts import atomic_write

LEASE_ENV = "CLIP_FP8_LOCK_LEASE_S"
DEFAULT_LEASE_S = 30.0

# Every manager of this process, so that an interrupted run can give its locks back before it exits.
_MANAGERS: "weakref.WeakSet" = weakref.WeakSet()


def register(manager) -> None:
    """Count ``manager`` (anything with ``release_held()``) among this process's lock managers."""
    _MANAGERS.add(manager)


def release_held_locks() -> int:
    """Remove the lock files this process holds (an interrupt: the stage threads holding them will not
    unwind). Return how many were released."""
    return sum(manager.release_held() for manager in list(_MANAGERS))


class LeasedFileLockManager(FileSystemLockManager):
    """A killed holder's lock expires after ``lease_seconds`` (env ``CLIP_FP8_LOCK_LEASE_S``, default 30)."""

    def __init__(self, lock_files_directory: Path, lease_seconds: float | None = None) -> None:
        super().__init__(lock_files_directory)
        self.lease_seconds = float(lease_seconds or os.environ.get(LEASE_ENV) or DEFAULT_LEASE_S)
        self._renewers = LeaseRenewers(self.lease_seconds, "lock-lease")
        _MANAGERS.add(self)

    def release_held(self) -> int:
        released = 0
        for key in self._renewers.keys():
            holder = (self._locks.get(key) or {}).get("holder")
            self._stop_renewing(key)
            path = self._lock_path_for_key(key)
            try:
                if holder is not None and json.loads(path.read_bytes()).get("holder") == holder:
                    path.unlink()
                    released += 1
            except (FileNotFoundError, ValueError):
                pass
        return released

    def acquire_lock(self, key: str, holder: str, acquire_timeout: Optional[float] = None,
                     hold_timeout: Optional[float] = None) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.lease_seconds)
        if acquired and hold_timeout is None:
            self._start_renewing(key, holder)
        return acquired

    def release_lock(self, key: str, holder: str) -> None:
        self._stop_renewing(key)
        super().release_lock(key, holder)

    def _get_lock_info(self, key: str, use_cache: bool = True):
        try:
            return super()._get_lock_info(key, use_cache=use_cache)
        except ValueError:
            # A holder killed while Prefect wrote its lock file leaves it empty or torn (seen: SIGKILL during a
            # run's first lock). Read it as a lease from when it was written, by nobody alive, so it expires
            # like any other instead of failing every later run with a JSON error.
            path = self._lock_path_for_key(key)
            try:
                written = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
            except FileNotFoundError:
                return None
            return {"holder": "unreadable lock file", "path": path,
                    "expiration": written + timedelta(seconds=self.lease_seconds)}

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        try:
            return super().is_locked(key, use_cache=use_cache)
        except FileNotFoundError:  # another waiter removed the same expired lock first
            self._locks.pop(key, None)
            return False

    def _start_renewing(self, key: str, holder: str) -> None:
        path = self._lock_path_for_key(key)

        def renew() -> bool:
            try:
                current = json.loads(path.read_bytes())
            except (FileNotFoundError, ValueError):
                return False  # released, or taken over after we stalled past the lease: not ours to renew
            if current.get("holder") != holder:
                return False
            expiration = now("UTC") + timedelta(seconds=self.lease_seconds)
            # Readers see the old lease or the new one, never a torn file.
            atomic_write(path, json.dumps({"holder": holder, "expiration": str(expiration)}))
            if key in self._locks:
                self._locks[key]["expiration"] = expiration
            return True

        self._renewers.start(key, renew)

    def _stop_renewing(self, key: str) -> None:
        self._renewers.stop(key)


class LeaseRenewers:
    """One daemon thread per held key, calling ``renew()`` every third of a lease until it returns False
    (the lock is no longer ours) or ``stop(key)``: what keeps a live holder's lease from running out."""

    def __init__(self, lease_seconds: float, name: str):
        self.lease_seconds = lease_seconds
        self.name = name
        self._threads: dict[str, tuple[threading.Event, threading.Thread]] = {}

    def start(self, key: str, renew: Callable[[], bool]) -> None:
        self.stop(key)
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.lease_seconds / 3):
                if not renew():
                    return

        thread = threading.Thread(target=loop, name=f"{self.name}-{key[:12]}", daemon=True)
        self._threads[key] = (stop, thread)
        thread.start()

    def stop(self, key: str) -> None:
        renewer = self._threads.pop(key, None)
        if renewer is not None:
            renewer[0].set()
            renewer[1].join(timeout=5)

    def keys(self) -> list[str]:
        return list(self._threads)
