"""Retrain on two nodes, as the chart renders it: an Indexed Job of two pods, a headless
Service giving pod 0 a stable name, torchrun's c10d rendezvous on pod 0, and the trainer's
NetworkPolicy letting the pods reach each other.

The workload test starts the rendered container (the image's entrypoint, args and env) as two
local processes, filling in what Kubernetes would: the downward API fields (completion index,
Job name and uid, pod IP as 127.0.0.1), pod 0's DNS name resolved to 127.0.0.1, the mounted
ConfigMap files and volumes as local folders (the ReadWriteMany volumes shared by both). No
container runtime and no GPU here: gloo on CPU, tiny models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.release_harness import Image, dockerfile_for, expand
from tests.support.chart import (
    HELM,
    NS,
    mount_of,
    mounted_config_maps,
    allowed,
    assert_valid_kubernetes,
    by_kind,
    name_of,
    render,
)
from tuneloop.common.local_kafka import free_port
from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.registry import Registry

pytestmark = pytest.mark.skipif(not HELM.exists(), reason=f"helm not built at {HELM} (run `make setup`)")

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread"]
TWO_NODES = ("--set", "trainer.nodes=2", "--set", "trainer.processesPerNode=1")
JOB_NAME = "tl-tuneloop-retrain-29170000"
JOB_UID = "5f0c1c51-2b1e-4d55-9a53-0d1b4a6f0e11"
# The pipeline's knobs for a tiny, quick run; everything else is the chart's rendering.
TINY = (
    "--set-json", 'trainer.retrainConfig.preferences={"path": "/var/lib/tuneloop/store/prefs.jsonl", '
    '"store_root": "", "tenants": ["default"], "snapshot": "latest"}',
    "--set-json", "trainer.retrainConfig.reward_model=null",
    "--set-json", 'trainer.retrainConfig.gates={"min_new_pairs": 4}',
    "--set-json", 'trainer.retrainConfig.dpo={"max_steps": 4, "per_device_train_batch_size": 2, "save_steps": 4, '
    '"learning_rate": 0.001, "logging_steps": 1}',
    "--set-json", 'trainer.successCriteria={"name": "tiny", "generation": {"max_new_tokens": 8}, '
    '"held_out_prompts": ["Tell me about the sea.", "Tell me about dogs."], "behaviour": [], '
    '"reward": {"min_win_rate": 0.0}, "kl": {"max_kl": 1000.0}, '
    '"degeneration": {"max_repeated_ngram_ratio": 1.0, "max_wrong_language_rate": 1.0}, '
    '"length_drift": {"min_ratio": 0.01, "max_ratio": 1000.0}}',
)  # fmt: skip


def job_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(objs, "CronJob")[f"{name_of('retrain')}"]["spec"]["jobTemplate"]["spec"]


def test_two_nodes_render_an_indexed_job_a_headless_service_and_open_policies() -> None:
    objs = render("default", *TWO_NODES)
    assert_valid_kubernetes(objs)
    spec = job_spec(objs)
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    service = by_kind(objs, "Service")[name_of("trainer")]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())

    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["TUNELOOP_TRAINER_RENDEZVOUS_ENDPOINT"]["value"] == (
        f"$(TUNELOOP_TRAINER_JOB_NAME)-0.{service['metadata']['name']}:29400"
    )
    assert "job-completion-index" in env["TUNELOOP_TRAINER_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]

    # Pod to pod: the rendezvous port and the collectives' ephemeral ports, both ways.
    policies = list(by_kind(objs, "NetworkPolicy").values())
    peer = {"namespace": NS, "labels": labels}
    for port in ((None, 29400), (None, 45123)):
        assert allowed(policies, "out", labels, peer, port) and allowed(policies, "in", labels, peer, port)

    # One node: as before, a plain Job and no Service.
    one = render("default")
    assert "completionMode" not in job_spec(one) and name_of("trainer") not in by_kind(one, "Service")


def test_gpu_requests_count_per_process() -> None:
    objs = render("gpu", "--set", "trainer.processesPerNode=4")
    resources = job_spec(objs)["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 4 and resources["requests"]["nvidia.com/gpu"] == 4
    env = {e["name"]: e.get("value") for e in job_spec(objs)["template"]["spec"]["containers"][0]["env"]}
    assert env["TUNELOOP_TRAINER_PROCESSES_PER_NODE"] == "4" and "TUNELOOP_TRAINER_NODES" not in env


class RenderedPod:
    """The trainer container of the rendered Job as a local process: pod `index` of the Job."""

    def __init__(self, objs: list[dict[str, Any]], index: int, shared: Path, local: Path, port: int) -> None:
        spec = job_spec(objs)
        pod = spec["template"]["spec"]
        self.container = next(c for c in pod["containers"] if c["name"] == "trainer")
        self.local = local
        self.shared = shared
        self.volumes = {v["name"]: v for v in pod["volumes"]}
        # The ConfigMap files, written where their mount would be.
        for path, text in mounted_config_maps(objs, pod, self.container).items():
            target = self.path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(self.localise(text))
        fields = {
            "metadata.labels['batch.kubernetes.io/job-name']": JOB_NAME,
            "metadata.labels['batch.kubernetes.io/controller-uid']": JOB_UID,
            "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index),
            "metadata.namespace": "tuneloop",
            "status.podIP": "127.0.0.1",
        }
        env: dict[str, str] = {}
        for e in self.container["env"]:
            if "valueFrom" in e:
                if "fieldRef" not in e["valueFrom"]:
                    continue  # Kafka's secret: no Kafka here, and the run publishes no events without it
                env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                env[e["name"]] = self.localise(expand(e["value"], env))
        # Pod 0's name, <job>-0.<service>, is what cluster DNS answers with its IP.
        pod0 = f"{JOB_NAME}-0.{pod['subdomain']}"
        endpoint = env["TUNELOOP_TRAINER_RENDEZVOUS_ENDPOINT"]
        assert endpoint == f"{pod0}:29400"
        env["TUNELOOP_TRAINER_RENDEZVOUS_ENDPOINT"] = f"127.0.0.1:{port}"
        env.pop("TUNELOOP_KAFKA_BOOTSTRAP_SERVERS", None)
        self.env = env
        image = Image.from_dockerfile(dockerfile_for("ghcr.io/tuneloop/tuneloop-trainer-cuda"))
        args = [self.localise(expand(a, env)) for a in self.container["args"]]
        self.command = [*(self.container.get("command") or image.entrypoint), *args]

    def path(self, container_path: str) -> Path:
        mount = mount_of(self.container, container_path)
        assert mount is not None, f"{container_path} is not mounted"
        volume = self.volumes[mount["name"]]
        # ReadWriteMany claims are one folder for both pods; the rest is each pod's own.
        root = self.shared if "persistentVolumeClaim" in volume else self.local
        return root / mount["name"] / Path(container_path).relative_to(mount["mountPath"])

    def localise(self, text: str) -> str:
        """Container paths in `text` as the local paths that stand for them (one pass: the
        local paths may themselves lie under a mounted path such as /tmp)."""
        mounts = sorted((m["mountPath"] for m in self.container["volumeMounts"]), key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(m) + r"(?=/|\b|$)" for m in mounts))
        return pattern.sub(lambda m: str(self.path(m.group(0))), text)

    def start(self) -> subprocess.Popen[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_")}
        env = {**base, **self.env, "OMP_NUM_THREADS": "1", "TUNELOOP_TRAINER_TORCH_THREADS": "1",
               "HOME": str(self.local), "XDG_CACHE_HOME": str(self.local / ".cache")}
        env.pop("HF_HOME", None)  # the container's points into its own /tmp; the host's cache has the tokenizer
        self.log = (self.local / "log").open("w")
        return subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)


def test_rendered_two_node_job_trains_over_c10d_and_registers_once(tmp_path: Path) -> None:
    objs = render("default", *TWO_NODES, *TINY)
    shared = tmp_path / "volumes"
    port = free_port()
    pods = [RenderedPod(objs, i, shared, tmp_path / f"pod-{i}", port) for i in (0, 1)]

    # What the volumes hold before the run: the registry's production policy, the pairs file.
    policy, _ = make_tiny(tmp_path / "tiny")
    registry = Registry(Path(pods[0].env["TUNELOOP_REGISTRY_ROOT"]))
    card = registry.register("policy", policy, kind="policy")
    registry.promote("policy", card.version)
    prefs = pods[0].path("/var/lib/tuneloop/store/prefs.jsonl")
    prefs.parent.mkdir(parents=True, exist_ok=True)
    prefs.write_text("\n".join(
        json.dumps({"prompt": f"Tell me about {t}.", "chosen": "Sure.", "rejected": "No."}) for t in TOPICS))

    started = time.monotonic()
    procs = [pod.start() for pod in pods]
    outs = []
    for pod, proc in zip(pods, procs, strict=True):
        out, _ = proc.communicate(timeout=240)
        pod.log.close()
        outs.append(out)
    seconds = time.monotonic() - started
    logs = [(pod.local / "log").read_text() for pod in pods]
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"pod {i}:\n{logs[i][-4000:]}"

    outcome = json.loads(outs[0].strip().splitlines()[-1])
    followed = json.loads(outs[1].strip().splitlines()[-1])
    assert outcome["status"] in ("promoted", "refused"), outcome
    assert followed["status"] == "followed" and followed["joined"] == [1]

    # Two training processes, one per pod, ended with the same weights.
    digests = {}
    for text in logs:
        for line in text.splitlines():
            if line.startswith("{") and '"trained weights"' in line:
                record = json.loads(line)
                digests[record["rank"]] = record["weights_sha256"]
    assert sorted(digests) == [0, 1] and len(set(digests.values())) == 1, digests
    run_dir = Path(outcome["run_dir"])
    stage = json.loads((run_dir / "train" / "stage.json").read_text())
    assert stage["processes"] == 2 and stage["weights_sha256"] == digests[0]

    # One candidate registered, by the pipeline on pod 0, and one metrics line per step.
    assert registry.versions("policy") == ["v0001", "v0002"]
    assert registry.card("policy@v0002").training_config["run_id"] == JOB_NAME
    assert len((run_dir / "train" / "metrics.jsonl").read_text().splitlines()) == 4
    print(f"two-node retrain: {seconds:.1f} s")  # noqa: T201 - the measured figure, in -s runs


def test_launch_command_is_torchrun_with_c10d_on_several_nodes() -> None:
    from tuneloop.trainer.config import TrainerSettings
    from tuneloop.trainer.distributed import launch_command

    one = launch_command(TrainerSettings(processes_per_node=4), ["retrain-stage", "/runs/r"])
    assert one[1:7] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone", "-m"]
    two = TrainerSettings(nodes=2, node_rank=1, rendezvous_endpoint="job-0.svc:29400", rendezvous_id="uid")
    args = launch_command(two, ["retrain-stage", "/runs/r"])
    assert "--nnodes" in args and args[args.index("--rdzv-endpoint") + 1] == "job-0.svc:29400"
    assert "is_host=false" in args and args[-3:] == ["tuneloop.trainer.cli", "retrain-stage", "/runs/r"]
    with pytest.raises(ValueError, match="rendezvous_endpoint"):
        TrainerSettings(nodes=2)
