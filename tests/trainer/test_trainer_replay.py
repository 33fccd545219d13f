"""DPO's replay term (replay.py) on the tiny model: the parent's answers are made once and
reused on resume, `replay_nll` is logged, the term keeps the policy closer to the parent's
answers than the same training without it, and the criteria's prompts stay out of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneloop.common.tiny_models import make_tiny
from tuneloop.trainer import replay as rp
from tuneloop.trainer.config import ConfigError, DPOParams, DPOStageConfig, ReplayParams, load_config
from tuneloop.trainer.metrics import read_metrics
from tuneloop.trainer.stages import StageData, StageRun, run_dpo, run_dpo_on

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread"]
GENERAL = ["What is the capital of Italy?", "How many days does a week have?", "Name a fruit.",
           "What color is the sky?", "Write a short poem about the sea.", "When does the sun rise?"]  # fmt: skip
PROBE = "What is the capital of France?"
STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replay")
    policy, _ = make_tiny(root / "models")
    prefs = root / "prefs.jsonl"
    prefs.write_text("\n".join(
        json.dumps({"prompt": f"Tell me about {t}.", "chosen": "Sure, here you go.", "rejected": "No."}) for t in TOPICS
    ))  # fmt: skip
    replay = root / "replay.jsonl"
    replay.write_text("\n".join(json.dumps({"prompt": q}) for q in GENERAL))
    criteria = root / "criteria.yaml"
    criteria.write_text(yaml.safe_dump({
        "name": "t",
        "held_out_prompts": ["How do I export my data?"],
        "probes": {"items": [{"prompt": PROBE, "expect": "Paris"}]},
    }))  # fmt: skip
    return {"policy": policy, "prefs": prefs, "replay": replay, "criteria": criteria}


def dpo_config(tiny: dict[str, Path], out: Path, *extra: str) -> DPOStageConfig:
    return load_config(
        DPOStageConfig,
        None,
        [
            f"model={tiny['policy']}",
            f"output_dir={out}",
            f"preferences.path={tiny['prefs']}",
            f"max_steps={STEPS}",
            "learning_rate=1e-2",
            "per_device_train_batch_size=2",
            f"replay.prompts={tiny['replay']}",
            "replay.max_new_tokens=8",
            "replay.batch_size=3",
            *extra,
        ],
    )


def replay_nll(model_dir: Path, answers: list[dict], tokenizer_dir: Path) -> float:
    """Mean token NLL of a saved model on every (replay prompt, parent's answer)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples = rp.ReplaySet.of(ReplayParams(), answers, tokenizer, max_length=1024)
    with torch.no_grad():
        return float(model(**examples.batch(list(range(len(answers))), "cpu")).loss)


@pytest.fixture(scope="module")
def replayed(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replayed") / "dpo"
    run_dpo(dpo_config(tiny, out, "replay.weight=1.0", "save_steps=2"))
    return out


def test_parent_answers_made_once_logged_and_reused_on_resume(
    tiny: dict[str, Path], replayed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers_file = replayed / rp.ANSWERS_FILE
    answers = rp.read_answers(answers_file)
    assert [a["prompt"][0]["content"] for a in answers] == GENERAL
    assert all(0 < len(a["answer_ids"]) <= 8 for a in answers)
    rows = read_metrics(replayed)
    assert len(rows) == STEPS and all(r["replay_nll"] > 0 for r in rows)

    # The loss falls on the answer tokens only.
    tokenizer = AutoTokenizer.from_pretrained(tiny["policy"])
    examples = rp.ReplaySet.of(ReplayParams(), answers, tokenizer, max_length=1024)
    batch = examples.batch([0], "cpu")
    prompt_len = len(rp.prompt_ids(tokenizer, answers[0]["prompt"]))
    assert (batch["labels"][0, :prompt_len] == -100).all()
    assert batch["labels"][0, prompt_len:].tolist() == answers[0]["answer_ids"]

    # A resumed run trains on the answers the run started with: the parent is not asked again.
    before = answers_file.read_bytes()

    def asked_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("the parent's answers were generated again on resume")

    monkeypatch.setattr(rp, "greedy_answers", asked_again)
    longer = dpo_config(tiny, replayed, "replay.weight=1.0", f"max_steps={STEPS + 2}", "save_steps=2")
    result = run_dpo(longer, resume=True)
    assert result.resumed_from is not None and result.steps == STEPS + 2
    assert answers_file.read_bytes() == before
    assert len(read_metrics(replayed)) == STEPS + 2

    # Another prompt set in the same run folder is refused, not silently mixed in.
    other = replayed / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Name an animal."}))
    params = ReplayParams(prompts=other, max_new_tokens=8)
    with pytest.raises(ConfigError, match="replay.prompts: .* other prompts"):
        rp.parent_answers(params, rp.replay_prompts(params, None), None, tokenizer, replayed)


def test_replay_keeps_the_parents_answers(tiny: dict[str, Path], replayed: Path, tmp_path: Path) -> None:
    # The same DPO steps, same seed, with the term measured but not trained on.
    control = tmp_path / "dpo"
    run_dpo(dpo_config(tiny, control, "replay.weight=0", "save_steps=2"))
    answers = rp.read_answers(control / rp.ANSWERS_FILE)
    assert answers == rp.read_answers(replayed / rp.ANSWERS_FILE)  # one parent, one set of answers
    # `replayed` has resumed for 2 more steps by now; compare at step STEPS, its checkpoint.
    with_replay = replay_nll(replayed / "checkpoints" / f"checkpoint-{STEPS}", answers, tiny["policy"])
    without = replay_nll(control / "model", answers, tiny["policy"])
    parent = replay_nll(tiny["policy"], answers, tiny["policy"])
    assert with_replay < without, (with_replay, without, parent)
    assert with_replay < parent  # the term pulled the policy towards the parent's answers
    # weight 0 logs the same measurement without training on it
    assert all("replay_nll" in r for r in read_metrics(control))


def test_a_replay_prompt_equal_to_a_criteria_prompt_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text("\n".join(json.dumps({"prompt": q}) for q in [GENERAL[0], "what is the capital  of FRANCE?"]))
    # The stage's own watch.criteria ...
    config = dpo_config(tiny, tmp_path / "a", f"replay.prompts={leaky}", f"watch.criteria={tiny['criteria']}")
    with pytest.raises(ConfigError, match=r"replay\.prompts: row 2 .*capital  of FRANCE.*held-out prompt or probe"):
        run_dpo(config)
    assert not (tmp_path / "a").exists()  # refused before any work
    # ... and retrain's criteria, which reach the stage through StageRun.
    params = DPOParams(replay=ReplayParams(prompts=leaky))
    with pytest.raises(ConfigError, match=r"replay\.prompts: row 2"):
        where = StageRun(str(tiny["policy"]), tmp_path / "b", criteria=tiny["criteria"])
        run_dpo_on(params, StageData(preferences=object()), where)
    # The same prompts are fine without a criteria file to compare with, and so are the
    # criteria's prompts in a chat's system message (not a question asked).
    assert rp.replay_prompts(ReplayParams(prompts=leaky), None) is not None
    system = tmp_path / "system.jsonl"
    messages = [{"role": "system", "content": PROBE}, {"role": "user", "content": "Hi"}]
    system.write_text(json.dumps({"messages": messages}))
    assert rp.replay_prompts(ReplayParams(prompts=system), tiny["criteria"]) is not None
