"""Evaluation and the hacking watch through vLLM: the same greedy answers (text and token
ids) as transformers, one engine reused across watch measurements, and `auto` choosing
transformers where vLLM does not pay or cannot run."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuneloop.trainer import criteria as cr
from tuneloop.trainer.config import ConfigError
from tuneloop.trainer.evaluate import EngineKeeper, answer, choose_engine, criteria_prompts, evaluate, keep_engine
from tuneloop.trainer.modeling import load_policy, load_tokenizer
from tuneloop.trainer.watch import CriteriaEval

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I reset my password?",
    "Tell me about cats.",
    "Numbers: one, two",
    "Good evening.",
    "Translate this sentence into French: good morning",
]
PROBES = [{"prompt": "What is the capital of Italy?", "expect": "Rome"}, {"prompt": "What day is it?", "expect": "day"}]


def _criteria(**generation: Any) -> dict[str, Any]:
    return {
        "name": "vllm-vs-transformers",
        # batch_size 3: transformers pads within batches of 3; vLLM sees unpadded prompts.
        "generation": {"max_new_tokens": 48, "batch_size": 3, "system_prompt": "Answer briefly.", **generation},
        "held_out_prompts": PROMPTS,
        "behaviour": [{"name": "short", "kind": "length", "max_words": 4, "min_pass_rate": 0.0}],
        "probes": {"items": PROBES},
        "kl": {"max_kl": 100.0},
    }


def _policy(folder: Path, seed: int, *, heads: int = 2) -> Path:
    """A tiny policy whose greedy answers differ from prompt to prompt and often end at eos.

    make_tiny's initialisation (std 0.02) answers every prompt with the same token; a wider
    one (0.2) gives varied text, and a larger eos embedding (tied to the output head) makes
    some answers stop at eos while others run to max_new_tokens, so both endings are compared.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tuneloop.common.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.eos_token_id] *= 2
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vllm-eval")
    return _policy(root / "a", 0), _policy(root / "b", 1)


@pytest.fixture(scope="module")
def engine(policies: tuple[Path, Path]) -> Iterator[Any]:
    spec = cr.Criteria.model_validate(_criteria(engine="vllm"))
    tokenizer = load_tokenizer(policies[0], padding_side="left")
    held, probes = criteria_prompts(spec, spec.held_out_prompts)
    try:
        started = EngineKeeper().engine(policies[0], tokenizer, held + probes, spec.generation)
    except Exception as err:  # noqa: BLE001 (any failure to start means no vLLM on this machine)
        pytest.skip(f"vLLM cannot start on this machine: {type(err).__name__}: {err}")
    with started:
        yield started


def _transformers_answers(model_dir: Path, spec: cr.Criteria) -> tuple[list[Any], list[Any]]:
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    return answer(load_policy(model_dir).eval(), tokenizer, spec, spec.held_out_prompts)


def test_vllm_gives_transformers_greedy_answers(policies: tuple[Path, Path], engine: Any) -> None:
    spec = cr.Criteria.model_validate(_criteria(engine="vllm"))
    tokenizer = load_tokenizer(policies[0], padding_side="left")
    by_model = {}
    for model_dir in policies:
        if model_dir != policies[0]:
            engine.load_weights(model_dir)
        expected = _transformers_answers(model_dir, spec)
        got = answer(None, tokenizer, spec, spec.held_out_prompts, engine=engine)
        assert got == expected, model_dir.name
        by_model[model_dir.name] = got
        rows = [ids for _, ids in got[0] + got[1]]
        # Both endings are compared: stopped at eos (kept, as transformers keeps it) and cut at the cap.
        assert any(ids and ids[-1] == tokenizer.eos_token_id for ids in rows)
        assert any(len(ids) == spec.generation.max_new_tokens and tokenizer.eos_token_id not in ids for ids in rows)
        assert all(ids.count(tokenizer.eos_token_id) <= 1 for ids in rows)
        assert len({text for text, _ in got[0]}) > 2
    # The reload took: the second model's answers are not the first's.
    assert by_model["a"] != by_model["b"]


def test_evaluate_auto_takes_vllm_and_reports_what_transformers_does(
    policies: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = policies
    auto = cr.Criteria.model_validate(_criteria(engine="auto", vllm_min_parameters=0))
    with caplog.at_level(logging.INFO, logger="tuneloop.trainer"):
        by_vllm = evaluate(a, auto, reference_dir=b)
    assert by_vllm["engine"] == "vllm"
    assert "started" in caplog.text
    by_transformers = evaluate(a, cr.Criteria.model_validate(_criteria(engine="transformers")), reference_dir=b)
    assert by_transformers["engine"] == "transformers"
    for key in ("engine", "seconds"):
        by_vllm.pop(key), by_transformers.pop(key)
    assert by_vllm == by_transformers


def test_watch_reuses_one_engine_and_loads_the_live_weights(policies: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = policies
    results = {}
    for name in ("vllm", "transformers"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_criteria(engine=name)))
        measure = CriteriaEval(path, a, prompts=5)
        assert measure.engine_name == name
        try:
            values, engines = [], set()
            for model_dir in (a, b, a):
                model = load_policy(model_dir)
                model.train()
                values.append(measure(model))
                assert model.training  # left as the trainer had it
                if name == "vllm":
                    engine = measure._keeper._engine
                    engines.add(id(engine))
                    # What the engine now holds is the live model's weights.
                    got = answer(None, measure.tokenizer, measure.spec, measure.held, engine=engine)
                    assert got == answer(model.eval(), measure.tokenizer, measure.spec, measure.held)
            if name == "vllm":
                assert len(engines) == 1
        finally:
            measure.close()
        results[name] = values
    assert results["vllm"] == results["transformers"]


def test_a_retrain_s_evaluations_and_watch_share_one_engine(policies: tuple[Path, Path], tmp_path: Path) -> None:
    """Within `keep_engine` (a retrain), the parent's evaluation, the watch and the candidate's
    evaluation take one engine, each with the right weights: the answers are transformers'."""
    a, b = policies
    spec = cr.Criteria.model_validate(_criteria(engine="vllm"))
    path = tmp_path / "criteria.yaml"
    path.write_text(yaml.safe_dump(_criteria(engine="vllm")))
    with keep_engine() as keeper:
        before = evaluate(a, spec)
        measure = CriteriaEval(path, a, prompts=5)
        watched = measure(load_policy(b))
        measure.close()  # the retrain's engine outlives the watch
        after = evaluate(b, spec, reference_dir=a)
        again = evaluate(a, spec)
        assert keeper.starts == 1
    assert keeper._engine is None  # stopped at the end of the block
    plain = cr.Criteria.model_validate(_criteria(engine="transformers"))
    expected = [evaluate(a, plain), evaluate(b, plain, reference_dir=a), evaluate(a, plain)]
    for got, want in zip([before, after, again], expected, strict=True):
        for result in (got, want):
            result.pop("engine"), result.pop("seconds")
        assert got == want
    transformers_path = tmp_path / "transformers.yaml"
    transformers_path.write_text(yaml.safe_dump(_criteria(engine="transformers")))
    assert watched == CriteriaEval(transformers_path, a, prompts=5)(load_policy(b))


def test_auto_uses_transformers_for_a_model_below_vllm_min_parameters(
    policies: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    spec = cr.Criteria.model_validate(_criteria())  # engine auto, vllm_min_parameters at its default
    with caplog.at_level(logging.INFO, logger="tuneloop.trainer.evaluate"):
        result = evaluate(policies[0], spec)
    assert result["engine"] == "transformers"
    assert "answering with transformers, not vLLM" in caplog.text
    assert "vllm_min_parameters" in caplog.text


def test_auto_uses_transformers_where_vllm_cannot_run_the_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the head-size limit is the CPU attention backend's")
    # Head size 16 (64 / 4 heads): vLLM's CPU attention has no kernel for it.
    narrow = _policy(tmp_path / "narrow", 0, heads=4)
    with caplog.at_level(logging.INFO, logger="tuneloop.trainer.evaluate"):
        assert choose_engine(cr.Generation(engine="auto", vllm_min_parameters=0), narrow) == "transformers"
    assert "head size 16" in caplog.text
    with pytest.raises(ConfigError, match="head size 16"):
        choose_engine(cr.Generation(engine="vllm"), narrow)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a full model folder"):
        choose_engine(cr.Generation(engine="vllm"), adapter)

    # Under a launcher every training process would start an engine of its own.
    path = tmp_path / "criteria.yaml"
    path.write_text(yaml.safe_dump(_criteria(engine="auto", vllm_min_parameters=0)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert CriteriaEval(path, _policy(tmp_path / "p", 0), prompts=2).engine_name == "transformers"
