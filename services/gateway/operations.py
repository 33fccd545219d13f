"""The workbench's operations pages: retrain runs, model versions with lineage and alias
history, and the promote and roll-back actions.

Runs are read from the trainer's run folders as written (state.json, config.yaml, verdict,
answers.json, plots); a run belongs to the tenants its `preferences.tenants` names, and a run
trained from a preferences file (no tenants) belongs to none. Which registry models a
tenant sees and may move is configured (`workbench_models`): the registry itself has no
tenants. Alias moves are the registry's own `promote` and `rollback` (the CLI's operations),
with the same ModelEvent on tuneloop.models.v1, and each one is recorded as an audit entry in
the registry folder, where every gateway replica reads it.
"""

import asyncio
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import yaml
from fastapi import Depends, FastAPI, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from tuneloop.common.registry import InvalidRefError, NotFoundError, Registry, RegistryError
from tuneloop.gateway.auth import ApiKey
from tuneloop.gateway.errors import ApiError
from tuneloop.gateway.live import served_versions

STATUSES = ("running", "promoted", "refused", "failed")
PLOTS = {"training": "training.png", "criteria": "criteria.png", "checkpoints": "checkpoints.png"}
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _seconds(start: str | None, end: str | None) -> float | None:
    try:
        t0 = datetime.fromisoformat(start) if start else None
        t1 = datetime.fromisoformat(end) if end else datetime.now(UTC)
    except ValueError:
        return None
    return None if t0 is None else round((t1 - t0).total_seconds(), 1)


class Runs:
    """Retrain run folders under one root, seen by one tenant at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def tenants(self, run_dir: Path) -> list[str]:
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return []
        return list((config.get("preferences") or {}).get("tenants") or [])

    def _dir(self, run_id: str, tenant: str) -> Path | None:
        run_dir = self.root / run_id
        if run_dir.resolve().parent != self.root.resolve() or not (run_dir / "state.json").is_file():
            return None
        return run_dir if tenant in self.tenants(run_dir) else None

    def summary(self, run_dir: Path, state: dict[str, Any], tenant: str) -> dict[str, Any]:
        steps = state.get("steps") or {}
        snapshot = steps.get("snapshot") or {}
        checks = (steps.get("gates") or {}).get("checks") or []
        # Only this tenant's annotation figures: another tenant's agreement is theirs.
        gate = {c["name"]: c.get("value") for c in checks if c.get("tenant") in (None, tenant)}
        return {
            "run_id": state.get("run_id", run_dir.name),
            "status": state.get("status"),
            "reason": state.get("reason", ""),
            "algorithm": state.get("algorithm"),
            "parent": state.get("parent"),
            "candidate": state.get("candidate") or steps.get("register"),
            "started_at": state.get("started_at"),
            "finished_at": state.get("finished_at"),
            "duration_s": _seconds(state.get("started_at"), state.get("finished_at")),
            "snapshot": {
                "source": snapshot.get("source"),
                "rows": snapshot.get("rows"),
                "new_pairs": gate.get("new_pairs"),
                "agreement": gate.get("agreement"),
                "kappa": gate.get("kappa"),
                "anchor_accuracy": gate.get("anchor_accuracy"),
            },
        }

    def find(self, tenant: str, status: str | None = None) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        out = []
        for run_dir in self.root.iterdir():
            state = _json(run_dir / "state.json")
            if not isinstance(state, dict) or tenant not in self.tenants(run_dir):
                continue
            if status is None or state.get("status") == status:
                out.append(self.summary(run_dir, state, tenant))
        return sorted(out, key=lambda r: r["started_at"] or "", reverse=True)

    def get(self, run_id: str, tenant: str) -> dict[str, Any] | None:
        run_dir = self._dir(run_id, tenant)
        if run_dir is None:
            return None
        state = _json(run_dir / "state.json") or {}
        steps = state.get("steps") or {}
        gates = steps.get("gates") or {}
        train = steps.get("train") or {}
        verdict = steps.get("verdict") or {}
        return {
            **self.summary(run_dir, state, tenant),
            "gates": [c for c in gates.get("checks") or [] if c.get("tenant") in (None, tenant)],
            "criteria": [
                {k: c.get(k) for k in ("name", "before", "after", "threshold", "passed", "skipped", "reason")}
                for c in verdict.get("criteria") or []
            ],
            "criteria_passed": verdict.get("passed"),
            "checkpoints": [{k: c.get(k) for k in ("name", "step", "passed", "chosen", "progress", "failures")}
                            for c in steps.get("checkpoints") or []],
            "train": {k: train.get(k) for k in ("stage", "steps", "seconds", "train_loss", "watch_flags")} if train else None,
            "plots": [name for name, file in PLOTS.items() if (run_dir / file).is_file()],
            "answers": self.answers(run_dir),
        }

    @staticmethod
    def answers(run_dir: Path) -> dict[str, Any]:
        """The report's answers.json; for runs older than it, the bare answers without checks."""
        paired = _json(run_dir / "answers.json")
        if isinstance(paired, dict):
            return paired
        before, after = _json(run_dir / "eval_before.json"), _json(run_dir / "eval_after.json")
        if not (isinstance(before, dict) and isinstance(after, dict)):
            return {"held_out": [], "probes": []}
        return {
            "held_out": [
                {"prompt": b["prompt"], "before": {"output": b["output"], "checks": []},
                 "after": {"output": a["output"], "checks": []}}
                for b, a in zip(before.get("held_out", []), after.get("held_out", []), strict=False)
            ],
            "probes": [],
        }

    def plot(self, run_id: str, name: str, tenant: str) -> Path | None:
        run_dir = self._dir(run_id, tenant)
        path = run_dir / PLOTS[name] if run_dir is not None and name in PLOTS else None
        return path if path is not None and path.is_file() else None

    def last_promoted_at(self, tenant: str) -> str | None:
        done = [r["finished_at"] for r in self.find(tenant, "promoted") if r["finished_at"]]
        return max(done) if done else None


def verdict_of(card_metrics: dict[str, Any]) -> dict[str, Any] | None:
    verdict = card_metrics.get("verdict")
    if not isinstance(verdict, dict):
        return None
    failed = [c["name"] for c in verdict.get("criteria", []) if not c.get("passed") and not c.get("skipped")]
    return {"passed": bool(verdict.get("passed")), "failed": failed}


class Models:
    """The registry as one tenant's leads and operators see it, and the alias moves they make."""

    def __init__(self, registry: "Registry", by_tenant: dict[str, list[str]]) -> None:
        self.registry = registry
        self.by_tenant = by_tenant

    def names(self, tenant: str) -> list[str]:
        known = set(self.registry.names())
        return [n for n in self.by_tenant.get(tenant, []) if n in known]

    def view(self, name: str, tenant: str) -> dict[str, Any]:
        reg = self.registry
        aliases = reg.aliases(name)
        versions = []
        for card in reversed(reg.list(name)):
            config = card.training_config
            versions.append({
                "version": card.version,
                "kind": card.kind,
                "created_at": card.created_at.isoformat(),
                "parent": card.parent,
                "aliases": sorted(a for a, v in aliases.items() if v == card.version),
                "dataset_snapshot": card.dataset_snapshot,
                "config": {k: config.get(k) for k in ("run_id", "algorithm", "data", "criteria") if k in config},
                "code_version": card.code_version,
                "verdict": verdict_of(card.metrics),
                "description": card.description,
            })
        alias_rows = {}
        for alias in aliases:
            state = reg.alias_state(name, alias) or {}
            alias_rows[alias] = {"version": state.get("version"), "rollback_to": reg.rollback_target(name, alias),
                                 "history": list(reversed(state.get("history", [])))}
        # Another tenant's operators may move a shared model: their entries are not ours to show.
        audit = [e for e in reg.audit_log(name) if e.get("tenant") == tenant]
        return {"name": name, "aliases": alias_rows, "versions": versions, "audit": list(reversed(audit))}


class PromoteRequest(BaseModel):
    version: str = Field(description="Version to point the alias at, vNNNN.", pattern=r"^v\d{4,}$")
    alias: str = Field("production", min_length=1, max_length=64, description="Alias to move.")
    expected_current: str | None = Field(
        None, description="The version the alias had when the page showed it; a different one now: 409."
    )
    force: bool = Field(False, description="Promote although the version did not pass its criteria.")
    reason: str = Field("", max_length=2000, description="Why; required with force.")


class RollbackRequest(BaseModel):
    alias: str = Field("production", min_length=1, max_length=64, description="Alias to move back.")
    expected_current: str | None = Field(None, description="As for promote.")
    reason: str = Field(min_length=1, max_length=2000, description="Why the alias goes back (for the audit).")


def mount(app: FastAPI, authed: Callable[[str], Callable[..., Any]], settings: Any,
          make_listener: Callable[[], Any] | None = None) -> None:
    """Adds /workbench/api/runs* and /workbench/api/models* (as far as their folders are configured);
    `authed` is the gateway's key check for a kind of call (auth.ACCESS)."""
    viewer = Depends(authed("review"))
    operator = Depends(authed("move"))
    runs = Runs(settings.workbench_runs_dir) if settings.workbench_runs_dir is not None else None

    def runs_or_404() -> Runs:
        if runs is None:
            raise ApiError(404, "no runs folder configured", "not_found_error", "run")
        return runs

    @app.get("/workbench/api/runs", tags=["workbench"])
    def list_runs(key: Annotated[ApiKey, viewer], status: Annotated[str | None, Query()] = None):
        if status is not None and status not in STATUSES:
            raise ApiError(422, f"status: must be one of {', '.join(STATUSES)}", "invalid_request_error", "status")
        found = runs_or_404()
        last = found.last_promoted_at(key.tenant)
        return {"runs": found.find(key.tenant, status),
                "last_promoted_at": last, "since_last_promoted_s": _seconds(last, None)}

    @app.get("/workbench/api/runs/{run_id}", tags=["workbench"])
    def get_run(run_id: str, key: Annotated[ApiKey, viewer]):
        run = runs_or_404().get(run_id, key.tenant) if _valid_run_id(run_id) else None
        if run is None:  # another tenant's run looks exactly like a missing one
            raise ApiError(404, f"no run {run_id!r}", "not_found_error", "run_id")
        return run

    @app.get("/workbench/api/runs/{run_id}/plots/{name}", tags=["workbench"], response_class=FileResponse)
    def get_plot(run_id: str, name: str, key: Annotated[ApiKey, viewer]):
        path = runs_or_404().plot(run_id, name, key.tenant) if _valid_run_id(run_id) else None
        if path is None:
            raise ApiError(404, f"no plot {name!r} in run {run_id!r}", "not_found_error", "name")
        return FileResponse(path, media_type="image/png")

    @app.get("/workbench/api/live", tags=["workbench"])
    async def live(key: Annotated[ApiKey, viewer]):
        """Served version per Generation replica (of this tenant's models) and time since the
        tenant's last promoted retrain."""
        visible = set(settings.workbench_models.get(key.tenant, []))
        replicas = []
        if settings.workbench_generation_metrics:
            for r in await served_versions(settings.workbench_generation_metrics):
                replicas.append({**r, "models": [m for m in r["models"] if m["name"] in visible]})
        last = await asyncio.to_thread(runs.last_promoted_at, key.tenant) if runs is not None else None
        return {"replicas": replicas, "last_promoted_at": last, "since_last_promoted_s": _seconds(last, None)}

    if settings.workbench_registry_root is None:
        return
    listener = make_listener() if make_listener is not None else None
    models = Models(Registry(settings.workbench_registry_root, on_event=listener), settings.workbench_models)

    def model_or_404(name: str, key: ApiKey) -> str:
        if name not in models.names(key.tenant):
            raise ApiError(404, f"no model {name!r}", "not_found_error", "name")
        return name

    def alias_now(name: str, alias: str, expected: str | None) -> str | None:
        try:
            current = models.registry.current(name, alias)
        except InvalidRefError as err:
            raise ApiError(422, f"alias: {err}", "invalid_request_error", "alias") from None
        if expected is not None and expected != current:
            raise ApiError(409, f"{name}@{alias} is at {current or 'nothing'} now, not {expected}; reload and retry",
                           "conflict_error", "expected_current")
        return current

    def _move(key: ApiKey, name: str, alias: str, previous: str | None, reason: str, action: str,
              operation: Callable[[], str], **extra: Any) -> dict[str, Any]:
        try:
            target = operation()
        except NotFoundError as err:
            raise ApiError(404, str(err), "not_found_error", "alias") from None
        except RegistryError as err:
            raise ApiError(409, str(err), "conflict_error", "alias") from None
        entry = models.registry.record_audit(name, {
            "action": action, "tenant": key.tenant, "who": key.name, "alias": alias,
            "from": previous, "to": target, "reason": reason.strip(), **extra,
        })
        return {"name": name, "alias": alias, "version": target, "previous": previous, "audit": entry}

    @app.get("/workbench/api/models", tags=["workbench"])
    def list_models(key: Annotated[ApiKey, viewer]):
        return {"models": [models.view(n, key.tenant) for n in models.names(key.tenant)]}

    @app.post("/workbench/api/models/{name}/promote", tags=["workbench"])
    def promote(name: str, body: PromoteRequest, key: Annotated[ApiKey, operator]):
        model_or_404(name, key)
        previous = alias_now(name, body.alias, body.expected_current)
        try:
            card = models.registry.card(f"{name}@{body.version}")
        except NotFoundError:
            raise ApiError(404, f"version: {name}@{body.version} does not exist", "not_found_error", "version") from None
        if previous == body.version:
            raise ApiError(409, f"{name}@{body.alias} is already {body.version}", "conflict_error", "version")
        verdict = verdict_of(card.metrics)
        passed = bool(verdict and verdict["passed"])
        if not passed and not body.force:
            why = f"failed its criteria ({', '.join(verdict['failed'])})" if verdict else "has no passing verdict"
            raise ApiError(409, f"{card.ref} {why}; promoting it anyway needs force: true and a reason",
                           "criteria_failed", "force")
        if not passed and not body.reason.strip():
            raise ApiError(422, "reason: a forced promotion needs a written reason", "invalid_request_error", "reason")
        return _move(key, name, body.alias, previous, body.reason, "promoted",
                     lambda: models.registry.promote(name, body.version, body.alias),
                     forced=not passed, criteria_passed=passed)

    @app.post("/workbench/api/models/{name}/rollback", tags=["workbench"])
    def rollback(name: str, body: RollbackRequest, key: Annotated[ApiKey, operator]):
        model_or_404(name, key)
        previous = alias_now(name, body.alias, body.expected_current)
        if not body.reason.strip():
            raise ApiError(422, "reason: say why the alias goes back", "invalid_request_error", "reason")
        return _move(key, name, body.alias, previous, body.reason, "rolled_back",
                     lambda: models.registry.rollback(name, body.alias))


def _valid_run_id(run_id: str) -> bool:
    return re.match(RUN_ID_PATTERN, run_id) is not None and ".." not in run_id
