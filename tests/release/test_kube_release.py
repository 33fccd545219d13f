"""The Helm chart and `tuneloop jobs` against a real Kubernetes control plane (kube-apiserver and
kube-controller-manager 1.35 over kine; no nodes, so pods stay Pending).

Each values file is installed by the real helm into a namespace that enforces the `restricted`
Pod Security Standard: every object the release holds must read back as sent (nothing dropped
or changed by the API server), and every pod its workloads make must be admitted. The trainer's
retrain runs go through the real controllers: `tuneloop jobs run` makes a Job from the CronJob,
the Job controller makes its Pod, the CronJob controller schedules one, and the trainer's own
ServiceAccount token records the promoted version, and nothing more.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from tests.support.kube import KubeApiError, KubeControlPlane, helm
from tuneloop.trainer import jobs

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tuneloop"
CRDS = Path(__file__).parents[1] / "support" / "crds" / "monitoring.coreos.com.yaml"
RELEASE = "tl"
FULLNAME = f"{RELEASE}-tuneloop"
CRONJOB = f"{FULLNAME}-retrain"
TRAINER_SA = f"{FULLNAME}-trainer"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/warn-version": "latest",
}
VALUES = {
    "default": [],
    "dev": [CHART / "values-dev.yaml"],
    "gpu": [CHART / "values-gpu.yaml"],
    "all": [CHART / "ci" / "all-values.yaml"],
}
# all-values.yaml gives the trainer this PriorityClass; a cluster that runs it has one.
PRIORITY_CLASS = "batch-low"
WAIT_S = 90.0


# ---------------------------------------------------------------- helpers


def same_quantity(a: Any, b: Any) -> bool:
    from kubernetes.utils import parse_quantity

    try:
        return parse_quantity(a) == parse_quantity(b)
    except (ValueError, TypeError):
        return False


def differences(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Where the object read back lacks or changed what the chart sent (server defaults added to
    it are fine): a field the API server drops is one it does not know."""
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return [f"{path}: sent a map, stored {stored!r}"]
        out = []
        for key, value in sent.items():
            if key not in stored:
                if value not in (None, {}, [], ""):
                    out.append(f"{path}.{key}: dropped by the API server")
                continue
            out += differences(value, stored[key], f"{path}.{key}")
        return out
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) != len(sent):
            return [f"{path}: sent {sent!r}, stored {stored!r}"]
        return [d for i, (a, b) in enumerate(zip(sent, stored, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    if sent == stored or str(sent) == str(stored) or same_quantity(sent, stored):
        return []
    return [f"{path}: sent {sent!r}, stored {stored!r}"]


def pod_from_template(template: dict[str, Any], name: str) -> dict[str, Any]:
    meta = template.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": meta.get("labels") or {}, "annotations": meta.get("annotations") or {}},
        "spec": template["spec"],
    }


def pods_of_job(kube: KubeControlPlane, namespace: str, job: str) -> list[Any]:
    from kubernetes import client

    with kube.api_client() as api:
        selector = f"{jobs.JOB_NAME_LABEL}={job}"
        return client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items


def forbidden(call: Callable[[], Any]) -> str:
    """The message of a call that must be refused with 403 Forbidden."""
    with pytest.raises(KubeApiError) as err:
        call()
    assert err.value.status == 403, err.value
    return err.value.message


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster_prereqs(kube: KubeControlPlane) -> None:
    """What a cluster running the chart has besides it: the Prometheus Operator CRDs (for the
    ServiceMonitors and the PrometheusRule) and the PriorityClass all-values.yaml names."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    with kube.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        names = []
        for crd in yaml.safe_load_all(CRDS.read_text()):
            names.append(crd["metadata"]["name"])
            try:
                ext.create_custom_resource_definition(crd)
            except ApiException as err:
                if err.status != 409:
                    raise
        try:
            client.SchedulingV1Api(api).create_priority_class(
                {"metadata": {"name": PRIORITY_CLASS}, "value": 1000, "description": "batch work"}
            )
        except ApiException as err:
            if err.status != 409:
                raise

        def established() -> bool:
            for name in names:
                conditions = ext.read_custom_resource_definition(name).status.conditions or []
                if not any(c.type == "Established" and c.status == "True" for c in conditions):
                    return False
            return True

        kube.wait_for("CRDs established", established, timeout_s=30)


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm")


@pytest.fixture(scope="module")
def install(kube: KubeControlPlane, cluster_prereqs: None, helm_home: Path) -> Callable[..., dict[str, Any]]:
    """Install the chart with a values set (once per module) into its own restricted namespace."""
    done: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}

    def _install(values: str, *sets: str, namespace: str | None = None) -> dict[str, Any]:
        key = (values, sets)
        if key not in done:
            ns = kube.create_namespace(namespace or f"tl-{values}-{uuid.uuid4().hex[:6]}", RESTRICTED)
            args = ["install", RELEASE, str(CHART), "--namespace", ns]
            for f in VALUES[values]:
                args += ["-f", str(f)]
            for s in sets:
                args += ["--set", s]
            result = helm(kube, helm_home, *args)
            manifest = helm(kube, helm_home, "get", "manifest", RELEASE, "--namespace", ns).stdout
            hooks = helm(kube, helm_home, "get", "hooks", RELEASE, "--namespace", ns).stdout
            done[key] = {
                "namespace": ns,
                "stderr": result.stderr,
                "objects": [d for d in yaml.safe_load_all(manifest) if d],
                "hooks": [d for d in yaml.safe_load_all(hooks) if d],
            }
        return done[key]

    return _install


@pytest.fixture(scope="module", autouse=True)
def scheduled_release(install: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The default install with a CronJob due every minute, installed when the module starts so
    that its first scheduled run exists by the time the last test looks for it."""
    return install("default", "trainer.cronJob.schedule=* * * * *")


@pytest.fixture(scope="module")
def admin(kube: KubeControlPlane) -> Iterator[Any]:
    with kube.api_client() as api:
        yield api


# ---------------------------------------------------------------- the chart


@pytest.mark.parametrize("values", list(VALUES))
def test_every_object_of_the_release_is_stored_as_sent(values, kube, install, admin):
    from kubernetes.dynamic import DynamicClient

    release = install(values)
    ns = release["namespace"]
    assert release["objects"], "the release holds no objects"
    dyn = DynamicClient(admin)
    problems = []
    for obj in release["objects"]:
        kind, name = obj["kind"], obj["metadata"]["name"]
        resource = dyn.resources.get(api_version=obj["apiVersion"], kind=kind)
        stored = resource.get(name=name, namespace=ns if resource.namespaced else None).to_dict()
        sent = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        problems += [f"{kind}/{name}{d}" for d in differences(sent, stored)]
    assert not problems, "\n".join(problems)
    # Warnings mode of the same policy: no workload template would violate it.
    assert "PodSecurity" not in release["stderr"], release["stderr"]


@pytest.mark.parametrize("values", list(VALUES))
def test_every_pod_of_the_release_is_admitted_under_restricted(values, kube, install, admin):
    """The controllers create every Deployment's pods and the one-off Job's pod for real; the
    CronJob's template and the `helm test` pod are created as a server-side dry run."""
    from kubernetes import client

    release = install(values)
    ns = release["namespace"]
    objs = release["objects"]
    apps = client.AppsV1Api(admin)
    deployments = [o["metadata"]["name"] for o in objs if o["kind"] == "Deployment"]
    assert deployments

    def all_pods_created() -> bool:
        for name in deployments:
            d = apps.read_namespaced_deployment(name, ns)
            failures = [c for c in d.status.conditions or [] if c.type == "ReplicaFailure" and c.status == "True"]
            assert not failures, f"Deployment {name}: {failures[0].message}"
            if (d.status.observed_generation or 0) < d.metadata.generation or d.status.replicas != d.spec.replicas:
                return False
        return True

    kube.wait_for(f"pods of {deployments}", all_pods_created, timeout_s=WAIT_S)
    for job in [o["metadata"]["name"] for o in objs if o["kind"] == "Job"]:
        kube.wait_for(f"pod of Job {job}", lambda job=job: pods_of_job(kube, ns, job), timeout_s=WAIT_S)

    templates = {}
    for o in objs:
        if o["kind"] == "CronJob":
            templates[o["metadata"]["name"]] = o["spec"]["jobTemplate"]["spec"]["template"]
    for hook in release["hooks"]:
        if hook["kind"] == "Pod":
            templates[hook["metadata"]["name"]] = hook
    assert templates
    for name, template in templates.items():
        pod = pod_from_template(template, f"dry-run-{name}"[:63])
        kube.request("POST", f"/api/v1/namespaces/{ns}/pods", pod, query={"dryRun": "All"})


def test_a_privileged_pod_is_refused_under_restricted(kube, install):
    ns = install("default")["namespace"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged"},
        "spec": {
            "containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}],
        },
    }
    message = forbidden(lambda: kube.request("POST", f"/api/v1/namespaces/{ns}/pods", pod))
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "privileged" in message
    # The same pod where no policy is enforced: admitted, so Pod Security is what refused it.
    plain = kube.create_namespace(f"plain-{uuid.uuid4().hex[:6]}")
    kube.request("POST", f"/api/v1/namespaces/{plain}/pods", pod, query={"dryRun": "All"})


# ---------------------------------------------------------------- retrain runs


def test_jobs_run_and_the_trainer_service_account(kube, install, admin, tmp_path):
    """`tuneloop jobs run` (an operator's command) makes the Job, the Job controller its Pod; the
    trainer's own token annotates the Job with the promoted version, which `list` shows, and is
    refused everything else."""
    from kubernetes import client, config

    ns = install("default")["namespace"]
    operator = kube.admin_kubeconfig(tmp_path / "admin.kubeconfig", ns)
    tuneloop = str(REPO / ".venv" / "bin" / "tuneloop")
    args = ["jobs", "run", "--cronjob", CRONJOB, "--name", "retrain-now", "--kubeconfig", str(operator)]
    run = subprocess.run([tuneloop, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"job.batch/retrain-now created in namespace {ns}" in run.stdout

    batch = client.BatchV1Api(admin)
    cronjob = batch.read_namespaced_cron_job(CRONJOB, ns)
    job = batch.read_namespaced_job("retrain-now", ns)
    owner = job.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid, owner.controller) == ("CronJob", CRONJOB, cronjob.metadata.uid, True)
    assert job.metadata.annotations[jobs.MANUAL_ANNOTATION] == "manual"
    assert job.spec.template.spec.containers[0].args == cronjob.spec.job_template.spec.template.spec.containers[0].args

    pods = kube.wait_for("the Job controller's pod", lambda: pods_of_job(kube, ns, "retrain-now"), timeout_s=WAIT_S)
    pod = pods[0]
    assert pod.status.phase == "Pending"  # no nodes
    assert pod.spec.service_account_name == TRAINER_SA
    # The downward API source of TUNELOOP_TRAINER_JOB_NAME names the Job.
    job_name = pod.metadata.labels[jobs.JOB_NAME_LABEL]
    assert job_name == "retrain-now"

    trainer_cfg = kube.service_account_kubeconfig(ns, TRAINER_SA, tmp_path / "trainer.kubeconfig")
    with config.new_client_from_config(config_file=str(trainer_cfg)) as trainer:
        env = {jobs.JOB_NAME_ENV: job_name, jobs.JOB_NAMESPACE_ENV: ns}
        assert jobs.record_promoted_version("policy-v8", api=trainer, env=env) is True
    # The Role grants get and patch on Jobs, nothing else.
    token = kube.service_account_token(ns, TRAINER_SA)
    jobs_path = f"/apis/batch/v1/namespaces/{ns}/jobs"
    assert kube.request("GET", f"{jobs_path}/retrain-now", token=token)["metadata"]["name"] == "retrain-now"
    refused = [
        ("DELETE", f"{jobs_path}/retrain-now", None),
        ("GET", jobs_path, None),
        ("POST", jobs_path, jobs.job_from_cronjob(admin.sanitize_for_serialization(cronjob), "by-the-trainer")),
        ("GET", f"/apis/batch/v1/namespaces/{ns}/cronjobs/{CRONJOB}", None),
        ("GET", f"/api/v1/namespaces/{ns}/secrets", None),
        ("GET", f"/api/v1/namespaces/{ns}/pods", None),
    ]
    for method, path, body in refused:
        message = forbidden(lambda method=method, path=path, body=body: kube.request(method, path, body, token=token))
        assert f"system:serviceaccount:{ns}:{TRAINER_SA}" in message
    # Starting runs is not the trainer's business: its token cannot read the CronJob.
    as_trainer = CliRunner().invoke(jobs.cli, ["run", "--cronjob", CRONJOB, "--kubeconfig", str(trainer_cfg)])
    assert as_trainer.exit_code == 1
    assert "403" in as_trainer.output

    annotations = batch.read_namespaced_job("retrain-now", ns).metadata.annotations
    assert annotations[jobs.PROMOTED_VERSION_KEY] == "policy-v8"
    assert annotations[jobs.MANUAL_ANNOTATION] == "manual"

    listed = CliRunner().invoke(jobs.cli, ["list", "--cronjob", CRONJOB, "-o", "json", "--kubeconfig", str(operator)])
    assert listed.exit_code == 0, listed.output
    runs = {r["name"]: r for r in json.loads(listed.output)}
    assert runs["retrain-now"]["trigger"] == "manual"
    assert runs["retrain-now"]["promoted_version"] == "policy-v8"
    # The Job controller counts the Pending pod as active.
    assert runs["retrain-now"]["status"] == "Running"
    table = CliRunner().invoke(jobs.cli, ["list", "--cronjob", CRONJOB, "--kubeconfig", str(operator)])
    assert table.exit_code == 0, table.output
    assert "retrain-now" in table.output and "policy-v8" in table.output


def test_the_cronjob_controller_schedules_a_run_and_list_shows_it(kube, scheduled_release, tmp_path):
    ns = scheduled_release["namespace"]
    operator = kube.admin_kubeconfig(tmp_path / "admin.kubeconfig", ns)

    def scheduled_runs() -> list[dict[str, Any]]:
        args = ["list", "--cronjob", CRONJOB, "-o", "json", "--kubeconfig", str(operator)]
        listed = CliRunner().invoke(jobs.cli, args)
        assert listed.exit_code == 0, listed.output
        return [r for r in json.loads(listed.output) if r["trigger"] == "scheduled"]

    # Due at the start of each minute: at most a minute after the install, plus the controller's delay.
    runs = kube.wait_for("a scheduled run of the CronJob", scheduled_runs, timeout_s=75 + WAIT_S, poll_s=2)
    name = runs[0]["name"]
    assert name.startswith(f"{CRONJOB}-")
    pods = kube.wait_for(f"the pod of {name}", lambda: pods_of_job(kube, ns, name), timeout_s=WAIT_S)
    assert pods[0].status.phase == "Pending"
