"""Run tuneloop services as local processes with the same entrypoint the images run
(`tuneloop serve <name>`), wait until they report SERVING, and stop them with SIGTERM.
Used by the demo and by tests that need the real thing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tuneloop.common.local_kafka import free_port

__all__ = ["ServiceProcess", "free_port"]


class ServiceProcess:
    """`tuneloop serve <name>` in a child process; a context manager that always stops it."""

    def __init__(self, name: str, args: list[str] | None = None, env: dict[str, str] | None = None,
                 log_dir: Path | None = None, port: int | None = None, metrics_port: int | None = None,
                 http: bool = False) -> None:
        self.name = name
        self.http = http
        self.port = port or free_port()
        self.metrics_port = metrics_port or free_port()
        cmd = [sys.executable, "-m", "tuneloop.cli", "serve", name, "--port", str(self.port),
               "--metrics-port", str(self.metrics_port)]
        self.cmd = cmd + list(args or [])
        self.env = {**os.environ, **(env or {})}
        self.log_path = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        if self.http:
            try:
                with urllib.request.urlopen(f"http://{self.target}/healthz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False
        with grpc.insecure_channel(self.target) as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                return r.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the whole process group (vLLM has workers), SIGKILL after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
