"""LoRA adapter versions served as adapters on top of their base model.

The registry holds the tiny policy (v0001, production), another full policy (v0002) and two
peft LoRA adapters on v0001 with non-zero B weights (v0003, v0004). Served greedy answers
must equal what peft produces in-process for the same adapter, and differ from the base's.
transformers runs in-process (so the test can see that swapping adapters keeps the base in
memory); vLLM runs as the real `tuneloop serve generation` process.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.support.generation import (
    Served,
    make_registry,
    raw,
    read_records,
    serve_vllm,
    wait_for,
)
from tuneloop.common.kafka import KafkaSettings
from tuneloop.common.registry import Registry
from tuneloop.generation.adapters import AdapterError, with_base
from tuneloop.generation.engines.base import ModelRef
from tuneloop.generation.server import GenerationApp
from tuneloop.generation.settings import GenerationSettings
from tuneloop.v1 import generation_pb2

PROMPTS = ["Cats and dogs", "The capital of France is", "def add(a, b):", "1 2 3"]
MAX_TOKENS = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


TEXTS = {1: "The capital of France is Paris. ", 2: "Cats and dogs are friends. "}


def make_lora(base: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A peft LoRA adapter on `base`, trained for a moment to repeat TEXTS[seed] (peft starts
    the B weights at zero, which would change nothing; trained, the answers are readable)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft = get_peft_model(model, config)
        ids = tok(TEXTS[seed] * 2, add_special_tokens=False, return_tensors="pt")["input_ids"]
        optimizer = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(20):
            optimizer.zero_grad()
            peft(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
    peft.save_pretrained(out)
    return out


Answer = tuple[str, list[float]]  # greedy text and each token's logprob


def reference(base: Path, adapter: Path | None) -> list[Answer]:
    """Greedy answers of `base` (with `adapter` applied by peft) in-process, one prompt at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    answers = []
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id,
                output_logits=True, return_dict_in_generate=True,
            )
        new = out.sequences[0, ids["input_ids"].shape[1] :]
        logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, new, strict=True)]
        answers.append((tok.decode(new, skip_special_tokens=True), logprobs))
    return answers


def same(served: list[Answer], wanted: list[Answer]) -> bool:
    """Same texts, and logprobs within 1e-3 (they tell weights apart that answer alike)."""
    return len(served) == len(wanted) and all(
        s[0] == w[0] and len(s[1]) == len(w[1]) and all(abs(a - b) < 1e-3 for a, b in zip(s[1], w[1], strict=True))
        for s, w in zip(served, wanted, strict=True)
    )


@pytest.fixture(scope="module")
def adapters(tiny_policies: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lora")
    return make_lora(tiny_policies[0], root / "a", seed=1), make_lora(tiny_policies[0], root / "b", seed=2)


@pytest.fixture(scope="module")
def expected(tiny_policies: tuple[Path, Path], adapters: tuple[Path, Path]) -> dict[str, list[Answer]]:
    """Each version's greedy answers, computed in-process."""
    out = {
        "v0001": reference(tiny_policies[0], None),
        "v0002": reference(tiny_policies[1], None),
        "v0003": reference(tiny_policies[0], adapters[0]),
        "v0004": reference(tiny_policies[0], adapters[1]),
    }
    texts = {version: [text for text, _ in answers] for version, answers in out.items()}
    # The adapters change every answer: serving the base by mistake could not pass.
    for version in ("v0003", "v0004"):
        assert all(a != b for a, b in zip(texts[version], texts["v0001"], strict=True)), texts
    assert texts["v0003"] != texts["v0004"]
    return out


def lora_registry(root: Path, policies: tuple[Path, Path], adapters: tuple[Path, Path]) -> Registry:
    """v0001 (production) and v0002 full models; v0003 and v0004 LoRA adapters on v0001."""
    registry = make_registry(root, policies)
    for adapter in adapters:
        registry.register("policy", adapter, kind="policy", parent="policy@v0001")
    return registry


def answers(served: Served, model: str = "") -> tuple[str, list[Answer]]:
    """The version that answered and its greedy answers to PROMPTS."""
    stub = served.stub()
    versions, out = set(), []
    for prompt in PROMPTS:
        request = raw(prompt, temperature=0, max_tokens=MAX_TOKENS, logprobs=True)
        request.model = model
        response = stub.Generate(request, timeout=60)
        versions.add(response.model.version)
        completion = response.completions[0]
        out.append((completion.text, [lp.logprob for lp in completion.logprobs]))
    assert len(versions) == 1, versions
    return versions.pop(), out


def check(served: Served, version: str, expected: dict[str, list[Answer]], model: str = "") -> None:
    answered, got = answers(served, model)
    assert answered == version
    assert same(got, expected[version]), (version, [t for t, _ in got], [t for t, _ in expected[version]])


def listed(served: Served) -> list[tuple[str, bool, list[str]]]:
    models = served.stub().ListModels(generation_pb2.ListModelsRequest(), timeout=30).models
    assert {m.engine for m in models} == {served.engine}
    return [(m.model.version, m.adapter, list(m.aliases)) for m in models]


def promote(served: Served, version: str, *, rollback: bool = False) -> None:
    if rollback:
        assert served.registry.rollback("policy") == version
    else:
        served.registry.promote("policy", version)
    wait_for(lambda: listed(served)[0][0] == version, 120, f"the swap to {version}")


# ---- transformers ----------------------------------------------------------------------


@pytest.fixture
def transformers_app(
    tmp_path: Path, tiny_policies: tuple[Path, Path], adapters: tuple[Path, Path], kafka_bootstrap: str
) -> Iterator[GenerationApp]:
    settings = GenerationSettings(
        port=0, metrics_port=0, host="127.0.0.1", engine="transformers", spool_path=tmp_path / "spool",
        alias_poll_s=0.2, alias_events=False, batch_window_ms=50,
    )
    registry = lora_registry(tmp_path / "registry", tiny_policies, adapters)
    with GenerationApp(settings, kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), registry=registry) as app:
        yield app


def _served(app: GenerationApp) -> Served:
    assert app.server.metrics_port is not None
    return Served("transformers", app.target, app.server.metrics_port, app.registry)


def test_transformers_swaps_adapters_on_the_loaded_base(
    transformers_app: GenerationApp, expected: dict[str, list[Answer]]
) -> None:
    app, served = transformers_app, _served(transformers_app)
    check(served, "v0001", expected)
    base = app.engine._current().weights  # type: ignore[attr-defined]

    promote(served, "v0003")
    assert listed(served) == [("v0003", True, ["production"]), ("v0001", False, [])]
    check(served, "v0003", expected)
    # The base answers when asked for by version, also in the same batches as the adapter.
    check(served, "v0001", expected, "v0001")
    stub = served.stub()
    requests = []
    for i, prompt in enumerate(PROMPTS * 2):
        request = raw(prompt, temperature=0, max_tokens=MAX_TOKENS)
        request.model = "policy@v0001" if i % 2 else ""
        requests.append(request)
    with ThreadPoolExecutor(len(requests)) as pool:
        mixed = list(pool.map(lambda r: stub.Generate(r, timeout=60), requests))
    for i, response in enumerate(mixed):
        version = "v0001" if i % 2 else "v0003"
        assert response.model.version == version
        assert response.completions[0].text == expected[version][i % len(PROMPTS)][0]

    promote(served, "v0004")  # another adapter on the same base: the base stays in memory
    check(served, "v0004", expected)
    weights = app.engine._current().weights  # type: ignore[attr-defined]
    assert weights is base and list(weights.peft.peft_config) == [app.engine._current().adapter]  # type: ignore[attr-defined]

    promote(served, "v0003", rollback=True)
    check(served, "v0003", expected)
    promote(served, "v0001", rollback=True)  # back to the base itself: the adapter layers go
    assert listed(served) == [("v0001", False, ["production"])]
    check(served, "v0001", expected)
    assert app.engine._current().weights is base and base.peft is None  # type: ignore[attr-defined]
    assert not any("lora" in name for name, _ in base.model.named_modules())

    promote(served, "v0002")  # another full model, then an adapter whose base is not loaded
    check(served, "v0002", expected)
    promote(served, "v0003")
    check(served, "v0003", expected)
    assert listed(served) == [("v0003", True, ["production"]), ("v0001", False, [])]
    assert served.metric("tuneloop_generation_model_swaps_total", result="failed") == 0


def test_transformers_serves_an_adapter_from_the_start(
    tmp_path: Path, tiny_policies: tuple[Path, Path], adapters: tuple[Path, Path], expected: dict[str, list[Answer]],
    kafka_bootstrap: str,
) -> None:
    registry = lora_registry(tmp_path / "registry", tiny_policies, adapters)
    settings = GenerationSettings(
        port=0, metrics_port=0, host="127.0.0.1", model="policy@v0004", spool_path=tmp_path / "spool",
        alias_events=False,
    )
    with GenerationApp(settings, kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), registry=registry) as app:
        served = _served(app)
        assert listed(served) == [("v0004", True, []), ("v0001", False, ["production"])]
        check(served, "v0004", expected)
        check(served, "v0001", expected, "v0001")

        # Completion records name the version that answered: the adapter, or the base.
        stub = served.stub()
        request = raw("Cats and dogs", temperature=0, max_tokens=2)
        adapter = stub.Generate(request, timeout=60).completions[0].completion_id
        request.model = "policy@v0001"
        base = stub.Generate(request, timeout=60).completions[0].completion_id
        records = {r.completion_id: r.model.version for r in read_records(kafka_bootstrap, [adapter, base])}
        assert records == {adapter: "v0004", base: "v0001"}


# ---- finding the base -------------------------------------------------------------------


def test_base_comes_from_the_card_parent_or_adapter_config(
    tmp_path: Path, tiny_policies: tuple[Path, Path], adapters: tuple[Path, Path]
) -> None:
    registry = lora_registry(tmp_path / "registry", tiny_policies, adapters)
    v1 = registry.resolve("policy@v0001")
    ref = with_base(ModelRef("policy", "v0003", registry.resolve("policy@v0003")), registry)
    assert ref.adapter and (ref.base.name, ref.base.version, ref.base.path) == ("policy", "v0001", v1)  # type: ignore[union-attr]
    full = ModelRef("policy", "v0002", registry.resolve("policy@v0002"))
    assert with_base(full, registry) is full

    # No parent: adapter_config's base_model_name_or_path, a registry ref or folder.
    for named, version in (("policy@v0002", "v0002"), (str(v1), "v0001")):
        folder = tmp_path / f"adapter-{version}"
        shutil.copytree(adapters[0], folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": named}))
        card = registry.register("policy", folder, kind="policy")
        ref = with_base(ModelRef("policy", card.version, registry.resolve(card.ref)), registry)
        assert (ref.base.name, ref.base.version) == ("policy", version)  # type: ignore[union-attr]

    # Neither: refused, with the reason.
    orphan = tmp_path / "orphan"
    shutil.copytree(adapters[0], orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "nowhere/model"}))
    card = registry.register("policy", orphan, kind="policy")
    with pytest.raises(AdapterError, match="no base model to serve it on.*nowhere/model"):
        with_base(ModelRef("policy", card.version, registry.resolve(card.ref)), registry)
    # An adapter on an adapter: refused too.
    stacked = registry.register("policy", adapters[1], kind="policy", parent="policy@v0003")
    (registry.resolve(stacked.ref) / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "policy@v0003"})
    )
    with pytest.raises(AdapterError, match="stacked adapters are not served"):
        with_base(ModelRef("policy", stacked.version, registry.resolve(stacked.ref)), registry)


def test_swap_to_an_adapter_without_base_keeps_the_served_version(
    transformers_app: GenerationApp, tmp_path: Path
) -> None:
    served = _served(transformers_app)
    registry = transformers_app.registry
    orphan = tmp_path / "orphan"
    shutil.copytree(registry.resolve("policy@v0003"), orphan, ignore=shutil.ignore_patterns("card.json"))
    config = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "nowhere/model"}))
    card = registry.register("policy", orphan, kind="policy", move=True)
    registry.promote("policy", card.version)
    wait_for(
        lambda: served.metric("tuneloop_generation_model_swaps_total", result="failed") >= 1, 30, "the refused swap"
    )
    assert listed(served) == [("v0001", False, [])]
    assert served.stub().Generate(raw("x", max_tokens=1), timeout=30).model.version == "v0001"


# ---- vLLM ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_lora(
    tiny_policies: tuple[Path, Path], adapters: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory,
    kafka_bootstrap: str,
) -> Iterator[Served]:
    """vLLM started on an adapter version (LoRA support sized to it)."""
    root = tmp_path_factory.mktemp("gen-vllm-lora")
    registry = lora_registry(root / "registry", tiny_policies, adapters)
    registry.promote("policy", "v0003")
    with serve_vllm(registry, root, kafka_bootstrap, TUNELOOP_GENERATION_ALIAS_POLL_S="0.2",
                    TUNELOOP_GENERATION_ALIAS_EVENTS="false") as served:
        yield served


def test_vllm_serves_adapters_with_lora_requests(vllm_lora: Served, expected: dict[str, list[Answer]]) -> None:
    served = vllm_lora
    assert listed(served) == [("v0003", True, ["production"]), ("v0001", False, [])]
    check(served, "v0003", expected)
    check(served, "v0001", expected, "v0001")

    promote(served, "v0004")  # adapter to adapter: the base weights stay
    check(served, "v0004", expected)
    promote(served, "v0003", rollback=True)
    check(served, "v0003", expected)
    promote(served, "v0001", rollback=True)  # the base itself: no adapter on the requests
    assert listed(served) == [("v0001", False, ["production"])]
    check(served, "v0001", expected)


def test_vllm_adapter_after_another_full_model_reloads_its_base(
    vllm_lora: Served, expected: dict[str, list[Answer]]
) -> None:
    served = vllm_lora
    promote(served, "v0002")
    check(served, "v0002", expected)
    promote(served, "v0004")  # base v0001 reloaded in place, then the adapter added
    assert listed(served) == [("v0004", True, ["production"]), ("v0001", False, [])]
    check(served, "v0004", expected)
    check(served, "v0001", expected, "policy@v0001")
    assert served.metric("tuneloop_generation_model_swaps_total", result="failed") == 0

