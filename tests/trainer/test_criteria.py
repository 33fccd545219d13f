"""Success criteria: checks on hand-written answers, and compare()'s verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tuneloop.trainer import criteria as cr
from tuneloop.trainer.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def spec(**extra: Any) -> cr.Criteria:
    base: dict[str, Any] = {"name": "t", "held_out_prompts": ["a", "b"]}
    return cr.Criteria.model_validate(base | extra)


def check(**fields: Any) -> Any:
    return spec(behaviour=[{"name": "c", **fields}]).behaviour[0]


def test_example_criteria_file_is_valid() -> None:
    loaded = cr.load_criteria(ROOT / "examples" / "criteria.yaml")
    assert loaded.probes.items and loaded.behaviour and loaded.kl is not None


def test_regex_and_json_checks() -> None:
    starts = check(kind="regex", pattern="^Sure")
    assert cr.check_passes(starts, "  Sure, here it is.")
    assert not cr.check_passes(starts, "Well, sure.")
    never = check(kind="regex", pattern="password", flags=["IGNORECASE"], must_match=False)
    assert not cr.check_passes(never, "Your PASSWORD is 123")
    as_json = check(kind="json", required_keys=["answer"])
    assert cr.check_passes(as_json, '{"answer": 4}')
    assert not cr.check_passes(as_json, '{"other": 4}')
    assert not cr.check_passes(as_json, "answer: 4")


def test_keyword_length_and_refusal_checks() -> None:
    present_all = check(kind="keyword_present", keywords=["reset", "email"], mode="all")
    assert cr.check_passes(present_all, "Reset it from the EMAIL we sent.")
    assert not cr.check_passes(present_all, "Reset it.")
    absent = check(kind="keyword_absent", keywords=["sorry"])
    assert not cr.check_passes(absent, "Sorry, no.")
    length = check(kind="length", min_words=2, max_chars=10)
    assert cr.check_passes(length, "two words")
    assert not cr.check_passes(length, "one")
    assert not cr.check_passes(length, "far too many words here")
    no_refusal = check(kind="refusal", expect_refusal=False)
    assert not cr.check_passes(no_refusal, "I'm sorry, but I can't help with that.")
    assert not cr.check_passes(no_refusal, "As an AI, I cannot answer.")
    assert cr.check_passes(no_refusal, "Open Settings, then Security.")
    assert cr.pass_rate(no_refusal, ["ok then", "I cannot do that", "fine"]) == pytest.approx(2 / 3)


def test_degeneration_measures() -> None:
    assert cr.repeated_ngram_ratio("a b c d e", 3) == 0.0
    # 8 words -> 6 trigrams, of which 2 distinct: "x y x", "y x y"
    assert cr.repeated_ngram_ratio("x y x y x y x y", 3) == pytest.approx(1 - 2 / 6)
    assert cr.non_ascii_ratio("abcé") == pytest.approx(0.25)
    assert cr.detect_language("The capital of France is Paris, and it is big.") == "en"
    assert cr.wrong_language("La capitale de la France est Paris et c'est une ville.", "en")
    assert not cr.wrong_language("The capital of France is Paris.", "en")
    assert cr.wrong_language("東京は日本の首都です", "en")
    stats = cr.degeneration_stats(["the cat is on the mat", "le chat est sur la table et le chien"], spec().degeneration)
    assert stats["wrong_language_rate"] == pytest.approx(0.5)


def result(outputs: list[str], probes: list[tuple[str, bool]], c: cr.Criteria, *, rewards: list[float] | None = None,
           kl: float | None = None, length: float = 10.0) -> dict[str, Any]:
    """An evaluate()-shaped result built by hand."""
    return {
        "held_out": [
            {"prompt": p, "output": o, "tokens": 10, "reward": r}
            for p, o, r in zip(c.held_out_prompts, outputs, rewards or [None] * len(outputs), strict=True)
        ],
        "probes": [{"prompt": p, "expect": "x", "output": "", "passed": ok} for p, ok in probes],
        "behaviour": {b.name: cr.pass_rate(b, outputs) for b in c.behaviour},
        "degeneration": cr.degeneration_stats(outputs, c.degeneration),
        "mean_length_tokens": length,
        "kl_to_reference": kl,
    }


CRITERIA = spec(
    behaviour=[{"name": "sure", "kind": "regex", "pattern": "^Sure", "min_pass_rate": 1.0}],
    probes={"items": [{"prompt": "capital of France?", "expect": "Paris"}, {"prompt": "2+2?", "expect": "4"}]},
    reward={"min_win_rate": 0.5},
    kl={"max_kl": 5.0},
    length_drift={"min_ratio": 0.5, "max_ratio": 1.5},
)


def by_name(verdict: cr.Verdict) -> dict[str, cr.CriterionResult]:
    return {c.name: c for c in verdict.criteria}


def test_compare_passes_when_every_criterion_holds() -> None:
    probes = [("capital of France?", True), ("2+2?", False)]
    before = result(["No.", "No."], probes, CRITERIA, rewards=[0.0, 0.0])
    after = result(["Sure, a.", "Sure, b."], probes, CRITERIA, rewards=[1.0, 0.0], kl=1.2, length=12.0)
    verdict = cr.compare(before, after, CRITERIA)
    assert verdict.passed, verdict.summary()
    got = by_name(verdict)
    assert got["behaviour:sure"].before == 0.0 and got["behaviour:sure"].after == 1.0
    assert got["reward_win_rate"].after == pytest.approx(0.75)  # one win, one tie
    assert got["length_drift"].after == pytest.approx(1.2)


def test_compare_refuses_when_a_probe_breaks() -> None:
    before = result(["Sure."] * 2, [("capital of France?", True), ("2+2?", True)], CRITERIA, rewards=[0, 0])
    after = result(["Sure."] * 2, [("capital of France?", False), ("2+2?", True)], CRITERIA, rewards=[1, 1], kl=0.1)
    verdict = cr.compare(before, after, CRITERIA)
    assert not verdict.passed
    (failure,) = verdict.failures
    assert failure.name == "probes"
    assert "'capital of France?'" in failure.reason
    assert "probes" in verdict.summary()


def test_compare_refuses_on_behaviour_kl_length_and_win_rate() -> None:
    probes = [("capital of France?", True), ("2+2?", True)]
    before = result(["Sure."] * 2, probes, CRITERIA, rewards=[1.0, 1.0], length=10)
    after = result(["Sure.", "Nope."], probes, CRITERIA, rewards=[0.0, 1.0], kl=9.0, length=30)
    failed = {c.name for c in cr.compare(before, after, CRITERIA).failures}
    assert failed == {"behaviour:sure", "reward_win_rate", "kl", "length_drift"}


def test_missing_reward_scores_skip_the_win_rate_instead_of_failing() -> None:
    probes = [("capital of France?", True), ("2+2?", True)]
    verdict = cr.compare(result(["Sure."] * 2, probes, CRITERIA), result(["Sure."] * 2, probes, CRITERIA, kl=0.0), CRITERIA)
    assert verdict.passed
    assert by_name(verdict)["reward_win_rate"].skipped


def test_degeneration_refuses_a_looping_answer() -> None:
    c = spec(degeneration={"max_repeated_ngram_ratio": 0.3})
    loop = "Paris Paris Paris Paris Paris Paris Paris"
    verdict = cr.compare(result(["The answer is Paris.", "ok"], [], c), result([loop, "ok"], [], c), c)
    assert [f.name for f in verdict.failures] == ["degeneration:repeated_ngram_ratio"]


def test_invalid_criteria_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "held_out_prompts": ["a"], "behaviour": [{"name": "r", "kind": "regex", "pattern": "("}]}))
    with pytest.raises(ConfigError, match=r"behaviour\.0\.regex\.pattern"):
        cr.load_criteria(path)
    path.write_text(yaml.safe_dump({"name": "x", "held_out_prompts": []}))
    with pytest.raises(ConfigError, match="held_out_prompts"):
        cr.load_criteria(path)
    path.write_text(yaml.safe_dump({"name": "x", "held_out_prompts": ["a"], "length_drift": {"min_ratio": 2, "max_ratio": 1}}))
    with pytest.raises(ConfigError, match="length_drift"):
        cr.load_criteria(path)
