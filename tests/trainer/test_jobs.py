"""`tuneloop jobs`: the Job-from-CronJob construction and run summaries (pure functions), and the
commands against a real kube-apiserver and kube-controller-manager (the `kube` fixture: no nodes,
so pods stay Pending).

Following a run's logs needs a kubelet (the API server proxies logs from it) and a pod that runs
to an end, which that control plane has not; the `..._no_kubelet_against_fake_apiserver` tests
run those against an HTTP server speaking the few REST endpoints the commands use, with the API
server's own request rules where the client could get them wrong (bearer token, JSON content
type on create, merge patch on patch).
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from typer.testing import CliRunner

from tests.support.kube import KubeControlPlane
from tuneloop.trainer import jobs

NS = "ml"
TOKEN = "test-token"
CRONJOB_UID = "5f0c3b7e-0000-4000-8000-000000000001"


def make_cronjob(uid: str | None = CRONJOB_UID, namespace: str = NS) -> dict[str, Any]:
    labels = {
        "helm.sh/chart": "tuneloop-0.2.0",
        "app.kubernetes.io/name": "tuneloop",
        "app.kubernetes.io/instance": "tuneloop",
        "app.kubernetes.io/component": "trainer",
    }
    meta: dict[str, Any] = {"name": "tuneloop-retrain", "namespace": namespace, "labels": labels}
    if uid:
        meta["uid"] = uid
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": meta,
        "spec": {
            "schedule": "0 3 * * *",
            "concurrencyPolicy": "Forbid",
            "jobTemplate": {
                "metadata": {"labels": dict(labels), "annotations": {"example.com/team": "ml"}},
                "spec": {
                    "backoffLimit": 1,
                    "template": {
                        "metadata": {"labels": {"app.kubernetes.io/component": "trainer"}},
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [
                                {
                                    "name": "trainer",
                                    "image": "ghcr.io/tuneloop/tuneloop:0.1.0",
                                    "args": ["train", "retrain", "--config", "/etc/tuneloop/retrain.yaml"],
                                    "resources": {"limits": {"nvidia.com/gpu": 1}},
                                }
                            ],
                        },
                    },
                },
            },
        },
    }


def make_job(
    name: str,
    created: str,
    *,
    owner_uid: str | None = CRONJOB_UID,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    status: dict[str, Any] | None = None,
    suspend: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": NS,
        "creationTimestamp": created,
        "labels": labels
        if labels is not None
        else {"app.kubernetes.io/instance": "tuneloop", "app.kubernetes.io/component": "trainer"},
        "annotations": annotations or {},
    }
    if owner_uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": "batch/v1",
                "kind": "CronJob",
                "name": "tuneloop-retrain",
                "uid": owner_uid,
                "controller": True,
            }
        ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {"suspend": suspend},
        "status": status or {},
    }


def complete(start: str, end: str) -> dict[str, Any]:
    return {
        "startTime": start,
        "completionTime": end,
        "succeeded": 1,
        "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": end},
            {"type": "Complete", "status": "True", "lastTransitionTime": end},
        ],
    }


def failed(start: str, end: str, reason: str = "BackoffLimitExceeded") -> dict[str, Any]:
    return {
        "startTime": start,
        "failed": 2,
        "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": reason, "lastTransitionTime": end},
            {"type": "Failed", "status": "True", "reason": reason, "lastTransitionTime": end},
        ],
    }


# ---------------------------------------------------------------- pure parts


def test_manual_job_name_is_a_valid_unique_job_name():
    now = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert jobs.manual_job_name("tuneloop-retrain", now) == "tuneloop-retrain-manual-20250304050607"
    long = jobs.manual_job_name("x" * 40 + "-" + "y" * 30, now)
    assert len(long) <= 63
    assert long.endswith("-manual-20250304050607")
    assert "--" not in long


def test_job_from_cronjob_matches_kubectl_create_job_from():
    cronjob = make_cronjob()
    job = jobs.job_from_cronjob(cronjob, "tuneloop-retrain-manual-1")
    meta = job["metadata"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert meta["name"] == "tuneloop-retrain-manual-1"
    assert meta["namespace"] == NS
    assert meta["annotations"] == {"example.com/team": "ml", jobs.MANUAL_ANNOTATION: "manual"}
    assert meta["labels"] == cronjob["spec"]["jobTemplate"]["metadata"]["labels"]
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "name": "tuneloop-retrain",
            "uid": CRONJOB_UID,
            "controller": True,
        }
    ]
    assert job["spec"] == cronjob["spec"]["jobTemplate"]["spec"]
    # A copy: changing the Job must not change the CronJob it came from.
    job["spec"]["template"]["spec"]["containers"][0]["args"].append("--dry-run")
    job["metadata"]["labels"]["extra"] = "1"
    assert "--dry-run" not in cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "extra" not in cronjob["spec"]["jobTemplate"]["metadata"]["labels"]


def test_job_from_cronjob_manual_annotation_wins_over_the_template():
    cronjob = make_cronjob()
    cronjob["spec"]["jobTemplate"]["metadata"]["annotations"][jobs.MANUAL_ANNOTATION] = "scheduled"
    job = jobs.job_from_cronjob(cronjob, "j")
    assert job["metadata"]["annotations"][jobs.MANUAL_ANNOTATION] == "manual"


def test_job_from_cronjob_is_a_valid_kubernetes_job():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (test extra) not installed"
    )
    job = jobs.job_from_cronjob(make_cronjob(), "tuneloop-retrain-manual-1")
    kubernetes_validate.validate(job, "1.33", strict=True)


def test_job_from_cronjob_needs_the_server_side_uid():
    with pytest.raises(jobs.JobsError, match="uid"):
        jobs.job_from_cronjob(make_cronjob(uid=None), "j")


def test_summarise_job_reads_each_state():
    t0, t1 = "2025-03-04T03:00:00Z", "2025-03-04T04:30:15Z"
    ok = jobs.summarise_job(
        make_job("a", t0, status=complete(t0, t1), annotations={jobs.PROMOTED_VERSION_KEY: "policy-v7"})
    )
    assert (ok.status, ok.trigger, ok.promoted_version, ok.reason) == ("Succeeded", "scheduled", "policy-v7", None)
    assert ok.finished == datetime(2025, 3, 4, 4, 30, 15, tzinfo=UTC)
    assert ok.duration_s == 5415

    bad = jobs.summarise_job(make_job("b", t0, status=failed(t0, t1, "DeadlineExceeded")))
    assert (bad.status, bad.reason, bad.promoted_version) == ("Failed", "DeadlineExceeded", None)
    assert bad.finished == datetime(2025, 3, 4, 4, 30, 15, tzinfo=UTC)

    failing = {
        "startTime": t0,
        "conditions": [{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"}],
    }
    assert jobs.summarise_job(make_job("c", t0, status=failing)).status == "Failing"
    assert jobs.summarise_job(make_job("d", t0, status={"startTime": t0, "active": 1})).status == "Running"
    assert jobs.summarise_job(make_job("e", t0)).status == "Pending"
    assert jobs.summarise_job(make_job("f", t0, suspend=True)).status == "Suspended"
    # A condition that is not True says nothing.
    not_yet = {"active": 1, "conditions": [{"type": "Complete", "status": "False"}]}
    assert jobs.summarise_job(make_job("g", t0, status=not_yet)).status == "Running"


def test_summarise_job_trigger_and_label_fallback():
    t0 = "2025-03-04T03:00:00Z"
    manual = make_job("m", t0, annotations={jobs.MANUAL_ANNOTATION: "manual"})
    assert jobs.summarise_job(manual).trigger == "manual"
    helm_job = make_job("h", t0, owner_uid=None, labels={jobs.PROMOTED_VERSION_KEY: "policy-v3"})
    summary = jobs.summarise_job(helm_job)
    assert (summary.trigger, summary.promoted_version) == ("other", "policy-v3")


def test_runs_of_keeps_owned_and_same_release_jobs_newest_first():
    cronjob = make_cronjob()
    owned_old = make_job("owned-old", "2025-03-01T03:00:00Z")
    owned_new = make_job("owned-new", "2025-03-03T03:00:00Z")
    # The chart's one-off Job: not owned, same release and component (made by an older chart).
    one_off = make_job(
        "one-off",
        "2025-03-02T03:00:00Z",
        owner_uid=None,
        labels={
            "helm.sh/chart": "tuneloop-0.1.0",
            "app.kubernetes.io/name": "tuneloop",
            "app.kubernetes.io/instance": "tuneloop",
            "app.kubernetes.io/component": "trainer",
        },
    )
    other_release = make_job(
        "other",
        "2025-03-04T03:00:00Z",
        owner_uid=str(uuid.uuid4()),
        labels={
            "app.kubernetes.io/name": "tuneloop",
            "app.kubernetes.io/instance": "staging",
            "app.kubernetes.io/component": "trainer",
        },
    )
    unrelated = make_job("unrelated", "2025-03-05T03:00:00Z", owner_uid=None, labels={})
    runs = jobs.runs_of(cronjob, [owned_old, other_release, one_off, unrelated, owned_new])
    assert [r.name for r in runs] == ["owned-new", "one-off", "owned-old"]


def test_newest_pod_is_the_latest_attempt():
    pods = [
        {"metadata": {"name": "run-a", "creationTimestamp": "2025-03-04T03:00:00Z"}},
        {"metadata": {"name": "run-c", "creationTimestamp": "2025-03-04T03:20:00Z"}},
        {"metadata": {"name": "run-b", "creationTimestamp": "2025-03-04T03:10:00Z"}},
    ]
    assert jobs.newest_pod(pods)["metadata"]["name"] == "run-c"
    assert jobs.newest_pod([]) is None


# ---------------------------------------------------------------- against the real API server

# Runs whose status the tests write themselves: the Job controller leaves a Job alone whose
# spec.managedBy names another controller.
TEST_MANAGER = "tuneloop.dev/tests"


@pytest.fixture
def real_ns(kube: KubeControlPlane) -> str:
    return kube.create_namespace(f"jobs-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def real_kubeconfig(kube: KubeControlPlane, real_ns: str, tmp_path: Path) -> Path:
    """A cluster admin (an operator starting runs), the test's namespace the default."""
    return kube.admin_kubeconfig(tmp_path / "admin.kubeconfig", real_ns)


@pytest.fixture
def real_cronjob(kube: KubeControlPlane, real_ns: str) -> dict[str, Any]:
    """make_cronjob() as stored by the API server (which gives it its uid)."""
    return kube.request("POST", f"/apis/batch/v1/namespaces/{real_ns}/cronjobs", make_cronjob(None, real_ns))


def jobs_path(namespace: str, name: str = "") -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs" + (f"/{name}" if name else "")


def create_finished_run(
    kube: KubeControlPlane,
    namespace: str,
    name: str,
    *,
    owner: dict[str, Any] | None,
    labels: dict[str, str],
    status: dict[str, Any],
    annotations: dict[str, str] | None = None,
) -> None:
    """A Job of the CronJob's template whose status the test writes (the /status subresource)."""
    meta: dict[str, Any] = {"name": name, "labels": labels, "annotations": annotations or {}}
    if owner is not None:
        ref = {"apiVersion": "batch/v1", "kind": "CronJob", "controller": True}
        meta["ownerReferences"] = [{**ref, "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}]
    spec = {**make_cronjob()["spec"]["jobTemplate"]["spec"], "managedBy": TEST_MANAGER}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}
    kube.request("POST", jobs_path(namespace), job)
    kube.request("PATCH", jobs_path(namespace, name) + "/status", {"status": status}, "application/merge-patch+json")


def test_run_creates_a_manual_job_from_the_cronjob(kube, real_ns, real_kubeconfig, real_cronjob):
    result = invoke(real_kubeconfig, "run", "--name", "retrain-now")
    assert result.exit_code == 0, result.output
    assert f"job.batch/retrain-now created in namespace {real_ns}" in result.output
    job = kube.request("GET", jobs_path(real_ns, "retrain-now"))
    meta = job["metadata"]
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "name": "tuneloop-retrain",
            "uid": real_cronjob["metadata"]["uid"],
            "controller": True,
        }
    ]
    assert meta["annotations"] == {"example.com/team": "ml", jobs.MANUAL_ANNOTATION: "manual"}
    template = make_cronjob()["spec"]["jobTemplate"]
    assert template["metadata"]["labels"].items() <= meta["labels"].items()
    assert job["spec"]["backoffLimit"] == template["spec"]["backoffLimit"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    sent = template["spec"]["template"]["spec"]["containers"][0]
    assert (container["image"], container["args"]) == (sent["image"], sent["args"])
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}

    # The Job controller makes the run's pod; with no nodes it stays Pending.
    with kube.api_client() as api:
        cluster = jobs.Cluster(api, real_ns)
        found = kube.wait_for("the Job controller's pod", lambda: cluster.pods_of("retrain-now"), timeout_s=60)
    assert found[0]["status"]["phase"] == "Pending"
    assert found[0]["metadata"]["ownerReferences"][0]["uid"] == meta["uid"]

    runs = json.loads(invoke(real_kubeconfig, "list", "-o", "json").output)
    assert [(r["name"], r["trigger"], r["status"]) for r in runs] == [("retrain-now", "manual", "Running")]


def test_run_names_a_missing_cronjob(kube, real_ns, real_kubeconfig):
    result = invoke(real_kubeconfig, "run", "--cronjob", "nope")
    assert result.exit_code == 1
    assert 'cronjobs.batch "nope" not found' in result.output
    assert not kube.request("GET", jobs_path(real_ns))["items"]


def test_list_shows_status_times_and_promoted_version(kube, real_ns, real_kubeconfig, real_cronjob):
    labels = {"app.kubernetes.io/instance": "tuneloop", "app.kubernetes.io/component": "trainer"}
    create_finished_run(
        kube,
        real_ns,
        "tuneloop-retrain-29001",
        owner=real_cronjob,
        labels=labels,
        status=complete("2025-03-03T03:00:05Z", "2025-03-03T04:02:05Z"),
        annotations={jobs.PROMOTED_VERSION_KEY: "policy-v7"},
    )
    create_finished_run(
        kube,
        real_ns,
        "tuneloop-retrain-29002",
        owner=real_cronjob,
        labels=labels,
        status=failed("2025-03-04T03:00:04Z", "2025-03-04T03:10:00Z"),
    )
    other = failed("2025-03-05T03:00:04Z", "2025-03-05T03:10:00Z")
    create_finished_run(kube, real_ns, "someone-else", owner=None, labels={}, status=other)

    result = invoke(real_kubeconfig, "list", "-o", "json")
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)
    assert [(r["name"], r["status"], r["promoted_version"]) for r in runs] == [
        ("tuneloop-retrain-29002", "Failed", None),
        ("tuneloop-retrain-29001", "Succeeded", "policy-v7"),
    ]
    assert runs[1]["started"] == "2025-03-03T03:00:05+00:00"
    assert runs[1]["finished"] == "2025-03-03T04:02:05+00:00"
    assert runs[1]["duration_s"] == 3720

    table = invoke(real_kubeconfig, "list")
    assert table.exit_code == 0, table.output
    assert "policy-v7" in table.output
    assert "BackoffLimitExceeded" in table.output
    assert "1h02m" in table.output
    assert "someone-else" not in table.output


def test_logs_gives_up_on_a_pod_that_stays_pending(kube, real_ns, real_kubeconfig, real_cronjob):
    assert invoke(real_kubeconfig, "run", "--name", "stuck").exit_code == 0
    with kube.api_client() as api:
        cluster = jobs.Cluster(api, real_ns)
        pods = kube.wait_for("the Job controller's pod", lambda: cluster.pods_of("stuck"), timeout_s=60)
    result = invoke(real_kubeconfig, "logs", "stuck", "--wait-seconds", "0")
    assert result.exit_code == 1
    assert f"pod {pods[0]['metadata']['name']} still Pending" in result.output


def test_record_promoted_version_annotates_the_own_job(kube, real_ns, real_kubeconfig, real_cronjob):
    from kubernetes import config

    assert invoke(real_kubeconfig, "run", "--name", "nightly").exit_code == 0
    env = {jobs.JOB_NAME_ENV: "nightly", jobs.JOB_NAMESPACE_ENV: real_ns}
    with config.new_client_from_config(config_file=str(real_kubeconfig)) as api:
        assert jobs.record_promoted_version("policy-v9", api=api, env=env) is True
    # The merge patch adds the annotation and keeps the others.
    annotations = kube.request("GET", jobs_path(real_ns, "nightly"))["metadata"]["annotations"]
    assert annotations[jobs.PROMOTED_VERSION_KEY] == "policy-v9"
    assert annotations[jobs.MANUAL_ANNOTATION] == "manual"

    runs = json.loads(invoke(real_kubeconfig, "list", "-o", "json").output)
    assert [(r["name"], r["trigger"], r["promoted_version"]) for r in runs] == [("nightly", "manual", "policy-v9")]


# ---------------------------------------------------------------- against a fake API server


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeApiServer:
    """In-memory CronJobs, Jobs and Pods of one namespace behind the Kubernetes REST paths.

    A created Job "runs" at once: it gets one pod whose log is `log_lines`, and ends as
    `outcome` ("Complete" or "Failed").
    """

    def __init__(self) -> None:
        self.cronjobs: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, list[bytes]] = {}
        self.requests: list[dict[str, Any]] = []
        self.outcome = "Complete"
        self.log_lines = [b"gates: ok\n", b"dpo: step 16 loss 0.41\n", "promoted policy-v8 \u2713\n".encode()]
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def add_pod(self, job_name: str, pod_name: str, created: str, phase: str, log: list[bytes]) -> None:
        self.pods[pod_name] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": NS,
                "creationTimestamp": created,
                "labels": {jobs.JOB_NAME_LABEL: job_name, "job-name": job_name},
            },
            "status": {"phase": phase},
        }
        self.logs[pod_name] = log

    def _create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        job = copy.deepcopy(body)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        job["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=now, namespace=NS)
        name = job["metadata"]["name"]
        ok = self.outcome == "Complete"
        job["status"] = complete(now, now) if ok else failed(now, now)
        self.jobs[name] = job
        self.add_pod(name, f"{name}-x7k2p", now, "Succeeded" if ok else "Failed", self.log_lines)
        return job

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "reason": reason,
                        "message": message,
                        "code": code,
                    },
                )

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                parts = url.path.strip("/").split("/")
                body = self._body() if method in ("POST", "PATCH") else None
                with server._lock:
                    server.requests.append(
                        {
                            "method": method,
                            "path": url.path,
                            "query": query,
                            "content_type": self.headers.get("Content-Type"),
                            "body": body,
                        }
                    )
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._status(401, "Unauthorized", "Unauthorized")
                # /apis/batch/v1/namespaces/NS/<resource>[/NAME]  or  /api/v1/namespaces/NS/pods[/NAME/log]
                base = 5 if parts[0] == "apis" else 4
                if len(parts) < base + 1 or parts[base - 2] != "namespaces" or parts[base - 1] != NS:
                    return self._status(404, "NotFound", f"no route {url.path}")
                resource, rest = parts[base], parts[base + 1 :]
                store = {"cronjobs": server.cronjobs, "jobs": server.jobs, "pods": server.pods}.get(resource)
                if store is None:
                    return self._status(404, "NotFound", f"unknown resource {resource}")
                if method == "GET" and not rest:
                    items = list(store.values())
                    for term in filter(None, query.get("labelSelector", "").split(",")):
                        key, _, value = term.partition("=")
                        items = [i for i in items if i["metadata"].get("labels", {}).get(key) == value]
                    return self._send(200, {"kind": resource.capitalize() + "List", "items": items})
                if method == "POST" and resource == "jobs" and not rest:
                    if (self.headers.get("Content-Type") or "").split(";")[0] != "application/json":
                        return self._status(415, "UnsupportedMediaType", "the body of a create must be JSON")
                    if body["metadata"]["name"] in store:
                        return self._status(
                            409, "AlreadyExists", f'jobs.batch "{body["metadata"]["name"]}" already exists'
                        )
                    return self._send(201, server._create_job(body))
                name = rest[0] if rest else ""
                if name not in store:
                    qualified = resource if resource == "pods" else f"{resource}.batch"
                    return self._status(404, "NotFound", f'{qualified} "{name}" not found')
                if method == "GET" and len(rest) == 2 and rest[1] == "log" and resource == "pods":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for line in server.logs[name]:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    return None
                if method == "GET" and len(rest) == 1:
                    return self._send(200, store[name])
                if method == "PATCH" and resource == "jobs" and len(rest) == 1:
                    if self.headers.get("Content-Type") != "application/merge-patch+json":
                        return self._status(415, "UnsupportedMediaType", "this server takes merge patches only")
                    store[name] = merge_patch(store[name], body)
                    return self._send(200, store[name])
                return self._status(405, "MethodNotAllowed", f"{method} {url.path}")

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_PATCH(self) -> None:
                self._route("PATCH")

        return Handler


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.cronjobs["tuneloop-retrain"] = make_cronjob()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=10)


@pytest.fixture
def kubeconfig(apiserver: FakeApiServer, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": apiserver.url}}],
                "users": [{"name": "ops", "user": {"token": TOKEN}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "ops", "namespace": NS}}],
                "current-context": "fake",
            }
        )
    )
    return path


def invoke(kubeconfig: Path, *args: str) -> Any:
    return CliRunner().invoke(jobs.cli, [*args, "--kubeconfig", str(kubeconfig)])


def test_run_follow_streams_logs_and_fails_with_the_run_no_kubelet_against_fake_apiserver(apiserver, kubeconfig):
    apiserver.outcome = "Failed"
    result = invoke(kubeconfig, "run", "--name", "doomed", "--follow")
    assert result.exit_code == 1
    assert "dpo: step 16 loss 0.41" in result.output
    assert "job.batch/doomed Failed (BackoffLimitExceeded)" in result.output
    log_reads = [r for r in apiserver.requests if r["path"].endswith("/log")]
    assert log_reads[0]["query"] == {"container": "trainer", "follow": "true"}

    apiserver.outcome = "Complete"
    result = invoke(kubeconfig, "run", "--name", "fine", "--follow")
    assert result.exit_code == 0, result.output
    assert "promoted policy-v8 \u2713" in result.output
    assert "job.batch/fine Succeeded" in result.output


def test_logs_follows_the_newest_pod_of_the_newest_run_no_kubelet_against_fake_apiserver(apiserver, kubeconfig):
    apiserver.jobs["tuneloop-retrain-29002"] = make_job(
        "tuneloop-retrain-29002", "2025-03-04T03:00:00Z", status={"startTime": "2025-03-04T03:00:04Z", "active": 1}
    )
    apiserver.jobs["tuneloop-retrain-29001"] = make_job("tuneloop-retrain-29001", "2025-03-03T03:00:00Z")
    apiserver.add_pod("tuneloop-retrain-29002", "first-try", "2025-03-04T03:00:04Z", "Failed", [b"oom\n"])
    apiserver.add_pod(
        "tuneloop-retrain-29002", "second-try", "2025-03-04T03:05:00Z", "Running", [b"retrying\n", b"step 1\n"]
    )
    apiserver.add_pod("tuneloop-retrain-29001", "old-run", "2025-03-03T03:00:04Z", "Succeeded", [b"old\n"])

    result = invoke(kubeconfig, "logs")
    assert result.exit_code == 0, result.output
    assert result.output == "retrying\nstep 1\n"
    pod_lists = [r for r in apiserver.requests if r["path"] == f"/api/v1/namespaces/{NS}/pods"]
    assert pod_lists[0]["query"]["labelSelector"] == f"{jobs.JOB_NAME_LABEL}=tuneloop-retrain-29002"

    result = invoke(kubeconfig, "logs", "tuneloop-retrain-29001", "--no-follow")
    assert result.output == "old\n"
    assert [r for r in apiserver.requests if r["path"].endswith("/log")][-1]["query"]["follow"] == "false"


def test_record_promoted_version_outside_a_job_does_nothing():
    assert jobs.record_promoted_version("policy-v9", env={}) is False


def test_an_unreachable_api_server_is_named(tmp_path):
    from tuneloop.common.local_kafka import free_port

    path = tmp_path / "kubeconfig"
    server = f"http://127.0.0.1:{free_port()}"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "gone", "cluster": {"server": server}}],
                "users": [{"name": "ops", "user": {"token": TOKEN}}],
                "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "ops"}}],
                "current-context": "gone",
            }
        )
    )
    result = invoke(path, "list")
    assert result.exit_code == 1
    assert f"cannot reach the API server at {server}" in result.output
