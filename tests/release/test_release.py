"""The release runs as rendered: the chart's workloads started from their rendered specs
(tests/support/release_harness.py), and the loop driven through them end to end.

Per values file: the `openai` client calls the gateway's Service, which calls generation;
feedback goes through the gateway to feedback, Kafka and the store; the CronJob's job template
runs once (gates, DPO, criteria) and its pod is killed with kill -9 mid-training: the Job's
next pod resumes the same run from its last checkpoint and promotes once; the generation pods
hot-swap to the new version; the `helm test` pod passes. Kafka is the test broker on the
node, reached through the rendered bootstrap address. Tiny models.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.support.kube import KubeControlPlane, helm
from tests.support.redis_server import RedisServer
from tests.support.release_harness import CHART, ApiAccess, Network, Release, can_run, render
from tuneloop.common.local_kafka import LocalBroker, install
from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.registry import Registry
from tuneloop.gateway.auth import hash_key
from tuneloop.trainer import jobs
from typer.testing import CliRunner

pytestmark = pytest.mark.skipif(can_run() is not None, reason=str(can_run()))

KEY = "release-app-key"
HELD_OUT = ["Tell me about the sea.", "Tell me about dogs.", "Tell me about the sun."]
PROMPTS = [f"Tell me about {t}." for t in ("cats", "rain", "tea", "maps", "trains", "books", "music", "bread")]
# Criteria any candidate meets: this is a test of the release's mechanics, not of training.
CRITERIA = {
    "name": "release-journey",
    "generation": {"max_new_tokens": 8},
    "held_out_prompts": HELD_OUT,
    "behaviour": [],
    "probes": {"items": []},
    "degeneration": {"max_repeated_ngram_ratio": 1.0, "max_wrong_language_rate": 1.0, "max_non_ascii_ratio": 1.0},
    "reward": {"min_win_rate": 0.0},
    "kl": {"max_kl": 100000.0},
    "length_drift": {"min_ratio": 0.01, "max_ratio": 100.0},
}
PROJECT = {
    "project": "journey", "tenant": "acme", "overlap": 2,
    "rubric": [{"name": "helpfulness", "description": "Does it answer the question?"}],
    "items": [{"id": "q1", "prompt": "Tell me about the sea.",
               "a": {"completion_id": "cmpl-" + "a" * 32, "text": "Waves."},
               "b": {"completion_id": "cmpl-" + "b" * 32, "text": "Salt."}}],
}
# Small requests: the node is this machine (two cores); the defaults are sized for real nodes.
SMALL = {"requests": {"cpu": "50m", "memory": "256Mi"}, "limits": {"memory": "3Gi"}}


@pytest.fixture(scope="module")
def network():
    net = Network().up()
    try:
        yield net
    finally:
        net.down()


@pytest.fixture(scope="module")
def broker(network: Network, tmp_path_factory: pytest.TempPathFactory):
    """The test broker on the node's bridge address, where pods reach it."""
    b = LocalBroker(tmp_path_factory.mktemp("release-kafka"), home=install(), host=network.node_ip)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def redis(network: Network, tmp_path_factory: pytest.TempPathFactory):
    """The Redis of the gateway's limits (deploy/redis/ in a cluster), where pods reach it."""
    server = RedisServer(tmp_path_factory.mktemp("release-redis"), host=network.node_ip).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny(tmp_path_factory.mktemp("release-tiny"))


class StandInPushgateway:
    """Records what the trainer pushes, as Prometheus' Pushgateway receives it (PUT or POST
    /metrics/job/<job>[/<label>/<value>...], text exposition format). The Pushgateway itself is
    not packaged for this machine (no PyPI package, no module on the Go proxy here)."""

    def __init__(self, host: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        pushes = self.pushes = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _push(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                pushes.append((self.command, self.path, body))
                self.send_response(200)
                self.end_headers()

            do_PUT = do_POST = _push

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def journey_values(broker: LocalBroker, redis: RedisServer, path: Path, pushgateway: str = "",
                   project: str = "journey") -> Path:
    values = {
        "kafka": {"bootstrapServers": broker.bootstrap},
        "metrics": {"pushgateway": {"url": pushgateway}},
        "extraEnv": [{"name": "TUNELOOP_GENERATION_TORCH_THREADS", "value": "1"},
                     {"name": "TUNELOOP_REWARD_TORCH_THREADS", "value": "1"},
                     {"name": "TUNELOOP_TRAINER_TORCH_THREADS", "value": "1"}],
        "gateway": {"apiKeys": {"keys": [{"name": "app", "tenant": "acme", "roles": ["app", "annotator", "lead"],
                                          "sha256": hash_key(KEY)}]},
                    # The replicas count their limits together in a real Redis on the node.
                    "limits": {"storageUrl": redis.url},
                    "workbench": {"enabled": True, "projects": {f"{project}.yaml": {**PROJECT, "project": project}},
                                  # The versions page: the registry is mounted read-write into the gateway.
                                  "models": {"acme": ["policy"]}}},
        "trainer": {
            "retrainConfig": {
                # The tiny policy never emits eos: every answer stops at max_tokens, so the
                # rule for cut answers must keep them (the default drops them).
                "preferences": {"tenants": ["acme"], "cut_answers": "keep"},
                # One annotator, no item judged twice: agreement cannot be measured.
                "gates": {"min_new_pairs": 6, "allow_unmeasured": True},
                "reward_model": None,
                "dpo": {"learning_rate": 1e-3, "max_steps": 1500, "save_steps": 10, "per_device_train_batch_size": 2,
                        "loss_type": "sigmoid"},
            },
            "successCriteria": CRITERIA,
        },
    }
    for svc in ("generation", "reward", "feedback", "store", "gateway", "trainer"):
        values.setdefault(svc, {})["resources"] = SMALL
    path.write_text(yaml.safe_dump(values))
    return path


def seed_registry(release: Release, tiny: tuple[Path, Path]) -> Registry:
    (claim,) = [o["metadata"]["name"] for o in release.all("PersistentVolumeClaim")
                if o["metadata"]["labels"]["app.kubernetes.io/component"] == "registry"]
    reg = Registry(release.claim_path(claim))
    for name, folder, kind in (("policy", tiny[0], "policy"), ("reward", tiny[1], "reward")):
        card = reg.register(name, folder, kind=kind)  # type: ignore[arg-type]
        reg.promote(name, card.version)
    return reg


def claim_of(release: Release, component: str) -> Path:
    (claim,) = [o["metadata"]["name"] for o in release.all("PersistentVolumeClaim")
                if o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return release.claim_path(claim)


def wait_for(what: str, check: Any, timeout: float, release: Release | None = None, poll: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    logs = "" if release is None else "\n".join(f"--- {p.name}\n{p.log()[-2000:]}" for p in release.pods)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def run_journey(release: Release, tiny: tuple[Path, Path], start_job: Any, project: str) -> None:
    reg = seed_registry(release, tiny)
    release.start_deployments()
    assert not release.not_started, release.not_started
    release.wait_ready(timeout=300)

    gateway = next(s["metadata"]["name"] for s in release.all("Service")
                   if s["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway")
    port = next(p["port"] for p in release.get("Service", gateway)["spec"]["ports"])
    url = f"http://{release.address(gateway, port)}"
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=2, timeout=60)

    # Chat completions through the gateway's Service, each pair judged by two annotators through
    # /v1/feedback (they agree on all but the last).
    auth = {"Authorization": f"Bearer {KEY}"}
    accepted = 0
    for i, prompt in enumerate(PROMPTS):
        resp = client.chat.completions.create(model="production", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=6, n=2, temperature=1.0)
        a, b = (c.model_extra["completion_id"] for c in resp.choices)
        for user, choice in (("annotator-1", "a"), ("annotator-2", "b" if i == len(PROMPTS) - 1 else "a")):
            r = httpx.post(url + "/v1/feedback", headers=auth, timeout=30,
                           json={"type": "pairwise", "completion_ids": [a, b], "choice": choice, "user": user,
                                 "event_id": uuid.uuid4().hex, "project": project, "item_id": f"{project}/{i}"})
            assert r.status_code == 200, r.text
            accepted += r.json()["results"][0]["status"] == "accepted"
    assert accepted == 2 * len(PROMPTS)

    # The store joined them: read it where the release keeps it.
    from tuneloop.store.read import load_rows

    store_root = claim_of(release, "preferences")
    wait_for("the store's rows", lambda: len(load_rows(store_root)) >= 2 * len(PROMPTS), 120, release)

    # Agreement, served by the feedback pods from the store they mount read-only, as the
    # workbench's calibration view shows it.
    def calibration() -> dict[str, Any]:
        cal = httpx.get(url + f"/workbench/api/projects/{project}/calibration", params={"calibration_only": False},
                        headers=auth, timeout=30)
        assert cal.status_code == 200, cal.text
        return cal.json()["agreement"]

    # The store may still be joining this journey's events behind an earlier test's.
    agreement = wait_for("this journey's judgements in the store",
                         lambda: (a := calibration())["judgements"] == 2 * len(PROMPTS) and a, 120, release)
    assert agreement["items"] == len(PROMPTS) and agreement["judgements"] == 2 * len(PROMPTS), agreement
    assert agreement["percent_agreement"] == pytest.approx((len(PROMPTS) - 1) / len(PROMPTS))
    # The workbench's queue progress lands on its volume, shared by the gateway pods.
    judged = httpx.post(url + f"/workbench/api/projects/{project}/judgements", headers=auth, timeout=30,
                        json={"item_id": "q1", "choice": "a"})
    assert judged.status_code == 200, judged.text
    assert '"item": "q1"' in (claim_of(release, "workbench") / f"{project}.jsonl").read_text()

    # The CronJob's job template, once; its pod killed mid-training; the retry resumes.
    job = start_job(release)
    runs = claim_of(release, "runs")
    killed: list[str] = []

    def kill_mid_training(pod: Any) -> None:
        if killed:
            return
        run_dir = runs / job.name
        # Complete once its trainer state is written (HF writes it last): a kill before that
        # leaves a folder the retry rightly does not resume from.
        wait_for("a complete training checkpoint",
                 lambda: list((run_dir / "train" / "checkpoints").glob("checkpoint-*/trainer_state.json"))
                 or pod.phase != "Running", 600, poll=0.1)
        assert pod.phase == "Running", pod.log()[-3000:]
        pod.kill()
        killed.append(pod.name)

    status = job.run(timeout=900, on_pod=kill_mid_training)
    logs = "\n".join(f"--- {p.name} {p.phase} {p.status.exit_codes}\n{p.log()[-4000:]}" for p in job.pods)
    assert status == "Complete", logs
    assert len(job.pods) == 2 and job.pods[0].status.exit_codes == [-9], logs
    state = json.loads((runs / job.name / "state.json").read_text())
    assert state["status"] == "promoted", state
    assert state["steps"]["train"]["resumed_from"], state["steps"]["train"]
    assert reg.current("policy") == "v0002" and reg.versions("policy") == ["v0001", "v0002"]

    # The run's report, where the workbench's review reads it.
    review = httpx.get(url + "/workbench/api/review", params={"run": job.name}, headers=auth, timeout=30)
    assert review.status_code == 200, review.text
    assert review.json()["status"] == "promoted" and len(review.json()["samples"]) == len(HELD_OUT)
    # The operations views, from the runs and registry volumes the chart mounts into the gateway.
    run_page = httpx.get(url + f"/workbench/api/runs/{job.name}", headers=auth, timeout=30)
    assert run_page.status_code == 200 and run_page.json()["status"] == "promoted", run_page.text
    (policy,) = httpx.get(url + "/workbench/api/models", headers=auth, timeout=30).json()["models"]
    assert policy["aliases"]["production"]["version"] == "v0002"
    assert [v["parent"] for v in policy["versions"] if v["version"] == "v0002"] == ["policy@v0001"]

    # The generation pods hot-swap to it.
    def serves_new() -> bool:
        resp = client.chat.completions.create(model="production", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2)
        return "v0002" in json.dumps(resp.model_dump())

    wait_for("generation serving policy@v0002", serves_new, 180, release)

    # `helm test`, as after an install or upgrade: once the release is ready.
    wait_for("the gateway ready", lambda: httpx.get(url + "/readyz", timeout=10).status_code == 200, 120)
    for pod in release.test_pods():
        assert release.start_pod(pod)
        assert pod.wait(120) == "Succeeded", pod.log()


@pytest.mark.parametrize("values_file", [None, CHART / "values-dev.yaml"], ids=["values", "values-dev"])
def test_journey_through_the_rendered_release(
    values_file: Path | None, network: Network, broker: LocalBroker, redis: RedisServer, tiny: tuple[Path, Path],
    kube: KubeControlPlane, tmp_path: Path,
) -> None:
    """The release installed into the real API server (restricted Pod Security) and run on this
    node: the trainer Job is created there from the CronJob by `tuneloop jobs run`; its pods, from
    the Job the API server stored, run here with the trainer ServiceAccount's token and annotate
    that Job with what it promoted."""
    pushgateway = StandInPushgateway(network.node_ip)
    namespace = f"journey-{uuid.uuid4().hex[:6]}"
    kube.create_namespace(namespace, {"pod-security.kubernetes.io/enforce": "restricted"})
    # The module's broker keeps earlier tests' events: this journey's judgements are its own project.
    files = [*([values_file] if values_file else []),
             journey_values(broker, redis, tmp_path / "journey.yaml", pushgateway.url, project=namespace)]
    helm(kube, tmp_path / "helm", "install", "tuneloop", str(CHART), "--namespace", namespace,
         *[a for f in files for a in ("-f", str(f))])
    objects = render(files, namespace=namespace)
    api = ApiAccess("127.0.0.1", kube.port, kube.ca.read_text(), kube.service_account_token)

    def start_job(release: Release) -> Any:
        (cron,) = release.all("CronJob")
        name = "retrain-journey"
        run = CliRunner().invoke(jobs.cli, ["run", "--cronjob", cron["metadata"]["name"], "--name", name,
                                            "--namespace", namespace, "--kubeconfig", str(kube.kubeconfig)])
        assert run.exit_code == 0, run.output
        # This node runs the Job the API server stored, as the Job controller would have it run.
        return release.job_from_api(kube.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"))

    release = Release(objects, tmp_path / "node", namespace=namespace, network=network, api=api)
    try:
        run_journey(release, tiny, start_job, project=namespace)
        # The rendered gateways counted their limits in the shared Redis, not each in its memory.
        import redis as redis_client

        counted = redis_client.Redis.from_url(redis.url).keys("LIMITS:*")
        assert any(b"tuneloop-tokens" in k for k in counted), counted
    except BaseException:
        print(release.logs())
        raise
    finally:
        release.stop()
        pushgateway.close()
    # The trainer's gauges reached the Pushgateway the chart named, the stale-retrain alert's too.
    pushed = "".join(body for _, _, body in pushgateway.pushes)
    assert "tuneloop_trainer_last_success_timestamp_seconds" in pushed, pushgateway.pushes[-1:]
    with kube.api_client() as client:
        from kubernetes.client import BatchV1Api

        annotations = BatchV1Api(client).read_namespaced_job("retrain-journey", namespace).metadata.annotations
    assert annotations[jobs.PROMOTED_VERSION_KEY] == "policy@v0002"


def start_what_fits(release: Release, tiny: tuple[Path, Path]) -> None:
    seed_registry(release, tiny)
    release.start_deployments()
    release.wait_ready(timeout=300)


def test_gpu_values_start_all_but_the_gpu_pods_which_stay_pending(network, broker, redis, tiny, tmp_path: Path) -> None:
    """values-gpu.yaml on this node (no GPU): generation (vLLM image) and the trainer ask for GPU
    nodes and stay Pending, with the scheduler's reason; everything else runs and is ready."""
    values = journey_values(broker, redis, tmp_path / "v.yaml")
    # helm merges the small CPU and memory requests into the GPU values: the GPU requests stay.
    # The GPU values log in to Kafka over SASL_SSL; the node's broker is plaintext, so that is
    # switched off here (tests/common/test_kafka_auth.py runs the chart's rendered Kafka env against a
    # SCRAM-over-TLS broker).
    objects = render([CHART / "values-gpu.yaml", values], sets=["trainer.rbac.create=false", "kafka.auth.enabled=false"])
    release = Release(objects, tmp_path / "node", network=network)
    try:
        seed_registry(release, tiny)
        release.start_deployments()
        gateways = release.by_label("gateway")
        release.wait_ready(timeout=300, pods=[p for p in release.pods if p not in gateways])
        # Without generation the gateway runs but is not ready, and says why.
        for pod in gateways:
            ready = httpx.get(f"http://{pod.ip}:8080/readyz", timeout=10)
            assert ready.status_code == 503 and ready.json()["backends"] == {"generation": False, "feedback": True}
        job = release.cronjob_job("gpu")
        assert job.run(timeout=60) == "Pending"
        pending = dict(release.not_started)
        print("not started on this node (no GPU):", json.dumps(pending, indent=1))
        assert set(pending) == {"Deployment/tuneloop-generation.spec.template",
                                "CronJob/tuneloop-retrain.spec.jobTemplate.spec.template"}
        assert all("nvidia.com/gpu" in why for why in pending.values()), pending
        running = {p.labels["app.kubernetes.io/component"] for p in release.pods if p.phase == "Running"}
        assert running == {"gateway", "feedback", "store", "reward"}
    except BaseException:
        print(release.logs())
        raise
    finally:
        release.stop()


def test_all_values_start_every_pod_and_the_one_off_job(network, broker, redis, tiny, tmp_path: Path) -> None:
    """ci/all-values.yaml (autoscaling, the one-off Job, a priority class, extra env): every
    Deployment at its HPA's minReplicas, ready; the install Job's retrain runs to an outcome
    (promoted or refused, exit 0: the broker may still hold earlier tests' feedback)."""
    values = journey_values(broker, redis, tmp_path / "v.yaml")
    objects = render([CHART / "ci" / "all-values.yaml", values], sets=["trainer.rbac.create=false"])
    release = Release(objects, tmp_path / "node", network=network)
    try:
        start_what_fits(release, tiny)
        assert not release.not_started
        per_component = {}
        for p in release.pods:
            c = p.labels["app.kubernetes.io/component"]
            per_component[c] = per_component.get(c, 0) + 1
        assert per_component == {"gateway": 2, "feedback": 2, "generation": 1, "reward": 1, "store": 1}
        (job_obj,) = release.all("Job")
        job = release.job(job_obj["metadata"]["name"], job_obj["spec"], f"Job/{job_obj['metadata']['name']}")
        assert job.run(timeout=600) == "Complete", release.logs()
        state = json.loads((claim_of(release, "runs") / job.name / "state.json").read_text())
        assert state["status"] in ("promoted", "refused"), state
    except BaseException:
        print(release.logs())
        raise
    finally:
        release.stop()


def _container(objects: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["labels"].get("app.kubernetes.io/component")
              == component]
    spec = obj["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else obj["spec"]
    return spec["template"]["spec"]["containers"][0]


def _rename_env(c: dict[str, Any], name: str) -> None:
    (env,) = [e for e in c["env"] if e["name"] == name]
    env["name"] = name + "_TYPO"


def _move_mount(c: dict[str, Any], volume: str) -> None:
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume]
    mount["mountPath"] += "-moved"


def _bad_retrain_field(objects: list[dict[str, Any]]) -> None:
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-trainer")]
    cm["data"]["retrain.yaml"] += "stages: [dpo]\n"


BROKEN = {
    "env-name": ("Deployment", "generation", lambda objs: _rename_env(_container(objs, "Deployment", "generation"),
                                                                      "TUNELOOP_REGISTRY_ROOT")),
    "mount-path": ("Deployment", "generation", lambda objs: _move_mount(_container(objs, "Deployment", "generation"),
                                                                        "registry")),
    "probe-port": ("Deployment", "store", lambda objs: _container(objs, "Deployment", "store")["startupProbe"]["grpc"]
                   .update(port=50099)),
    "config-mount-path": ("CronJob", "trainer", lambda objs: _move_mount(_container(objs, "CronJob", "trainer"),
                                                                          "config")),
    "config-field": ("CronJob", "trainer", _bad_retrain_field),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_rendered_key_fails_the_release(broken: str, network, broker, redis, tiny, tmp_path: Path) -> None:
    """The harness runs what is rendered, so a rendered key broken after rendering (an env name,
    a mount path, a probe port, a config field) makes the workload fail: it is never ready, or
    its Job fails. (A Role verb the trainer needs is refused by the real API server:
    tests/release/test_kube_release.py.)"""
    kind, component, breaks = BROKEN[broken]
    objects = render([journey_values(broker, redis, tmp_path / "v.yaml")], sets=["trainer.rbac.create=false"])
    breaks(objects)
    release = Release(objects, tmp_path / "node", network=network)
    try:
        seed_registry(release, tiny)
        if kind == "CronJob":
            job = release.cronjob_job("broken")
            assert job.run(timeout=300) == "Failed"
            assert all(p.status.exit_codes and p.status.exit_codes[-1] != 0 for p in job.pods)
            return
        (dep,) = [d["metadata"]["name"] for d in release.all("Deployment")
                  if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        release.start_deployments(only=[dep])
        (pod,) = release.pods
        # Broken: the container exits, or its startup probe keeps failing (the kubelet restarts it
        # after failureThreshold); in either case no Service ever routes to it.
        wait_for("the broken pod's failure", lambda: any(c != 0 for c in pod.status.exit_codes)
                 or pod.probe_failures["startup"] >= 3, 180)
        assert not pod.status.ready
    finally:
        release.stop()
