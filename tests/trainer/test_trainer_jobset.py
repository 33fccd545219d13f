"""The retrain as a JobSet (`trainer.workload=jobset`): the same Indexed Job spec as the plain
workload inside one replicated Job, the rendezvous found through the JobSet's own headless
Service, `/dev/shm` and GPUs sized per process.

The JobSet is checked by a real kube-apiserver against the released JobSet CRD
(tests/support/crds/jobset.x-k8s.io_jobsets.yaml, its header says which version): `helm
install` creates it, and a strict server-side dry run refuses unknown fields and bad types.
No JobSet controller runs here, so the test creates the Job that controller would make from
it (its naming and labels as in JobSet's constructJob) and lets the Job controller make the
pods, admitted under the restricted Pod Security level."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chart import HELM, NS, allowed, by_kind, helm, name_of, render
from tests.support.release_harness import expand

pytestmark = pytest.mark.skipif(not HELM.exists(), reason=f"helm not built at {HELM} (run `make setup`)")

CHART = Path(__file__).resolve().parents[2] / "charts" / "tuneloop"
CRD = Path(__file__).resolve().parents[1] / "support" / "crds" / "jobset.x-k8s.io_jobsets.yaml"
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "node"
NODES = ("--set", "trainer.nodes=3", "--set", "trainer.processesPerNode=2")
AS_JOB = ("--set", "trainer.job.enabled=true")
AS_JOBSET = (*AS_JOB, "--set", "trainer.cronJob.enabled=false", "--set", "trainer.workload=jobset")
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}
# What differs between the two workloads' pod templates, and why: the JobSet controller sets
# the pods' subdomain itself (its Service), and pod 0's name has its own form there.
JOBSET_ONLY_ENV = {"JOBSET_NAME"}
DIFFERENT_ENV = {"TUNELOOP_TRAINER_RENDEZVOUS_ENDPOINT"}


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = list(by_kind(objs, kind).values())
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def env_list(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return next(c for c in pod_spec["containers"] if c["name"] == "trainer")["env"]


def jobset_job_spec(jobset: dict[str, Any]) -> dict[str, Any]:
    (rjob,) = jobset["spec"]["replicatedJobs"]
    assert (rjob["name"], rjob["replicas"]) == (REPLICATED_JOB, 1)
    return rjob["template"]["spec"]


def controller_job(jobset: dict[str, Any], namespace: str, uid: str) -> dict[str, Any]:
    """The Job the JobSet controller (v0.10 constructJob) makes for the one replicated Job: named
    <jobset>-<replicated job>-<job index>, the template's labels plus the JobSet's, the pod
    subdomain set to the JobSet's Service (its name, with enableDNSHostnames)."""
    name = jobset["metadata"]["name"]
    rjob = jobset["spec"]["replicatedJobs"][0]
    labels = {
        "jobset.sigs.k8s.io/jobset-name": name,
        "jobset.sigs.k8s.io/jobset-uid": uid,
        "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"],
        "jobset.sigs.k8s.io/restart-attempt": "0",
        "jobset.sigs.k8s.io/replicatedjob-replicas": "1",
        "jobset.sigs.k8s.io/global-replicas": "1",
        "jobset.sigs.k8s.io/job-index": "0",
        "jobset.sigs.k8s.io/job-global-index": "0",
    }
    spec = copy.deepcopy(rjob["template"]["spec"])
    pod_meta = spec["template"].setdefault("metadata", {})
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **labels}
    pod_meta["annotations"] = {**(pod_meta.get("annotations") or {}), **labels}
    if (jobset["spec"].get("network") or {}).get("enableDNSHostnames"):
        spec["template"]["spec"]["subdomain"] = (jobset["spec"].get("network") or {}).get("subdomain") or name
    spec["suspend"] = False
    meta = rjob["template"].get("metadata") or {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{name}-{rjob['name']}-0",
            "namespace": namespace,
            "labels": {**(meta.get("labels") or {}), **labels},
            "annotations": {**(meta.get("annotations") or {}), **labels},
            "ownerReferences": [
                {"apiVersion": JOBSET_API, "kind": "JobSet", "name": name, "uid": uid, "controller": True}
            ],
        },
        "spec": spec,
    }


# ---------------------------------------------------------------- rendered


def test_the_jobsets_job_is_the_indexed_job_but_for_the_rendezvous_name() -> None:
    job = one(render("default", *NODES, *AS_JOB), "Job")
    objs = render("default", *NODES, *AS_JOBSET)
    jobset = one(objs, "JobSet")
    assert jobset["apiVersion"] == JOBSET_API
    assert "Job" not in {o["kind"] for o in objs} and "CronJob" not in {o["kind"] for o in objs}
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True}
    # The JobSet expires, its Job goes with it (the controller owns the Job).
    assert jobset["spec"]["ttlSecondsAfterFinished"] == job["spec"]["ttlSecondsAfterFinished"]
    # The child Job carries the run's identity labels (`tuneloop jobs list` reads them).
    assert jobset["spec"]["replicatedJobs"][0]["template"]["metadata"]["labels"] == job["metadata"]["labels"]

    want = copy.deepcopy(job["spec"])
    got = copy.deepcopy(jobset_job_spec(jobset))
    del want["ttlSecondsAfterFinished"]
    assert (got["completionMode"], got["completions"], got["parallelism"]) == ("Indexed", 3, 3)
    want_pod, got_pod = want["template"]["spec"], got["template"]["spec"]
    assert want_pod.pop("subdomain") == name_of("trainer") and "subdomain" not in got_pod
    want_env = {e["name"]: e for e in env_list(want_pod)}
    got_env = {e["name"]: e for e in env_list(got_pod)}
    assert set(got_env) - set(want_env) == JOBSET_ONLY_ENV and set(want_env) <= set(got_env)
    for name in DIFFERENT_ENV:
        assert got_env[name] != want_env[name]
    same = [e for e in env_list(got_pod) if e["name"] not in JOBSET_ONLY_ENV | DIFFERENT_ENV]
    assert same == [e for e in env_list(want_pod) if e["name"] not in DIFFERENT_ENV]
    for pod in (want_pod, got_pod):
        next(c for c in pod["containers"] if c["name"] == "trainer")["env"] = []
    # Everything else (command, args, image, mounts, volumes, resources, security, labels,
    # checksums, failure policy, deadlines) is the Indexed Job's.
    assert got == want

    # The Job's Service is the JobSet's own; the pod-to-pod NetworkPolicy still selects the pods.
    assert name_of("trainer") not in by_kind(objs, "Service")
    labels = got["template"]["metadata"]["labels"]
    policies = list(by_kind(objs, "NetworkPolicy").values())
    peer = {"namespace": NS, "labels": labels}
    assert allowed(policies, "in", labels, peer, (None, 29400)) and allowed(policies, "out", labels, peer, (None, 29400))


def test_the_rendezvous_endpoint_is_pod_0_of_the_jobsets_job() -> None:
    jobset = one(render("default", *NODES, *AS_JOBSET), "JobSet")
    job = controller_job(jobset, NS, "uid")
    pod = job["spec"]["template"]
    # The downward API as the kubelet fills it in for pod 0 of the Job.
    fields = {f"metadata.labels['{k}']": v for k, v in pod["metadata"]["labels"].items()}
    fields |= {"metadata.labels['batch.kubernetes.io/job-name']": job["metadata"]["name"]}
    env: dict[str, str] = {}
    for e in env_list(pod["spec"]):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") in fields:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
    # An Indexed Job's pod i has the hostname <job>-<i>, and the subdomain the JobSet set.
    pod0 = f"{job['metadata']['name']}-0.{pod['spec']['subdomain']}"
    name = jobset["metadata"]["name"]
    assert pod0 == f"{name}-{REPLICATED_JOB}-0-0.{name}"
    assert env["TUNELOOP_TRAINER_RENDEZVOUS_ENDPOINT"] == f"{pod0}:29400"
    assert env["TUNELOOP_TRAINER_JOB_NAME"] == f"{name}-{REPLICATED_JOB}-0"


def test_the_jobset_name_leaves_room_for_its_pod_names() -> None:
    release = "a-release-name-long-enough-to-be-cut-short"
    args = ["template", release, str(CHART), "--namespace", NS, *AS_JOBSET, *NODES, "--set", "trainer.nodes=99"]
    out = helm(*args).stdout
    jobset = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "JobSet")
    name = jobset["metadata"]["name"]
    # JobSet's webhook refuses a name whose longest pod name would pass 63 characters.
    assert name.endswith("-r1") and len(f"{name}-{REPLICATED_JOB}-0-98-abcde") <= 63


def test_a_cronjob_cannot_make_a_jobset() -> None:
    args = ["template", "tl", str(CHART), "--set", "trainer.workload=jobset"]
    failed = helm(*args, check=False)
    assert failed.returncode != 0 and "trainer.cronJob.enabled=false" in failed.stderr
    refused = helm("template", "tl", str(CHART), "--set", "trainer.workload=jobs", check=False)
    assert refused.returncode != 0 and "/trainer/workload" in refused.stderr


@pytest.mark.parametrize("workload", [AS_JOB, AS_JOBSET])
def test_shm_and_gpus_are_sized_per_process(workload: tuple[str, ...]) -> None:
    for per_node, shm, gpus in ((1, "16Gi", 1), (4, "64Gi", 4)):
        objs = render("gpu", *workload, "--set", f"trainer.processesPerNode={per_node}")
        kind = "JobSet" if "trainer.workload=jobset" in workload else "Job"
        spec = jobset_job_spec(one(objs, kind)) if kind == "JobSet" else one(objs, kind)["spec"]
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}
        trainer = next(c for c in pod["containers"] if c["name"] == "trainer")
        assert {"name": "dshm", "mountPath": "/dev/shm"} in trainer["volumeMounts"]
        assert trainer["resources"]["limits"]["nvidia.com/gpu"] == gpus
        # Tolerations and node selection are the pod's, whatever its process count.
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    amd = render("default", *workload, "--set", "trainer.processesPerNode=2",
                 "--set-json", 'trainer.resources={"limits": {"amd.com/gpu": 1, "memory": "16Gi"}}')
    kind = "JobSet" if "trainer.workload=jobset" in workload else "Job"
    spec = jobset_job_spec(one(amd, kind)) if kind == "JobSet" else one(amd, kind)["spec"]
    trainer = spec["template"]["spec"]["containers"][0]
    assert trainer["resources"]["limits"] == {"amd.com/gpu": 2, "memory": "16Gi"}
    no_shm = render("default", *workload, "--set", "trainer.shmSize=0", "--set", "trainer.processesPerNode=2")
    spec = jobset_job_spec(one(no_shm, kind)) if kind == "JobSet" else one(no_shm, kind)["spec"]
    assert "dshm" not in {v["name"] for v in spec["template"]["spec"]["volumes"]}


# ---------------------------------------------------------------- on a real API server


@pytest.fixture(scope="module")
def jobset_crd(kube: Any) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    crd = yaml.safe_load(CRD.read_text())
    with kube.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as err:
            if err.status != 409:
                raise

        def established() -> bool:
            conditions = ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        kube.wait_for("the JobSet CRD established", established, timeout_s=30)


def test_the_api_server_validates_and_stores_the_jobset(kube: Any, jobset_crd: None, tmp_path: Path) -> None:
    """helm install in JobSet mode, two nodes: the JobSet stored as sent (no field pruned as
    unknown), a strict dry run refusing a bad one, and the Job its controller would make
    admitted with its pods, the trainer's token annotating that Job."""
    from kubernetes import client, config

    from tests.support.kube import KubeApiError
    from tests.support.kube import helm as kube_helm
    from tuneloop.trainer import jobs

    ns = kube.create_namespace(f"tl-jobset-{uuid.uuid4().hex[:6]}", RESTRICTED)
    sets = ["trainer.nodes=2", "trainer.processesPerNode=2", "trainer.job.enabled=true",
            "trainer.cronJob.enabled=false", "trainer.workload=jobset"]
    args = ["install", "tl", str(CHART), "--namespace", ns]
    for s in sets:
        args += ["--set", s]
    kube_helm(kube, tmp_path, *args)
    manifest = kube_helm(kube, tmp_path, "get", "manifest", "tl", "--namespace", ns).stdout
    sent = one([d for d in yaml.safe_load_all(manifest) if d], "JobSet")
    name = sent["metadata"]["name"]
    path = f"/apis/{JOBSET_API}/namespaces/{ns}/jobsets"
    stored = kube.request("GET", f"{path}/{name}")
    # The CRD's structural schema prunes what it does not know: stored equals sent.
    assert stored["spec"]["replicatedJobs"][0]["template"]["spec"] == jobset_job_spec(sent)
    assert stored["spec"]["network"] == sent["spec"]["network"]

    strict = {"dryRun": "All", "fieldValidation": "Strict"}
    again = {**copy.deepcopy(sent), "metadata": {**sent["metadata"], "name": "dry-run"}}
    assert kube.request("POST", path, again, query=strict)["metadata"]["name"] == "dry-run"
    typo = copy.deepcopy(again)
    typo["spec"]["replicatedJobs"][0]["replica"] = 1
    with pytest.raises(KubeApiError, match="unknown field"):
        kube.request("POST", path, typo, query=strict)
    wrong = copy.deepcopy(again)
    jobset_job_spec(wrong)["completions"] = "two"
    with pytest.raises(KubeApiError) as err:
        kube.request("POST", path, wrong, query=strict)
    assert err.value.status == 422 and "completions" in err.value.message

    job = controller_job(sent, ns, stored["metadata"]["uid"])
    created = kube.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job)
    job_name = created["metadata"]["name"]

    def pods() -> list[dict[str, Any]]:
        found = kube.request("GET", f"/api/v1/namespaces/{ns}/pods",
                             query={"labelSelector": f"{jobs.JOB_NAME_LABEL}={job_name}"})["items"]
        return found if len(found) == 2 else []

    made = sorted(kube.wait_for("the Job controller's two pods", pods, timeout_s=90),
                  key=lambda p: p["spec"]["hostname"])
    assert [p["spec"]["hostname"] for p in made] == [f"{name}-{REPLICATED_JOB}-0-0", f"{name}-{REPLICATED_JOB}-0-1"]
    assert {p["spec"]["subdomain"] for p in made} == {name}
    assert made[0]["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"] == name

    trainer_sa = "tl-tuneloop-trainer"
    trainer_cfg = kube.service_account_kubeconfig(ns, trainer_sa, tmp_path / "trainer.kubeconfig")
    with config.new_client_from_config(config_file=str(trainer_cfg)) as trainer:
        env = {jobs.JOB_NAME_ENV: job_name, jobs.JOB_NAMESPACE_ENV: ns}
        assert jobs.record_promoted_version("policy-v3", api=trainer, env=env) is True
    with kube.api_client() as admin:
        annotations = client.BatchV1Api(admin).read_namespaced_job(job_name, ns).metadata.annotations
    assert annotations[jobs.PROMOTED_VERSION_KEY] == "policy-v3"
