"""A real ``tritonserver`` on a promoted repository: found, given a Python backend that sees this environment,
started, waited for, listed and stopped.

Which server: one on ``PATH`` (an NGC container, a Triton install) with its own backends, else the one the
``nvidia-pytriton`` wheel bundles (``pip install --no-deps nvidia-pytriton==0.7.0``: its numpy<2 pin is
for PyTriton's own Python code, which is not used). The bundled server has the Python backend only (no
ONNX Runtime or TensorRT backend), so the repository's models are Python-backend models
(``clip_fp8.triton_model``). Its Python backend needs a stub built for this interpreter's version beside
``libtriton_python.so``; the wheel ships one per version, so a backend folder is assembled once per
(server, Python) under the user cache. The stub embeds the system's ``libpython3.X`` and so starts
without this environment's packages: the server's environment names them in ``CLIP_FP8_SITE_PACKAGES``,
which each model's ``model.py`` adds as site directories first (what PyTriton does through ``PATH``).
The bundled stub was built against NumPy 1 and answers an output made by NumPy 2 with no data ("output
tensor shape does not match size of output"), so the stub's packages start with a NumPy 1 of their own
(``STUB_SITE``, installed by ``scripts/setup.sh``); the other packages, built against NumPy 2, import with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SITE_ENV = "CLIP_FP8_SITE_PACKAGES"
INSTALL_HINT = "pip install --no-deps nvidia-pytriton==0.7.0 (its bundled tritonserver), or put a tritonserver on PATH"
# The bundled stub's NumPy (see above), in this environment: scripts/setup.sh puts it there.
STUB_SITE = Path(sys.prefix) / "lib" / "clip-fp8-triton-stub"
STUB_NUMPY = "numpy==1.26.4"
STOP_WITHIN_S = 10.0


class ServerError(RuntimeError):
    """The server could not be found, started or reached (and why, in one line)."""


@dataclass
class TritonInstall:
    binary: Path
    backend_dir: Path | None  # None: the server's own default (/opt/tritonserver/backends)
    libs: Path | None = None  # shared libraries the bundled binary needs
    site: list[str] = field(default_factory=list)  # package folders the stub sees before this environment's


def _bundled() -> TritonInstall | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    binary = root / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the bundled tritonserver ({binary}) has no Python backend stub for Python {version}")
    # One backend folder per (wheel, Python): the backend loads the stub from beside libtriton_python.so.
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip-fp8" / "triton-backends"
    tag = hashlib.sha256(f"{root}:{binary.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    backends = cache / f"{tag}-py{version}"
    python = backends / "python"
    if not (python / "triton_python_backend_stub").is_file():
        staging = cache / f".{backends.name}.{os.getpid()}"
        (staging / "python").mkdir(parents=True, exist_ok=True)
        for item in (root / "tritonserver" / "backends" / "python").iterdir():
            if item.is_file():
                shutil.copy2(item, staging / "python" / item.name)
        shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
        try:
            staging.rename(backends)
        except OSError:  # another process assembled it first
            shutil.rmtree(staging, ignore_errors=True)
    if not (STUB_SITE / "numpy").is_dir():
        raise ServerError(f"the bundled tritonserver's Python backend needs NumPy 1 beside this environment's: "
                          f"pip install --target {STUB_SITE} {STUB_NUMPY} (scripts/setup.sh --serve does)")
    return TritonInstall(binary=binary, backend_dir=backends, libs=root.parent / "nvidia_pytriton.libs",
                         site=[str(STUB_SITE)])


def find_tritonserver() -> TritonInstall:
    """The server to run: ``tritonserver`` on PATH, else the nvidia-pytriton wheel's."""
    if found := shutil.which("tritonserver"):
        return TritonInstall(binary=Path(found), backend_dir=None)
    if (bundled := _bundled()) is not None:
        return bundled
    raise ServerError(f"no tritonserver found: {INSTALL_HINT}")


def site_packages() -> list[str]:
    """This environment's package folders (the stub's interpreter adds them, ``.pth`` files included)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(p for p in (paths["purelib"], paths["platlib"]) if Path(p).is_dir()))


def server_env(install: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    if install.libs is not None and install.libs.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (env.get("LD_LIBRARY_PATH"), str(install.libs)) if p)
    env[SITE_ENV] = os.pathsep.join([*install.site, *site_packages()])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """``tritonserver`` on ``repository``; ports 0 pick free ones. ``models``: load only these (explicit
    model control), else everything in the repository. Use as a context manager, or ``start``/``stop``."""

    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    models: list[str] | None = None
    model_config_name: str | None = None
    log: Path | None = None
    install: TritonInstall | None = None
    process: subprocess.Popen | None = field(default=None, init=False)

    def command(self) -> list[str]:
        install = self.install or find_tritonserver()
        cmd = [str(install.binary), f"--model-repository={self.repository}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
               "--exit-on-error=true", "--strict-readiness=true"]
        if install.backend_dir is not None:
            cmd.append(f"--backend-directory={install.backend_dir}")
        if self.models is not None:
            cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models)]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        return cmd

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 300.0) -> "TritonServer":
        self.install = self.install or find_tritonserver()
        for name in ("http_port", "grpc_port", "metrics_port"):
            if getattr(self, name) == 0:
                setattr(self, name, free_port())
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), env=server_env(self.install), stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with {self.process.returncode} while loading {self.repository}"
                                  f"{self._log_tail()}")
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready within {timeout:.0f} s{self._log_tail()}")

    def _log_tail(self, lines: int = 6) -> str:
        if not self.log or not Path(self.log).is_file():
            return ""
        errors = [line for line in Path(self.log).read_text(errors="replace").splitlines()
                  if line.startswith("E") or "error" in line.lower()]
        return (": " + " | ".join(errors[-lines:])) if errors else ""

    def _get(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://{self.http_url}{path}", method=method,
                                         data=b"{}" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0, b""

    def ready(self) -> bool:
        return self._get("/v2/health/ready")[0] == 200

    def index(self) -> list[dict]:
        """The repository index: every model with its version and state."""
        status, body = self._get("/v2/repository/index", method="POST")
        return json.loads(body) if status == 200 else []

    def stop(self, within: float = STOP_WITHIN_S) -> int | None:
        """SIGINT (Triton drains in-flight requests), then SIGKILL of its process group after ``within`` s."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        try:
            os.killpg(self.process.pid, signal.SIGINT)
            return self.process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()
        except ProcessLookupError:
            return self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def bytes_inputs(client_module, **values: list) -> list:
    """Triton ``BYTES`` inputs, one per keyword (``text=[...]``, ``image=[...]``: what ``clip_raw`` takes), for
    ``tritonclient.http`` or ``tritonclient.grpc``."""
    import numpy as np

    tensors = []
    for name, items in values.items():
        tensor = client_module.InferInput(name, [len(items)], "BYTES")
        tensor.set_data_from_numpy(np.array(items, dtype=np.object_))
        tensors.append(tensor)
    return tensors
