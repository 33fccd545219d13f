"""`tuneloop demo`: the whole loop on local defaults, as local processes.

A real Kafka broker and every service start with the entrypoints the images run. SmolLM2-135M-
Instruct becomes the production policy. The product team declares a behaviour
(`demo_behaviours`). For `tldr` (answers open with a one-line summary, "TL;DR: ...") they train
an SFT candidate from demonstrations of it, and the app shows its users A/B comparisons between
production and the candidate; for `concise` (a natural preference: say it in few words) the app
shows two of production's own answers per prompt. A pool of simulated annotators (declared
noise, one careless annotator, a calibration round and anchor items) judges the pairs. One
scheduled `retrain` turns those preferences into a DPO update of production, evaluates it
against the declared success criteria and promotes it; the generation service hot-swaps to it.
Nothing keeps running afterwards, also after Ctrl-C.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tuneloop.common.processes import ServiceProcess, free_port
from tuneloop.demo_behaviours import BEHAVIOURS, PROBES, Answer, Behaviour, native_bf16

console = Console()
SEED = 7
TENANT = "demo"
CONCURRENCY = 16
ANCHOR_BAR = 0.7  # annotators below this accuracy on anchors leave the queue after calibration


@dataclass(frozen=True)
class Annotator:
    name: str
    noise: float  # chance of answering at random instead of by the guideline


# Declared up front: three careful annotators and one careless one.
ANNOTATORS = [Annotator("alice", 0.05), Annotator("bob", 0.08), Annotator("carol", 0.1), Annotator("dave", 0.8)]
CHOICES = ["a", "b", "tie", "both_bad"]


def _prompts() -> list[str]:
    text = (Path(__file__).parent / "demo_data" / "prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class Demo:
    def __init__(self, root: Path, behaviour: Behaviour, fast: bool = False) -> None:
        self.root = root
        self.behaviour = behaviour
        self.fast = fast
        self.rng = random.Random(SEED)
        self.env = {
            "TUNELOOP_REGISTRY_ROOT": str(root / "registry"),
            "TUNELOOP_STORE_ROOT": str(root / "store"),
            "TUNELOOP_TRAINER_RUNS_DIR": str(root / "runs"),
            # Production and the candidate generate at the same time during the A/B comparisons:
            # a thread each, since two threads each on two cores left both waiting in OpenMP
            # barriers (a batch took several times longer than one process alone). Without a
            # candidate, production has the cores to itself.
            "TUNELOOP_GENERATION_TORCH_THREADS": "1" if behaviour.sft_candidate else "2",
            "TUNELOOP_GENERATION_ENGINE": behaviour.engine,
            "TUNELOOP_REWARD_TORCH_THREADS": "2",
            "TUNELOOP_GENERATION_ALIAS_POLL_S": "2",
        }
        self.keys = {"app": ("app", ["app"]), "lead": ("lead", ["lead"])}
        self.phases: list[tuple[str, float]] = []
        self.keys.update({a.name: (a.name, ["annotator"]) for a in ANNOTATORS})

    # ---- helpers ---------------------------------------------------------------------------
    def step(self, text: str) -> None:
        self.phases.append((text, time.monotonic()))
        console.rule(f"[bold]{text}")

    def phase_table(self) -> Table:
        """Where the demo's time went: each step from its start to the next one's."""
        table = Table(title="Time per step")
        table.add_column("step")
        table.add_column("seconds", justify="right")
        ends = [start for _, start in self.phases[1:]] + [time.monotonic()]
        for (text, start), end in zip(self.phases, ends, strict=True):
            table.add_row(text, f"{end - start:.0f}")
        return table

    def tuneloop(self, *args: str, log: str) -> None:
        """Runs a `tuneloop` command (the trainer Job's entrypoint) with its log in the demo folder."""
        path = self.root / "logs" / log
        with open(path, "ab") as out:
            proc = subprocess.run([sys.executable, "-m", "tuneloop.cli", *args], env={**os.environ, **self.env},
                                  stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"`tuneloop {' '.join(args)}` failed ({proc.returncode}); log {path}:\n{tail}")

    def http(self, path: str, body: dict, key: str = "app") -> dict:
        r = httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        r.raise_for_status()
        return r.json()

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        t0 = time.monotonic()
        behaviour = self.behaviour
        prompts = _prompts()
        self.rng.shuffle(prompts)
        probes = {p["prompt"] for p in PROBES}
        pool = [p for p in prompts if p not in probes]
        n_held = 12 if self.fast else 24
        n_sft = n_held if behaviour.sft_candidate else 0
        held_out, sft_prompts, traffic = pool[:n_held], pool[n_held:n_held + n_sft], pool[n_held + n_sft:]
        if self.fast:
            traffic = traffic[:32]
        for folder in ("logs", "models", "projects"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        total = 8 if behaviour.sft_candidate else 7
        number = iter(range(1, total + 1))

        def step(text: str) -> None:
            self.step(f"{next(number)}/{total} {text}")

        console.print(f"declared behaviour ({behaviour.name}): {behaviour.declared}")
        with ExitStack() as stack:
            step("Kafka: a real Apache Kafka broker (KRaft) on loopback")
            from tuneloop.common.local_kafka import LocalBroker, install

            broker = stack.enter_context(LocalBroker(self.root / "kafka", home=install()))
            self.env["TUNELOOP_KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
            console.print(f"broker at {broker.bootstrap}")

            step("Models: SmolLM2-135M-Instruct becomes policy@production")
            registry = self.import_models()

            step("Services: generation, feedback, store, gateway (the images' entrypoints)")
            self.start_services(stack)

            if behaviour.sft_candidate:
                step("SFT candidate from demonstrations of the declared behaviour")
                self.train_candidate(sft_prompts, registry)
                cand = ServiceProcess("generation", ["--model", "policy@candidate"], self.env, self.root / "logs",
                                      port=self.candidate_port)
                stack.callback(cand.stop)
                cand.start(timeout=300)
                step("The app: A/B comparisons through the gateway, feedback from users and annotators")
            else:
                step("The app: two of production's answers per prompt through the gateway, feedback from annotators")
            comparisons = self.app_traffic(traffic)
            agreement = self.annotate(comparisons)

            step("Scheduled retrain: gates → reward model → DPO → criteria → promotion")
            criteria = self.root / "criteria.yaml"
            criteria.write_text(yaml.safe_dump(behaviour.criteria(held_out), sort_keys=False))
            run_dir = self.retrain(criteria)

            step("Hot swap: the generation service now serves the promoted version")
            live = self.live_answers(held_out[:4], registry)

            step("Results")
            self.results(run_dir, agreement, live, time.monotonic() - t0)

    def import_models(self):
        from tuneloop.common.model_import import import_minilm, import_smollm2
        from tuneloop.common.registry import Registry

        cache = Path(os.environ.get("TUNELOOP_DEMO_CACHE", Path.cwd() / ".tuneloop" / "cache" / "models"))
        smol = cache / "smollm2-135m-instruct"
        if not (smol / "config.json").exists():
            with console.status("dequantising SmolLM2 from its GGUF (about 30 s, once)"):
                import_smollm2(smol)
        minilm = cache / "all-minilm-l6-v2"
        if not (minilm / "config.json").exists():
            import_minilm(minilm)
        registry = Registry(self.root / "registry")
        policy = registry.register("policy", smol, kind="policy", description="SmolLM2-135M-Instruct (imported)")
        registry.promote("policy", policy.version)
        reward = registry.register("reward", minilm, kind="reward", description="all-MiniLM-L6-v2 backbone, untrained head")
        console.print(f"policy@production = {policy.version}; reward backbone = reward@{reward.version}")
        return registry

    def start_services(self, stack: ExitStack) -> None:
        from tuneloop.gateway.auth import hash_key

        logs = self.root / "logs"
        keys = self.root / "keys.json"
        keys.write_text(json.dumps([{"sha256": hash_key(k), "tenant": TENANT, "name": n, "roles": r}
                                    for k, (n, r) in self.keys.items()]))
        procs = [ServiceProcess("generation", ["--model", "policy@production"], self.env, logs),
                 ServiceProcess("feedback", [], self.env, logs),
                 ServiceProcess("store", [], self.env, logs)]
        for p in procs:
            stack.callback(p.stop)
            p.start(timeout=300)
            console.print(f"{p.name} ready on {p.target}")
        gen, fb = procs[0], procs[1]
        self.candidate_port = free_port()
        gw = ServiceProcess("gateway", [], {
            **self.env,
            "TUNELOOP_GATEWAY_API_KEYS_FILE": str(keys),
            "TUNELOOP_GATEWAY_GENERATION_TARGET": gen.target,
            "TUNELOOP_GATEWAY_CANDIDATE_GENERATION_TARGET": f"127.0.0.1:{self.candidate_port}",
            "TUNELOOP_GATEWAY_FEEDBACK_TARGET": fb.target,
            "TUNELOOP_GATEWAY_RATE_LIMIT_PER_MINUTE": "100000",
            "TUNELOOP_GATEWAY_TENANT_TOKENS_PER_MINUTE": "100000000",
            # CPU generation of a full batch can take minutes on a busy machine.
            "TUNELOOP_GATEWAY_REQUEST_TIMEOUT_S": "900",
            "TUNELOOP_GATEWAY_WORKBENCH_RUNS_DIR": str(self.root / "runs"),
        }, logs, http=True)
        stack.callback(gw.stop)
        gw.start(timeout=120)
        self.url = f"http://{gw.target}"
        console.print(f"gateway ready on {self.url} (OpenAI-compatible: {self.url}/v1)")

    def train_candidate(self, prompts: list[str], registry) -> None:
        import openai

        client = openai.OpenAI(base_url=self.url + "/v1", api_key="app", max_retries=2, timeout=600)

        def demonstrate(p: str) -> dict:
            answer = client.chat.completions.create(
                model="production", messages=[{"role": "user", "content": p}], temperature=0,
                max_tokens=self.behaviour.max_tokens,
            ).choices[0].message.content.strip()
            ideal = self.behaviour.demonstrate(answer)
            return {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ideal}]}

        demos = _concurrently(demonstrate, prompts,
                              "demonstrations (production's answers, rewritten to show the behaviour)")
        data = self.root / "sft.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in demos))
        config = self.root / "sft.yaml"
        config.write_text(yaml.safe_dump({
            "model": "policy@production", "output_dir": str(self.root / "runs" / "sft"), "data": str(data),
            "max_steps": 12 if self.fast else 24, "learning_rate": 3e-5, "per_device_train_batch_size": 4,
            "max_length": 256, "save_steps": 1000, "bf16": native_bf16(),
        }))
        with console.status("SFT on the demonstrations (TRL SFTTrainer)"):
            self.tuneloop("train", "sft", "--config", str(config), log="sft.log")
        card = registry.register("policy", self.root / "runs" / "sft" / "model", kind="policy", parent="policy@production",
                                 description=f"SFT candidate: demonstrations of the {self.behaviour.name} behaviour",
                                 training_config=yaml.safe_load(config.read_text()))
        registry.promote("policy", card.version, alias="candidate")
        console.print(f"policy@candidate = {card.version}")

    def app_traffic(self, prompts: list[str]) -> list[dict]:
        """Each prompt: `comparisons_per_prompt` comparisons, production vs the candidate (order
        shuffled) or, without a candidate, two samples of production."""
        asks = [p for p in prompts for _ in range(self.behaviour.comparisons_per_prompt)]
        seeds = [self.rng.randrange(2**31) for _ in asks]
        swaps = [self.rng.random() < 0.5 for _ in asks]
        work = list(zip(asks, seeds, swaps, strict=True))
        second = {"model_b": "candidate"} if self.behaviour.sft_candidate else {}

        def compare(item: tuple[str, int, bool]) -> dict:
            p, seed, swap = item
            r = self.http("/v1/comparisons", {"messages": [{"role": "user", "content": p}], "model": "production",
                                              **second, "temperature": 0.7, "max_tokens": self.behaviour.max_tokens,
                                              "seed": seed})
            a, b = r["candidates"]
            return {"prompt": p, "a": b, "b": a} if swap else {"prompt": p, "a": a, "b": b}

        what = "A/B comparisons, production vs candidate" if second else "two samples of production per comparison"
        return _concurrently(compare, work, what)

    def truth(self, c: dict) -> str:
        """What the rubric says of a comparison, without noise."""
        a, b = (Answer(c[k]["content"], c[k].get("finish_reason") == "length") for k in ("a", "b"))
        return self.behaviour.rubric(a, b)

    def annotate(self, comparisons: list[dict]) -> Table:
        """Round one: every annotator judges the calibration items and the anchors (known
        answers, unmarked). The lead reads the round's report and takes annotators whose anchor
        accuracy is below the bar off the queue; round two: the rest of the pairs, two of the
        remaining annotators each. Returns the final agreement table."""
        calibration = comparisons[:8]
        anchors = [c for c in comparisons[8:] if self.truth(c) in ("a", "b")][:20]
        regular = [c for c in comparisons[8:] if c not in anchors]
        answers = {self.item_id(c): c[self.truth(c)]["completion_id"] for c in anchors}
        store = self.root / "store"
        store.mkdir(parents=True, exist_ok=True)
        (store / "anchors.json").write_text(json.dumps({"answers": answers}, indent=1))

        sent = self.judge([(c, ANNOTATORS, True, False) for c in calibration]
                          + [(c, ANNOTATORS, False, True) for c in anchors])
        self.wait_for_store(sent)
        console.print("[bold]Calibration round")
        from tuneloop.store.agreement import measure_store

        quality = {q.annotator_id: q.anchor_accuracy for q in measure_store(store, TENANT).annotators}
        self.agreement_table()
        kept = [a for a in ANNOTATORS if quality.get(a.name, 0.0) >= ANCHOR_BAR]
        dropped = sorted(set(a.name for a in ANNOTATORS) - {a.name for a in kept})
        console.print(f"anchor accuracy below {ANCHOR_BAR}: {', '.join(dropped) or 'nobody'} — taken off the queue")
        sent += self.judge([(c, self.rng.sample(kept, min(2, len(kept))), False, False) for c in regular])
        self.wait_for_store(sent)
        truth_share = sum(self.truth(c) in ("a", "b") for c in comparisons)
        console.print(f"{sent} judgements on {len(comparisons)} pairs ({truth_share} pairs where exactly one "
                      "answer follows the guideline)")
        console.print("[bold]All judgements")
        return self.agreement_table()

    def judge(self, work: list[tuple[dict, list[Annotator], bool, bool]]) -> int:
        """Each annotator judges its items by the guideline, at its declared noise; sent
        through the gateway as a batch per annotator."""
        batches: dict[str, list[dict]] = {a.name: [] for a in ANNOTATORS}
        for c, judges, calibration, anchor in work:
            truth = self.truth(c)
            for a in judges:
                choice = self.rng.choice(CHOICES) if self.rng.random() < a.noise else truth
                batches[a.name].append({
                    "type": "pairwise", "event_id": uuid.uuid4().hex, "user": a.name,
                    "project": self.behaviour.name, "choice": choice,
                    "completion_ids": [c["a"]["completion_id"], c["b"]["completion_id"]],
                    "criteria": self.behaviour.feedback_criteria, "calibration": calibration,
                    "anchor": anchor, "item_id": self.item_id(c),
                })
        sent = 0
        for name, events in batches.items():
            if not events:
                continue
            r = self.http("/v1/feedback", {"events": events}, key=name)
            bad = [x for x in r["results"] if x["status"] == "rejected"]
            if bad:
                raise RuntimeError(f"feedback from {name} rejected: {bad[:3]}")
            sent += len(events)
        return sent

    def item_id(self, c: dict) -> str:
        return f"{self.behaviour.name}/" + "|".join(sorted([c["a"]["completion_id"], c["b"]["completion_id"]]))

    def wait_for_store(self, sent: int) -> None:
        from tuneloop.store.read import load_judgements

        deadline = time.monotonic() + 600
        with _progress() as progress:
            task = progress.add_task("stored in the preference store", total=sent)
            while time.monotonic() < deadline:
                try:
                    n = len(load_judgements(self.root / "store"))
                except Exception:  # the store has not written its first batch yet
                    n = 0
                progress.update(task, completed=n)
                if n >= sent:
                    return
                time.sleep(1)
        raise RuntimeError(f"the store holds {n} of {sent} judgements after 600 s")

    def agreement_table(self) -> Table:
        from tuneloop.store.agreement import measure_store

        m = measure_store(self.root / "store", TENANT)
        table = Table(title=f"Annotation quality: percent agreement {m.percent_agreement:.2f}, "
                            f"{m.kappa_method} kappa {m.kappa:.2f} over {m.items} items")
        for col in ("annotator", "declared noise", "anchors", "anchor accuracy", "with majority"):
            table.add_column(col)
        noise = {a.name: a.noise for a in ANNOTATORS}
        for q in m.annotators:
            table.add_row(q.annotator_id, f"{noise.get(q.annotator_id, 0):.2f}", str(q.anchors),
                          f"{q.anchor_accuracy:.2f}", f"{q.majority_agreement:.2f}")
        console.print(table)
        return table

    def retrain(self, criteria: Path) -> Path:
        config = self.behaviour.retrain_config(self.root / "store", TENANT, criteria, fast=self.fast)
        path = self.root / "retrain.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        with console.status("retrain (reward model, DPO, evaluation before and after) — the longest step"):
            self.tuneloop("train", "retrain", "--config", str(path), log="retrain.log")
        runs = sorted((p for p in (self.root / "runs").iterdir() if (p / "report.json").exists()),
                      key=lambda p: p.stat().st_mtime)
        return runs[-1]

    def live_answers(self, prompts: list[str], registry) -> list[tuple[str, str, str]]:
        import openai

        target = registry.current("policy", "production")
        client = openai.OpenAI(base_url=self.url + "/v1", api_key="app", max_retries=2)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            served = client.chat.completions.create(model="production", max_tokens=4, temperature=0,
                                                    messages=[{"role": "user", "content": "Hi"}]).model
            if served.endswith("@" + target):
                break
            time.sleep(2)
        out = []
        for p in prompts:
            r = client.chat.completions.create(model="production", messages=[{"role": "user", "content": p}],
                                               temperature=0, max_tokens=self.behaviour.max_tokens)
            out.append((p, r.model, r.choices[0].message.content))
        console.print(f"the gateway now answers with {out[0][1]}")
        return out

    def results(self, run_dir: Path, agreement: Table, live: list, seconds: float) -> None:
        report = json.loads((run_dir / "report.json").read_text())
        console.print(_before_after_table(run_dir))
        console.print(_criteria_table(report))
        console.print(agreement)
        live_table = Table(title="Served now, through the gateway (greedy)")
        for col in ("prompt", "model", "answer"):
            live_table.add_column(col)
        for p, m, a in live:
            live_table.add_row(p, m, a)
        console.print(live_table)
        console.print(f"report: {run_dir / 'report.md'} (plots beside it); demo folder: {self.root}")
        console.print(self.phase_table())
        console.print(f"finished in {seconds / 60:.1f} min")


def _concurrently(fn, items: list, description: str) -> list:
    """Runs `fn` over `items` with many requests in flight, so the generation service batches
    them (its dynamic batching is what makes CPU serving bearable); results keep their order."""
    from concurrent.futures import ThreadPoolExecutor

    with _progress() as progress, ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        task = progress.add_task(description, total=len(items))
        futures = [pool.submit(fn, item) for item in items]
        for f in futures:
            f.add_done_callback(lambda _f: progress.advance(task))
        return [f.result() for f in futures]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def _before_after_table(run_dir: Path) -> Table:
    table = Table(title="Held-out answers, before and after (greedy)")
    for col in ("prompt", "before", "after"):
        table.add_column(col, overflow="fold")
    for prompt, before, after in held_out_pairs(run_dir)[:8]:
        table.add_row(prompt, before, after)
    return table


def held_out_pairs(run_dir: Path) -> list[tuple[str, str, str]]:
    """(prompt, parent's answer, candidate's answer) from a retrain run's evaluations."""
    files = [run_dir / "eval_before.json", run_dir / "eval_after.json"]
    if not all(f.exists() for f in files):
        return []
    before, after = (json.loads(f.read_text())["held_out"] for f in files)
    return [(b["prompt"], b["output"], a["output"]) for b, a in zip(before, after, strict=True)]


def _criteria_table(report: dict) -> Table:
    verdict = report.get("verdict") or {}
    table = Table(title=f"Success criteria — run {report.get('status', '?').upper()} {report.get('reason', '')}")
    for col in ("criterion", "before", "after", "required", "holds"):
        table.add_column(col)
    for c in verdict.get("criteria", []):
        holds = "skipped" if c.get("skipped") else ("yes" if c.get("passed") else "NO")
        table.add_row(str(c.get("name")), _fmt(c.get("before")), _fmt(c.get("after")), str(c.get("threshold", "")), holds)
    return table


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main(behaviour: str = "tldr", fast: bool = False) -> None:
    # The demo prints its own progress; the libraries' bars and load reports would bury it.
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
                      TOKENIZERS_PARALLELISM="false")
    root = Path(os.environ.get("TUNELOOP_DEMO_DIR", Path.cwd() / ".tuneloop" / "demo")).resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    try:
        Demo(root, BEHAVIOURS[behaviour], fast=fast).run()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process the demo started has been stopped")
        raise SystemExit(130) from None
