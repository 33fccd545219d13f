"""Success criteria: declared before a run, checked after it.

A criteria file (YAML, see examples/criteria.yaml) names held-out prompts and what must
hold for a candidate to replace its parent:

- behaviour checks on the held-out answers (regex, JSON format, keywords present or
  absent, length bounds, refusal detection), each with a required pass rate;
- general-knowledge probes (prompt + expected substring): every probe the parent got right
  must stay right, and optionally a minimum share must pass;
- degeneration bounds: repeated n-gram ratio, non-ASCII ratio, wrong-language rate;
- reward-model win rate against the parent (when a reward function is available);
- KL to the parent on the held-out prompts;
- length drift: mean answer length over the parent's, within bounds.

This module is pure: checks on text, and `compare` over two evaluation results. The
model side (generation, scoring, KL) is in `evaluate.py`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneloop.trainer.config import ConfigError, format_errors


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckBase(Strict):
    name: str = Field(description="Name shown in verdicts and reports.")
    min_pass_rate: float = Field(1.0, ge=0, le=1, description="Share of held-out answers that must pass.")


class RegexCheck(CheckBase):
    kind: Literal["regex"]
    pattern: str = Field(description="Python regex searched in the answer (anchor with ^ for a prefix).")
    flags: list[Literal["IGNORECASE", "MULTILINE", "DOTALL"]] = Field(default_factory=list, description="re flags.")
    must_match: bool = Field(True, description="False: the answer must NOT match.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"not a valid regex: {err}") from None
        return pattern


class JsonCheck(CheckBase):
    kind: Literal["json"]
    required_keys: list[str] = Field(default_factory=list, description="Keys the JSON object must have.")


class KeywordCheck(CheckBase):
    kind: Literal["keyword_present", "keyword_absent"]
    keywords: list[str] = Field(min_length=1, description="Words or phrases looked for.")
    mode: Literal["any", "all"] = Field(
        "any", description="present: any/all keywords must appear; absent: none may appear (mode ignored)."
    )
    case_sensitive: bool = Field(False, description="Match case exactly.")


class LengthCheck(CheckBase):
    kind: Literal["length"]
    min_chars: int = Field(0, ge=0, description="Fewest characters (after stripping).")
    max_chars: int | None = Field(None, ge=1, description="Most characters; unset: no bound.")
    min_words: int = Field(0, ge=0, description="Fewest words.")
    max_words: int | None = Field(None, ge=1, description="Most words; unset: no bound.")


class RefusalCheck(CheckBase):
    kind: Literal["refusal"]
    expect_refusal: bool = Field(False, description="True: answers must be refusals (e.g. unsafe prompts).")


Check = Annotated[RegexCheck | JsonCheck | KeywordCheck | LengthCheck | RefusalCheck, Field(discriminator="kind")]


class Probe(Strict):
    prompt: str = Field(description="A general-knowledge question.")
    expect: str = Field(description="Substring a right answer contains (case-insensitive).")


class Probes(Strict):
    items: list[Probe] = Field(default_factory=list, description="Questions whose answers must stay right.")
    min_pass_rate: float | None = Field(None, ge=0, le=1, description="Also require this share right after.")


class Degeneration(Strict):
    ngram: int = Field(3, ge=1, description="n of the repeated n-gram ratio (words).")
    max_repeated_ngram_ratio: float | None = Field(
        0.5, ge=0, le=1, description="Mean share of repeated word n-grams per answer; unset: not checked."
    )
    max_non_ascii_ratio: float | None = Field(
        None, ge=0, le=1, description="Share of non-ASCII characters over all answers; unset: not checked."
    )
    language: str = Field("en", description="Language answers must be in (en, fr, de, es, it, pt, nl).")
    max_wrong_language_rate: float | None = Field(
        0.2, ge=0, le=1, description="Share of answers detected as another language; unset: not checked."
    )


class RewardCriterion(Strict):
    min_win_rate: float = Field(0.5, ge=0, le=1, description="Share of held-out prompts where the candidate's answer outscores the parent's (ties count half).")


class KLCriterion(Strict):
    max_kl: float = Field(gt=0, description="Mean KL(candidate || parent) per held-out answer, in nats.")


class LengthDrift(Strict):
    min_ratio: float = Field(0.5, gt=0, description="Lowest allowed mean answer length over the parent's.")
    max_ratio: float = Field(2.0, gt=0, description="Highest allowed ratio.")

    @model_validator(mode="after")
    def _ordered(self) -> LengthDrift:
        if self.min_ratio > self.max_ratio:
            raise ValueError("min_ratio must not exceed max_ratio")
        return self


class Generation(Strict):
    max_new_tokens: int = Field(64, ge=1, description="Greedy tokens per answer.")
    batch_size: int = Field(16, ge=1, description="Prompts per generate call (left padding).")
    system_prompt: str | None = Field(None, description="System message put before every prompt.")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description=(
            "What generates the answers: vllm (fp32, the same greedy answers as transformers, several times "
            "faster once started, but a start costs 20-70 s on a CPU), transformers (`generate`, batched), or "
            "auto: vLLM when it is installed, can run the model here and the model has at least "
            "vllm_min_parameters parameters, else transformers."
        ),
    )
    vllm_min_parameters: int = Field(
        50_000_000,
        ge=0,
        description="auto: models with fewer parameters are answered by transformers, which finishes before vLLM has started.",
    )


class Criteria(Strict):
    name: str = Field(description="What this set of criteria is for.")
    generation: Generation = Field(default_factory=Generation, description="How answers are generated (greedy).")
    held_out_prompts: list[str] = Field(min_length=1, description="Prompts never trained on.")
    behaviour: list[Check] = Field(default_factory=list, description="Checks on held-out answers.")
    probes: Probes = Field(default_factory=Probes, description="General-knowledge probes.")
    degeneration: Degeneration = Field(default_factory=Degeneration, description="Degeneration bounds.")
    reward: RewardCriterion | None = Field(None, description="Reward-model win rate vs the parent.")
    kl: KLCriterion | None = Field(None, description="KL to the parent on held-out prompts.")
    length_drift: LengthDrift | None = Field(default_factory=LengthDrift, description="Answer length vs the parent.")

    @model_validator(mode="after")
    def _unique_names(self) -> Criteria:
        names = [c.name for c in self.behaviour]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"behaviour check names must be unique: {dupes}")
        return self


def load_criteria(path: Path) -> Criteria:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"criteria file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"criteria file {path} is not valid YAML: {err}") from None
    try:
        return Criteria.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid criteria file {path}: {format_errors(err)}") from None


# ---- checks on text ----------------------------------------------------------------------

REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can'?t (help|assist|do|provide|answer|comply)|i cannot|"
    r"i'?m (unable|not able)|i am (unable|not able)|i won'?t|as an ai\b|i must decline|i'?m afraid i can'?t)",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    return REFUSAL.search(text) is not None


def _has(text: str, word: str, case_sensitive: bool) -> bool:
    return word in text if case_sensitive else word.lower() in text.lower()


def check_passes(check: Check, text: str) -> bool:
    text = text.strip()
    if isinstance(check, RegexCheck):
        flags = 0
        for name in check.flags:
            flags |= getattr(re, name)
        return (re.search(check.pattern, text, flags) is not None) == check.must_match
    if isinstance(check, JsonCheck):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        return not check.required_keys or (isinstance(value, dict) and all(k in value for k in check.required_keys))
    if isinstance(check, KeywordCheck):
        found = [_has(text, k, check.case_sensitive) for k in check.keywords]
        if check.kind == "keyword_absent":
            return not any(found)
        return all(found) if check.mode == "all" else any(found)
    if isinstance(check, LengthCheck):
        words = len(text.split())
        return (
            len(text) >= check.min_chars
            and (check.max_chars is None or len(text) <= check.max_chars)
            and words >= check.min_words
            and (check.max_words is None or words <= check.max_words)
        )
    if isinstance(check, RefusalCheck):
        return is_refusal(text) == check.expect_refusal
    raise TypeError(f"unknown check {check!r}")


def pass_rate(check: Check, texts: list[str]) -> float:
    return sum(check_passes(check, t) for t in texts) / len(texts) if texts else 0.0


def repeated_ngram_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0: none, near 1: a loop)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def non_ascii_ratio(text: str) -> float:
    return sum(ord(c) > 127 for c in text) / len(text) if text else 0.0


# Frequent function words: enough to tell these languages apart in a sentence or two.
STOPWORDS = {
    "en": {"the", "and", "is", "of", "to", "in", "it", "you", "that", "a", "are", "for", "with", "this", "be", "on"},
    "fr": {"le", "la", "les", "et", "est", "de", "des", "un", "une", "du", "que", "qui", "pour", "dans", "ce", "pas", "vous", "je"},
    "de": {"der", "die", "das", "und", "ist", "nicht", "ein", "eine", "zu", "den", "mit", "von", "sie", "ich", "auf", "es"},
    "es": {"el", "la", "los", "las", "y", "es", "de", "que", "un", "una", "por", "para", "con", "no", "en", "del"},
    "it": {"il", "la", "gli", "le", "e", "è", "di", "che", "un", "una", "per", "con", "non", "sono", "del", "della"},
    "pt": {"o", "a", "os", "as", "e", "é", "de", "que", "um", "uma", "para", "com", "não", "do", "da", "em"},
    "nl": {"de", "het", "een", "en", "is", "van", "dat", "niet", "op", "te", "zijn", "met", "voor", "ik", "je", "die"},
}


def detect_language(text: str) -> str | None:
    """The language whose function words the text uses most; None when it has too few to tell."""
    words = re.findall(r"[^\W\d_]+", text.lower())
    counts = {lang: sum(w in vocab for w in words) for lang, vocab in STOPWORDS.items()}
    best = max(counts, key=lambda lang: counts[lang])
    if counts[best] < 2:
        return None
    return best


def wrong_language(text: str, expected: str) -> bool:
    """Another language detected, or mostly non-Latin script where Latin is expected."""
    if expected in STOPWORDS and non_ascii_ratio(text) > 0.5:
        return True
    found = detect_language(text)
    if found is None or found == expected:
        return False
    expected_hits = sum(w in STOPWORDS.get(expected, set()) for w in re.findall(r"[^\W\d_]+", text.lower()))
    found_hits = sum(w in STOPWORDS[found] for w in re.findall(r"[^\W\d_]+", text.lower()))
    return found_hits > expected_hits


def degeneration_stats(texts: list[str], spec: Degeneration) -> dict[str, float]:
    if not texts:
        return {"repeated_ngram_ratio": 0.0, "non_ascii_ratio": 0.0, "wrong_language_rate": 0.0}
    joined = "".join(texts)
    return {
        "repeated_ngram_ratio": sum(repeated_ngram_ratio(t, spec.ngram) for t in texts) / len(texts),
        "non_ascii_ratio": non_ascii_ratio(joined),
        "wrong_language_rate": sum(wrong_language(t, spec.language) for t in texts) / len(texts),
    }


def probe_passes(probe: Probe, text: str) -> bool:
    return probe.expect.lower() in text.lower()


# ---- verdict -------------------------------------------------------------------------------


class CriterionResult(BaseModel):
    name: str = Field(description="Criterion, e.g. 'behaviour:starts-with-sure', 'probes', 'kl'.")
    passed: bool
    skipped: bool = Field(False, description="Could not be measured (e.g. no reward function); not a failure.")
    before: float | None = None
    after: float | None = None
    threshold: str = Field("", description="What was required, in words.")
    reason: str = Field("", description="Why it passed or failed.")


def _measured(name: str, ok: bool, before: float | None, after: float, threshold: str, reason: str) -> CriterionResult:
    return CriterionResult(name=name, passed=ok, before=before, after=after, threshold=threshold, reason=reason)


class Verdict(BaseModel):
    passed: bool = Field(description="Every criterion holds (skipped ones aside).")
    criteria: list[CriterionResult]

    @property
    def failures(self) -> list[CriterionResult]:
        return [c for c in self.criteria if not c.passed]

    def summary(self) -> str:
        if self.passed:
            return "all criteria hold"
        return "; ".join(f"{c.name}: {c.reason}" for c in self.failures)


def _bound(name: str, value: float, limit: float | None, *, upper: bool, before: float | None, unit: str = "") -> CriterionResult | None:
    if limit is None:
        return None
    ok = value <= limit if upper else value >= limit
    op = "<=" if upper else ">="
    return _measured(
        name, ok, before, value, f"{op} {limit}{unit}", f"{value:.4g}{unit} {'within' if ok else 'breaks'} bound {op} {limit}{unit}"
    )


def compare(before: dict[str, Any], after: dict[str, Any], criteria: Criteria) -> Verdict:
    """Checks each criterion on the parent's (`before`) and candidate's (`after`) evaluation.

    Both are `evaluate(...)` results (dicts, as stored in the run folder).
    """
    out: list[CriterionResult] = []
    for check in criteria.behaviour:
        rate_after = after["behaviour"][check.name]
        rate_before = before["behaviour"].get(check.name)
        ok = rate_after >= check.min_pass_rate
        out.append(
            _measured(
                f"behaviour:{check.name}",
                ok,
                rate_before,
                rate_after,
                f"pass rate >= {check.min_pass_rate}",
                f"pass rate {rate_after:.3f} (parent {rate_before:.3f}) {'meets' if ok else 'is below'} {check.min_pass_rate}",
            )
        )

    if criteria.probes.items:
        was = {p["prompt"]: p["passed"] for p in before["probes"]}
        broken = [p["prompt"] for p in after["probes"] if was.get(p["prompt"]) and not p["passed"]]
        rate_after = sum(p["passed"] for p in after["probes"]) / len(after["probes"])
        rate_before = sum(p["passed"] for p in before["probes"]) / len(before["probes"]) if before["probes"] else None
        min_rate = criteria.probes.min_pass_rate
        reasons = []
        if broken:
            reasons.append(f"{len(broken)} probe(s) the parent got right now fail: " + "; ".join(repr(b) for b in broken))
        if min_rate is not None and rate_after < min_rate:
            reasons.append(f"pass rate {rate_after:.3f} below {min_rate}")
        out.append(
            CriterionResult(
                name="probes",
                passed=not reasons,
                before=rate_before,
                after=rate_after,
                threshold="no probe regresses" + (f", pass rate >= {min_rate}" if min_rate is not None else ""),
                reason="; ".join(reasons) or f"no regressions ({rate_after:.3f} right)",
            )
        )

    deg, d_after, d_before = criteria.degeneration, after["degeneration"], before["degeneration"]
    for key, limit in (
        ("repeated_ngram_ratio", deg.max_repeated_ngram_ratio),
        ("non_ascii_ratio", deg.max_non_ascii_ratio),
        ("wrong_language_rate", deg.max_wrong_language_rate),
    ):
        result = _bound(f"degeneration:{key}", d_after[key], limit, upper=True, before=d_before.get(key))
        if result:
            out.append(result)

    if criteria.reward is not None:
        out.append(_win_rate(before, after, criteria.reward))

    if criteria.kl is not None:
        kl = after.get("kl_to_reference")
        if kl is None:
            out.append(CriterionResult(name="kl", passed=True, skipped=True, reason="no reference model was given"))
        else:
            result = _bound("kl", kl, criteria.kl.max_kl, upper=True, before=0.0, unit=" nats")
            assert result is not None
            out.append(result)

    if criteria.length_drift is not None:
        ld = criteria.length_drift
        base = before["mean_length_tokens"]
        ratio = after["mean_length_tokens"] / base if base > 0 else float("inf")
        ok = ld.min_ratio <= ratio <= ld.max_ratio
        out.append(
            _measured(
                "length_drift",
                ok,
                1.0,
                ratio,
                f"{ld.min_ratio} <= ratio <= {ld.max_ratio}",
                f"mean length {after['mean_length_tokens']:.1f} vs parent {base:.1f} tokens "
                f"(ratio {ratio:.3f}) {'within' if ok else 'outside'} [{ld.min_ratio}, {ld.max_ratio}]",
            )
        )
    return Verdict(passed=all(c.passed for c in out), criteria=out)


def _win_rate(before: dict[str, Any], after: dict[str, Any], spec: RewardCriterion) -> CriterionResult:
    a = [r.get("reward") for r in after["held_out"]]
    b = [r.get("reward") for r in before["held_out"]]
    if any(x is None for x in a + b):
        return CriterionResult(name="reward_win_rate", passed=True, skipped=True, reason="no reward function was available")
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True))
    rate = wins / len(a)
    ok = rate >= spec.min_win_rate
    return _measured(
        "reward_win_rate",
        ok,
        0.5,
        rate,
        f">= {spec.min_win_rate}",
        f"candidate wins {rate:.3f} of held-out prompts against the parent ({'meets' if ok else 'below'} {spec.min_win_rate})",
    )
