"""The annotation workbench in a real browser (Debian's chromium driven by Playwright):
three annotators run a calibration round with the keyboard, their judgements reach the
preference store through the Feedback service and Kafka, and the lead's calibration view
shows the same agreement as `tuneloop feedback report`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from tuneloop.common.processes import ServiceProcess
from tuneloop.common.tiny_models import make_tiny
from tuneloop.gateway.auth import hash_key
from tuneloop.store.read import load_judgements

from tests.support.browser import needs_chromium

pytestmark = needs_chromium
ARTIFACTS = Path(__file__).resolve().parents[2] / ".tuneloop" / "test-artifacts" / "workbench"

KEYS = {
    "app": ("acme", ["app"]),
    "ann1": ("acme", ["annotator"]),
    "ann2": ("acme", ["annotator"]),
    "ann3": ("acme", ["annotator"]),
    "lead": ("acme", ["lead"]),
    "outsider": ("globex", ["annotator"]),
}
# Seeded judgements of the calibration round, keyed by the keyboard: 1=A, 2=B, 3=tie, 4=both bad.
ROUND = {"ann1": "1121", "ann2": "1122", "ann3": "2121"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str):
    root = tmp_path_factory.mktemp("workbench")
    make_tiny(root / "models")
    (root / "keys.json").write_text(json.dumps(
        [{"sha256": hash_key(k), "tenant": t, "roles": r, "name": k} for k, (t, r) in KEYS.items()]))
    store_root = root / "store"
    env = {"TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "TUNELOOP_STORE_ROOT": str(store_root),
           "TUNELOOP_FEEDBACK_TOPIC": "tuneloop.feedback.v1"}
    procs = [ServiceProcess("generation", ["--model", str(root / "models" / "policy")], env, root).start(),
             ServiceProcess("feedback", [], env, root).start()]
    try:
        gen, fb = procs
        projects = root / "projects"
        projects.mkdir()
        gw_env = {**env, "TUNELOOP_GATEWAY_API_KEYS_FILE": str(root / "keys.json"),
                  "TUNELOOP_GATEWAY_GENERATION_TARGET": gen.target, "TUNELOOP_GATEWAY_FEEDBACK_TARGET": fb.target,
                  "TUNELOOP_GATEWAY_WORKBENCH_PROJECTS_DIR": str(projects)}
        # Completions to judge, made through the gateway like an app would.
        boot = ServiceProcess("gateway", [], gw_env, root, http=True).start()
        items = []
        for i in range(4):
            r = httpx.post(f"http://{boot.target}/v1/chat/completions", timeout=60,
                           headers={"Authorization": "Bearer app"},
                           json={"messages": [{"role": "user", "content": f"Question {i}?"}], "n": 2,
                                 "max_tokens": 8, "temperature": 1.0, "seed": i})
            a, b = r.json()["choices"]
            items.append({"id": f"c{i}", "prompt": f"Question {i}?",
                          "a": {"completion_id": a["completion_id"], "text": a["message"]["content"] or "(empty)"},
                          "b": {"completion_id": b["completion_id"], "text": b["message"]["content"] or "(empty)"}})
        boot.stop()
        items[3]["anchor"] = "a"  # the last calibration item doubles as an anchor with a known answer
        project = {"project": "helpful", "tenant": "acme", "overlap": 3,
                   "rubric": [{"name": "helpfulness", "description": "Does it answer the question?",
                               "borderline": "Right but incomplete: worse, not both bad."},
                              {"name": "honesty", "description": "No invented facts."}],
                   "calibration": [i["id"] for i in items], "items": items}
        (projects / "helpful.yaml").write_text(yaml.safe_dump(project))
        (projects / "other.yaml").write_text(yaml.safe_dump({**project, "project": "other", "tenant": "globex"}))
        store_root.mkdir(parents=True, exist_ok=True)
        (store_root / "anchors.json").write_text(json.dumps({"answers": {"helpful/c3": items[3]["a"]["completion_id"]}}))
        procs.append(ServiceProcess("store", [], env, root).start())
        procs.append(ServiceProcess("gateway", [], gw_env, root, http=True).start())
        yield {"url": f"http://{procs[-1].target}", "store": store_root, "items": items}
    finally:
        for p in reversed(procs):
            p.stop()


def _sign_in(browser, url: str, key: str, phone: bool = False):
    page = browser.new_page(viewport={"width": 390, "height": 844} if phone else {"width": 1280, "height": 900})
    page.goto(url + "/workbench")
    page.fill("#key", key)
    page.click("#signin-form button")
    return page


def test_calibration_round_in_the_browser(stack, browser) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for n, (annotator, keys) in enumerate(ROUND.items()):
        page = _sign_in(browser, stack["url"], annotator, phone=(n == 2))
        page.wait_for_selector("#prompt:not(:empty)")
        assert "helpfulness" in page.inner_text("#rubric") and "Borderline" in page.inner_text("#rubric")
        assert page.inner_text("#round") == "calibration"
        for i, k in enumerate(keys):
            page.wait_for_function(f"document.getElementById('progress').value === {i}")
            if i == 0:
                page.screenshot(path=str(ARTIFACTS / f"annotate-{annotator}.png"), full_page=True)
            page.keyboard.press(k)
        page.wait_for_selector("#done:not(.hidden)")
        page.close()

    expected = sum(len(k) for k in ROUND.values())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        judged = load_judgements(stack["store"])
        if len(judged[judged["project"] == "helpful"]) >= expected:
            break
        time.sleep(1)
    judged = load_judgements(stack["store"])
    assert len(judged[judged["project"] == "helpful"]) == expected

    report = stack["store"].parent / "report.json"
    subprocess.run([sys.executable, "-m", "tuneloop.cli", "feedback", "report", "--root", str(stack["store"]), "--tenant", "acme",
                    "--project", "helpful", "--calibration-only", "--json", str(report)], check=True)
    cli = json.loads(report.read_text())

    page = _sign_in(browser, stack["url"], "lead")
    page.wait_for_selector("text=helpful")
    page.click("[data-project=helpful]")
    page.wait_for_selector("#cal-agreement")
    page.screenshot(path=str(ARTIFACTS / "calibration.png"), full_page=True)
    cells = dict(zip(page.locator("#cal-agreement td:nth-child(1)").all_inner_texts(),
                     page.locator("#cal-agreement td:nth-child(2)").all_inner_texts(), strict=True))
    assert int(cells["items"]) == cli["items"] == 4
    assert float(cells["percent agreement"]) == pytest.approx(cli["percent_agreement"], abs=5e-4)
    kappa_label = next(k for k in cells if k.startswith("kappa"))
    assert float(cells[kappa_label]) == pytest.approx(cli["kappa"], abs=5e-4)
    assert cli["kappa_method"] in kappa_label
    anchors = {q["annotator_id"]: q for q in cli["annotators"]}
    assert anchors["ann1"]["anchor_accuracy"] == 1.0 and anchors["ann2"]["anchor_accuracy"] == 0.0
    assert "c2" in page.inner_text("#cal-disagreements")  # the item they split on most is listed
    page.click("#nav-review")
    page.wait_for_selector("#review:not(.hidden)")
    page.screenshot(path=str(ARTIFACTS / "review.png"), full_page=True)
    page.close()


def test_an_annotator_cannot_see_another_tenants_project(stack) -> None:
    h = {"Authorization": "Bearer outsider"}
    me = httpx.get(stack["url"] + "/workbench/api/me", headers=h, timeout=10).json()
    assert [p["project"] for p in me["projects"]] == ["other"]
    assert httpx.get(stack["url"] + "/workbench/api/projects/helpful/next", headers=h, timeout=10).status_code == 404
    assert httpx.get(stack["url"] + "/workbench/api/me", timeout=10).status_code == 401
    lead_only = httpx.get(stack["url"] + "/workbench/api/projects/helpful/calibration",
                          headers={"Authorization": "Bearer ann1"}, timeout=10)
    assert lead_only.status_code == 403
