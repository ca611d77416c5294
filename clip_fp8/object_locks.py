"""Cache-key locks kept in the object store, for workers on several hosts that share only the bucket.

With an ``s3://`` ``output.root``, two workers on different hosts (each with its own local cache and its
own Prefect database) have one thing in common: the bucket. A lock is the object
``<root>/locks/<key>.lock``, created with S3's conditional write (``If-None-Match: *``: of two creators
at the same moment exactly one succeeds), its holder and lease expiry in the object's metadata. The
holder renews the lease from a background thread by rewriting the object only while it is still the one
it wrote (``If-Match`` on its ETag); a holder that dies stops renewing, and once its lease has run out a
waiter deletes exactly that object (``If-Match`` again, so it never deletes a lock that another waiter
has just taken) and creates its own. The guarantees are the file locks' (``clip_fp8.locking``): a live
holder keeps its lock however long the stage takes, a dead one loses it within one lease.

Needs an S3 API with conditional writes and deletes (AWS S3 since 2024, MinIO, moto) and hosts whose
clocks agree to well within a lease (NTP), since each host compares the lease with its own clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any, Optional

from clip_fp8.locking import DEFAULT_LEASE_S, LEASE_ENV, LeaseRenewers, register


def _condition_failed(exc: OSError) -> bool:
    # s3fs maps HTTP 412 to FileExistsError for If-None-Match and to a plain OSError for If-Match.
    return isinstance(exc, FileExistsError) or "pre-condition" in str(exc)


class ObjectStoreLockManager:
    """Prefect's ``LockManager`` protocol over lock objects in an S3 bucket (see the module docstring)."""

    def __init__(self, fs: Any, directory: str, lease_seconds: float | None = None, poll_seconds: float = 0.5):
        self.fs = fs  # an s3fs.S3FileSystem
        self.bucket, _, prefix = directory.removeprefix("s3://").strip("/").partition("/")
        self.prefix = prefix.strip("/")
        self.lease_seconds = float(lease_seconds or os.environ.get(LEASE_ENV) or DEFAULT_LEASE_S)
        self.poll_seconds = poll_seconds
        self._held: dict[str, tuple[str, str]] = {}  # key -> (holder, ETag of the object we last wrote)
        self._renewers = LeaseRenewers(self.lease_seconds, "s3-lock-lease")
        self._lock = threading.Lock()
        register(self)

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}.lock" if self.prefix else f"{key}.lock"

    def _write(self, key: str, holder: str, condition: dict) -> str:
        expiration = time.time() + self.lease_seconds
        out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._object(key),
                              Body=json.dumps({"holder": holder, "expiration": expiration}).encode(),
                              Metadata={"holder": holder, "expiration": repr(expiration)}, **condition)
        return out["ETag"]

    def _head(self, key: str) -> dict | None:
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self._object(key))
        except FileNotFoundError:
            return None
        meta = head.get("Metadata") or {}
        return {"etag": head["ETag"], "holder": meta.get("holder", ""),
                "expiration": float(meta.get("expiration") or 0.0)}

    def _delete(self, key: str, etag: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self._object(key), IfMatch=etag)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not _condition_failed(exc):
                raise

    # Prefect's LockManager protocol.
    def acquire_lock(self, key: str, holder: str, acquire_timeout: Optional[float] = None,
                     hold_timeout: Optional[float] = None) -> bool:
        if self.is_lock_holder(key, holder):
            return True
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            try:
                etag = self._write(key, holder, {"IfNoneMatch": "*"})
            except OSError as exc:
                if not _condition_failed(exc):
                    raise
            else:
                with self._lock:
                    self._held[key] = (holder, etag)
                self._start_renewing(key, holder)
                return True
            current = self._head(key)
            if current is not None and current["expiration"] < time.time():
                self._delete(key, current["etag"])  # the holder died: its lease ran out
                continue
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_seconds)

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: Optional[float] = None,
                            hold_timeout: Optional[float] = None) -> bool:
        return await asyncio.to_thread(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        self._stop_renewing(key)
        with self._lock:
            _, etag = self._held.pop(key)
        self._delete(key, etag)

    def release_held(self) -> int:
        """Give back every lock this process holds (an interrupt); return how many."""
        released = 0
        for key, (holder, _) in list(self._held.items()):
            self.release_lock(key, holder)
            released += 1
        return released

    def is_locked(self, key: str) -> bool:
        current = self._head(key)
        return current is not None and current["expiration"] >= time.time()

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with self._lock:
            return self._held.get(key, ("", ""))[0] == holder

    def wait_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_seconds)
        return True

    async def await_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)

    def _start_renewing(self, key: str, holder: str) -> None:
        def renew() -> bool:
            with self._lock:
                held = self._held.get(key)
            if held is None or held[0] != holder:
                return False
            try:
                etag = self._write(key, holder, {"IfMatch": held[1]})
            except OSError as exc:
                # Taken over after we stalled past the lease: not ours any more. Else a network hiccup:
                # try again before the lease runs out.
                return not _condition_failed(exc)
            with self._lock:
                if key in self._held:
                    self._held[key] = (holder, etag)
            return True

        self._renewers.start(key, renew)

    def _stop_renewing(self, key: str) -> None:
        self._renewers.stop(key)
