"""Nobody unauthenticated at the controls: the compose file's Prefect server requires its auth string and binds
to loopback, and a server started with that setting refuses an API call without it."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker" / "compose.yaml"
BIN = Path(sys.executable).parent


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` (what `docker compose config` would do)."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in env and env[name]:
            return env[name]
        if op == ":?":
            raise ValueError(f"{name}: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, value)


def test_the_compose_server_requires_auth_binds_to_loopback_and_bounds_the_workers():
    compose = yaml.safe_load(COMPOSE.read_text())
    server, worker = compose["services"]["server"], compose["services"]["worker"]
    with pytest.raises(ValueError, match="PREFECT_AUTH: set PREFECT_AUTH=user:password"):
        _interpolate(server["environment"]["PREFECT_SERVER_API_AUTH_STRING"], {})  # no way to start it open
    env = {"PREFECT_AUTH": "admin:s3cret"}
    assert _interpolate(server["environment"]["PREFECT_SERVER_API_AUTH_STRING"], env) == "admin:s3cret"
    assert _interpolate(worker["environment"]["PREFECT_API_AUTH_STRING"], env) == "admin:s3cret"
    (port,) = server["ports"]
    assert _interpolate(port, env) == "127.0.0.1:4200:4200"
    assert _interpolate(port, {**env, "PREFECT_BIND": "0.0.0.0"}) == "0.0.0.0:4200:4200"
    assert worker["environment"]["CLIP_FP8_ALLOWED_ROOTS"] == "/data"
    assert any(v.startswith("/data:/data") for v in worker["volumes"])


@pytest.mark.slow
def test_a_server_started_with_the_compose_auth_setting_refuses_unauthenticated_calls(tmp_path):
    compose = yaml.safe_load(COMPOSE.read_text())
    auth = "admin:" + os.urandom(8).hex()
    server_env = {k: _interpolate(str(v), {"PREFECT_AUTH": auth}) for k, v in compose["services"]["server"]["environment"].items()
                  if not k.startswith("PREFECT_API_DATABASE")}  # sqlite here instead of the compose file's PostgreSQL
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **server_env, "PREFECT_HOME": str(tmp_path),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/prefect.db"}
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/api"

    def get(path: str, credentials: str | None = None) -> int:
        request = urllib.request.Request(base + path)
        if credentials:
            request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    try:
        deadline = time.time() + 180
        while get("/health") != 200 and time.time() < deadline:
            time.sleep(0.5)
        assert get("/health") == 200  # probes stay open
        assert get("/admin/settings") == 401
        assert get("/admin/settings", "admin:wrong") == 401
        assert get("/admin/settings", auth) == 200
        # What the worker does: a Prefect client given the same string through PREFECT_API_AUTH_STRING.
        client = subprocess.run(
            [sys.executable, "-c", "from prefect import get_client\nwith get_client(sync_client=True) as c: "
             "print(len(c.read_work_pools()))"],
            env={**os.environ, "PREFECT_API_URL": base, "PREFECT_API_AUTH_STRING": auth},
            capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr[-2000:]
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
