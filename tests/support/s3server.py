"""A real S3-compatible HTTP server on loopback for tests: moto's S3 server in a subprocess.

    with S3Server() as s3:
        write_deltalake(s3.uri("prefs"), data, storage_options=s3.storage_options)

or, through the session fixture ``s3`` below (import it into a conftest):

    from tests.support.s3server import s3  # noqa: F401

The server is moto's (PyPI ``moto[server]``): an in-memory S3 that speaks the real wire
protocol, path-style, SigV4 accepted but not checked. It runs in a child process of its own,
started by this file's ``__main__`` block, which

* binds port 0 on 127.0.0.1 itself and reports the port back on stdout (no free-port race);
* dies with the process that started it (prctl PR_SET_PDEATHSIG), so a killed test run leaves
  no server behind;
* serves requests one at a time (a lock around the WSGI app). moto checks S3's conditional
  PUT (``If-None-Match: *``) and then stores the object as two separate steps; with requests
  handled side by side, two writers racing for the same Delta log entry could both pass the
  check and one commit would silently overwrite the other. Serialised, the check and the
  store are atomic, as on AWS S3.

Concurrent Delta writers stay safe through S3 conditional PUT: ``aws_conditional_put: etag``
makes delta-rs create each ``_delta_log/NNNN.json`` with ``If-None-Match: *``, so the loser of
a race gets 412 Precondition Failed, re-reads the log and retries at the next version (or
fails with CommitFailedError on a real conflict). No DynamoDB lock and no unsafe rename.

Objects live in the server's memory: stop() (or a crash) loses them. ``S3SERVER_TRACE=1`` in
the test's environment makes the server log every request, its If-None-Match / If-Match header
and the status it answered to the log file (``log_path``).

The parent side of this module needs only the standard library; moto is needed in the
interpreter that runs the server (``python`` below, the test interpreter by default).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

__all__ = ["S3Server", "S3ServerError", "s3"]

REGION = "us-east-1"
ACCESS_KEY = "tuneloop-test"
SECRET_KEY = "tuneloop-test-secret"
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class S3ServerError(RuntimeError):
    pass


class S3Server:
    """One S3 server subprocess on 127.0.0.1 with one bucket.

    ``storage_options``: the dict to pass to delta-rs (DeltaTable, write_deltalake, ...).
    ``env``: the same settings as AWS_* environment variables, for a service subprocess
    (delta-rs and object_store read them when no storage_options are given).
    """

    def __init__(
        self,
        bucket: str = "tuneloop-test",
        *,
        python: str | None = None,
        start_timeout: float = 120.0,
        log_path: Path | str | None = None,
    ) -> None:
        self.bucket = bucket
        self.python = python or sys.executable
        self.start_timeout = start_timeout
        self.log_path = Path(log_path) if log_path else None
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise S3ServerError("S3 server not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> S3Server:
        if self.running:
            return self
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="s3server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        env["PYTHONUNBUFFERED"] = "1"
        if os.environ.get("S3SERVER_TRACE"):
            env["S3SERVER_TRACE"] = os.environ["S3SERVER_TRACE"]
        self._proc = subprocess.Popen(
            [self.python, str(Path(__file__).resolve()), "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=tempfile.gettempdir(),
            start_new_session=True,  # a Ctrl-C in the terminal goes to pytest, not here
        )
        try:
            self.port = self._read_port(time.monotonic() + self.start_timeout)
            self._wait_ready(time.monotonic() + self.start_timeout)
            self.create_bucket(self.bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_port(self, deadline: float) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        out = self._proc.stdout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise S3ServerError(f"S3 server did not report its port in time{self._tail()}")
            ready, _, _ = select.select([out], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(out.fileno(), 4096)
                if not chunk:
                    raise S3ServerError(
                        f"S3 server exited (rc={self._proc.wait()}) before serving{self._tail()}"
                    )
                buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith("PORT "):
            raise S3ServerError(f"unexpected S3 server output {line!r}{self._tail()}")
        return int(line.split()[1])

    def _wait_ready(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise S3ServerError(f"S3 server exited before serving{self._tail()}")
            try:
                self._request("GET", "/", timeout=10)
                return
            except (OSError, urllib.error.URLError) as exc:
                last = exc
                time.sleep(0.1)
        raise S3ServerError(f"S3 server on {self.endpoint} never answered: {last}{self._tail()}")

    def _tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_bytes()[-4000:].decode(errors="replace")
        return f"\n--- {self.log_path} (tail) ---\n{text}" if text.strip() else ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- settings for clients --------------------------------------------------------------

    @property
    def storage_options(self) -> dict[str, str]:
        """delta-rs storage options for this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            # Commit log entries with If-None-Match: * (safe concurrent writers).
            "AWS_CONDITIONAL_PUT": "etag",
        }

    @property
    def env(self) -> dict[str, str]:
        """The same settings as environment variables (merge into a subprocess's env)."""
        return dict(self.storage_options)

    def uri(self, prefix: str = "") -> str:
        """s3://bucket/prefix (a fresh unique prefix when none is given)."""
        prefix = prefix.strip("/") or f"t-{uuid.uuid4().hex[:12]}"
        return f"s3://{self.bucket}/{prefix}"

    # -- a minimal S3 client (stdlib; moto does not check signatures) -----------------------

    def _request(
        self, method: str, path: str, *, body: bytes | None = None, timeout: float = 60
    ) -> bytes:
        req = urllib.request.Request(self.endpoint + path, data=body, method=method)
        # moto takes the region and the access key from the Authorization header.
        req.add_header(
            "Authorization",
            f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20250101/{REGION}/s3/aws4_request, "
            "SignedHeaders=host, Signature=0",
        )
        with _DIRECT.open(req, timeout=timeout) as resp:  # never through an HTTP(S)_PROXY
            return resp.read()

    def create_bucket(self, bucket: str) -> None:
        try:
            self._request("PUT", f"/{urllib.parse.quote(bucket)}")
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # BucketAlreadyOwnedByYou
                raise

    def list_keys(self, prefix: str = "", bucket: str | None = None) -> list[str]:
        """Every key in the bucket under prefix (a prefix of an s3:// URI also works)."""
        bucket = bucket or self.bucket
        if prefix.startswith("s3://"):
            b, _, prefix = prefix[len("s3://") :].partition("/")
            bucket = b
        keys: list[str] = []
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            xml = self._request(
                "GET", f"/{urllib.parse.quote(bucket)}?{urllib.parse.urlencode(query)}"
            )
            root = ET.fromstring(xml)
            keys += [el.text or "" for el in root.iter(f"{_S3_NS}Key")]
            truncated = root.findtext(f"{_S3_NS}IsTruncated") == "true"
            token = root.findtext(f"{_S3_NS}NextContinuationToken")
            if not truncated or not token:
                return keys


# -- the pytest fixture ------------------------------------------------------------------------

if __name__ != "__main__":  # the server process needs no pytest
    import pytest

    @pytest.fixture(scope="session")
    def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
        """One S3 server (moto) per test session, with bucket ``tuneloop-test``.

        Tests share the bucket: give each table its own prefix, e.g. ``s3.uri()``."""
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
            pytest.fail("the S3 test server needs moto[server]: pip install -e '.[test]'")
        server = S3Server(log_path=tmp_path_factory.mktemp("s3") / "server.log")
        server.start()
        try:
            yield server
        finally:
            server.stop()


# -- the server process ------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os._exit(1)


def _serve(parent_pid: int | None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    import logging
    import threading

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto_app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()
    trace = os.environ.get("S3SERVER_TRACE") == "1"  # log each request and its conditions

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        # One request at a time: makes moto's conditional-PUT check-then-store atomic.
        if not trace:
            with lock:
                return list(moto_app(environ, start_response))
        conditions = {
            h: environ[k]
            for h, k in (("If-None-Match", "HTTP_IF_NONE_MATCH"), ("If-Match", "HTTP_IF_MATCH"))
            if k in environ
        }
        status: list[str] = []

        def recording_start_response(st, headers, exc_info=None):  # type: ignore[no-untyped-def]
            status.append(st)
            return start_response(st, headers, exc_info)

        with lock:
            body = list(moto_app(environ, recording_start_response))
        query = environ.get("QUERY_STRING", "")
        sys.stderr.write(
            f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}{'?' + query if query else ''}"
            f" {conditions or ''} -> {status[0] if status else '?'}\n"
        )
        return body

    server = make_server(
        "127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler
    )
    port = server.server_address[1]
    os.environ["MOTO_PORT"] = str(port)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    # Nobody reads the pipe after the port: anything printed later goes to the log instead of
    # filling the pipe and blocking the server.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    server.serve_forever()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="moto S3 server on a free loopback port")
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args()
    # Run as a script, this file's folder (tests/) heads sys.path: keep its modules out.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    _serve(args.parent_pid)
