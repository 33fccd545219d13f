"""The Helm chart, rendered by the real helm: lint, schema, Kubernetes 1.33 validity, and what the
rendered objects promise (hardened pods, native gRPC probes, only the gateway reachable from
outside, GPU scheduling of the trainer, monitoring for every service). Also the pieces around
it: the `helm test` health script run against real gRPC health servers, the API keys Secret
read by the gateway's own loader, Strimzi topics, skaffold and the Dockerfiles. The preference
store on a volume or on object storage, and its consumer-lag autoscaling.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chart import (
    CHART,
    GRPC_PORTS,
    GRPC_SERVICES,
    HELM,
    KUBE_VERSION,
    NS,
    RELEASE,
    REPO,
    SERVICES,
    VALUES,
    allowed,
    assert_valid_kubernetes,
    by_kind,
    container,
    env_of,
    helm,
    mount_of,
    mounted_config_maps,
    name_of,
    pod_labels,
    pod_specs,
    render,
    template_args,
)

pytestmark = pytest.mark.skipif(not HELM.exists(), reason=f"helm not built at {HELM} (run `make setup`)")


# ---------------------------------------------------------------- lint, schema, validity


@pytest.mark.parametrize("values", sorted(VALUES))
def test_helm_lint_strict(values):
    args = ["lint", "--strict", str(CHART), "--kube-version", f"{KUBE_VERSION}.0"]
    for f in VALUES[values]:
        args += ["-f", str(f)]
    result = helm(*args)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", sorted(VALUES))
def test_rendered_objects_are_valid_kubernetes_1_33(values):
    assert_valid_kubernetes(render(values))


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("generation.replicas=-1", "/generation/replicas"),
        ("generation.engine=tgi", "/generation/engine"),
        ("gateway.bogus=1", "/gateway"),
        ("kafka.bootstrapServers=kafka", "/kafka/bootstrapServers"),
        ("trainer.cronJob.concurrencyPolicy=Sometimes", "/trainer/cronJob/concurrencyPolicy"),
        ("gateway.apiKeys.keys[0].tenant=a", "/gateway/apiKeys/keys/0"),
        ("store.root=gs://bucket/prefs", "/store/root"),
        ("store.root=prefs", "/store/root"),
        ("store.objectStorage.endpoint=minio:9000", "/store/objectStorage/endpoint"),
        ("store.autoscaling.targetCPUUtilizationPercentage=70", "/store/autoscaling"),
        ("store.autoscaling.targetLagPerReplica=0", "/store/autoscaling/targetLagPerReplica"),
    ],
)
def test_values_schema_rejects_bad_values_naming_the_field(setting, field):
    result = helm(*template_args([], "--set", setting), check=False)
    assert result.returncode != 0
    assert f"'{field}'" in result.stderr, result.stderr


# ---------------------------------------------------------------- what the objects promise


def test_default_install_has_every_service_and_no_optional_objects():
    objs = render("default")
    kinds = {o["kind"] for o in objs}
    assert set(by_kind(objs, "Deployment")) == {name_of(s) for s in SERVICES}
    assert set(by_kind(objs, "Service")) == {name_of(s) for s in SERVICES}
    assert list(by_kind(objs, "CronJob")) == [f"{RELEASE}-tuneloop-retrain"]
    assert set(by_kind(objs, "PersistentVolumeClaim")) == {name_of("registry"), name_of("preferences"), name_of("runs")}
    # Optional objects (and the CRDs they need) stay off unless asked for.
    assert not kinds & {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "Ingress", "Job"}
    assert not any("nvidia.com/gpu" in json.dumps(spec) for spec in pod_specs(objs).values())
    # Only the gateway is exposed over HTTP; the rest speak gRPC; each has a metrics port.
    for s in SERVICES:
        ports = {p["name"]: p for p in by_kind(objs, "Service")[name_of(s)]["spec"]["ports"]}
        assert set(ports) == ({"http", "metrics"} if s == "gateway" else {"grpc", "metrics"})
    for s in GRPC_SERVICES:
        ports = {p["name"]: p for p in by_kind(objs, "Service")[name_of(s)]["spec"]["ports"]}
        assert (ports["grpc"]["port"], ports["metrics"]["port"]) == (GRPC_PORTS[s], 9090)


@pytest.mark.parametrize("values", sorted(VALUES))
def test_every_pod_is_non_root_with_a_read_only_root_filesystem(values):
    specs = pod_specs(render(values))
    assert len(specs) >= 7  # 5 Deployments, the CronJob, the helm test Pod
    for where, spec in specs.items():
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["runAsUser"] != 0, where
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["tmp"], where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc.get("privileged") is not True, where
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], where
            assert "limits" in c["resources"] and "memory" in c["resources"]["limits"], where


def test_services_run_the_one_entrypoint_with_native_grpc_probes():
    objs = render("default")
    for s in GRPC_SERVICES:
        c = container(objs, s)
        args = c["args"]
        assert args[:6] == ["serve", s, "--port", str(GRPC_PORTS[s]), "--metrics-port", "9090"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": GRPC_PORTS[s], "metrics": 9090}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["grpc"] == {"port": GRPC_PORTS[s]}, (s, probe)
            assert "httpGet" not in c[probe] and "exec" not in c[probe]
    assert container(objs, "generation")["args"][6:] == ["--model", "policy@production"]
    assert container(objs, "reward")["args"][6:] == ["--model", "reward@production"]
    gateway = container(objs, "gateway")
    assert gateway["args"] == ["serve", "gateway", "--port", "8080", "--metrics-port", "9095"]
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def test_settings_and_volumes_are_wired_to_the_right_services():
    objs = render("default")
    services = by_kind(objs, "Service")
    registry, store_root = "/var/lib/tuneloop/registry", "/var/lib/tuneloop/store"
    for s in ("generation", "reward", "feedback", "store"):
        assert env_of(container(objs, s))["TUNELOOP_KAFKA_BOOTSTRAP_SERVERS"] == "tuneloop-kafka-bootstrap:9092"
    gen = container(objs, "generation")
    assert env_of(gen)["TUNELOOP_GENERATION_ENGINE"] == "transformers"
    for s in ("generation", "reward"):
        c = container(objs, s)
        assert env_of(c)["TUNELOOP_REGISTRY_ROOT"] == registry
        assert {"name": "registry", "mountPath": registry, "readOnly": True} in c["volumeMounts"]
    store = container(objs, "store")
    assert env_of(store)["TUNELOOP_STORE_ROOT"] == store_root
    assert {"name": "store", "mountPath": store_root} in store["volumeMounts"]
    assert not any(m["name"] == "registry" for m in store["volumeMounts"])
    feedback = container(objs, "feedback")
    assert env_of(feedback)["TUNELOOP_STORE_ROOT"] == store_root
    assert {"name": "store", "mountPath": store_root, "readOnly": True} in feedback["volumeMounts"]
    # On a volume, no object-storage settings.
    assert not any(n.startswith("AWS_") for s in SERVICES for n in env_of(container(objs, s)))

    # The gateway's targets are the Services' gRPC ports.
    gw = env_of(container(objs, "gateway"))
    for key, target in (("GENERATION", "generation"), ("FEEDBACK", "feedback")):
        host, port = gw[f"TUNELOOP_GATEWAY_{key}_TARGET"].split(":")
        grpc_port = {p["name"]: p["port"] for p in services[host]["spec"]["ports"]}["grpc"]
        assert (host, int(port)) == (name_of(target), grpc_port)
    keys_file = Path(gw["TUNELOOP_GATEWAY_API_KEYS_FILE"])
    gw_pod = by_kind(objs, "Deployment")[name_of("gateway")]["spec"]["template"]["spec"]
    mount = next(m for m in container(objs, "gateway")["volumeMounts"] if m["name"] == "api-keys")
    secret_volume = next(v for v in gw_pod["volumes"] if v["name"] == "api-keys")["secret"]
    assert keys_file.parent == Path(mount["mountPath"])
    assert [i["path"] for i in secret_volume["items"]] == [keys_file.name]

    cron = by_kind(objs, "CronJob")[f"{RELEASE}-tuneloop-retrain"]
    trainer_pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    trainer = trainer_pod["containers"][0]
    assert trainer["args"] == ["train", "retrain", "--config", "/etc/tuneloop/retrain.yaml"]
    assert {"name": "registry", "mountPath": registry} in trainer["volumeMounts"]
    assert {"name": "store", "mountPath": store_root, "readOnly": True} in trainer["volumeMounts"]
    config_volume = next(v for v in trainer_pod["volumes"] if v["name"] == "config")["configMap"]["name"]
    config_map = by_kind(objs, "ConfigMap")[config_volume]
    assert set(config_map["data"]) == {"retrain.yaml", "success-criteria.yaml"}
    # What the files say is checked by the trainer's own loaders below.
    # Each claim a pod mounts is one the chart creates.
    claims = set(by_kind(objs, "PersistentVolumeClaim"))
    for where, spec in pod_specs(objs).items():
        for v in spec["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, where


@pytest.mark.parametrize("values", sorted(VALUES))
def test_trainer_config_is_read_by_the_trainers_own_loaders(values, tmp_path, monkeypatch):
    """The retrain command's --config and the criteria it names are files in the trainer's
    container, accepted by the code that reads them, pointing at the volumes mounted there."""
    from tuneloop.common.registry import RegistrySettings
    from tuneloop.trainer.config import TrainerSettings, load_config
    from tuneloop.trainer.criteria import load_criteria
    from tuneloop.trainer.retrain import RetrainConfig

    objs = render(values)
    pods = {k: v for k, v in pod_specs(objs).items() if k.split("/")[0] in ("CronJob", "Job")}
    assert pods
    for where, pod in pods.items():
        trainer = next(c for c in pod["containers"] if c["name"] == "trainer")
        files = mounted_config_maps(objs, pod, trainer)
        local = tmp_path / where.replace("/", "_")
        local.mkdir()

        def materialise(path: str) -> Path:
            assert path in files, f"{where}: {path} is not mounted in the trainer (mounted: {sorted(files)})"
            out = local / Path(path).name
            out.write_text(files[path])
            return out

        args = trainer["args"]
        config_path = args[args.index("--config") + 1]
        config = load_config(RetrainConfig, materialise(config_path))
        criteria = load_criteria(materialise(str(config.criteria)))
        assert criteria.held_out_prompts and criteria.probes.items, where

        # The preference store is the store's own root (the container's TUNELOOP_STORE_ROOT):
        # the store volume, mounted read-only, or an object-storage URL and no store volume.
        env = {e["name"]: e["value"] for e in trainer.get("env") or [] if "value" in e}
        store_root = config.preferences.store_root
        assert store_root == env["TUNELOOP_STORE_ROOT"], where
        assert config.preferences.path is None
        if store_root.startswith("s3://"):
            assert not any(v["name"] == "store" for v in pod["volumes"]), where
        else:
            store_mount = mount_of(trainer, store_root)
            assert store_mount is not None and store_mount["name"] == "store", where
            assert store_mount.get("readOnly") is True, where
            assert "persistentVolumeClaim" in next(v for v in pod["volumes"] if v["name"] == "store"), where

        # registry_root and runs_dir left unset resolve, through the container's env, to
        # writable volumes.
        for name in [n for n in os.environ if n.startswith("TUNELOOP_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        registry_root = config.registry_root or RegistrySettings().root
        runs_dir = config.runs_dir or TrainerSettings().runs_dir
        for what, path in (("registry", registry_root), ("runs", runs_dir)):
            mount = mount_of(trainer, str(path))
            assert mount is not None and not mount.get("readOnly"), f"{where}: {what} {path} is not a writable volume"
            assert "persistentVolumeClaim" in next(v for v in pod["volumes"] if v["name"] == mount["name"]), where


# ---------------------------------------------------------------- the preference store's place


# The store on object storage through --set (the brief's shape), next to the shipped example.
OBJECT_STORE_SET = {
    "store.root": "s3://bucket/prefs",
    "store.objectStorage.endpoint": "http://minio.minio.svc:9000",
    "store.objectStorage.region": "eu-west-1",
    "store.objectStorage.allowHttp": "true",
    "store.objectStorage.credentialsSecret": "store-s3",
    "store.replicas": "3",
}
OBJECT_STORE_CASES = {
    "set": ("default", tuple(a for k, v in OBJECT_STORE_SET.items() for a in ("--set", f"{k}={v}"))),
    "values-file": ("object-storage", ()),
}
MINIO = {"namespace": "minio", "labels": {"app": "minio"}}


def _store_values(values: str, sets: tuple[str, ...]) -> dict[str, Any]:
    """The `store` values a case renders with (defaults, its files, its --set)."""
    store = yaml.safe_load((CHART / "values.yaml").read_text())["store"]
    for f in VALUES[values]:
        for key, value in (yaml.safe_load(f.read_text()).get("store") or {}).items():
            store[key] = {**store[key], **value} if isinstance(value, dict) else value
    for setting in sets[1::2]:
        path, value = setting.split("=", 1)
        *parents, last = path.split(".")[1:]
        node = store
        for key in parents:
            node = node[key]
        node[last] = yaml.safe_load(value)
    return store


def _store_pods(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Containers that read or write the preference store (the store, feedback, the trainer),
    by "<Kind>/<name>"."""
    readers = {f"Deployment/{name_of('store')}", f"Deployment/{name_of('feedback')}"}
    return {
        where: spec["containers"][0]
        for where, spec in pod_specs(objs).items()
        if where in readers or where.split("/")[0] in ("CronJob", "Job")
    }


@pytest.mark.parametrize("case", sorted(OBJECT_STORE_CASES))
def test_store_on_object_storage_has_no_volume_and_every_reader_gets_the_url(case, tmp_path, monkeypatch):
    """store.root an s3:// URL: no store PVC, nothing mounts one; the store, feedback and trainer
    containers get the URL and the AWS_* settings delta-rs reads, and the code's own loaders (the
    store's and feedback's settings, the trainer's RetrainConfig) take the URL as the root."""
    from tuneloop.common.settings import load_settings
    from tuneloop.feedback.settings import FeedbackSettings
    from tuneloop.store.settings import StoreSettings
    from tuneloop.trainer.config import load_config
    from tuneloop.trainer.retrain import RetrainConfig

    values, sets = OBJECT_STORE_CASES[case]
    store_values = _store_values(values, sets)
    url, o = store_values["root"], store_values["objectStorage"]
    assert url.startswith("s3://")
    objs = render(values, *sets)
    assert_valid_kubernetes(objs)

    # No store volume: not created, not mounted by anyone.
    assert set(by_kind(objs, "PersistentVolumeClaim")) == {name_of("registry"), name_of("runs")}
    for where, spec in pod_specs(objs).items():
        for v in spec["volumes"]:
            assert v["name"] != "store", where
            assert (v.get("persistentVolumeClaim") or {}).get("claimName") != name_of("preferences"), where
        for c in spec["containers"]:
            assert not any(m["name"] == "store" for m in c.get("volumeMounts") or []), where

    # Every reader and writer: the URL, the endpoint, region, plain HTTP, conditional puts (safe
    # concurrent writers) and the keys from the Secret; nobody else gets any of it.
    secret = o["credentialsSecret"]
    expected_aws = {
        "AWS_ENDPOINT_URL": o["endpoint"],
        "AWS_REGION": o["region"],
        "AWS_ALLOW_HTTP": "true",
        "AWS_CONDITIONAL_PUT": "etag",
        "AWS_ACCESS_KEY_ID": {"secretKeyRef": {"name": secret, "key": "AWS_ACCESS_KEY_ID"}},
        "AWS_SECRET_ACCESS_KEY": {"secretKeyRef": {"name": secret, "key": "AWS_SECRET_ACCESS_KEY"}},
    }
    readers = _store_pods(objs)
    assert len(readers) == 3, sorted(readers)
    for where, spec in pod_specs(objs).items():
        for c in spec["containers"]:
            env = env_of(c)
            aws = {k: v for k, v in env.items() if k.startswith("AWS_")}
            if where in readers:
                assert env["TUNELOOP_STORE_ROOT"] == url, where
                assert aws == expected_aws, where
            else:
                assert "TUNELOOP_STORE_ROOT" not in env and not aws, where

    # The trainer's retrain config names the URL, as RetrainConfig reads it.
    for where in [w for w in readers if w.split("/")[0] in ("CronJob", "Job")]:
        pod, trainer = pod_specs(objs)[where], readers[where]
        files = mounted_config_maps(objs, pod, trainer)
        config_file = tmp_path / f"{where.replace('/', '_')}-retrain.yaml"
        config_file.write_text(files[trainer["args"][trainer["args"].index("--config") + 1]])
        config = load_config(RetrainConfig, config_file)
        assert config.preferences.store_root == url, where

    # The services' settings, loaded from their containers' env by the code's own loader.
    def settings_from(c: dict[str, Any], cls: type) -> Any:
        for name in [n for n in os.environ if n.startswith(("TUNELOOP_", "AWS_"))]:
            monkeypatch.delenv(name)
        for e in c["env"]:
            if "value" in e:
                monkeypatch.setenv(e["name"], e["value"])
        return load_settings(cls)

    assert settings_from(container(objs, "store"), StoreSettings).root == url
    assert settings_from(container(objs, "feedback"), FeedbackSettings).store_root == url

    # Several replicas, rolled like the other services (they share the partitions).
    store = by_kind(objs, "Deployment")[name_of("store")]["spec"]
    assert store["replicas"] == store_values["replicas"] > 1
    assert store["strategy"]["type"] == "RollingUpdate"

    # The object store is reached only where networkPolicy.extraEgress admits it (the example does).
    policies = list(by_kind(objs, "NetworkPolicy").values())
    for where, labels in pod_labels(objs).items():
        if where in readers:
            assert allowed(policies, "out", labels, MINIO, (None, 9000)) is (case == "values-file"), where


def test_store_root_outside_the_store_volume_is_refused():
    # A folder in the volume is fine: every reader gets it.
    objs = render("default", "--set", "store.root=/var/lib/tuneloop/store/prefs")
    for where, c in _store_pods(objs).items():
        assert env_of(c)["TUNELOOP_STORE_ROOT"] == "/var/lib/tuneloop/store/prefs", where
    # A folder elsewhere would be on the read-only root filesystem.
    result = helm(*template_args([], "--set", "store.root=/data/prefs"), check=False)
    assert result.returncode != 0
    assert "persistence.store.mountPath" in result.stderr, result.stderr


def test_store_autoscales_on_consumer_lag():
    from tuneloop.store.consumer import LAG

    objs = render(
        "default",
        "--set", "store.autoscaling.enabled=true",
        "--set", "store.autoscaling.maxReplicas=6",
        "--set", "store.autoscaling.targetLagPerReplica=500",
    )
    assert_valid_kubernetes(objs)
    hpas = by_kind(objs, "HorizontalPodAutoscaler")
    assert list(hpas) == [name_of("store")]
    spec = hpas[name_of("store")]["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name_of("store")}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 6)
    # One External metric: the Gauge the store exports, of this release's store Service only;
    # AverageValue: the total lag divided by the replica count.
    (metric,) = spec["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == LAG._name
    assert metric["external"]["metric"]["selector"] == {"matchLabels": {"service": name_of("store")}}
    assert name_of("store") in by_kind(objs, "Service")
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "500"}
    # The HPA owns the store's replica count; the other Deployments keep theirs.
    deployments = by_kind(objs, "Deployment")
    assert "replicas" not in deployments[name_of("store")]["spec"]
    assert all("replicas" in d["spec"] for name, d in deployments.items() if name != name_of("store"))


def test_gpu_values_put_generation_and_the_trainer_on_gpu_nodes():
    objs = render("gpu")
    cron = by_kind(objs, "CronJob")[f"{RELEASE}-tuneloop-retrain"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    trainer = pod["containers"][0]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "tuneloop-trainer-cuda" in trainer["image"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "podAntiAffinity" in pod["affinity"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in trainer["volumeMounts"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"

    gen_pod = by_kind(objs, "Deployment")[name_of("generation")]["spec"]["template"]["spec"]
    gen = gen_pod["containers"][0]
    assert gen["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(gen)["TUNELOOP_GENERATION_ENGINE"] == "vllm"
    assert "tuneloop-vllm-cuda" in gen["image"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gen_pod["tolerations"])
    # The other services stay on CPU nodes.
    for s in ("reward", "feedback", "store", "gateway"):
        assert "nvidia.com/gpu" not in json.dumps(container(objs, s)["resources"])


def test_all_optional_objects_cover_every_service():
    objs = render("all")
    deployments = by_kind(objs, "Deployment")
    services = by_kind(objs, "Service")
    monitors = by_kind(objs, "ServiceMonitor")
    hpas = by_kind(objs, "HorizontalPodAutoscaler")
    pdbs = by_kind(objs, "PodDisruptionBudget")
    assert len(deployments) == 5
    for name, deployment in deployments.items():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        svc = services[name]
        assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        sm = monitors[name]
        assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
        assert sm["metadata"]["labels"]["release"] == "prometheus"
        svc_ports = {p["name"] for p in svc["spec"]["ports"]}
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= svc_ports
        assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
        assert hpas[name]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        # The HPA owns the replica count.
        assert "replicas" not in deployment["spec"]
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
        assert all(pod_labels.get(k) == v for k, v in pdbs[name]["spec"]["selector"]["matchLabels"].items())
    custom = [m for m in hpas[name_of("generation")]["spec"]["metrics"] if m["type"] == "Pods"]
    assert custom[0]["pods"]["metric"]["name"] == "tuneloop_generation_grpc_requests_in_flight"
    # The store scales on consumer lag alone (CPU says nothing about a consumer's backlog).
    assert [m["type"] for m in hpas[name_of("store")]["spec"]["metrics"]] == ["External"]
    assert "minAvailable" in pdbs[name_of("store")]["spec"]

    ingress = next(iter(by_kind(objs, "Ingress").values()))
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": name_of("gateway"), "port": {"name": "http"}}

    # The one-off Job runs exactly the CronJob's pod (bar the config checksum, equal here).
    job = next(iter(by_kind(objs, "Job").values()))
    cron = by_kind(objs, "CronJob")[f"{RELEASE}-tuneloop-retrain"]
    assert job["spec"] == cron["spec"]["jobTemplate"]["spec"]
    assert job["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    dashboards = [c for c in by_kind(objs, "ConfigMap").values() if "tuneloop.json" in c.get("data", {})]
    assert dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboards[0]["data"]["tuneloop.json"]) == json.loads(
        (REPO / "deploy" / "grafana" / "tuneloop.json").read_text()
    )


def test_prometheus_rule_alerts_on_the_loop_signals():
    rule = next(iter(by_kind(render("all"), "PrometheusRule").values()))
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    expected_metric = {
        "TuneloopGrpcErrorRateHigh": "_grpc_requests_total",
        "TuneloopGatewayErrorRateHigh": "tuneloop_gateway_requests_total",
        "TuneloopConsumerLagHigh": "tuneloop_store_consumer_lag",
        "TuneloopCompletionSpoolBacklog": "tuneloop_generation_completion_spool_records",
        "TuneloopAnnotatorAgreementLow": "tuneloop_store_agreement_kappa",
        "TuneloopAnnotatorAnchorDrift": "tuneloop_store_anchor_accuracy",
        "TuneloopTrainerKLHigh": "tuneloop_trainer_kl",
        "TuneloopTrainerResponseLengthDrift": "tuneloop_trainer_response_length_ratio",
        "TuneloopRetrainStale": "tuneloop_trainer_last_success_timestamp_seconds",
    }
    for alert, metric in expected_metric.items():
        assert metric in alerts[alert]["expr"], alert
        assert alerts[alert]["labels"]["severity"] in {"info", "warning", "critical"}
        assert alerts[alert]["annotations"]["summary"]
    # Scoped to the release's namespace; thresholds from values.
    assert f'namespace="{NS}"' in alerts["TuneloopGrpcErrorRateHigh"]["expr"]
    assert "< 0.65" in alerts["TuneloopAnnotatorAgreementLow"]["expr"]
    assert f"> {3 * 86400}" in alerts["TuneloopRetrainStale"]["expr"]
    # Prometheus templates survive Helm's templating.
    assert "{{ $labels.service }}" in alerts["TuneloopGrpcErrorRateHigh"]["annotations"]["description"]


def _promtool() -> str | None:
    local = REPO / ".tools" / "bin" / "promtool"
    return str(local) if local.exists() else shutil.which("promtool")


@pytest.mark.skipif(_promtool() is None, reason="promtool not installed (Debian package `prometheus`)")
def test_prometheus_rules_pass_promtool(tmp_path):
    rule = next(iter(by_kind(render("all"), "PrometheusRule").values()))
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run(
        [_promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    body = ", ".join(f'{k}="{v}"' for k, v in {"namespace": NS, **labels}.items())
    return {"series": f"{metric}{{{body}}}", "values": values}


@pytest.mark.skipif(_promtool() is None, reason="promtool not installed (Debian package `prometheus`)")
def test_alerts_fire_on_the_signals_they_watch_with_promtool(tmp_path):
    """promtool unit tests: synthetic series in, the alerts (with rendered descriptions) out."""
    rule = next(iter(by_kind(render("all"), "PrometheusRule").values()))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    # Each service names its own counter (tuneloop_<service>_grpc_requests_total); the
    # ServiceMonitor's target labels add `service`.
    gen_total, fb_total = "tuneloop_generation_grpc_requests_total", "tuneloop_feedback_grpc_requests_total"
    gen, fb = "tuneloop-generation", "tuneloop-feedback"
    lag = "tuneloop_store_consumer_lag"
    series = [
        # 10% server errors on generation; 10% client errors (bad input) on feedback.
        _series(gen_total, "0+90x40", service=gen, method="Generate", code="OK"),
        _series(gen_total, "0+10x40", service=gen, method="Generate", code="INTERNAL"),
        _series(fb_total, "0+90x40", service=fb, method="Submit", code="OK"),
        _series(fb_total, "0+10x40", service=fb, method="Submit", code="INVALID_ARGUMENT"),
        _series("tuneloop_gateway_requests_total", "0+90x40", route="/v1/chat/completions", status="200"),
        _series("tuneloop_gateway_requests_total", "0+10x40", route="/v1/chat/completions", status="503"),
        _series("up", "0x40", job=f"{RELEASE}-tuneloop-generation", pod="gen-0"),
        _series("up", "1x40", job=f"{RELEASE}-tuneloop-reward", pod="rew-0"),
        # Two store pods report the same partition: it counts once (9000, below 10000).
        _series(lag, "6000x40", topic="tuneloop.feedback.v1", partition="0", pod="store-0"),
        _series(lag, "6000x40", topic="tuneloop.feedback.v1", partition="0", pod="store-1"),
        _series(lag, "3000x40", topic="tuneloop.feedback.v1", partition="1", pod="store-0"),
        _series(lag, "11000x40", topic="tuneloop.completions.v1", partition="0", pod="store-0"),
        _series("tuneloop_generation_completion_spool_records", "1500x40", pod="gen-0"),
        _series("tuneloop_store_agreement_kappa", "0.5x90", tenant="acme", pod="store-0"),
        _series("tuneloop_store_agreement_kappa", "0.9x90", tenant="globex", pod="store-0"),
        _series("tuneloop_store_anchor_accuracy", "0.6x90", tenant="acme", annotator="a1", pod="store-0"),
        _series("tuneloop_store_anchor_accuracy", "0.95x90", tenant="acme", annotator="a2", pod="store-0"),
        _series("tuneloop_trainer_kl", "12x10"),
        _series("tuneloop_trainer_response_length_ratio", "2x10"),
        # Last success 3.5 days before the test's clock starts (3d 13h 5m before 65m).
        _series("tuneloop_trainer_last_success_timestamp_seconds", "-302400x90"),
    ]

    def fired(alert: str, at: str, *expected: dict[str, Any]) -> dict[str, Any]:
        return {"eval_time": at, "alertname": alert, "exp_alerts": list(expected)}

    def alert(name: str, severity: str, description: str, **labels: str) -> dict[str, Any]:
        return {
            "exp_labels": {"severity": severity, "namespace": NS, **labels},
            "exp_annotations": {"summary": alerts[name]["annotations"]["summary"], "description": description},
        }

    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    cases = []
    for name, at, expected in [
        (
            "TuneloopGrpcErrorRateHigh",
            "20m",
            [("warning", f"{gen} failed 10% of its calls over 5 minutes.", {"service": gen})],
        ),
        ("TuneloopGatewayErrorRateHigh", "20m", [("warning", "10% of gateway requests failed over 5 minutes.", {})]),
        (
            "TuneloopTargetDown",
            "10m",
            [
                (
                    "critical",
                    f"{RELEASE}-tuneloop-generation pod gen-0 has been down for 5 minutes.",
                    {"job": f"{RELEASE}-tuneloop-generation", "pod": "gen-0"},
                )
            ],
        ),
        (
            "TuneloopConsumerLagHigh",
            "20m",
            [("warning", "tuneloop.completions.v1 is 11000 records behind.", {"topic": "tuneloop.completions.v1"})],
        ),
        (
            "TuneloopCompletionSpoolBacklog",
            "15m",
            [
                (
                    "warning",
                    "gen-0 holds 1500 completions it could not publish to Kafka;"
                    " feedback on them cannot be joined until they are.",
                    {"pod": "gen-0"},
                )
            ],
        ),
        (
            "TuneloopAnnotatorAgreementLow",
            "65m",
            [("warning", "acme: agreement (kappa) is 0.50, below 0.65; the retrain gate will refuse its new data.",
              {"tenant": "acme"})],
        ),
        ("TuneloopAnnotatorAnchorDrift", "65m",
         [("info", "a1 (acme) matches 60% of anchor items.", {"tenant": "acme", "annotator": "a1"})]),
        ("TuneloopTrainerKLHigh", "6m", [("warning", "KL to the reference model is 12.00 (limit 10).", {})]),
        ("TuneloopTrainerResponseLengthDrift", "6m", [("warning", "Responses are 2.00x the reference length.", {})]),
        (
            "TuneloopRetrainStale",
            "65m",
            [("warning", "The last successful retrain finished 3d 13h 5m 0s ago; see `tuneloop jobs list`.", {})],
        ),
    ]:
        cases.append(fired(name, at, *(alert(name, sev, desc, **labels) for sev, desc, labels in expected)))
    # Not yet: every alert waits out its `for`.
    cases.append(fired("TuneloopAnnotatorAgreementLow", "30m"))
    cases.append(fired("TuneloopRetrainStale", "30m"))
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": cases}],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [_promtool(), "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- NetworkPolicy semantics


OUTSIDE_POD = {"namespace": "apps", "labels": {"app": "client"}}
SAME_NS_STRANGER = {"namespace": NS, "labels": {"app": "something-else"}}
PROMETHEUS = {"namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
INTERNET = {"ip": "203.0.113.7"}
KAFKA_BROKER = {"namespace": NS, "labels": {"strimzi.io/cluster": "tuneloop", "strimzi.io/kind": "Kafka"}}
DNS = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}


def _component_pods(objs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, str], dict[str, tuple[str, int]]]]:
    out = {}
    for d in by_kind(objs, "Deployment").values():
        labels = d["spec"]["template"]["metadata"]["labels"]
        ports = {
            p["name"]: (p["name"], p["containerPort"]) for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        out[labels["app.kubernetes.io/component"]] = (labels, ports)
    return out


def test_network_policy_lets_only_the_gateway_in_from_outside():
    objs = render("default")
    policies = list(by_kind(objs, "NetworkPolicy").values())
    pods = _component_pods(objs)
    gateway_labels = pods["gateway"][0]
    for component, (labels, ports) in pods.items():
        for port_name, port in ports.items():
            for stranger in (OUTSIDE_POD, SAME_NS_STRANGER):
                # The gateway's API, not its metrics.
                expected = component == "gateway" and port_name == "http"
                assert allowed(policies, "in", labels, stranger, port) is expected, (component, port_name, stranger)
            # Other tuneloop pods reach every port (the gateway calls generation and feedback).
            assert allowed(policies, "in", labels, {"namespace": NS, "labels": gateway_labels}, port)
            # Prometheus scrapes the metrics ports; of the rest it reaches only what anyone reaches.
            public = component == "gateway" and port_name == "http"
            assert allowed(policies, "in", labels, PROMETHEUS, port) is (port_name == "metrics" or public)


def test_network_policy_egress_reaches_kafka_and_dns_only():
    objs = render("default")
    policies = list(by_kind(objs, "NetworkPolicy").values())
    pods = _component_pods(objs)
    for component in ("generation", "feedback", "store"):
        labels = pods[component][0]
        assert allowed(policies, "out", labels, KAFKA_BROKER, (None, 9092))
        assert not allowed(policies, "out", labels, KAFKA_BROKER, (None, 2181))
        assert allowed(policies, "out", labels, DNS, (None, 53), protocol="UDP")
        assert not allowed(policies, "out", labels, INTERNET, (None, 443))
        assert not allowed(policies, "out", labels, OUTSIDE_POD, (None, 8080))
        assert allowed(policies, "out", labels, {"namespace": NS, "labels": pods["reward"][0]}, (None, 50052))
    # The trainer also reaches the API server (it annotates its own Job).
    cron = by_kind(objs, "CronJob")[f"{RELEASE}-tuneloop-retrain"]
    trainer_labels = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert allowed(policies, "out", trainer_labels, {"ip": "10.96.0.1"}, (None, 443))
    assert allowed(policies, "out", trainer_labels, KAFKA_BROKER, (None, 9092))
    assert not allowed(policies, "out", pods["generation"][0], {"ip": "10.96.0.1"}, (None, 443))


def test_the_gateway_replicas_reach_the_redis_of_deploy_redis_and_it_admits_only_them():
    objs = render("default")
    policies = list(by_kind(objs, "NetworkPolicy").values())
    pods = _component_pods(objs)
    manifests = list(yaml.safe_load_all((REPO / "deploy" / "redis" / "redis.yaml").read_text()))
    assert_valid_kubernetes(manifests)
    redis_pod = {"namespace": NS, "labels": by_kind(manifests, "Deployment")["tuneloop-redis"]["spec"]["template"][
        "metadata"]["labels"]}
    env = {e["name"]: e.get("value") for e in pod_specs(objs)[f"Deployment/{name_of('gateway')}"]["containers"][0]["env"]}
    assert env["TUNELOOP_GATEWAY_LIMITS_STORAGE_URL"] == "redis://tuneloop-redis:6379/0"
    assert allowed(policies, "out", pods["gateway"][0], redis_pod, (None, 6379))
    assert not allowed(policies, "out", pods["generation"][0], redis_pod, (None, 6379))
    redis_policy = by_kind(manifests, "NetworkPolicy")["tuneloop-redis"]
    redis_port = ("redis", 6379)
    for component, (labels, _) in pods.items():
        peer = {"namespace": NS, "labels": labels}
        assert allowed([redis_policy], "in", redis_pod["labels"], peer, redis_port) is (component == "gateway")


@pytest.mark.parametrize("setting", ["gateway.replicas=2", "gateway.autoscaling.enabled=true"])
def test_more_than_one_gateway_replica_needs_shared_limits(setting):
    result = helm("template", "t", str(CHART), "--set", "gateway.limits.storageUrl=", "--set", setting, check=False)
    assert result.returncode != 0 and "gateway.limits.storageUrl is required" in result.stderr
    one = helm("template", "t", str(CHART), "--set", "gateway.limits.storageUrl=", "--set", "gateway.replicas=1")
    assert "TUNELOOP_GATEWAY_LIMITS_STORAGE_URL" not in one.stdout


def test_gateway_can_be_limited_to_an_ingress_controller():
    objs = render("all")
    policies = list(by_kind(objs, "NetworkPolicy").values())
    labels, ports = _component_pods(objs)["gateway"]
    controller = {"namespace": "ingress-nginx", "labels": {"app": "ingress-nginx"}}
    assert allowed(policies, "in", labels, controller, ports["http"])
    assert not allowed(policies, "in", labels, OUTSIDE_POD, ports["http"])


# ---------------------------------------------------------------- helm test hook, API keys


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/readyz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_targets() -> Iterator[dict[str, str]]:
    """Real gRPC health servers (one SERVING, one NOT_SERVING) and HTTP /readyz (200 and 503)."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servers, http_servers = [], []
    targets = {}
    for name, status in (
        ("serving", health_pb2.HealthCheckResponse.SERVING),
        ("not_serving", health_pb2.HealthCheckResponse.NOT_SERVING),
    ):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servicer.set("", status)
        servers.append(server)
        targets[name] = f"127.0.0.1:{port}"
    for name, code in (("ready", 200), ("unready", 503)):
        handler = type(f"Ready{code}", (_Ready,), {"status": code})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        http_servers.append(httpd)
        targets[name] = f"http://127.0.0.1:{httpd.server_port}/readyz"
    try:
        yield targets
    finally:
        for server in servers:
            server.stop(grace=None)
        for httpd in http_servers:
            httpd.shutdown()
            httpd.server_close()


def test_helm_test_pod_checks_every_service_for_real(health_targets):
    objs = render("default")
    pod = next(iter(by_kind(objs, "Pod").values()))
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    services = by_kind(objs, "Service")
    expected = [f"{name_of(s)}:{GRPC_PORTS[s]}" for s in GRPC_SERVICES]
    expected.append(f"http://{name_of('gateway')}:8080/readyz")
    assert c["args"] == expected
    for target in expected[:-1]:
        host, port = target.split(":")
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}

    # Run the Pod's own command against real health endpoints.
    assert c["command"][:2] == ["python", "-c"]
    script = c["command"][2]
    env = {"TIMEOUT_SECONDS": "5", "PATH": "/usr/bin:/bin"}

    def run(*targets: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script, *targets], capture_output=True, text=True, timeout=60, env=env
        )

    healthy = run(health_targets["serving"], health_targets["ready"])
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.count("ok  ") == 2

    from tuneloop.common.local_kafka import free_port

    closed = f"127.0.0.1:{free_port()}"
    sick = run(
        health_targets["serving"],
        health_targets["not_serving"],
        health_targets["unready"],
        closed,
        health_targets["ready"],
    )
    assert sick.returncode == 1
    lines = sick.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["ok", "FAIL", "FAIL", "FAIL", "ok"]
    assert "NOT_SERVING" in lines[1]
    assert "503" in lines[2]


def _api_keys_file(values_files: list[Path], *settings: str) -> tuple[str, bytes, dict[str, bytes]]:
    out = helm(*template_args(values_files, *settings, "--show-only", "templates/gateway/secret-api-keys.yaml")).stdout
    secret = yaml.safe_load(out)
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    key = next(k for k in data if k != "bootstrap-key")
    return key, data[key], data


def test_api_keys_secret_is_read_by_the_gateway(tmp_path):
    from tuneloop.gateway.auth import KeyStore, load_keys

    # Generated bootstrap key: the file holds only its hash.
    name, content, data = _api_keys_file([])
    bootstrap = data["bootstrap-key"].decode()
    assert bootstrap.encode() not in content
    path = tmp_path / name
    path.write_bytes(content)
    key = KeyStore(load_keys(path)).lookup(bootstrap)
    assert key is not None and key.tenant == "default" and key.roles == {"app", "annotator", "lead"}

    # Keys given as values (the dev values), as JSON this time.
    name, content, data = _api_keys_file([CHART / "values-dev.yaml"], "--set", "gateway.apiKeys.secretKey=keys.json")
    assert "bootstrap-key" not in data
    path = tmp_path / name
    path.write_bytes(content)
    store = KeyStore(load_keys(path))
    assert store.lookup("tl-dev-key-not-for-production").tenant == "dev"
    assert store.lookup("some-other-key") is None


def test_no_api_keys_secret_when_an_existing_one_is_named():
    objs = render("default")
    assert name_of("api-keys") in by_kind(objs, "Secret")
    out = helm(*template_args([], "--set", "gateway.apiKeys.existingSecret=prod-keys")).stdout
    objs = [d for d in yaml.safe_load_all(out) if d]
    assert not by_kind(objs, "Secret")
    volumes = by_kind(objs, "Deployment")[name_of("gateway")]["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "api-keys")["secret"]["secretName"] == "prod-keys"


def test_manual_run_of_the_rendered_cronjob_is_a_valid_job():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (test extra) not installed"
    )
    from tuneloop.trainer.jobs import MANUAL_ANNOTATION, job_from_cronjob

    cron = by_kind(render("gpu"), "CronJob")[f"{RELEASE}-tuneloop-retrain"]
    cron["metadata"].update(uid="9d9c6c36-7b1d-4a1e-9d55-2f5c1d1b2a10", namespace=NS)
    job = job_from_cronjob(cron, "tl-tuneloop-retrain-manual-20250101000000")
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    assert job["metadata"]["annotations"][MANUAL_ANNOTATION] == "manual"
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


# ---------------------------------------------------------------- Kafka, skaffold, images


def test_strimzi_topics_are_the_services_topics():
    from tuneloop.common import kafka

    docs = list(yaml.safe_load_all((REPO / "deploy" / "strimzi" / "topics.yaml").read_text()))
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "KafkaTopic"}
    code_topics = {v for k, v in vars(kafka).items() if k.endswith("_TOPIC") and isinstance(v, str)}
    assert names == code_topics
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["kafka"]
    # The dev cluster's plain listener is the chart's default; the production cluster's only
    # listener (SCRAM over TLS) is what values-gpu.yaml logs in to.
    for path, values in (("dev/kafka.yaml", defaults), ("kafka.yaml", {**defaults, **_gpu_kafka_values()})):
        kafka_cr = next(
            d for d in yaml.safe_load_all((REPO / "deploy" / "strimzi" / path).read_text()) if d["kind"] == "Kafka"
        )
        (listener,) = kafka_cr["spec"]["kafka"]["listeners"]
        cluster = kafka_cr["metadata"]["name"]
        assert all(d["metadata"]["labels"]["strimzi.io/cluster"] == cluster for d in docs)
        # The chart's bootstrap address, ports, login and NetworkPolicy peer are this cluster's.
        assert values["bootstrapServers"] == f"{cluster}-kafka-bootstrap:{listener['port']}"
        assert values["ports"] == [listener["port"]]
        assert values["auth"].get("enabled", False) is ("authentication" in listener) is listener["tls"]
        assert values["networkPolicyPeers"][0]["podSelector"]["matchLabels"] == {"strimzi.io/cluster": cluster}


def _gpu_kafka_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values-gpu.yaml").read_text())["kafka"]


KAFKA_WORKLOADS = ("feedback", "generation", "store", "reward", "trainer", "gateway")


@pytest.mark.parametrize("values", ["default", "gpu"])
def test_kafka_login_the_chart_renders_is_what_each_workload_loads(values, tmp_path):
    """With kafka.auth on, every workload that talks to Kafka loads SASL_SSL settings as its own
    user, with the password from its user's Secret and the CA from a read-only mounted Secret;
    the others get no login at all."""
    from tuneloop.common.kafka_acls import username

    from tests.support.kafka_security import kafka_env_of, settings_from_env

    objs = render(values, "--set", "kafka.auth.enabled=true")
    auth = yaml.safe_load((CHART / "values.yaml").read_text())["kafka"]["auth"]
    secrets = {username(w): {"password": f"pw-{w}"} for w in KAFKA_WORKLOADS}
    secrets[auth["caSecret"]["name"]] = {"ca.crt": "-----BEGIN CERTIFICATE-----\n"}
    seen = set()
    for key, spec in pod_specs(objs).items():
        if key.startswith("Pod/"):
            continue
        c = spec["containers"][0]
        env = kafka_env_of(spec, secrets, tmp_path / key.replace("/", "_"))
        settings = settings_from_env(env)
        if c["name"] not in KAFKA_WORKLOADS:
            assert settings.security_protocol == "PLAINTEXT" and settings.sasl_username is None, key
            continue
        seen.add(c["name"])
        assert settings.security_protocol == "SASL_SSL", key
        assert (settings.sasl_username, settings.sasl_secret()) == (username(c["name"]), f"pw-{c['name']}"), key
        # The CA path is inside a read-only mount of the CA Secret (kafka_env_of wrote it there).
        assert settings.ssl_cafile is not None and settings.ssl_cafile.read_text().startswith("-----BEGIN"), key
        cafile = env_of(c)["TUNELOOP_KAFKA_SSL_CAFILE"]
        mount = next(m for m in c["volumeMounts"] if cafile.startswith(m["mountPath"].rstrip("/") + "/"))
        assert mount["readOnly"] is True
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == auth["caSecret"]["name"]
    assert seen == set(KAFKA_WORKLOADS)


def test_strimzi_listener_lets_in_only_the_release_pods_that_use_kafka():
    """kafka.yaml's networkPolicyPeers (for a release named tuneloop) select exactly the pods of
    the workloads that have a Kafka user."""
    kafka_cr = next(
        d for d in yaml.safe_load_all((REPO / "deploy" / "strimzi" / "kafka.yaml").read_text()) if d["kind"] == "Kafka"
    )
    (peer,) = kafka_cr["spec"]["kafka"]["listeners"][0]["networkPolicyPeers"]
    selector = peer["podSelector"]
    objs = [d for d in yaml.safe_load_all(helm(*["template", "tuneloop", str(CHART), "--namespace", NS,
                                                  "--kube-version", f"{KUBE_VERSION}.0"]).stdout) if d]
    for key, labels in pod_labels(objs).items():
        wanted = labels["app.kubernetes.io/component"] in KAFKA_WORKLOADS
        matched = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
            (labels.get(e["key"]) in e["values"]) is (e["operator"] == "In") for e in selector.get("matchExpressions", [])
        )
        assert matched is wanted, key


def test_skaffold_points_at_real_files_and_chart_values():
    configs = list(yaml.safe_load_all((REPO / "skaffold.yaml").read_text()))
    assert [c["metadata"]["name"] for c in configs] == ["kafka", "tuneloop"]
    for config in configs:
        assert re.fullmatch(r"skaffold/v4beta\d+", config["apiVersion"])
    sections = [c for c in configs] + [p for c in configs for p in c.get("profiles", [])]
    releases, artifacts = [], set()
    for section in sections:
        for path in (section.get("manifests") or {}).get("rawYaml", []):
            assert (REPO / path).exists(), path
        for artifact in (section.get("build") or {}).get("artifacts", []):
            assert (REPO / artifact["docker"]["dockerfile"]).exists()
            artifacts.add(artifact["image"])
        releases += ((section.get("deploy") or {}).get("helm") or {}).get("releases", [])
    assert {"tuneloop", "tuneloop-vllm-cuda", "tuneloop-trainer-cuda"} <= artifacts
    for release in releases:
        assert (REPO / release["chartPath"]) == CHART
        sets = []
        for key, template in release.get("setValueTemplates", {}).items():
            # Template names use the artifact name with - as _ ; each must be a built artifact.
            for image in re.findall(r"IMAGE_(?:REPO|TAG|DIGEST)_(\w+)", template):
                assert image in {a.replace("-", "_") for a in artifacts}, template
            value = "sha256:" + "0" * 64 if key.endswith(".tag") else "registry.example/img"
            sets += ["--set", f"{key}={value}"]
        for key, value in release.get("setValues", {}).items():
            sets += ["--set", f"{key}={value}"]
        files = [REPO / f for f in release.get("valuesFiles", [])]
        assert all(f.exists() for f in files)
        # The chart takes exactly these values (the schema rejects unknown keys).
        helm(*template_args(files, *sets))


def test_dockerfiles_match_the_chart_and_the_package():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11,<3.12"' in pyproject
    uid = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    for name in ("Dockerfile.cpu", "Dockerfile.vllm-cuda", "Dockerfile.trainer-cuda"):
        text = (REPO / "deploy" / "docker" / name).read_text()
        assert f"USER {uid}:{uid}" in text, name
        assert 'ENTRYPOINT ["tuneloop"]' in text, name
        assert "COPY services/ services/" in text and "COPY pyproject.toml" in text, name
        assert re.search(r"python:3\.11|--python 3\.11", text), name
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"!pyproject.toml", "!services/", "!protos/"} <= set(ignored)
