"""A real Kubernetes control plane for the tests: kine (etcd API over SQLite), kube-apiserver and
kube-controller-manager on free loopback ports, with certificates made by openssl.

There are no nodes: Pods are created and admitted (Pod Security, RBAC, ...) but stay Pending.
`scripts/build_kube.sh` (run by `make setup`) builds the three binaries into .tools/bin.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest
import yaml
from tuneloop.common.local_kafka import die_with_parent, free_port

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

REPO = Path(__file__).resolve().parents[2]
HELM = REPO / ".tools" / "bin" / "helm"
BIN = REPO / ".tools" / "bin"
BINARIES = ("kine", "kube-apiserver", "kube-controller-manager")
SKIP_ENV = "TUNELOOP_SKIP_KUBE"
SERVICE_CIDR = "10.96.0.0/16"
# The `kubernetes` Service's address (the first of SERVICE_CIDR): pods of the release harness
# reach the API server there, so the serving certificate names it.
KUBERNETES_SERVICE_IP = "10.96.0.1"
ISSUER = "https://kubernetes.default.svc.cluster.local"


class KubeApiError(RuntimeError):
    """A request the API server refused: its HTTP status and Status message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


def missing_binaries(bin_dir: Path = BIN) -> list[str]:
    return [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def make_certificates(d: Path) -> None:
    """CA, API server serving cert (127.0.0.1), client certs for the admin (system:masters) and
    the controller-manager, and the service-account signing key pair. ECDSA P-256: fast to make."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_subject = ["-subj", "/CN=tuneloop-test-ca"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "7", *ca_subject, cwd=d)
    san = (f"subjectAltName=IP:127.0.0.1,IP:{KUBERNETES_SERVICE_IP},DNS:localhost,DNS:kubernetes,"
           "DNS:kubernetes.default.svc")
    certs = {
        "apiserver": ("/CN=kube-apiserver", "serverAuth", san),
        "admin": ("/O=system:masters/CN=tuneloop-test-admin", "clientAuth", ""),
        "controller-manager": ("/CN=system:kube-controller-manager", "clientAuth", ""),
    }
    for name, (subject, usage, extra) in certs.items():
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
        ext = d / f"{name}.ext"
        lines = [
            "basicConstraints=CA:FALSE",
            "keyUsage=critical,digitalSignature",
            f"extendedKeyUsage={usage}",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid,issuer",
        ]
        ext.write_text("\n".join([*lines, extra]) + "\n")
        ca = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "7"]
        _openssl("x509", "-req", "-in", f"{name}.csr", *ca, "-extfile", ext.name, "-out", f"{name}.crt", cwd=d)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=d)
    _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, user: dict[str, str], namespace: str = "default") -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}],
                "users": [{"name": "user", "user": user}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user", "namespace": namespace}}],
                "current-context": "test",
            }
        )
    )
    path.chmod(0o600)
    return path


@dataclass
class KubeControlPlane:
    """kine + kube-apiserver + kube-controller-manager, started by `start` and stopped by `stop`."""

    workdir: Path
    bin_dir: Path = BIN
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pki = self.workdir / "pki"
        self.logs = self.workdir / "logs"
        self.kine_port = free_port()
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.ca = self.pki / "ca.crt"
        self.kubeconfig = self.workdir / "admin.kubeconfig"

    # ------------------------------------------------------------ processes

    def _spawn(self, name: str, args: list[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def start(self, timeout_s: float = 120.0) -> KubeControlPlane:
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} not built in {self.bin_dir}: run `make setup`")
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        self.pki.mkdir(parents=True, exist_ok=True)
        make_certificates(self.pki)
        p = self.pki
        data = self.workdir / "kine"
        data.mkdir(exist_ok=True)
        self._spawn(
            "kine",
            [
                f"--listen-address=tcp://127.0.0.1:{self.kine_port}",
                # kine's default SQLite parameters, without fsync: the data lives as long as the test run.
                f"--endpoint=sqlite://{data}/state.db?_journal_mode=WAL&_busy_timeout=30000&_synchronous=OFF"
                "&_txlock=immediate&_stmt_cache_size=20&cache=shared",
                "--metrics-bind-address=0",
            ],
        )
        self._wait_tcp(self.kine_port, "kine", timeout_s)
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{self.kine_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={p}",
                f"--tls-cert-file={p / 'apiserver.crt'}",
                f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={self.ca}",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction,PodSecurity",
                # Privileged pods are allowed by the server: only Pod Security may refuse them.
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait_ready(timeout_s)
        self.admin_kubeconfig(self.kubeconfig)
        cm_kubeconfig = self.workdir / "controller-manager.kubeconfig"
        cm_user = {
            "client-certificate-data": _b64(p / "controller-manager.crt"),
            "client-key-data": _b64(p / "controller-manager.key"),
        }
        write_kubeconfig(cm_kubeconfig, self.server, self.ca, cm_user)
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={cm_kubeconfig}",
                # No health or metrics endpoint: readiness is seen in what the controllers do.
                "--secure-port=0",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={p / 'sa.key'}",
                f"--root-ca-file={self.ca}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--profiling=false",
                "--v=1",
            ],
        )
        # The controllers run once the default namespace has its default ServiceAccount.
        self.wait_for_service_account("default", "default", timeout_s)

    def _wait_tcp(self, port: int, name: str, timeout_s: float) -> None:
        import socket

        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not listening on {port}:\n{self.log_tail(name)}") from None
                time.sleep(0.1)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _wait_ready(self, timeout_s: float) -> None:
        ctx = self._ssl_context()
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as err:
                last = err.read().decode(errors="replace")
            except OSError as err:
                last = str(err)
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-apiserver not ready: {last}\n{self.log_tail('kube-apiserver')}")
            time.sleep(0.3)

    def stop(self) -> None:
        # Reverse start order: the controller-manager, the API server, then its storage.
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()

    # ------------------------------------------------------------ clients

    def api_client(self, kubeconfig: Path | None = None) -> ApiClient:
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
        token: str | None = None,
    ) -> Any:
        """One REST call as the admin (or the bearer of `token`), objects in wire form (the
        generated client's models reject some values the API server accepts, e.g. a quantity
        written as an integer)."""
        url = self.server + path + (f"?{urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"} | ({"Content-Type": content_type} if data is not None else {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        ctx = ssl.create_default_context(cafile=str(self.ca)) if token else self._ssl_context()
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = json.loads(raw).get("message") or err.reason
            except ValueError:
                message = raw.decode(errors="replace") or err.reason
            raise KubeApiError(err.code, message) from None

    def wait_for_service_account(self, namespace: str, name: str, timeout_s: float = 60.0) -> None:
        """Pods of a namespace are only admitted once its ServiceAccount exists."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            deadline = time.monotonic() + timeout_s
            while True:
                self._check_alive()
                try:
                    core.read_namespaced_service_account(name, namespace)
                    return
                except ApiException as err:
                    if err.status != 404 or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"serviceaccount {namespace}/{name}: {err.status} {err.reason}\n"
                            + self.log_tail("kube-controller-manager")
                        ) from None
                time.sleep(0.2)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> str:
        """A namespace, ready for pods (its default ServiceAccount exists)."""
        from kubernetes import client

        with self.api_client() as api:
            body = {"metadata": {"name": name, "labels": labels or {}}}
            client.CoreV1Api(api).create_namespace(body)
        self.wait_for_service_account(name, "default")
        return name

    def admin_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A cluster-admin kubeconfig whose context defaults to `namespace`."""
        p = self.pki
        admin = {"client-certificate-data": _b64(p / "admin.crt"), "client-key-data": _b64(p / "admin.key")}
        return write_kubeconfig(path, self.server, self.ca, admin, namespace)

    def service_account_token(self, namespace: str, name: str, expiration_s: int = 3600) -> str:
        """A bound token of the ServiceAccount (TokenRequest API), as a pod would get it."""
        from kubernetes import client

        with self.api_client() as api:
            request = {"spec": {"expirationSeconds": expiration_s}}
            out = client.CoreV1Api(api).create_namespaced_service_account_token(name, namespace, request)
        return out.status.token

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount, its namespace the default."""
        token = self.service_account_token(namespace, name)
        return write_kubeconfig(path, self.server, self.ca, {"token": token}, namespace)

    def wait_for(self, what: str, probe: Any, timeout_s: float = 60.0, poll_s: float = 0.3) -> Any:
        """Poll `probe()` until it returns something truthy; fail naming `what`."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} after {timeout_s:.0f}s\n{self.log_tail('kube-controller-manager', 20)}")
            time.sleep(poll_s)


def helm(kube: KubeControlPlane, home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """helm against the control plane, with its own cache and config under `home`."""
    if not HELM.exists():
        pytest.fail(f"helm not built at {HELM}: `make setup` builds it", pytrace=False)
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    cmd = [str(HELM), *args, "--kubeconfig", str(kube.kubeconfig)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result
