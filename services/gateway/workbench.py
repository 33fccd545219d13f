"""The annotation workbench: labelling queues from project files, calibration rounds, anchor
items mixed in unmarked, a calibration view for leads and a before/after review view; the
operations pages (retrain runs, model versions, promote and roll back) are operations.py's,
mounted with it.

Judgements go through the Feedback service like any app feedback, so they land in the same
Kafka topic and preference store; each is also recorded in the project's state file, which
only drives the queues (who still has to judge what). The agreement figures (percent
agreement, kappa, each annotator's anchor accuracy) are the Feedback service's GetAgreement,
the store's numbers; what the calibration view adds from the state file is per-item: the
vote split of the items judged apart and each annotator's anchor answers over time.
"""

import csv
import io
import json
import math
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import grpc
import yaml
from fastapi import Depends, FastAPI, Query
from fastapi.responses import HTMLResponse, PlainTextResponse
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, Field

from tuneloop.gateway.auth import ApiKey
from tuneloop.gateway.errors import ApiError, from_rpc
from tuneloop.gateway.operations import Runs
from tuneloop.gateway.operations import mount as mount_operations
from tuneloop.gateway.settings import GatewaySettings
from tuneloop.v1 import feedback_pb2

CHOICES = {"a": feedback_pb2.PAIRWISE_CHOICE_A, "b": feedback_pb2.PAIRWISE_CHOICE_B,
           "tie": feedback_pb2.PAIRWISE_CHOICE_TIE, "both_bad": feedback_pb2.PAIRWISE_CHOICE_BOTH_BAD}


class Response(BaseModel):
    completion_id: str
    text: str


class Criterion(BaseModel):
    name: str
    description: str
    borderline: str = ""


class Item(BaseModel):
    id: str
    prompt: str
    a: Response
    b: Response
    anchor: Literal["a", "b", "tie", "both_bad"] | None = Field(None, description="Known answer of an anchor item.")


class Project(BaseModel):
    """A labelling project file (YAML) in the workbench projects folder."""

    project: str
    tenant: str
    overlap: int = Field(3, ge=1, description="Annotators per regular item.")
    annotators: list[str] = Field(default_factory=list, description="Allowed annotator key names (empty: any).")
    rubric: list[Criterion] = Field(min_length=1, max_length=5)
    calibration: list[str] = Field(default_factory=list, description="Item ids every annotator judges first.")
    items: list[Item]

    def item_id(self, item: Item) -> str:
        """The item id judgements carry (project-qualified: agreement is measured per item)."""
        return f"{self.project}/{item.id}"

    def anchor_answers(self) -> dict[str, str]:
        """Known anchor answers as the preference store's anchors.json spells them: the
        preferred completion id, or "tie" / "both_bad"."""
        return {
            self.item_id(i): {"a": i.a.completion_id, "b": i.b.completion_id}.get(i.anchor, i.anchor)
            for i in self.items if i.anchor is not None
        }


class Judgement(BaseModel):
    item_id: str = Field(min_length=1, max_length=256)
    choice: Literal["a", "b", "tie", "both_bad"]
    marks: dict[str, float] = Field(default_factory=dict, description="Optional per-criterion marks, 1-5.")
    comment: str = Field("", max_length=4096)


@dataclass
class ProjectState:
    """Who judged what, persisted as JSON lines so a restart keeps every queue's progress."""

    path: Path
    judged: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))  # item → annotator → choice
    times: list[tuple[float, str, str, str]] = field(default_factory=list)  # (t, annotator, item, choice)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> "ProjectState":
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self._add(r["t"], r["annotator"], r["item"], r["choice"])
        return self

    def _add(self, t: float, annotator: str, item: str, choice: str) -> None:
        self.judged[item][annotator] = choice
        self.times.append((t, annotator, item, choice))

    def record(self, annotator: str, item: str, choice: str) -> None:
        with self.lock:
            t = time.time()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"t": t, "annotator": annotator, "item": item, "choice": choice}) + "\n")
            self._add(t, annotator, item, choice)


class Workbench:
    def __init__(self, projects_dir: Path, state_dir: Path | None = None) -> None:
        self.dir = projects_dir
        self.projects: dict[str, Project] = {}
        for path in sorted(projects_dir.glob("*.y*ml")):
            p = Project.model_validate(yaml.safe_load(path.read_text()))
            self.projects[p.project] = p
        # Projects may come from a read-only mount (a ConfigMap): progress is kept apart.
        state_dir = state_dir or projects_dir / ".state"
        self.states = {name: ProjectState(state_dir / f"{name}.jsonl").load() for name in self.projects}

    def visible(self, key: ApiKey) -> list[Project]:
        return [p for p in self.projects.values()
                if p.tenant == key.tenant and (not p.annotators or key.name in p.annotators or "lead" in key.roles)]

    def project(self, name: str, key: ApiKey) -> Project | None:
        return next((p for p in self.visible(key) if p.project == name), None)

    def queue(self, p: Project, annotator: str) -> list[Item]:
        """What this annotator still has to judge, in order: the calibration round first, then
        the regular items (anchors among them, unmarked) in an order shuffled per annotator."""
        state = self.states[p.project]
        by_id = {i.id: i for i in p.items}
        todo = [by_id[i] for i in p.calibration if annotator not in state.judged.get(i, {})]
        rest = [i for i in p.items if i.id not in p.calibration and annotator not in state.judged.get(i.id, {})]
        random.Random(f"{p.project}/{annotator}").shuffle(rest)
        for item in rest:
            # Anchors go to everyone (they measure each annotator); regular items until overlap is met.
            if item.anchor is not None or len(state.judged.get(item.id, {})) < p.overlap:
                todo.append(item)
        return todo

    def progress(self, p: Project, annotator: str) -> dict:
        todo = self.queue(p, annotator)
        done = sum(1 for judges in self.states[p.project].judged.values() if annotator in judges)
        return {"done": done, "remaining": len(todo), "calibration_remaining": sum(i.id in p.calibration for i in todo)}

    def disagreements(self, p: Project, calibration_only: bool) -> list[dict]:
        ids = set(p.calibration) if calibration_only else {i.id for i in p.items}
        rows = []
        for item_id, judges in self.states[p.project].judged.items():
            if item_id in ids and len(judges) >= 2:
                counts = Counter(judges.values())
                rows.append({"item_id": item_id, "judges": len(judges), "votes": dict(counts),
                             "agreement": max(counts.values()) / len(judges)})
        return sorted(rows, key=lambda r: (r["agreement"], r["item_id"]))

    def anchor_history(self, p: Project) -> dict[str, list[dict]]:
        known = {i.id: i.anchor for i in p.items if i.anchor is not None}
        history: dict[str, list[dict]] = defaultdict(list)
        for t, annotator, item, choice in self.states[p.project].times:
            if item in known:
                history[annotator].append({"t": t, "item_id": item, "correct": choice == known[item]})
        return history


def _event(p: Project, item: Item, j: Judgement, key: ApiKey) -> feedback_pb2.FeedbackEvent:
    ts = Timestamp()
    ts.GetCurrentTime()
    return feedback_pb2.FeedbackEvent(
        event_id=uuid.uuid4().hex,
        created_at=ts,
        tenant=key.tenant,
        source=feedback_pb2.FEEDBACK_SOURCE_ANNOTATOR,
        annotator_id=key.name,
        project=p.project,
        pairwise=feedback_pb2.PairwiseJudgement(
            completion_a_id=item.a.completion_id, completion_b_id=item.b.completion_id, choice=CHOICES[j.choice]
        ),
        criteria=[c.name for c in p.rubric],
        marks=[feedback_pb2.CriterionMark(criterion=c, value=v) for c, v in j.marks.items()],
        comment=j.comment,
        calibration=item.id in p.calibration,
        anchor=item.anchor is not None,
        item_id=p.item_id(item),
    )


def measured(value: float) -> float | None:
    """A figure the report could not measure (NaN: no anchors, no shared items) as JSON null."""
    return None if math.isnan(value) else value


def mount(
    app: FastAPI, authed: Callable[[str], Callable[..., Any]], stub: Callable[[str], Any], settings: GatewaySettings
) -> None:
    """Adds /workbench (the page) and /workbench/api/* to the gateway, if projects are configured;
    `authed` is the gateway's key check for a kind of call (auth.ACCESS)."""
    if settings.workbench_projects_dir is None:
        return

    bench = Workbench(settings.workbench_projects_dir, settings.workbench_state_dir)
    page = (Path(__file__).parent / "static" / "workbench.html").read_text()
    annotator = Depends(authed("annotate"))
    lead = Depends(authed("review"))

    def project_or_404(name: str, key: ApiKey) -> Project:
        p = bench.project(name, key)
        if p is None:  # another tenant's project looks exactly like a missing one
            raise ApiError(404, f"no project {name!r}", "not_found_error", "project")
        return p

    @app.get("/workbench", response_class=HTMLResponse, include_in_schema=False)
    async def workbench_page() -> str:
        return page

    @app.get("/workbench/api/me", tags=["workbench"])
    async def me(key: Annotated[ApiKey, annotator]):
        return {"name": key.name, "tenant": key.tenant, "roles": sorted(key.roles),
                "projects": [{"project": p.project, **bench.progress(p, key.name)} for p in bench.visible(key)]}

    @app.get("/workbench/api/projects/{name}/next", tags=["workbench"])
    async def next_item(name: str, key: Annotated[ApiKey, annotator]):
        p = project_or_404(name, key)
        todo = bench.queue(p, key.name)
        item = todo[0] if todo else None
        return {
            "project": p.project,
            "rubric": [c.model_dump() for c in p.rubric],
            "progress": bench.progress(p, key.name),
            "item": None if item is None else {
                "id": item.id, "prompt": item.prompt, "a": item.a.text, "b": item.b.text,
                "calibration": item.id in p.calibration,  # anchors stay unmarked
            },
        }

    @app.post("/workbench/api/projects/{name}/judgements", tags=["workbench"])
    async def judge(name: str, body: Judgement, key: Annotated[ApiKey, annotator]):
        p = project_or_404(name, key)
        item = next((i for i in p.items if i.id == body.item_id), None)
        if item is None:
            raise ApiError(422, f"item_id: no item {body.item_id!r} in {name}", "invalid_request_error", "item_id")
        unknown = set(body.marks) - {c.name for c in p.rubric}
        if unknown:
            raise ApiError(422, f"marks: unknown criteria {sorted(unknown)}", "invalid_request_error", "marks")
        try:
            result = await stub("feedback").Submit(_event(p, item, body, key), timeout=30)
        except grpc.RpcError as err:
            raise from_rpc(err) from None
        bench.states[p.project].record(key.name, item.id, body.choice)
        return {"event_id": result.event_id, "progress": bench.progress(p, key.name)}

    @app.get("/workbench/api/projects/{name}/calibration", tags=["workbench"])
    async def calibration(name: str, key: Annotated[ApiKey, lead], calibration_only: bool = True):
        p = project_or_404(name, key)
        try:
            report = await stub("feedback").GetAgreement(
                feedback_pb2.AgreementRequest(tenant=key.tenant, project=p.project,
                                              calibration_only=calibration_only), timeout=30)
        except grpc.RpcError as err:
            raise from_rpc(err) from None
        return {
            "project": p.project,
            "agreement": {"items": report.items, "judgements": report.judgements, "annotators": report.annotators,
                          "percent_agreement": measured(report.percent_agreement), "kappa": measured(report.kappa),
                          "kappa_method": report.kappa_method},
            "annotators": [{"annotator_id": q.annotator_id, "anchors": q.anchors,
                            "anchor_accuracy": measured(q.anchor_accuracy),
                            "recent_anchor_accuracy": measured(q.recent_anchor_accuracy),
                            "majority_agreement": measured(q.majority_agreement)} for q in report.annotators_quality],
            "disagreements": bench.disagreements(p, calibration_only)[:20],
            "anchor_history": bench.anchor_history(p),
        }

    @app.get("/workbench/api/projects/{name}/export.csv", tags=["workbench"], response_class=PlainTextResponse)
    async def export(name: str, key: Annotated[ApiKey, lead]):
        p = project_or_404(name, key)
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["item_id", "calibration", "annotator", "choice", "judged_at"])
        for t, annotator, item, choice in bench.states[p.project].times:
            w.writerow([item, item in p.calibration, annotator, choice,
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))])
        return out.getvalue()

    @app.get("/workbench/api/review", tags=["workbench"])
    async def review(key: Annotated[ApiKey, lead], run: Annotated[str, Query(min_length=1, max_length=128)]):
        """Before/after answers of a retrain run, from the run's report in the runs folder."""
        runs = settings.workbench_runs_dir
        if runs is None:
            raise ApiError(404, "no runs folder configured", "not_found_error", "run")
        path = (runs / run / "report.json").resolve()
        # Another tenant's run looks exactly like a missing one.
        if runs.resolve() not in path.parents or not path.exists() or key.tenant not in Runs(runs).tenants(path.parent):
            raise ApiError(404, f"no report for run {run!r}", "not_found_error", "run")
        report = json.loads(path.read_text())
        evals = [path.parent / "eval_before.json", path.parent / "eval_after.json"]
        samples = []
        if all(e.exists() for e in evals):
            before, after = (json.loads(e.read_text())["held_out"] for e in evals)
            samples = [{"prompt": b["prompt"], "before": b["output"], "after": a["output"]}
                       for b, a in zip(before, after, strict=True)]
        return {"run": run, "status": report.get("status"), "reason": report.get("reason", ""),
                "verdict": report.get("verdict"), "samples": samples}

    mount_operations(app, authed, settings, model_events(settings))


def model_events(settings: GatewaySettings) -> Callable[[], Any] | None:
    """The registry listener publishing ModelEvents, as the trainer's promotions do."""
    if not settings.model_events_bootstrap_servers or settings.workbench_registry_root is None:
        return None

    def make() -> Any:
        # One ModelEvent format and key, whoever moves the alias (the trainer publishes the same).
        from tuneloop.common.model_events import KafkaModelEvents

        events = KafkaModelEvents(settings.model_events_bootstrap_servers, str(settings.workbench_registry_root))
        lock = threading.Lock()  # requests run on a thread pool; the producer is made on first use

        def publish(*args: Any) -> None:
            with lock:
                events(*args)

        return publish

    return make
