"""A real Redis server (Debian's redis-server) on a free local port, for the gateway's shared limits."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tuneloop.common.local_kafka import free_port


class RedisServer:
    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.host, self.port, self.workdir = host, free_port(), workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            pytest.skip("redis-server is not installed (make setup installs Debian's package as root)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # No persistence: limit windows and leases are worth nothing after a restart.
        cmd = [binary, "--bind", self.host, "--port", str(self.port), "--save", "", "--appendonly", "no",
               "--dir", str(self.workdir), "--protected-mode", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"redis-server on {self.host}:{self.port} did not answer in {timeout_s}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
