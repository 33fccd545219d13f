"""The workbench's operations pages in a real browser (Debian's chromium driven by Playwright):
retrain runs and one run's criteria and answers side by side, model versions with lineage and
alias history, and promote / roll back with confirmation and audit, all per tenant.

Run folders are made by the trainer's own `Run.finish` (state.json, report.json, report.md,
answers.json, plots) from evaluations written here, so the pages read what a retrain writes;
the rollback goes through a running Generation service and is checked through the gateway."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import yaml
from tuneloop.common.durable import file_sha256
from tuneloop.common.processes import ServiceProcess
from tuneloop.common.registry import Registry
from tuneloop.common.tiny_models import make_tiny
from tuneloop.gateway.auth import hash_key
from tuneloop.trainer import criteria as cr
from tuneloop.trainer.retrain import Run

from tests.support.browser import needs_chromium

pytestmark = needs_chromium
ARTIFACTS = Path(__file__).resolve().parents[2] / ".tuneloop" / "test-artifacts" / "workbench-operations"

KEYS = {
    "app": ("acme", ["app"]),
    "lead": ("acme", ["lead"]),
    "op": ("acme", ["operator"]),
    "ann": ("acme", ["annotator"]),
    "outsider": ("globex", ["lead", "operator"]),
}
CRITERIA = {
    "name": "polite answers",
    "held_out_prompts": ["How do I boil an egg?", "Name a colour."],
    "behaviour": [{"name": "starts-with-sure", "kind": "regex", "pattern": "^Sure", "min_pass_rate": 1.0}],
    "probes": {"items": [{"prompt": "Capital of France?", "expect": "Paris"}]},
    "length_drift": None,
}


def _evaluation(spec: cr.Criteria, answers: list[str], probe_answer: str) -> dict:
    probes = [{"prompt": p.prompt, "expect": p.expect, "output": probe_answer, "passed": cr.probe_passes(p, probe_answer)}
              for p in spec.probes.items]
    return {
        "held_out": [{"prompt": p, "output": a, "tokens": len(a.split()), "reward": None}
                     for p, a in zip(spec.held_out_prompts, answers, strict=True)],
        "probes": probes,
        "behaviour": {c.name: cr.pass_rate(c, answers) for c in spec.behaviour},
        "degeneration": cr.degeneration_stats(answers + [probe_answer], spec.degeneration),
        "mean_length_tokens": sum(len(a.split()) for a in answers) / len(answers),
        "reward_mean": None,
        "kl_to_reference": None,
        "probe_pass_rate": sum(p["passed"] for p in probes) / len(probes),
    }


def make_run(runs: Path, run_id: str, tenants: list[str], started: str, before: list[str], after: list[str],
             parent: str, candidate: str | None) -> dict:
    """A finished run folder, written by the trainer's own Run.finish (report.md, answers.json)."""
    run_dir = runs / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "criteria.yaml").write_text(yaml.safe_dump(CRITERIA))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"preferences": {"store_root": "/store", "tenants": tenants}}))
    spec = cr.load_criteria(run_dir / "criteria.yaml")
    b, a = _evaluation(spec, before, "Paris."), _evaluation(spec, after, "Paris, of course.")
    (run_dir / "eval_before.json").write_text(json.dumps(b))
    (run_dir / "eval_after.json").write_text(json.dumps(a))
    verdict = cr.compare(b, a, spec)
    gates = {"passed": True, "reason": "", "checks": [
        {"name": "new_pairs", "value": 80, "bar": 64, "passed": True, "reason": "80 new preference pairs"},
        *[{"name": "agreement", "value": v, "bar": 0.65, "passed": True, "reason": "", "tenant": t}
          for t, v in zip(tenants, (0.81, 0.99), strict=False)]]}
    state = {"run_id": run_id, "status": "running", "started_at": started, "algorithm": "dpo", "parent": parent,
             "criteria_name": spec.name, "criteria_sha256": file_sha256(run_dir / "criteria.yaml"),
             "candidate": candidate,
             "steps": {"snapshot": {"source": "pairs@7", "rows": 120, "version": 7}, "gates": gates,
                       "train": {"stage": "dpo", "steps": 4, "seconds": 3.5, "train_loss": 0.61},
                       "verdict": verdict.model_dump(), "register": candidate}}
    run = Run(run_dir, None, state)  # type: ignore[arg-type]  # finish() needs no config
    status = "promoted" if verdict.passed else "refused"
    run.finish(status, "" if verdict.passed else f"criteria: {verdict.summary()}")
    run.state["finished_at"] = started.replace("10:00:00", "10:01:30")  # a 90 s run, not one of days
    run.save()
    return {"dir": run_dir, "verdict": verdict}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str):
    root = tmp_path_factory.mktemp("operations")
    make_tiny(root / "models")
    (root / "keys.json").write_text(json.dumps(
        [{"sha256": hash_key(k), "tenant": t, "roles": r, "name": k} for k, (t, r) in KEYS.items()]))

    runs = root / "runs"
    refused = make_run(runs, "20261201T100000Z-refused", ["acme"], "2026-12-01T10:00:00+00:00",
                       ["Sure, boil it for 8 minutes.", "Sure: blue."], ["Boil it.", "Blue."],
                       "policy@v0002", "policy@v0003")
    passing = make_run(runs, "20261130T100000Z-promoted", ["acme", "globex"], "2026-11-30T10:00:00+00:00",
                       ["Boil it.", "Sure: blue."], ["Sure, boil it.", "Sure: blue."], "policy@v0001", "policy@v0002")
    make_run(runs, "20261202T100000Z-globex", ["globex"], "2026-12-02T10:00:00+00:00",
             ["Sure."] * 2, ["No."] * 2, "policy@v0002", None)
    assert not refused["verdict"].passed and passing["verdict"].passed

    # policy@v0001 (imported), v0002 (passed, now production), v0003 (the refused run's candidate).
    registry = Registry(root / "registry")
    policy = root / "models" / "policy"
    first = registry.register("policy", policy, kind="policy", description="tiny seeded policy")
    registry.promote("policy", first.version)
    second = registry.register("policy", policy, kind="policy", parent=first.ref,
                               dataset_snapshot={"tuneloop.feedback.v1": {0: 42}},
                               training_config={"run_id": "20261130T100000Z-promoted", "algorithm": "dpo",
                                                "data": {"source": "pairs@7", "rows": 120}},
                               metrics={"verdict": passing["verdict"].model_dump()})
    registry.promote("policy", second.version)
    registry.register("policy", policy, kind="policy", parent=second.ref,
                      training_config={"run_id": "20261201T100000Z-refused", "algorithm": "dpo"},
                      metrics={"verdict": refused["verdict"].model_dump()})

    env = {"TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "TUNELOOP_REGISTRY_ROOT": str(root / "registry"),
           "TUNELOOP_GENERATION_ALIAS_POLL_S": "30"}  # the swap must come from the model event
    procs = [ServiceProcess("generation", ["--model", "policy@production"], env, root).start()]
    try:
        (root / "projects").mkdir()
        gw_env = {**env, "TUNELOOP_GATEWAY_API_KEYS_FILE": str(root / "keys.json"),
                  "TUNELOOP_GATEWAY_GENERATION_TARGET": procs[0].target,
                  "TUNELOOP_GATEWAY_WORKBENCH_PROJECTS_DIR": str(root / "projects"),
                  "TUNELOOP_GATEWAY_WORKBENCH_RUNS_DIR": str(runs),
                  "TUNELOOP_GATEWAY_WORKBENCH_REGISTRY_ROOT": str(root / "registry"),
                  "TUNELOOP_GATEWAY_WORKBENCH_MODELS": json.dumps({"acme": ["policy"]}),
                  "TUNELOOP_GATEWAY_MODEL_EVENTS_BOOTSTRAP_SERVERS": kafka_bootstrap,
                  "TUNELOOP_GATEWAY_WORKBENCH_GENERATION_METRICS": f"127.0.0.1:{procs[0].metrics_port}"}
        procs.append(ServiceProcess("gateway", [], gw_env, root, http=True).start())
        yield {"url": f"http://{procs[-1].target}", "runs": runs, "registry": registry,
               "generation_metrics": f"127.0.0.1:{procs[0].metrics_port}"}
    finally:
        for p in reversed(procs):
            p.stop()


def _sign_in(browser, url: str, key: str, phone: bool = False):
    page = browser.new_page(viewport={"width": 390, "height": 844} if phone else {"width": 1280, "height": 900})
    page.goto(url + "/workbench")
    page.fill("#key", key)
    page.press("#key", "Enter")
    page.wait_for_selector("#nav:not(.hidden)")
    return page


def _served(url: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer app"}, timeout=60,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.json()["model"]


def test_lead_opens_a_refused_run_and_sees_the_failing_criterion_and_the_answers(stack, browser) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = _sign_in(browser, stack["url"], "lead")
    page.click("#nav-review")
    page.wait_for_selector("#runs-table a.run-link")
    # Newest first, this tenant's runs only (the globex-only run is not listed).
    assert page.locator("#runs-table a.run-link").all_inner_texts() == [
        "20261201T100000Z-refused", "20261130T100000Z-promoted"]
    assert "refused" in page.inner_text("#runs-table") and "criteria: behaviour:starts-with-sure" in page.inner_text("#runs-table")
    assert "agreement 0.810" in page.inner_text("#runs-table")  # acme's figure, not globex's 0.99
    page.screenshot(path=str(ARTIFACTS / "runs.png"), full_page=True)

    page.select_option("#runs-filter", "promoted")
    page.wait_for_function("document.querySelectorAll('#runs-table a.run-link').length === 1")
    page.select_option("#runs-filter", "")
    page.wait_for_function("document.querySelectorAll('#runs-table a.run-link').length === 2")

    page.focus("a[data-run='20261201T100000Z-refused']")  # keyboard: focus the link, press Enter
    page.keyboard.press("Enter")
    page.wait_for_selector("#run-detail:not(.hidden) #review-samples .sample")
    failing = page.locator("#run-criteria tr.fail").all_inner_texts()
    assert len(failing) == 1 and "behaviour:starts-with-sure" in failing[0] and "NO" in failing[0]
    samples = page.locator("#review-samples .sample")
    assert samples.count() == 2
    first = samples.nth(0)
    before, after = first.locator(".pair .card").nth(0), first.locator(".pair .card").nth(1)
    assert "Sure, boil it for 8 minutes." in before.inner_text() and "Boil it." in after.inner_text()
    assert before.locator(".check.pass").inner_text() == "✓ behaviour:starts-with-sure"
    assert after.locator(".check.fail").inner_text() == "✗ behaviour:starts-with-sure"
    assert page.locator("#run-probes .sample .check.pass").count() == 2
    assert page.locator("#run-plot-images img.plot").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "run-refused.png"), full_page=True)
    assert page.evaluate("location.hash") == "#run/20261201T100000Z-refused"  # the page links to the run
    page.fill("#run", "no-such-run")
    page.press("#run", "Enter")
    page.wait_for_selector("#runs-error:not(:empty)")
    assert "no run 'no-such-run'" in page.inner_text("#runs-error")
    page.close()

    phone = _sign_in(browser, stack["url"], "lead", phone=True)
    phone.click("#nav-review")
    phone.click("a[data-run='20261201T100000Z-refused']")
    phone.wait_for_selector("#review-samples .sample")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390 + 1  # nothing wider than the phone
    phone.screenshot(path=str(ARTIFACTS / "run-refused-phone.png"), full_page=True)
    phone.close()

    # The same content without the browser: report.md has the answers side by side.
    report = (stack["runs"] / "20261201T100000Z-refused" / "report.md").read_text()
    assert "## Held-out answers: parent vs candidate" in report
    assert "| How do I boil an egg? | Sure, boil it for 8 minutes.<br>✓ behaviour:starts-with-sure " \
           "| Boil it.<br>✗ behaviour:starts-with-sure |" in report
    assert "## Probes: parent vs candidate" in report


def test_operator_rolls_back_production_and_generation_serves_the_earlier_version(stack, browser) -> None:
    assert _served(stack["url"]) == "policy@v0002"
    page = _sign_in(browser, stack["url"], "op")
    page.click("#nav-versions")
    page.wait_for_selector("[data-model=policy] table.versions")
    versions = page.inner_text("[data-model=policy] table.versions")
    assert "failed: behaviour:starts-with-sure" in versions and "criteria hold" in versions
    assert "20261201T100000Z-refused" in versions  # lineage: the run that made v0003
    assert "pairs@7 (120 rows)" in versions  # and the snapshot v0002 was trained on
    page.screenshot(path=str(ARTIFACTS / "versions.png"), full_page=True)

    page.click("[data-rollback=production]")
    page.wait_for_selector("#confirm[open]")
    assert "from v0002 back to v0001" in page.inner_text("#confirm-text")
    page.screenshot(path=str(ARTIFACTS / "confirm-rollback.png"))
    page.fill("#confirm-reason", "v0002 answers rudely in production")
    page.click("#confirm-ok")
    page.wait_for_function("document.getElementById('versions-status')?.textContent.includes('done')")
    assert stack["registry"].current("policy") == "v0001"
    audit = page.locator("[data-model=policy] table.audit tr").nth(1).inner_text()
    assert all(s in audit for s in ("op", "rolled_back", "v0002", "v0001", "v0002 answers rudely in production"))
    assert "rolled_back" in page.inner_text("[data-model=policy] table.history[data-alias=production]")
    page.screenshot(path=str(ARTIFACTS / "versions-after-rollback.png"), full_page=True)
    page.close()

    # The model event makes generation swap (its poll is 30 s away); checked through the gateway.
    deadline = time.monotonic() + 25
    while _served(stack["url"]) != "policy@v0001":
        assert time.monotonic() < deadline, "generation still serves v0002 after the rollback"
        time.sleep(0.5)

    # The runs page's live figures show it too, read from the replica's own metrics.
    page = _sign_in(browser, stack["url"], "lead", phone=True)
    page.click("#nav-review")
    page.wait_for_selector("#live-replicas li")
    assert page.locator("#live-replicas li").all_inner_texts() == [f"{stack['generation_metrics']}: policy@v0001"]
    assert "days" in page.inner_text("#live-since")  # since the promoted run of 2026-11-30
    page.screenshot(path=str(ARTIFACTS / "runs-live-phone.png"), full_page=True)
    page.close()


def test_promote_of_a_failed_candidate_is_refused_without_a_reason(stack, browser) -> None:
    page = _sign_in(browser, stack["url"], "op")
    page.click("#nav-versions")
    page.click("[data-promote=v0003]")
    page.wait_for_selector("#confirm[open]")
    assert "did not pass its criteria" in page.inner_text("#confirm-text")
    page.click("#confirm-ok")  # no force, no reason
    page.wait_for_function("document.getElementById('versions-status')?.textContent.includes('refused')")
    assert "failed its criteria (behaviour:starts-with-sure)" in page.inner_text("#versions-status")

    page.click("[data-promote=v0003]")
    page.check("#confirm-force")  # forced, still without a reason
    page.click("#confirm-ok")
    page.wait_for_function("document.getElementById('versions-status')?.textContent.includes('written reason')")
    page.screenshot(path=str(ARTIFACTS / "promote-refused.png"), full_page=True)
    page.close()
    assert stack["registry"].current("policy") != "v0003"
    assert not any(e["to"] == "v0003" for e in stack["registry"].audit_log("policy"))

    op = {"Authorization": "Bearer op"}
    r = httpx.post(stack["url"] + "/workbench/api/models/policy/promote", headers=op, timeout=30,
                   json={"version": "v0003", "force": True, "reason": "  "})
    assert r.status_code == 422 and r.json()["error"]["param"] == "reason"
    lead = httpx.post(stack["url"] + "/workbench/api/models/policy/promote", headers={"Authorization": "Bearer lead"},
                      timeout=30, json={"version": "v0002"})
    assert lead.status_code == 403  # leads review; operators move aliases
    stale = httpx.post(stack["url"] + "/workbench/api/models/policy/promote", headers=op, timeout=30,
                       json={"version": "v0002", "expected_current": "v0003"})
    assert stale.status_code == 409 and stale.json()["error"]["param"] == "expected_current"


def test_another_tenants_key_sees_none_of_it(stack, browser) -> None:
    h = {"Authorization": "Bearer outsider"}
    url = stack["url"]
    runs = httpx.get(url + "/workbench/api/runs", headers=h, timeout=10).json()["runs"]
    assert [r["run_id"] for r in runs] == ["20261202T100000Z-globex", "20261130T100000Z-promoted"]
    shared = next(r for r in runs if r["run_id"] == "20261130T100000Z-promoted")
    assert shared["snapshot"]["agreement"] == 0.99  # its own tenant's figure only
    for path in ("/workbench/api/runs/20261201T100000Z-refused",
                 "/workbench/api/runs/20261201T100000Z-refused/plots/criteria",
                 "/workbench/api/review?run=20261201T100000Z-refused"):
        r = httpx.get(url + path, headers=h, timeout=10)
        assert r.status_code == 404, path
    assert httpx.get(url + "/workbench/api/models", headers=h, timeout=10).json() == {"models": []}
    r = httpx.post(url + "/workbench/api/models/policy/rollback", headers=h, timeout=10, json={"reason": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "name"
    assert httpx.get(url + "/workbench/api/runs", headers={"Authorization": "Bearer ann"}, timeout=10).status_code == 403
    bad = httpx.get(url + "/workbench/api/runs?status=done", headers={"Authorization": "Bearer lead"}, timeout=10)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "status"

    page = _sign_in(browser, url, "outsider")
    page.click("#nav-review")
    page.wait_for_selector("#runs-table a.run-link")
    assert "20261201T100000Z-refused" not in page.inner_text("#runs-table")
    page.click("#nav-versions")
    page.wait_for_selector("text=No models are shown to this tenant.")
    page.screenshot(path=str(ARTIFACTS / "outsider.png"), full_page=True)
    page.close()


def test_audit_entries_are_one_file_each_and_read_in_order(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w")
    for _ in range(3):
        registry.promote("policy", registry.register("policy", folder, kind="policy").version)
    assert registry.rollback_target("policy") == "v0002"
    first = registry.record_audit("policy", {"action": "rolled_back", "who": "op", "from": "v0003", "to": "v0002"})
    second = registry.record_audit("policy", {"action": "promoted", "who": "op", "from": "v0002", "to": "v0003"})
    (tmp_path / "policy" / "audit" / "zz-damaged.json").write_text("{")
    assert [e["id"] for e in registry.audit_log("policy")] == [first["id"], second["id"]]
    assert len(list((tmp_path / "policy" / "audit").glob("*.json"))) == 3
