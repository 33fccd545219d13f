"""`tuneloop jobs`: start, list and follow the retraining runs of the trainer CronJob.

A run is a Kubernetes Job: one the CronJob scheduled, one started here (`run`, the same
Job `kubectl create job --from=cronjob/...` makes), or the chart's one-off retrain Job. The
trainer records the version it promoted as the annotation `tuneloop.dev/promoted-version` on
its own Job (`record_promoted_version`), which `list` shows.

Objects are handled in their wire form (camelCase dicts): the pure functions below build and
read them, the commands only move them to and from the API server.
"""

from __future__ import annotations

import codecs
import copy
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

PROMOTED_VERSION_KEY = "tuneloop.dev/promoted-version"
MANUAL_ANNOTATION = "cronjob.kubernetes.io/instantiate"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
DEFAULT_CRONJOB = "tuneloop-retrain"
TRAINER_CONTAINER = "trainer"
# Labels a run shares with its CronJob's template whatever the chart version: a Job made by an
# older chart (other helm.sh/chart label) is still one of its runs.
RUN_IDENTITY_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")
# Set by the chart on the trainer container (downward API).
JOB_NAME_ENV = "TUNELOOP_TRAINER_JOB_NAME"
JOB_NAMESPACE_ENV = "TUNELOOP_TRAINER_JOB_NAMESPACE"
_MAX_NAME = 63


class JobsError(RuntimeError):
    """A request the cluster refused or an object that is not what the command needs."""


# ---------------------------------------------------------------- pure parts


def manual_job_name(cronjob_name: str, now: datetime) -> str:
    """A unique, valid Job name for a run started by hand, e.g. `tuneloop-retrain-manual-20250101030000`."""
    suffix = "-manual-" + now.astimezone(UTC).strftime("%Y%m%d%H%M%S")
    return cronjob_name[: _MAX_NAME - len(suffix)].rstrip("-.") + suffix


def job_from_cronjob(cronjob: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The Job `kubectl create job NAME --from=cronjob/...` creates: the CronJob's jobTemplate,
    marked as started by hand and owned by the CronJob (so history limits and deletion apply)."""
    meta = cronjob.get("metadata") or {}
    if not meta.get("uid"):
        raise JobsError("the CronJob has no uid; read it from the API server, not from a manifest")
    template = (cronjob.get("spec") or {}).get("jobTemplate") or {}
    if "spec" not in template:
        raise JobsError(f"CronJob {meta.get('name')} has no spec.jobTemplate.spec")
    tmeta = template.get("metadata") or {}
    job_meta: dict[str, Any] = {
        "name": name,
        "labels": dict(tmeta.get("labels") or {}),
        "annotations": {**(tmeta.get("annotations") or {}), MANUAL_ANNOTATION: "manual"},
        "ownerReferences": [
            {
                "apiVersion": "batch/v1",
                "kind": "CronJob",
                "name": meta["name"],
                "uid": meta["uid"],
                # Not blockOwnerDeletion: that needs the cronjobs/finalizers permission.
                "controller": True,
            }
        ],
    }
    if meta.get("namespace"):
        job_meta["namespace"] = meta["namespace"]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": copy.deepcopy(template["spec"])}


@dataclass(frozen=True)
class RunSummary:
    """One retraining run as `list` shows it."""

    name: str
    status: str  # Pending, Running, Suspended, Failing, Succeeded or Failed
    trigger: str  # scheduled, manual or other (e.g. the chart's one-off Job)
    created: datetime | None
    started: datetime | None
    finished: datetime | None
    promoted_version: str | None
    reason: str | None  # why it failed, from the Job's Failed condition

    @property
    def duration_s(self) -> float | None:
        if self.started is None:
            return None
        end = self.finished or datetime.now(UTC)
        return (end - self.started).total_seconds()

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("created", "started", "finished"):
            out[key] = out[key].isoformat() if out[key] else None
        out["duration_s"] = self.duration_s
        return out


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def summarise_job(job: Mapping[str, Any]) -> RunSummary:
    """Status, times and promoted version of one Job, from its conditions and annotations."""
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    true_conditions = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
    finished = None
    reason = None
    if "Complete" in true_conditions:
        state = "Succeeded"
        finished = _time(status.get("completionTime") or true_conditions["Complete"].get("lastTransitionTime"))
    elif "Failed" in true_conditions:
        state = "Failed"
        failed = true_conditions["Failed"]
        finished = _time(failed.get("lastTransitionTime"))
        reason = failed.get("reason") or failed.get("message")
    elif "FailureTarget" in true_conditions:
        # Decided to fail; waiting for its pods to terminate.
        state = "Failing"
        reason = true_conditions["FailureTarget"].get("reason")
    elif spec.get("suspend"):
        state = "Suspended"
    elif status.get("active"):
        state = "Running"
    else:
        state = "Pending"
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    owners = meta.get("ownerReferences") or []
    if annotations.get(MANUAL_ANNOTATION) == "manual":
        trigger = "manual"
    elif any(ref.get("kind") == "CronJob" for ref in owners):
        trigger = "scheduled"
    else:
        trigger = "other"
    return RunSummary(
        name=meta.get("name", "?"),
        status=state,
        trigger=trigger,
        created=_time(meta.get("creationTimestamp")),
        started=_time(status.get("startTime")),
        finished=finished,
        promoted_version=annotations.get(PROMOTED_VERSION_KEY) or labels.get(PROMOTED_VERSION_KEY),
        reason=reason,
    )


def is_run_of(job: Mapping[str, Any], cronjob: Mapping[str, Any]) -> bool:
    """Owned by the CronJob, or labelled as the same component of the same release."""
    uid = (cronjob.get("metadata") or {}).get("uid")
    meta = job.get("metadata") or {}
    if uid and any(ref.get("uid") == uid for ref in meta.get("ownerReferences") or []):
        return True
    template_labels = ((cronjob.get("spec") or {}).get("jobTemplate") or {}).get("metadata", {}).get("labels") or {}
    identity = {k: template_labels[k] for k in RUN_IDENTITY_LABELS if k in template_labels}
    labels = meta.get("labels") or {}
    return bool(identity) and all(labels.get(k) == v for k, v in identity.items())


def runs_of(cronjob: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]]) -> list[RunSummary]:
    """The CronJob's runs, newest first."""
    runs = [summarise_job(j) for j in jobs if is_run_of(j, cronjob)]
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(runs, key=lambda r: (r.created or oldest, r.name), reverse=True)


def newest_pod(pods: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The pod of a Job to follow: the latest attempt (a retry makes a new pod)."""
    oldest = datetime.min.replace(tzinfo=UTC)
    pods = list(pods)
    if not pods:
        return None
    return max(pods, key=lambda p: (_time(p["metadata"].get("creationTimestamp")) or oldest, p["metadata"]["name"]))


# ---------------------------------------------------------------- cluster access


def api_client(kubeconfig: str | None = None, context: str | None = None) -> tuple[ApiClient, str]:
    """A client and its default namespace: the kubeconfig's (KUBECONFIG, ~/.kube/config), or the
    pod's service account when running inside the cluster."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        api = config.new_client_from_config(config_file=kubeconfig, context=context)
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = next((c for c in contexts if c["name"] == context), active) if context else active
        namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
        return api, namespace
    except (ConfigException, FileNotFoundError):
        if kubeconfig or context:
            raise
    cfg = client.Configuration()
    config.load_incluster_config(client_configuration=cfg)
    with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
        return client.ApiClient(cfg), f.read().strip()


class Cluster:
    """The few REST calls the commands make, in wire form.

    The requests go through the client's transport (server, credentials, TLS from the
    kubeconfig) but not its generated models, which would drop fields they do not know and
    insist on types the API server itself is lenient about.
    """

    def __init__(self, api: ApiClient, namespace: str) -> None:
        self.api = api
        self.namespace = namespace

    def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            resp = self.api.call_api(*request)
        except ApiException as err:
            raise JobsError(f"{err.status} {err.reason}") from None
        except HTTPError as err:
            raise JobsError(f"cannot reach the API server at {self.api.configuration.host}: {err}") from None
        if not 200 <= resp.status < 300:
            data = resp.read()
            try:
                detail = json.loads(data).get("message") or resp.reason
            except ValueError:
                detail = resp.reason
            raise JobsError(f"{resp.status} {detail}")
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return json.loads(self._send(method, path, **kwargs).read())

    def _batch(self, resource: str, name: str = "") -> str:
        return f"/apis/batch/v1/namespaces/{self.namespace}/{resource}" + (f"/{name}" if name else "")

    def cronjob(self, name: str) -> dict[str, Any]:
        return self._json("GET", self._batch("cronjobs", name))

    def create_job(self, job: Mapping[str, Any]) -> dict[str, Any]:
        return self._json("POST", self._batch("jobs"), body=dict(job), content_type="application/json")

    def job(self, name: str) -> dict[str, Any]:
        return self._json("GET", self._batch("jobs", name))

    def jobs(self) -> list[dict[str, Any]]:
        return self._json("GET", self._batch("jobs"))["items"]

    def annotate_job(self, name: str, annotations: Mapping[str, str]) -> dict[str, Any]:
        patch = {"metadata": {"annotations": dict(annotations)}}
        return self._json("PATCH", self._batch("jobs", name), body=patch, content_type="application/merge-patch+json")

    def pods_of(self, job_name: str) -> list[dict[str, Any]]:
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        return self._json("GET", path, query={"labelSelector": f"{JOB_NAME_LABEL}={job_name}"})["items"]

    def log_chunks(self, pod: str, container: str, follow: bool) -> Iterator[bytes]:
        path = f"/api/v1/namespaces/{self.namespace}/pods/{pod}/log"
        query = {"container": container, "follow": "true" if follow else "false"}
        resp = self._send("GET", path, query=query).response
        try:
            yield from resp.stream(4096)
        finally:
            resp.release_conn()


def record_promoted_version(version: str, api: ApiClient | None = None, env: Mapping[str, str] = os.environ) -> bool:
    """Annotate the running trainer's own Job with the version it promoted.

    Returns False, doing nothing, outside a Job started from the chart (no job name in `env`).
    """
    name, namespace = env.get(JOB_NAME_ENV), env.get(JOB_NAMESPACE_ENV)
    if not name or not namespace:
        return False
    if api is None:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        api = client.ApiClient(cfg)
    Cluster(api, namespace).annotate_job(name, {PROMOTED_VERSION_KEY: version})
    return True


def wait_for_pod(cluster: Cluster, job_name: str, timeout_s: float, poll_s: float = 2.0) -> Mapping[str, Any]:
    """The Job's newest pod once it has left Pending (its logs exist from then on)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pod = newest_pod(cluster.pods_of(job_name))
        if pod is not None and (pod.get("status") or {}).get("phase", "Pending") != "Pending":
            return pod
        if time.monotonic() >= deadline:
            state = "no pod yet" if pod is None else f"pod {pod['metadata']['name']} still Pending"
            raise JobsError(f"job {job_name}: {state} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def wait_for_end(cluster: Cluster, job_name: str, timeout_s: float, poll_s: float = 2.0) -> RunSummary:
    """The run's summary once the Job is Succeeded or Failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = summarise_job(cluster.job(job_name))
        if run.status in ("Succeeded", "Failed") or time.monotonic() >= deadline:
            return run
        time.sleep(poll_s)


# ---------------------------------------------------------------- commands

cli = typer.Typer(help="Start, list and follow retraining runs (Jobs of the trainer CronJob).", no_args_is_help=True)

CronJobOpt = Annotated[str, typer.Option("--cronjob", "-c", help="The trainer CronJob (chart: <release>-retrain).")]
NamespaceOpt = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Namespace (default: the kubeconfig context's).")
]
ContextOpt = Annotated[str | None, typer.Option("--context", help="kubeconfig context (default: the current one).")]
KubeconfigOpt = Annotated[
    str | None, typer.Option("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")
]
WaitOpt = Annotated[float, typer.Option("--wait-seconds", help="How long to wait for the run's pod to start.")]


def _cluster(namespace: str | None, context: str | None, kubeconfig: str | None) -> Cluster:
    api, default_namespace = api_client(kubeconfig, context)
    return Cluster(api, namespace or default_namespace)


def _fail(err: Exception) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)


def _stream_logs(cluster: Cluster, job_name: str, container: str, follow: bool, wait_s: float) -> None:
    pod = wait_for_pod(cluster, job_name, wait_s)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in cluster.log_chunks(pod["metadata"]["name"], container, follow):
        typer.echo(decoder.decode(chunk), nl=False)
    typer.echo(decoder.decode(b"", final=True), nl=False)


@cli.command()
def run(
    cronjob: CronJobOpt = DEFAULT_CRONJOB,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    name: Annotated[str | None, typer.Option(help="Job name (default: <cronjob>-manual-<UTC time>).")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the run's logs; exit 1 if it fails.")] = False,
    wait_seconds: WaitOpt = 600.0,
) -> None:
    """Start a retrain now from the CronJob's template (like `kubectl create job --from=cronjob/...`)."""
    try:
        cluster = _cluster(namespace, context, kubeconfig)
        source = cluster.cronjob(cronjob)
        job = job_from_cronjob(source, name or manual_job_name(cronjob, datetime.now(UTC)))
        created = cluster.create_job(job)
        job_name = created["metadata"]["name"]
        typer.echo(f"job.batch/{job_name} created in namespace {cluster.namespace}")
        if not follow:
            return
        _stream_logs(cluster, job_name, TRAINER_CONTAINER, True, wait_seconds)
        summary = wait_for_end(cluster, job_name, timeout_s=60)
    except JobsError as err:
        raise _fail(err) from None
    typer.echo(f"job.batch/{job_name} {summary.status}" + (f" ({summary.reason})" if summary.reason else ""))
    if summary.status != "Succeeded":
        raise typer.Exit(1)


def _fmt_time(t: datetime | None) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if t else "-"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@cli.command("list")
def list_runs(
    cronjob: CronJobOpt = DEFAULT_CRONJOB,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
) -> None:
    """Runs of the CronJob, newest first: status, start and end, the version each promoted."""
    if output not in ("table", "json"):
        raise _fail(ValueError(f"--output must be table or json, not {output!r}"))
    try:
        cluster = _cluster(namespace, context, kubeconfig)
        runs = runs_of(cluster.cronjob(cronjob), cluster.jobs())
    except JobsError as err:
        raise _fail(err) from None
    if output == "json":
        typer.echo(json.dumps([r.to_json() for r in runs], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"runs of cronjob/{cronjob} in {cluster.namespace}")
    for col in ("JOB", "STATUS", "TRIGGER", "STARTED", "FINISHED", "DURATION", "PROMOTED"):
        table.add_column(col)
    for r in runs:
        status = r.status + (f" ({r.reason})" if r.reason else "")
        table.add_row(
            r.name,
            status,
            r.trigger,
            _fmt_time(r.started),
            _fmt_time(r.finished),
            _fmt_duration(r.duration_s),
            r.promoted_version or "-",
        )
    Console(width=160).print(table)


@cli.command()
def logs(
    job: Annotated[str | None, typer.Argument(help="The run's Job (default: the newest run).")] = None,
    cronjob: CronJobOpt = DEFAULT_CRONJOB,
    namespace: NamespaceOpt = None,
    context: ContextOpt = None,
    kubeconfig: KubeconfigOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", "-f", help="Keep streaming until the pod ends.")
    ] = True,
    container: Annotated[str, typer.Option(help="Container of the pod.")] = TRAINER_CONTAINER,
    wait_seconds: WaitOpt = 600.0,
) -> None:
    """Stream a run's logs (its newest pod: a retry after a failure is a new pod)."""
    try:
        cluster = _cluster(namespace, context, kubeconfig)
        if job is None:
            runs = runs_of(cluster.cronjob(cronjob), cluster.jobs())
            if not runs:
                raise JobsError(f"cronjob/{cronjob} has no runs in {cluster.namespace}")
            job = runs[0].name
        _stream_logs(cluster, job, container, follow, wait_seconds)
    except JobsError as err:
        raise _fail(err) from None
