"""The release as a kubelet would run it: the chart's rendered workloads as local processes.

`helm template` renders the chart; for every Deployment (its HPA's minReplicas when it has
one), for a Job (or a CronJob's job template) and for the `helm test` pods, each container
starts with exactly its rendered command and args (the image's ENTRYPOINT and CMD read from
its Dockerfile), its env (values, ConfigMap and Secret references, the downward API, the
kubelet's service links), its ConfigMap and Secret volumes written as files at their mount
paths, emptyDir and PVC volumes (pods that share a claim share a folder; `readOnly` honoured),
a read-only root filesystem, its uid, gid and fsGroup, no capabilities and no privilege
escalation, and its memory limit and CPU request as cgroup settings.

Each pod has its own mount, PID and UTS namespaces (tests/support/release_pod_init.py does the mounts)
and its own network namespace on a bridge; a Service is a virtual IP on that bridge whose
ports forward to the Service's ready pods (kube-proxy's userspace mode), and Service names
resolve through the cluster DNS on the node (the pod's resolv.conf as dnsPolicy ClusterFirst
writes it). Startup, readiness and liveness probes run as the
kubelet runs them, from the node against the pod IP; a failed liveness or startup probe
restarts the container with the kubelet's back-off.

The image is stood in for by the project's own environment (`.venv` at the Dockerfile's
`/opt/venv`, the source tree visible read-only). Scheduling is checked against one node: its
labels, no taints, and its allocatable CPU, memory and GPUs; a pod that does not fit is left
Pending with the reason (no GPU here: every container asking for `nvidia.com/gpu`).

A rendered field this harness does not implement raises `Unimplemented` with its path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tuneloop.common.local_kafka import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tuneloop"
HELM = ROOT / ".tools" / "bin" / "helm"
POD_INIT = Path(__file__).with_name("release_pod_init.py")
DOCKER_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_V1 = Path("/sys/fs/cgroup")


class HarnessError(RuntimeError):
    """The release cannot run as rendered."""


class Unimplemented(HarnessError):
    """A rendered field the harness does not implement: never skipped silently."""

    def __init__(self, path: str, why: str = "not implemented by the release harness") -> None:
        super().__init__(f"{path}: {why}")
        self.path = path


# ------------------------------------------------------------------ rendering


def render(
    values_files: Iterable[Path] = (),
    sets: Iterable[str] = (),
    *,
    release: str = "tuneloop",
    namespace: str = "tuneloop",
    set_json: Iterable[str] = (),
) -> list[dict[str, Any]]:
    cmd = [str(HELM), "template", release, str(CHART), "--namespace", namespace]
    for f in values_files:
        cmd += ["-f", str(f)]
    for s in sets:
        cmd += ["--set", s]
    for s in set_json:
        cmd += ["--set-json", s]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HarnessError(f"helm template failed: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# ------------------------------------------------------------------ the image


@dataclass
class Image:
    """What a Dockerfile's final stage sets for the container: read from the file itself."""

    dockerfile: Path
    env: dict[str, str]
    user: str
    workdir: str
    entrypoint: list[str]
    cmd: list[str]

    @classmethod
    def from_dockerfile(cls, path: Path) -> Image:
        lines, buf = [], ""
        for raw in path.read_text().splitlines():
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.endswith("\\"):
                buf += stripped[:-1] + " "
                continue
            lines.append(buf + stripped)
            buf = ""
        final: list[str] = []
        for line in lines:
            if line.split(None, 1)[0].upper() == "FROM":
                final = []
            else:
                final.append(line)
        env = {"PATH": DOCKER_DEFAULT_PATH}
        user, workdir, entrypoint, cmd = "0", "/", [], []
        for line in final:
            word, _, rest = line.partition(" ")
            word = word.upper()
            if word == "ENV":
                for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                    value = value.strip('"')
                    env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
            elif word == "USER":
                user = rest.strip()
            elif word == "WORKDIR":
                workdir = rest.strip()
            elif word == "ENTRYPOINT":
                entrypoint = json.loads(rest)
            elif word == "CMD":
                cmd = json.loads(rest)
        return cls(path, env, user, workdir, entrypoint, cmd)

    @property
    def venv(self) -> str:
        return self.env.get("VIRTUAL_ENV", "/opt/venv")


def dockerfile_for(image: str) -> Path:
    """The Dockerfile that builds an image, by its repository's last part: `tuneloop` is
    Dockerfile.cpu (skaffold's artifact), `tuneloop-<x>` is Dockerfile.<x>."""
    repo = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    suffix = "cpu" if repo == "tuneloop" else repo.removeprefix("tuneloop-")
    path = ROOT / "deploy" / "docker" / f"Dockerfile.{suffix}"
    if not path.is_file():
        raise HarnessError(f"image {image}: no {path.relative_to(ROOT)} builds it")
    return path


# ------------------------------------------------------------------ fields implemented

# Each rendered pod-spec field is implemented here or refused with its path.
PROBE = {
    "grpc": {"port", "service"}, "httpGet": {"path", "port", "scheme", "host", "httpHeaders"},
    "tcpSocket": {"port", "host"}, "initialDelaySeconds": None, "periodSeconds": None, "timeoutSeconds": None,
    "failureThreshold": None, "successThreshold": None,
}
CONTAINER = {
    "name": None, "image": None, "imagePullPolicy": None, "command": None, "args": None, "workingDir": None,
    "terminationMessagePath": None, "terminationMessagePolicy": None,
    "env": None, "ports": None, "resources": {"requests", "limits"},
    "startupProbe": PROBE, "livenessProbe": PROBE, "readinessProbe": PROBE,
    "securityContext": {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsNonRoot", "runAsUser",
                        "runAsGroup", "privileged", "capabilities", "seccompProfile"},
    "volumeMounts": None,
}
POD = {
    "restartPolicy": None, "dnsPolicy": None, "schedulerName": None, "serviceAccountName": None,
    "serviceAccount": None, "automountServiceAccountToken": None,
    "imagePullSecrets": None, "enableServiceLinks": None, "priorityClassName": None,
    "terminationGracePeriodSeconds": None, "nodeSelector": None, "tolerations": None,
    "affinity": {"nodeAffinity", "podAffinity", "podAntiAffinity"}, "topologySpreadConstraints": None,
    "securityContext": {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "fsGroupChangePolicy",
                        "seccompProfile", "supplementalGroups"},
    "containers": None, "volumes": None,
}
VOLUME = {"name", "emptyDir", "configMap", "secret", "persistentVolumeClaim"}
MOUNT = {"name", "mountPath", "readOnly", "subPath"}
ENV_FROM = {"fieldRef", "configMapKeyRef", "secretKeyRef"}


def check_fields(obj: dict[str, Any], allowed: dict[str, Any] | set[str], path: str) -> None:
    for key, value in obj.items():
        if key not in allowed:
            raise Unimplemented(f"{path}.{key}")
        sub = allowed[key] if isinstance(allowed, dict) else None
        if sub is not None and isinstance(value, dict):
            check_fields(value, sub, f"{path}.{key}")


def check_pod_spec(spec: dict[str, Any], path: str) -> None:
    check_fields(spec, POD, path)
    for i, c in enumerate(spec.get("containers", [])):
        cpath = f"{path}.containers[{i}]"
        check_fields(c, CONTAINER, cpath)
        for j, m in enumerate(c.get("volumeMounts", [])):
            check_fields(m, MOUNT, f"{cpath}.volumeMounts[{j}]")
        for j, e in enumerate(c.get("env", [])):
            check_fields(e, {"name", "value", "valueFrom"}, f"{cpath}.env[{j}]")
            if "valueFrom" in e:
                check_fields(e["valueFrom"], ENV_FROM, f"{cpath}.env[{j}].valueFrom")
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            raise Unimplemented(f"{cpath}.securityContext.privileged", "privileged containers are not run")
        if (sc.get("capabilities") or {}).get("add"):
            raise Unimplemented(f"{cpath}.securityContext.capabilities.add")
        if "seccompProfile" in sc and sc["seccompProfile"].get("type") != "RuntimeDefault":
            raise Unimplemented(f"{cpath}.securityContext.seccompProfile.type")
    if spec.get("serviceAccount", spec.get("serviceAccountName")) != spec.get("serviceAccountName"):
        raise Unimplemented(f"{path}.serviceAccount", "differs from serviceAccountName")
    if spec.get("schedulerName", "default-scheduler") != "default-scheduler":
        raise Unimplemented(f"{path}.schedulerName", "only the default scheduler")
    for i, v in enumerate(spec.get("volumes", [])):
        check_fields(v, VOLUME, f"{path}.volumes[{i}]")
    seccomp = (spec.get("securityContext") or {}).get("seccompProfile")
    if seccomp and seccomp.get("type") != "RuntimeDefault":
        raise Unimplemented(f"{path}.securityContext.seccompProfile.type")
    affinity = spec.get("affinity") or {}
    for kind in ("podAffinity", "podAntiAffinity"):
        if (affinity.get(kind) or {}).get("requiredDuringSchedulingIgnoredDuringExecution"):
            raise Unimplemented(f"{path}.affinity.{kind}.requiredDuringSchedulingIgnoredDuringExecution")


# ------------------------------------------------------------------ quantities


def quantity(value: Any) -> float:
    """A Kubernetes quantity as a number (bytes, cores)."""
    text = str(value)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# ------------------------------------------------------------------ the node's network


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)}: {done.stderr.strip()}")


class Network:
    """A bridge with the node's address; pods in network namespaces on veth pairs; Service
    virtual IPs on the bridge."""

    def __init__(self) -> None:
        self.tag = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        taken = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
        for _ in range(50):
            net = ipaddress.ip_network(f"10.{random.randint(200, 254)}.{random.randint(0, 255)}.0/24")
            if str(net.network_address)[:-2] not in taken:
                break
        self.net = net
        hosts = list(net.hosts())
        self.node_ip = str(hosts[0])
        self._pod_ips = iter(str(h) for h in hosts[1:150])
        self._vips = iter(str(h) for h in hosts[150:])
        self.bridge = f"tlb{self.tag}"
        self.namespaces: list[str] = []
        self._vip_set: set[str] = set()
        self._counter = itertools.count()

    def up(self) -> Network:
        _run("ip", "link", "add", "name", self.bridge, "type", "bridge")
        # A bridge without an address of its own takes the lowest of its ports': each new pod would
        # change the node's MAC under the others' ARP caches and cut their Service connections.
        mac = "02:" + ":".join(f"{b:02x}" for b in random.randbytes(5))
        _run("ip", "link", "set", self.bridge, "address", mac)
        _run("ip", "addr", "add", f"{self.node_ip}/{self.net.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        return self

    def add_pod(self) -> tuple[str, str]:
        """A new network namespace wired to the bridge: (its name, the pod IP)."""
        n = next(self._counter)
        ns, ip = f"tl{self.tag}p{n}", next(self._pod_ips)
        host_end, pod_end = f"tv{self.tag}{n}", f"tp{self.tag}{n}"
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", pod_end)
        _run("ip", "link", "set", pod_end, "netns", ns)
        _run("ip", "link", "set", host_end, "master", self.bridge, "up")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/{self.net.prefixlen}", "dev", pod_end)
        _run("ip", "-n", ns, "link", "set", pod_end, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "route", "add", "default", "via", self.node_ip)
        return ns, ip

    def add_vip(self, vip: str | None = None) -> str:
        vip = vip or next(self._vips)
        if vip not in self._vip_set:
            _run("ip", "addr", "add", f"{vip}/32", "dev", self.bridge)
            self._vip_set.add(vip)
        return vip

    def down(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)


class ServiceProxy:
    """kube-proxy's userspace mode: every Service port listens on the Service's VIP and
    forwards each connection to one of the Service's ready endpoints, in turn."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="service-proxy")
        self._thread.start()
        self._servers: list[asyncio.AbstractServer] = []

    def listen(self, vip: str, port: int, endpoints: Any) -> None:
        turn = itertools.count()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            eps = endpoints()
            if not eps:
                writer.close()
                return
            host, target = eps[next(turn) % len(eps)]
            try:
                up_reader, up_writer = await asyncio.open_connection(host, target)
            except OSError:
                writer.close()
                return

            async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                try:
                    while data := await r.read(65536):
                        w.write(data)
                        await w.drain()
                except (OSError, asyncio.CancelledError):
                    pass
                finally:
                    with contextlib.suppress(Exception):
                        w.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def start() -> None:
            self._servers.append(await asyncio.start_server(handle, vip, port, reuse_address=True))

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def stop(self) -> None:
        async def close() -> None:
            for s in self._servers:
                s.close()
                await s.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class ClusterDNS(asyncio.DatagramProtocol):
    """The cluster's DNS for dnsPolicy ClusterFirst: A records of `<service>.<namespace>.svc.
    <domain>` (and `kubernetes.default.svc...`); NXDOMAIN for every other name, at once, so
    that clients do not wait on a resolver they cannot reach."""

    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(Exception):
            assert self.transport is not None
            self.transport.sendto(self.answer(data), addr)

    def answer(self, query: bytes) -> bytes:
        qid, flags = query[:2], int.from_bytes(query[2:4], "big")
        labels, i = [], 12
        while query[i]:
            labels.append(query[i + 1 : i + 1 + query[i]].decode().lower())
            i += 1 + query[i]
        question = query[12 : i + 5]
        qtype = int.from_bytes(query[i + 1 : i + 3], "big")
        ip = self.records.get(".".join(labels))
        rd = flags & 0x0100
        if ip is None:
            return qid + (0x8080 | rd | 3).to_bytes(2, "big") + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
        answers = b""
        if qtype == 1:  # A
            answers = b"\xc0\x0c" + b"\x00\x01\x00\x01" + (5).to_bytes(4, "big") + b"\x00\x04" + ipaddress.ip_address(ip).packed
        header = qid + (0x8080 | rd).to_bytes(2, "big") + b"\x00\x01" + (1 if answers else 0).to_bytes(2, "big") + b"\x00\x00\x00\x00"
        return header + question + answers


# ------------------------------------------------------------------ pods


@dataclass
class ApiAccess:
    """How pods reach the Kubernetes API (the `kubernetes` Service): a TCP target on the node,
    the CA bundle and a token minting function (namespace, service account) -> token."""

    host: str
    port: int
    ca_pem: str
    token_for: Any
    service_ip: str = "10.96.0.1"


@dataclass
class ContainerStatus:
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    started: bool = False
    ready: bool = False


class Pod:
    def __init__(self, release: Release, name: str, meta: dict[str, Any], spec: dict[str, Any], path: str) -> None:
        self.release = release
        self.name = name
        self.labels = dict(meta.get("labels") or {})
        self.annotations = dict(meta.get("annotations") or {})
        self.spec = spec
        self.path = path
        self.phase = "Pending"
        self.reason = ""
        self.ip = ""
        self.ns = ""
        check_pod_spec(spec, f"{path}.spec")
        if len(spec["containers"]) != 1:
            raise Unimplemented(f"{path}.spec.containers", "one container per pod")
        self.container = spec["containers"][0]
        self.status = ContainerStatus()
        self.dir = release.workdir / "pods" / name
        self.dir.mkdir(parents=True)
        self.log_path = self.dir / "container.log"
        self.termination_log = self.dir / "termination-log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.evicted = False
        self.probe_failures = {"startup": 0, "liveness": 0, "readiness": 0}

    # -------------------------------------------------------- scheduling

    def schedule(self) -> bool:
        """Whether the node fits this pod (else Pending, with the reason)."""
        node = self.release.node
        for key, want in (self.spec.get("nodeSelector") or {}).items():
            if node.labels.get(key) != want:
                self.reason = f"Unschedulable: node selector {key}={want} matches no node"
                return False
        required = (((self.spec.get("affinity") or {}).get("nodeAffinity") or {})
                    .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
        for i, term in enumerate(required.get("nodeSelectorTerms", [])):
            for expr in term.get("matchExpressions", []):
                have = node.labels.get(expr["key"])
                op = expr["operator"]
                ok = {"In": have in expr.get("values", []), "NotIn": have not in expr.get("values", []),
                      "Exists": have is not None, "DoesNotExist": have is None}.get(op)
                if ok is None:
                    raise Unimplemented(f"{self.path}.spec.affinity.nodeAffinity.required.nodeSelectorTerms[{i}]")
                if not ok:
                    self.reason = f"Unschedulable: node affinity {expr['key']} {op}"
                    return False
        requests = (self.container.get("resources") or {}).get("requests") or {}
        for resource, amount in requests.items():
            free = node.allocatable.get(resource, 0) - node.used.get(resource, 0)
            if quantity(amount) > free:
                self.reason = f"Unschedulable: Insufficient {resource} (requests {amount}, node has {free:g} free)"
                return False
        for resource, amount in requests.items():
            node.used[resource] = node.used.get(resource, 0) + quantity(amount)
        return True

    def unschedule(self) -> None:
        requests = (self.container.get("resources") or {}).get("requests") or {}
        for resource, amount in requests.items():
            self.release.node.used[resource] -= quantity(amount)

    # -------------------------------------------------------- the container

    def _fs_group(self) -> int | None:
        return (self.spec.get("securityContext") or {}).get("fsGroup")

    def _own(self, folder: Path) -> None:
        """What the kubelet does with fsGroup: the volume's files belong to the group, writable
        by it, new files inherit it (setgid folders). OnRootMismatch: only when the root differs."""
        gid = self._fs_group()
        if gid is None:
            return
        policy = (self.spec.get("securityContext") or {}).get("fsGroupChangePolicy", "Always")
        st = folder.stat()
        if policy == "OnRootMismatch" and st.st_gid == gid and st.st_mode & 0o2070 == 0o2070:
            return
        for path in [folder, *folder.rglob("*")]:
            if path.is_symlink():
                continue
            os.chown(path, -1, gid)
            mode = path.stat().st_mode
            os.chmod(path, mode | (0o2070 if path.is_dir() else 0o060))

    def _write_items(self, folder: Path, data: dict[str, bytes], source: dict[str, Any], mode_default: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        mode = source.get("defaultMode", mode_default)
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                raise HarnessError(f"{self.path}: key {item['key']} not in {source}")
            target = folder / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[item["key"]])
            os.chmod(target, item.get("mode", mode))
            gid = self._fs_group()
            if gid is not None:
                os.chown(target, 0, gid)

    def _volumes(self) -> dict[str, tuple[str, Any, bool]]:
        """name -> (kind, host path or tmpfs size, read-only at the source)."""
        out: dict[str, tuple[str, Any, bool]] = {}
        rel = self.release
        for i, vol in enumerate(self.spec.get("volumes", [])):
            name, vpath = vol["name"], f"{self.path}.spec.volumes[{i}]"
            if "emptyDir" in vol:
                ed = vol["emptyDir"] or {}
                check_fields(ed, {"medium", "sizeLimit"}, f"{vpath}.emptyDir")
                if ed.get("medium") == "Memory":
                    size = int(quantity(ed.get("sizeLimit", "64Mi")))
                    out[name] = ("tmpfs", size, False)
                else:
                    # An emptyDir lives as long as its pod: a restarted container finds it as left.
                    folder = self.dir / "volumes" / name
                    folder.mkdir(parents=True, exist_ok=True)
                    os.chmod(folder, 0o777)
                    self._own(folder)
                    out[name] = ("bind", folder, False)
            elif "configMap" in vol:
                src = vol["configMap"]
                check_fields(src, {"name", "items", "defaultMode", "optional"}, f"{vpath}.configMap")
                cm = rel.get("ConfigMap", src["name"], f"{vpath}.configMap.name")
                data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
                folder = self.dir / "volumes" / name
                self._write_items(folder, data, src, 0o644)
                out[name] = ("bind", folder, True)
            elif "secret" in vol:
                src = vol["secret"]
                check_fields(src, {"secretName", "items", "defaultMode", "optional"}, f"{vpath}.secret")
                folder = self.dir / "volumes" / name
                self._write_items(folder, rel.secret_data(src["secretName"], f"{vpath}.secret.secretName"), src, 0o644)
                out[name] = ("bind", folder, True)
            elif "persistentVolumeClaim" in vol:
                src = vol["persistentVolumeClaim"]
                check_fields(src, {"claimName", "readOnly"}, f"{vpath}.persistentVolumeClaim")
                folder = rel.claim(src["claimName"], f"{vpath}.persistentVolumeClaim.claimName")
                self._own(folder)
                out[name] = ("bind", folder, bool(src.get("readOnly")))
            else:
                raise Unimplemented(vpath)
        return out

    def _env(self, image: Image) -> dict[str, str]:
        c, rel = self.container, self.release
        env = dict(image.env)
        env["HOSTNAME"] = self.name
        if self.spec.get("enableServiceLinks", True):
            env.update(rel.service_links())
        if rel.api is not None:
            env.update({"KUBERNETES_SERVICE_HOST": rel.api_vip, "KUBERNETES_SERVICE_PORT": "443",
                        "KUBERNETES_SERVICE_PORT_HTTPS": "443"})
        for i, e in enumerate(c.get("env", [])):
            epath = f"{self.path}.spec.containers[0].env[{i}]"
            if "value" in e or "valueFrom" not in e:
                env[e["name"]] = expand(str(e.get("value", "")), env)
                continue
            src = e["valueFrom"]
            if "fieldRef" in src:
                env[e["name"]] = self.field(src["fieldRef"]["fieldPath"], f"{epath}.valueFrom.fieldRef.fieldPath")
            elif "configMapKeyRef" in src:
                ref = src["configMapKeyRef"]
                cm = rel.get("ConfigMap", ref["name"], f"{epath}.valueFrom.configMapKeyRef.name")
                if ref["key"] not in (cm.get("data") or {}):
                    raise HarnessError(f"{epath}.valueFrom.configMapKeyRef.key: {ref['key']} not in {ref['name']}")
                env[e["name"]] = cm["data"][ref["key"]]
            else:
                ref = src["secretKeyRef"]
                data = rel.secret_data(ref["name"], f"{epath}.valueFrom.secretKeyRef.name")
                if ref["key"] not in data:
                    raise HarnessError(f"{epath}.valueFrom.secretKeyRef.key: {ref['key']} not in {ref['name']}")
                env[e["name"]] = data[ref["key"]].decode()
        return env

    def field(self, path: str, where: str) -> str:
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return (self.labels if m.group(1) == "labels" else self.annotations).get(m.group(2), "")
        values = {"metadata.name": self.name, "metadata.namespace": self.release.namespace, "status.podIP": self.ip,
                  "spec.nodeName": self.release.node.name, "status.hostIP": self.release.network.node_ip,
                  "spec.serviceAccountName": self.spec.get("serviceAccountName", "default")}
        if path not in values:
            raise Unimplemented(where, f"downward API field {path} is not implemented")
        return values[path]

    def _spec_file(self) -> Path:
        c, rel = self.container, self.release
        image = Image.from_dockerfile(dockerfile_for(c["image"]))
        pod_sc = self.spec.get("securityContext") or {}
        sc = {**pod_sc, **(c.get("securityContext") or {})}
        user, _, group = image.user.partition(":")
        uid = int(sc.get("runAsUser", user or 0))
        gid = int(sc.get("runAsGroup", group or 0))
        if sc.get("runAsNonRoot") and uid == 0:
            raise HarnessError(f"{self.path}: runAsNonRoot but the container would run as uid 0")
        groups = sorted({gid, *([pod_sc["fsGroup"]] if "fsGroup" in pod_sc else []), *pod_sc.get("supplementalGroups", [])})
        env = self._env(image)
        command = [expand(a, env) for a in c.get("command", image.entrypoint)]
        args = [expand(a, env) for a in c.get("args", image.cmd if "command" not in c else [])]
        volumes = self._volumes()
        mounts, mkdirs, mkfiles, own_shm = [], [], [], False
        for j, m in enumerate(c.get("volumeMounts", [])):
            if m["name"] not in volumes:
                raise HarnessError(f"{self.path}.spec.containers[0].volumeMounts[{j}].name: no volume {m['name']}")
            kind, src, src_ro = volumes[m["name"]]
            dst = m["mountPath"]
            own_shm |= dst == "/dev/shm"
            if kind == "tmpfs":
                mounts.append({"kind": "tmpfs", "dst": dst, "size": src})
                mkdirs.append(dst)
                continue
            if m.get("subPath"):
                src = Path(src) / m["subPath"]
                if not src.exists():
                    src.mkdir(parents=True)
                    self._own(src)
            (mkdirs if Path(src).is_dir() else mkfiles).append(dst)
            mounts.append({"kind": "bind", "src": str(src), "dst": dst, "ro": bool(m.get("readOnly")) or src_ro})
        if self.spec.get("automountServiceAccountToken", True):
            if rel.api is None:
                raise Unimplemented(f"{self.path}.spec.automountServiceAccountToken",
                                    "a service account token needs an API server (give the harness one)")
            folder = self.dir / "serviceaccount"
            sa = self.spec.get("serviceAccountName", "default")
            files = {"token": rel.api.token_for(rel.namespace, sa).encode(), "ca.crt": rel.api.ca_pem.encode(),
                     "namespace": rel.namespace.encode()}
            self._write_items(folder, files, {"defaultMode": 0o644}, 0o644)
            dst = "/var/run/secrets/kubernetes.io/serviceaccount"
            mkdirs.append(dst)
            mounts.append({"kind": "bind", "src": str(folder), "dst": dst, "ro": True})
        # The kubelet's termination message file: what the container writes there ends its status.
        message_path = c.get("terminationMessagePath", "/dev/termination-log")
        self.termination_log.touch(mode=0o666)
        os.chmod(self.termination_log, 0o666)
        mkfiles.append(message_path)
        mounts.append({"kind": "bind", "src": str(self.termination_log), "dst": message_path, "ro": False})
        mounts.sort(key=lambda m: m["dst"].count("/"))
        hosts = self.dir / "hosts"
        hosts.write_text(rel.hosts_file(self))
        resolv = self.dir / "resolv.conf"
        resolv.write_text(rel.resolv_conf(self))
        spec = {
            "hostname": self.name[:63],
            "reveal": rel.reveal,
            "image": [{"src": str(ROOT / ".venv"), "dst": image.venv}],
            "mkdirs": [image.venv, *mkdirs],
            "mkfiles": mkfiles,
            # The stand-in image's files live at the project's own path (its scripts name it in
            # their #! lines): when a volume covers that path (a checkout under /tmp), show it again.
            "reveal_after": [str(ROOT)] if any(str(ROOT).startswith(m["dst"].rstrip("/") + "/") for m in mounts)
            else [],
            "read_only_root": bool(sc.get("readOnlyRootFilesystem")),
            "mounts": mounts,
            "hosts": str(hosts),
            "resolv_conf": str(resolv),
            "own_shm": own_shm,
            "cwd": c.get("workingDir", image.workdir),
            "uid": uid,
            "gid": gid,
            "groups": groups,
            "drop_all_caps": "ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
            "no_new_privs": sc.get("allowPrivilegeEscalation") is False,
            "env": env,
            "argv": [*command, *args],
        }
        path = self.dir / "spec.json"
        path.write_text(json.dumps(spec, indent=1))
        return path

    def _cgroups(self) -> list[Path]:
        """Memory limit and CPU request, as the kubelet sets them (cgroup v1 here)."""
        resources = self.container.get("resources") or {}
        groups = []
        memory = CGROUP_V1 / "memory" / f"tuneloop-{self.release.network.tag}" / self.name
        memory.mkdir(parents=True, exist_ok=True)
        limit = (resources.get("limits") or {}).get("memory")
        if limit is not None:
            (memory / "memory.limit_in_bytes").write_text(str(int(quantity(limit))))
        groups.append(memory)
        cpu = CGROUP_V1 / "cpu" / f"tuneloop-{self.release.network.tag}" / self.name
        cpu.mkdir(parents=True, exist_ok=True)
        request = (resources.get("requests") or {}).get("cpu")
        if request is not None:
            (cpu / "cpu.shares").write_text(str(max(2, int(quantity(request) * 1024))))
        groups.append(cpu)
        return groups

    def start(self) -> None:
        """Start the container and the kubelet's loop for it (probes, restarts)."""
        self.ns, self.ip = self.release.network.add_pod()
        self.phase = "Running"
        self._thread = threading.Thread(target=self._kubelet, daemon=True, name=f"kubelet-{self.name}")
        self._thread.start()

    def _launch(self) -> None:
        spec = self._spec_file()
        groups = self._cgroups()

        def enter_cgroups() -> None:
            for g in groups:
                (g / "cgroup.procs").write_text(str(os.getpid()))
            # The pod goes with the harness: no container outlives an interrupted test run.
            die_with_parent()

        cmd = ["nsenter", f"--net=/var/run/netns/{self.ns}", "unshare", "--mount", "--uts", "--pid",
               "--fork", "--kill-child", "--mount-proc", "--propagation", "private", sys.executable, str(POD_INIT),
               str(spec)]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, preexec_fn=enter_cgroups)
        self.status.started = False
        self.status.ready = False

    def container_pid(self) -> int | None:
        """The container's own process (PID 1 of the pod's PID namespace), seen from the node."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        try:
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the pod's whole process group (kill -9 of a node's process)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    def _terminate(self) -> None:
        """SIGTERM to the container, SIGKILL after its grace period."""
        if self._proc is None or self._proc.poll() is not None:
            return
        pid = self.container_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        try:
            self._proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            self._proc.wait(10)

    def delete(self) -> None:
        self._stop.set()
        self._terminate()
        if self._thread is not None:
            self._thread.join(30)
        self.phase = "Deleted" if self.phase == "Running" else self.phase

    # -------------------------------------------------------- probes

    def probe(self, spec: dict[str, Any]) -> bool:
        timeout = spec.get("timeoutSeconds", 1)
        try:
            if "grpc" in spec:
                import grpc
                from grpc_health.v1 import health_pb2, health_pb2_grpc

                with grpc.insecure_channel(f"{self.ip}:{spec['grpc']['port']}") as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=spec["grpc"].get("service", "")), timeout=timeout)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            if "httpGet" in spec:
                get = spec["httpGet"]
                if get.get("scheme", "HTTP") != "HTTP":
                    raise Unimplemented(f"{self.path}: httpGet.scheme {get['scheme']}")
                port = self.port_number(get["port"])
                req = urllib.request.Request(f"http://{get.get('host', self.ip)}:{port}{get.get('path', '/')}")
                for h in get.get("httpHeaders", []):
                    req.add_header(h["name"], h["value"])
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return 200 <= resp.status < 400
            if "tcpSocket" in spec:
                import socket

                with socket.create_connection((self.ip, self.port_number(spec["tcpSocket"]["port"])), timeout):
                    return True
        except Unimplemented:
            raise
        except Exception:
            return False
        raise Unimplemented(f"{self.path}: probe {sorted(spec)}")

    def port_number(self, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in self.container.get("ports", []):
            if p.get("name") == port:
                return int(p["containerPort"])
        raise HarnessError(f"{self.path}: probe port {port!r} names no container port")

    def _kubelet(self) -> None:
        restart_policy = self.spec.get("restartPolicy", "Always")
        backoff = 10.0
        while not self._stop.is_set():
            self._launch()
            outcome = self._watch()
            code = self._proc.wait() if self._proc else -1
            self.status.exit_codes.append(code)
            self.status.ready = False
            if self._stop.is_set():
                return
            if outcome == "evicted":
                self.phase, self.evicted = "Failed", True
                return
            if restart_policy == "Never" or (restart_policy == "OnFailure" and code == 0):
                self.phase = "Succeeded" if code == 0 else "Failed"
                return
            self.status.restarts += 1
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 300.0)

    def _watch(self) -> str:
        """Run the probes until the container exits, is restarted or the pod is deleted."""
        c = self.container
        startup, liveness, readiness = c.get("startupProbe"), c.get("livenessProbe"), c.get("readinessProbe")
        start = time.monotonic()
        due = {"startup": 0.0, "liveness": 0.0, "readiness": 0.0}
        fails = {"startup": 0, "liveness": 0, "readiness": 0}
        self.probe_failures = fails
        passes = {"readiness": 0}
        started_at: float | None = None if startup else start
        self.status.started = startup is None
        if readiness is None and startup is None:
            self.status.ready = True
        next_disk_check = start
        while not self._stop.is_set():
            if self._proc is None or self._proc.poll() is not None:
                return "exited"
            now = time.monotonic()
            if now >= next_disk_check:
                next_disk_check = now + 5
                if self._over_disk_limit():
                    self._terminate()
                    return "evicted"
            if not self.status.started:
                if now - start >= startup.get("initialDelaySeconds", 0) and now >= due["startup"]:
                    due["startup"] = now + startup.get("periodSeconds", 10)
                    if self.probe(startup):
                        self.status.started, started_at = True, time.monotonic()
                        if readiness is None:
                            self.status.ready = True
                    else:
                        fails["startup"] += 1
                        if fails["startup"] >= startup.get("failureThreshold", 3):
                            self._terminate()
                            return "startup-failed"
            else:
                assert started_at is not None
                if liveness and now - started_at >= liveness.get("initialDelaySeconds", 0) and now >= due["liveness"]:
                    due["liveness"] = now + liveness.get("periodSeconds", 10)
                    if self.probe(liveness):
                        fails["liveness"] = 0
                    else:
                        fails["liveness"] += 1
                        if fails["liveness"] >= liveness.get("failureThreshold", 3):
                            self._terminate()
                            return "liveness-failed"
                if readiness and now - started_at >= readiness.get("initialDelaySeconds", 0) and now >= due["readiness"]:
                    due["readiness"] = now + readiness.get("periodSeconds", 10)
                    if self.probe(readiness):
                        fails["readiness"], passes["readiness"] = 0, passes["readiness"] + 1
                        if passes["readiness"] >= readiness.get("successThreshold", 1):
                            self.status.ready = True
                    else:
                        passes["readiness"], fails["readiness"] = 0, fails["readiness"] + 1
                        if fails["readiness"] >= readiness.get("failureThreshold", 3):
                            self.status.ready = False
            self._stop.wait(0.2)
        return "deleted"

    def _over_disk_limit(self) -> bool:
        """The kubelet's eviction of a pod whose disk-backed emptyDir outgrew its sizeLimit."""
        for vol in self.spec.get("volumes", []):
            ed = vol.get("emptyDir")
            if ed is None or ed.get("medium") == "Memory" or "sizeLimit" not in ed:
                continue
            folder = self.dir / "volumes" / vol["name"]
            used = sum(p.lstat().st_size for p in folder.rglob("*") if not p.is_symlink())
            if used > quantity(ed["sizeLimit"]):
                self.reason = f"Evicted: emptyDir {vol['name']} uses {used} bytes over its sizeLimit {ed['sizeLimit']}"
                return True
        return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout: float) -> str:
        """Wait until a run-to-completion pod ends: its phase."""
        deadline = time.monotonic() + timeout
        while self.phase in ("Pending", "Running") and time.monotonic() < deadline:
            if self.phase == "Pending":
                return self.phase
            time.sleep(0.5)
        return self.phase


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references in command, args and env values ($$ escapes)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _private_parent_of(path: Path) -> list[list[str]]:
    """The first folder above `path` others cannot enter (e.g. /root), with its child to show."""
    real = path.resolve()
    for parent in reversed(real.parents):
        if parent == Path("/"):
            continue
        if not parent.stat().st_mode & 0o001:
            return [[str(parent), str(Path(*real.parts[: len(parent.parts) + 1]))]]
    return []


@dataclass
class Node:
    name: str
    labels: dict[str, str]
    allocatable: dict[str, float]
    used: dict[str, float] = field(default_factory=dict)


def local_node() -> Node:
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    name = os.uname().nodename
    return Node(name, {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name},
                {"cpu": float(os.cpu_count() or 1), "memory": float(mem), "nvidia.com/gpu": 0.0})


class Job:
    """The Job controller for one Job: pods until one succeeds or the back-off limit is spent."""

    def __init__(self, release: Release, name: str, spec: dict[str, Any], path: str, uid: str | None = None) -> None:
        self.release, self.name, self.spec, self.path = release, name, spec, path
        known = {"backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "podFailurePolicy", "template",
                 "completions", "parallelism", "completionMode", "suspend", "podReplacementPolicy", "selector",
                 "manualSelector", "backoffLimitPerIndex", "maxFailedIndexes", "managedBy"}
        check_fields(spec, known, f"{path}.spec")
        # What the API server stores for a Job made from the chart: one pod at a time, run now.
        for key, want in (("completionMode", "NonIndexed"), ("suspend", False), ("manualSelector", False)):
            if spec.get(key, want) != want:
                raise Unimplemented(f"{path}.spec.{key}", f"{key}: {spec[key]}")
        for key in ("backoffLimitPerIndex", "maxFailedIndexes", "managedBy"):
            if key in spec:
                raise Unimplemented(f"{path}.spec.{key}")
        for i, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules", [])):
            if rule.get("action") != "Ignore" or set(rule) - {"action", "onPodConditions"}:
                raise Unimplemented(f"{path}.spec.podFailurePolicy.rules[{i}]")
        if spec.get("completions", 1) != 1 or spec.get("parallelism", 1) != 1:
            raise Unimplemented(f"{path}.spec.completions", "one completion, one pod at a time")
        self.uid = uid or hashlib.sha1(f"{name}{time.time()}".encode()).hexdigest()[:36]
        self.pods: list[Pod] = []
        self.failures = 0
        self.status = "Running"

    def new_pod(self) -> Pod:
        tmpl = self.spec["template"]
        meta = dict(tmpl.get("metadata") or {})
        meta["labels"] = {**(meta.get("labels") or {}), "batch.kubernetes.io/job-name": self.name,
                          "job-name": self.name, "batch.kubernetes.io/controller-uid": self.uid,
                          "controller-uid": self.uid}
        pod = self.release.make_pod(f"{self.name}-{_suffix()}", meta, tmpl["spec"], f"{self.path}.spec.template")
        self.pods.append(pod)
        return pod

    def run(self, timeout: float, on_pod: Any = None) -> str:
        """Run to completion: Complete, Failed (back-off limit or deadline) or Pending."""
        deadline = time.monotonic() + min(timeout, self.spec.get("activeDeadlineSeconds", timeout))
        while True:
            pod = self.new_pod()
            if not self.release.start_pod(pod):
                self.status = "Pending"
                return self.status
            if on_pod is not None:
                on_pod(pod)
            while pod.phase == "Running" and time.monotonic() < deadline:
                time.sleep(0.5)
            if pod.phase == "Running":
                pod.delete()
                self.status = "Failed"  # DeadlineExceeded
                return self.status
            pod.unschedule()
            if pod.phase == "Succeeded":
                self.status = "Complete"
                return self.status
            ignored = pod.evicted and any(
                c.get("type") == "DisruptionTarget"
                for r in (self.spec.get("podFailurePolicy") or {}).get("rules", [])
                for c in r.get("onPodConditions", []))
            if not ignored:
                self.failures += 1
            if self.failures > self.spec.get("backoffLimit", 6):
                self.status = "Failed"
                return self.status


def _suffix(n: int = 5) -> str:
    return "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=n))


class Release:
    """The rendered release on one node."""

    def __init__(
        self,
        objects: list[dict[str, Any]],
        workdir: Path,
        *,
        namespace: str = "tuneloop",
        claims: dict[str, Path] | None = None,
        api: ApiAccess | None = None,
        network: Network | None = None,
    ) -> None:
        self.objects = objects
        self.workdir = Path(workdir)
        self.namespace = namespace
        self.api = api
        self.node = local_node()
        self._own_network = network is None
        self.network = network or Network().up()
        self.proxy = ServiceProxy()
        self.pods: list[Pod] = []
        self.not_started: dict[str, str] = {}
        self.reveal = _private_parent_of(Path(sys.executable))
        self._claims = dict(claims or {})
        self.vips: dict[str, str] = {}
        for svc in self.all("Service"):
            if svc["spec"].get("type", "ClusterIP") not in ("ClusterIP", "NodePort", "LoadBalancer"):
                raise Unimplemented(f"Service/{svc['metadata']['name']}.spec.type")
            name = svc["metadata"]["name"]
            self.vips[name] = vip = self.network.add_vip()
            for port in svc["spec"]["ports"]:
                self.proxy.listen(vip, int(port["port"]), self._endpoints(svc, port))
        self.api_vip = ""
        if api is not None:
            self.api_vip = self.network.add_vip(api.service_ip)
            self.proxy.listen(self.api_vip, 443, lambda: [(api.host, api.port)])
        self.cluster_domain = "cluster.local"
        records = {f"{name}.{namespace}.svc.{self.cluster_domain}": vip for name, vip in self.vips.items()}
        if self.api_vip:
            records[f"kubernetes.default.svc.{self.cluster_domain}"] = self.api_vip
        self.dns = ClusterDNS(records)

        async def serve_dns() -> None:
            await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: self.dns, local_addr=(self.network.node_ip, 53))

        asyncio.run_coroutine_threadsafe(serve_dns(), self.proxy.loop).result(10)

    # -------------------------------------------------------- objects

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o.get("kind") == kind]

    def get(self, kind: str, name: str, where: str = "") -> dict[str, Any]:
        for o in self.all(kind):
            if o["metadata"]["name"] == name:
                return o
        raise HarnessError(f"{where or kind}: the release has no {kind} {name}")

    def secret_data(self, name: str, where: str) -> dict[str, bytes]:
        secret = self.get("Secret", name, where)
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
        return data

    def claim(self, name: str, where: str) -> Path:
        """The folder behind a PVC: one per claim, shared by every pod that mounts it."""
        if name not in self._claims:
            if not any(o["metadata"]["name"] == name for o in self.all("PersistentVolumeClaim")):
                raise HarnessError(f"{where}: no PersistentVolumeClaim {name} in the release (nor given)")
            self._claims[name] = self.workdir / "claims" / name
        folder = self._claims[name]
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def claim_path(self, name: str) -> Path:
        return self.claim(name, name)

    def service_links(self) -> dict[str, str]:
        """The kubelet's Docker-link variables for every Service of the namespace."""
        env: dict[str, str] = {}
        for svc in self.all("Service"):
            name = svc["metadata"]["name"].upper().replace("-", "_")
            vip = self.vips[svc["metadata"]["name"]]
            ports = svc["spec"]["ports"]
            env[f"{name}_SERVICE_HOST"] = vip
            env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
            for p in ports:
                proto = p.get("protocol", "TCP")
                if "name" in p:
                    env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
                base = f"{name}_PORT_{p['port']}_{proto}"
                env[base] = f"{proto.lower()}://{vip}:{p['port']}"
                env[f"{base}_PROTO"] = proto.lower()
                env[f"{base}_PORT"] = str(p["port"])
                env[f"{base}_ADDR"] = vip
            env[f"{name}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{vip}:{ports[0]['port']}"
        return env

    def hosts_file(self, pod: Pod) -> str:
        """The kubelet's /etc/hosts: localhost and the pod itself (Services resolve through DNS)."""
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{pod.ip}\t{pod.name}"]
        return "\n".join(lines) + "\n"

    def resolv_conf(self, pod: Pod) -> str:
        """dnsPolicy ClusterFirst: the cluster's DNS, the namespace's search path, ndots:5."""
        policy = pod.spec.get("dnsPolicy", "ClusterFirst")
        if policy != "ClusterFirst":
            raise Unimplemented(f"{pod.path}.spec.dnsPolicy", f"dnsPolicy {policy}")
        d, ns = self.cluster_domain, self.namespace
        return f"search {ns}.svc.{d} svc.{d} {d}\nnameserver {self.network.node_ip}\noptions ndots:5\n"

    def _endpoints(self, svc: dict[str, Any], port: dict[str, Any]) -> Any:
        selector = svc["spec"].get("selector") or {}
        target = port.get("targetPort", port["port"])

        def ready() -> list[tuple[str, int]]:
            out = []
            for pod in self.pods:
                if pod.phase == "Running" and pod.status.ready and all(
                        pod.labels.get(k) == v for k, v in selector.items()):
                    out.append((pod.ip, pod.port_number(target)))
            return out

        return ready

    # -------------------------------------------------------- workloads

    def make_pod(self, name: str, meta: dict[str, Any], spec: dict[str, Any], path: str) -> Pod:
        return Pod(self, name, meta, spec, path)

    def start_pod(self, pod: Pod) -> bool:
        self.pods.append(pod)
        if not pod.schedule():
            self.not_started[pod.path] = pod.reason
            return False
        pod.start()
        return True

    def replicas(self, deployment: dict[str, Any]) -> int:
        name = deployment["metadata"]["name"]
        for hpa in self.all("HorizontalPodAutoscaler"):
            ref = hpa["spec"]["scaleTargetRef"]
            if ref["kind"] == "Deployment" and ref["name"] == name:
                return int(hpa["spec"].get("minReplicas", 1))
        return int(deployment["spec"].get("replicas", 1))

    def start_deployments(self, only: Iterable[str] | None = None) -> None:
        wanted = set(only) if only is not None else None
        for dep in self.all("Deployment"):
            name = dep["metadata"]["name"]
            if wanted is not None and name not in wanted:
                continue
            tmpl = dep["spec"]["template"]
            template_hash = hashlib.sha256(json.dumps(tmpl, sort_keys=True).encode()).hexdigest()[:10]
            meta = dict(tmpl.get("metadata") or {})
            meta["labels"] = {**(meta.get("labels") or {}), "pod-template-hash": template_hash}
            for _ in range(self.replicas(dep)):
                pod = self.make_pod(f"{name}-{template_hash}-{_suffix()}", meta, tmpl["spec"],
                                    f"Deployment/{name}.spec.template")
                self.start_pod(pod)

    def wait_ready(self, timeout: float = 300.0, pods: Iterable[Pod] | None = None) -> None:
        targets = [p for p in (pods or self.pods) if p.phase != "Pending"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.status.ready for p in targets):
                return
            time.sleep(0.5)
        waiting = [p for p in targets if not p.status.ready]
        raise HarnessError("not ready in time: " + "; ".join(
            f"{p.name} (phase {p.phase}, restarts {p.status.restarts}, exits {p.status.exit_codes}):\n"
            f"{p.log()[-3000:]}" for p in waiting))

    def job(self, name: str, spec: dict[str, Any], path: str, uid: str | None = None) -> Job:
        return Job(self, name, spec, path, uid)

    def job_from_api(self, job: dict[str, Any]) -> Job:
        """A Job as the API server stores it (server defaults and all): this node runs its pods."""
        name = job["metadata"]["name"]
        return self.job(name, job["spec"], f"Job/{name}", job["metadata"]["uid"])

    def cronjob_job(self, name_suffix: str = "manual") -> Job:
        """A Job from the release's CronJob, as `kubectl create job --from=cronjob/...` makes it."""
        (cron,) = self.all("CronJob")
        cname = cron["metadata"]["name"]
        return self.job(f"{cname}-{name_suffix}", cron["spec"]["jobTemplate"]["spec"],
                        f"CronJob/{cname}.spec.jobTemplate")

    def test_pods(self) -> list[Pod]:
        """The `helm test` hook pods."""
        out = []
        for pod in self.all("Pod"):
            if "test" in pod["metadata"].get("annotations", {}).get("helm.sh/hook", ""):
                out.append(self.make_pod(pod["metadata"]["name"], pod["metadata"], pod["spec"],
                                         f"Pod/{pod['metadata']['name']}"))
        return out

    def by_label(self, component: str) -> list[Pod]:
        return [p for p in self.pods if p.labels.get("app.kubernetes.io/component") == component]

    def logs(self, tail: int = 3000) -> str:
        """Every pod's phase, exit codes and log tail: what a failed test shows."""
        return "\n".join(f"--- {p.name} ({p.phase}{', ' + p.reason if p.reason else ''}; exits "
                         f"{p.status.exit_codes})\n{p.log()[-tail:]}" for p in self.pods)

    def address(self, service: str, port: int) -> str:
        return f"{self.vips[service]}:{port}"

    def stop(self) -> None:
        for pod in self.pods:
            if pod.phase == "Running":
                pod.delete()
        if self.dns.transport is not None:
            self.proxy.loop.call_soon_threadsafe(self.dns.transport.close)
        self.proxy.stop()
        if self._own_network:
            self.network.down()
        for controller in ("memory", "cpu"):
            base = CGROUP_V1 / controller / f"tuneloop-{self.network.tag}"
            if base.is_dir():
                for child in base.iterdir():
                    if child.is_dir():
                        with contextlib.suppress(OSError):
                            child.rmdir()
                with contextlib.suppress(OSError):
                    base.rmdir()


def can_run() -> str | None:
    """Why this machine cannot run the harness, or None."""
    if os.geteuid() != 0:
        return "the release harness needs root (namespaces, mounts, veth)"
    for tool in ("ip", "nsenter", "unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"the release harness needs `{tool}`"
    if not (CGROUP_V1 / "memory").is_dir():
        return "the release harness needs the cgroup v1 memory controller"
    return None
