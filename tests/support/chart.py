"""The chart rendered by the real helm, and readers of what it renders (pods, containers, env,
mounted ConfigMaps, NetworkPolicy reachability) shared by the chart, release and trainer tests."""

from __future__ import annotations

import functools
import ipaddress
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml


REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tuneloop"
HELM = REPO / ".tools" / "bin" / "helm"
RELEASE = "tl"
NS = "ml"
KUBE_VERSION = "1.33"
SERVICES = ("generation", "reward", "feedback", "store", "gateway")
GRPC_SERVICES = ("generation", "reward", "feedback", "store")
GRPC_PORTS = {"generation": 50051, "reward": 50052, "feedback": 50053, "store": 50054}
VALUES = {
    "default": [],
    "gpu": [CHART / "values-gpu.yaml"],
    "dev": [CHART / "values-dev.yaml"],
    "all": [CHART / "ci" / "all-values.yaml"],
    "object-storage": [CHART / "values-object-storage.yaml"],
}
# Kinds from CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def template_args(files: list[Path], *extra: str) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NS, "--kube-version", f"{KUBE_VERSION}.0"]
    for f in files:
        args += ["-f", str(f)]
    return args + list(extra)


@functools.cache
def _rendered(values: str, sets: tuple[str, ...] = ()) -> str:
    return helm(*template_args(VALUES[values], *sets)).stdout


def render(values: str, *sets: str) -> list[dict[str, Any]]:
    """Fresh copies of the rendered objects (tests may change what they get); `sets` are --set
    arguments on top of the values file(s)."""
    return [d for d in yaml.safe_load_all(_rendered(values, sets)) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def name_of(component: str) -> str:
    return f"{RELEASE}-tuneloop-{component}"


def pod_specs(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template, by "<Kind>/<name>"."""
    out = {}
    for o in objs:
        spec = o.get("spec") or {}
        if o["kind"] == "Deployment":
            out[f"Deployment/{o['metadata']['name']}"] = spec["template"]["spec"]
        elif o["kind"] == "CronJob":
            out[f"CronJob/{o['metadata']['name']}"] = spec["jobTemplate"]["spec"]["template"]["spec"]
        elif o["kind"] == "Job":
            out[f"Job/{o['metadata']['name']}"] = spec["template"]["spec"]
        elif o["kind"] == "Pod":
            out[f"Pod/{o['metadata']['name']}"] = spec
    return out


def pod_labels(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The labels of every Deployment's, CronJob's and Job's pods, by "<Kind>/<name>"."""
    out = {}
    for o in objs:
        if o["kind"] in ("Deployment", "Job"):
            out[f"{o['kind']}/{o['metadata']['name']}"] = o["spec"]["template"]["metadata"]["labels"]
        elif o["kind"] == "CronJob":
            labels = o["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
            out[f"CronJob/{o['metadata']['name']}"] = labels
    return out


def container(objs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    deployment = by_kind(objs, "Deployment")[name_of(component)]
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env") or []}


def assert_valid_kubernetes(objs: list[dict[str, Any]]) -> None:
    """Every object is valid Kubernetes 1.33 (strict), bar the CRD kinds."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (test extra) not installed"
    )
    assert objs
    unvalidated = set()
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unvalidated.add(obj["kind"])
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {err.message}")
    assert unvalidated <= CRD_KINDS


def mounted_config_maps(
    objs: list[dict[str, Any]], pod: dict[str, Any], c: dict[str, Any]
) -> dict[str, str]:
    """{path in the container: content} of every ConfigMap key the container mounts."""
    config_maps = by_kind(objs, "ConfigMap")
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for mount in c["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        data = config_maps[source["name"]]["data"]
        paths = {i["key"]: i["path"] for i in source.get("items") or []} or {k: k for k in data}
        for key, rel in paths.items():
            if "subPath" in mount:
                if mount["subPath"] == rel:
                    files[mount["mountPath"]] = data[key]
            else:
                files[str(Path(mount["mountPath"]) / rel)] = data[key]
    return files


def mount_of(c: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The container's volumeMount that holds `path` (the deepest one)."""
    holding = [m for m in c["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    return max(holding, key=lambda m: len(m["mountPath"]), default=None)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert not selector.get("matchExpressions"), "evaluator handles matchLabels only"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_matches(peer: dict[str, Any], other: dict[str, Any]) -> bool:
    if "ipBlock" in peer:
        return "ip" in other and ipaddress.ip_address(other["ip"]) in ipaddress.ip_network(peer["ipBlock"]["cidr"])
    if "ip" in other and "labels" not in other:
        return False  # an address outside the cluster is no pod
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": other["namespace"]})
    else:
        ns_ok = other["namespace"] == NS
    return ns_ok and ("podSelector" not in peer or _selects(peer["podSelector"], other["labels"]))


def _port_matches(rule_ports: list[dict[str, Any]] | None, port: tuple[str | None, int], protocol: str) -> bool:
    if not rule_ports:
        return True
    name, number = port
    return any(p.get("port") in (name, number) and p.get("protocol", "TCP") == protocol for p in rule_ports)


def allowed(
    policies: list[dict[str, Any]],
    direction: str,
    pod_labels: dict[str, str],
    other: dict[str, Any],
    port: tuple[str | None, int],
    protocol: str = "TCP",
) -> bool:
    """Whether traffic between a tuneloop pod and `other` may pass, per the policies' rules
    (Ingress: other -> pod on the pod's port; Egress: pod -> other on other's port)."""
    policy_type, rules_key, peers_key = {
        "in": ("Ingress", "ingress", "from"),
        "out": ("Egress", "egress", "to"),
    }[direction]
    selecting = [
        p
        for p in policies
        if policy_type in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod_labels)
    ]
    if not selecting:
        return True
    return any(
        _port_matches(rule.get("ports"), port, protocol)
        and (not rule.get(peers_key) or any(_peer_matches(peer, other) for peer in rule[peers_key]))
        for p in selecting
        for rule in p["spec"].get(rules_key) or []
    )
