"""Start the CPU-only ``tritonserver`` bundled in the nvidia-pytriton wheel on a model repository.

For trying an exported repository (``seg-export triton MODEL.onnx --python-backend``) on a
machine without Docker or a GPU, and for this project's tests and Triton benchmark. On a GPU
box or a Jetson, use NVIDIA's Triton container instead (docs/triton.md).

The bundled binary needs, besides the wheel's own libraries on ``LD_LIBRARY_PATH``, a backend
directory laid out as ``python/{libtriton_python.so, triton_python_backend_utils.py,
triton_python_backend_stub}`` with the stub built for this Python, this interpreter's own
libpython first on ``LD_LIBRARY_PATH`` (another patch release's libpython breaks the stub),
and this interpreter's ``python3`` first on ``PATH`` (the stub finds numpy and onnxruntime
through it). The server listens on 127.0.0.1 only, on free ports.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from runtime.errors import MissingDependency, SegError

SHM_GLOB = "triton_python_backend_shm_region_*"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytriton_dirs() -> tuple[Path, Path]:
    """(the wheel's tritonserver folder, its bundled libraries), or a one-line error naming the package."""
    found = importlib.util.find_spec("pytriton")
    if found is None or not found.submodule_search_locations:
        raise MissingDependency("a local Triton server needs nvidia-pytriton: pip install nvidia-pytriton")
    pkg = Path(list(found.submodule_search_locations)[0])
    server, libs = pkg / "tritonserver", pkg.parent / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").is_file():
        raise MissingDependency(f"{server}: nvidia-pytriton has no bundled tritonserver; reinstall nvidia-pytriton")
    return server, libs


class LocalTritonServer:
    """A tritonserver process on 127.0.0.1 serving ``repo``; a context manager that always stops it."""

    def __init__(self, repo: str | Path, startup_timeout: float = 60.0, log: str | Path | None = None):
        self.repo = Path(repo)
        self.startup_timeout = startup_timeout
        self.log_path = Path(log) if log else None
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self._work: Path | None = None
        self._shm_before: set[str] = set()

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _backends(self, server: Path) -> Path:
        stub = server / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = stub / "triton_python_backend_stub"
        if not stub.is_file():
            raise SegError(f"nvidia-pytriton has no Python-backend stub for Python {sys.version.split()[0]}")
        python = self._work / "backends" / "python"
        python.mkdir(parents=True)
        for src in (server / "backends" / "python" / "libtriton_python.so", stub):
            os.symlink(src, python / src.name)
        shutil.copyfile(
            server / "backends" / "python" / "triton_python_backend_utils.py", python / "triton_python_backend_utils.py"
        )
        return python.parent

    def start(self) -> LocalTritonServer:
        server, libs = pytriton_dirs()
        self._work = Path(tempfile.mkdtemp(prefix="unet-edge-triton-"))
        self._shm_before = {p.name for p in Path("/dev/shm").glob(SHM_GLOB)}
        try:
            backends = self._backends(server)
            self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
            env = dict(os.environ)
            ld = [sysconfig.get_config_var("LIBDIR") or "", str(libs), env.get("LD_LIBRARY_PATH", "")]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
            cmd = [
                str(server / "bin" / "tritonserver"),
                f"--model-repository={self.repo.resolve()}",
                f"--backend-directory={backends}",
                f"--cache-directory={server / 'caches'}",
                "--http-address=127.0.0.1",
                "--grpc-address=127.0.0.1",
                "--metrics-address=127.0.0.1",
                f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}",
                "--allow-metrics=true",
                "--allow-gpu-metrics=false",
                "--exit-timeout-secs=5",
                "--log-verbose=0",
            ]
            log = open(self.log_path or self._work / "server.log", "wb")  # noqa: SIM115 (the server writes it)
            with log:
                self.proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self._work, start_new_session=True
                )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SegError(f"tritonserver exited during start-up ({self.proc.returncode}): {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise SegError(f"tritonserver was not ready within {self.startup_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        p = self.log_path or (self._work / "server.log" if self._work else None)
        if p is None or not p.is_file():
            return "(no log)"
        text = p.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def kill(self) -> None:
        """SIGKILL the server and its Python-backend stubs (a crash, as tests need one)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 20 s), and remove what it left behind."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            try:  # stubs left by a killed server, in the server's own process group
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self.proc.poll() is None:
                self.proc.wait()
        for p in Path("/dev/shm").glob(SHM_GLOB):
            if p.name not in self._shm_before:
                p.unlink(missing_ok=True)
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
