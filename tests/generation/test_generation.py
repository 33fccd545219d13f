"""Contract tests of the Generation service, run against every engine.

transformers runs in-process; vLLM runs as the real `tuneloop serve generation` process
(its engine spawns workers, which needs a `__main__` guard), one per test session. Both
serve the same tiny policy from a registry of their own, publish to the session's Kafka.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from tests.support.generation import (
    Served,
    chat,
    make_registry,
    raw,
    read_records,
    rpc_error,
    serve_vllm,
    wait_for,
)
from tuneloop.common.errors import field_of
from tuneloop.common.kafka import KafkaSettings
from tuneloop.generation.server import GenerationApp
from tuneloop.generation.settings import GenerationSettings
from tuneloop.v1 import completion_pb2, generation_pb2

STOP, LENGTH, ABORTED = (
    completion_pb2.FINISH_REASON_STOP,
    completion_pb2.FINISH_REASON_LENGTH,
    completion_pb2.FINISH_REASON_ABORTED,
)
ID = re.compile(r"^cmpl-[0-9a-f]{32}$")
PROMPTS = ["Cats and dogs", "The capital of France is", "def add(a, b):", "1 2 3"]


@pytest.fixture(scope="module")
def transformers_server(
    tiny_policies: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("gen-transformers")
    registry = make_registry(root / "registry", tiny_policies)
    settings = GenerationSettings(
        port=0, metrics_port=0, host="127.0.0.1", engine="transformers", spool_path=root / "spool",
        alias_poll_s=0.5,
    )
    with GenerationApp(settings, kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), registry=registry) as app:
        assert app.server.metrics_port is not None
        yield Served("transformers", app.target, app.server.metrics_port, registry)


@pytest.fixture(scope="module")
def vllm_server(
    tiny_policies: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("gen-vllm")
    with serve_vllm(make_registry(root / "registry", tiny_policies), root, kafka_bootstrap,
                    TUNELOOP_GENERATION_ALIAS_POLL_S="0.5") as served:
        yield served


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def served(request: pytest.FixtureRequest) -> Served:
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture(scope="module")
def tokenizer(tiny_policies: tuple[Path, Path]) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(tiny_policies[0])


def test_unary_and_stream_agree_under_greedy(served: Served, tokenizer: AutoTokenizer) -> None:
    stub = served.stub()
    request = raw("Cats and dogs", temperature=0, max_tokens=24)
    response = stub.Generate(request, timeout=60)
    assert response.model == completion_pb2.ModelVersion(name="policy", version="v0001")
    assert response.prompt_tokens == len(tokenizer("Cats and dogs", add_special_tokens=False)["input_ids"])
    (completion,) = response.completions
    assert ID.match(completion.completion_id)
    assert (completion.completion_tokens, completion.finish_reason) == (24, LENGTH)
    assert completion.text

    chunks = list(stub.GenerateStream(request, timeout=60))
    assert "".join(c.delta for c in chunks) == completion.text
    assert {c.completion_id for c in chunks} == {chunks[0].completion_id}
    assert chunks[0].completion_id != completion.completion_id
    assert [c.finish_reason for c in chunks[:-1]] == [0] * (len(chunks) - 1)
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == (LENGTH, 24)
    assert all(c.model.version == "v0001" and c.prompt_tokens == response.prompt_tokens for c in chunks)


def test_chat_prompt_is_rendered_with_the_model_template(served: Served, tokenizer: AutoTokenizer) -> None:
    response = served.stub().Generate(chat("What is the capital of France?", max_tokens=4), timeout=60)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    assert response.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_n_candidates_have_distinct_ids_and_seeds_reproduce(served: Served) -> None:
    stub = served.stub()
    request = chat("Write a short poem about the sea.", temperature=1.0, max_tokens=12, n=2, seed=7)
    first = stub.Generate(request, timeout=60)
    assert [c.index for c in first.completions] == [0, 1]
    ids = {c.completion_id for c in first.completions}
    assert len(ids) == 2 and all(ID.match(i) for i in ids)
    again = stub.Generate(request, timeout=60)
    assert [c.text for c in again.completions] == [c.text for c in first.completions]
    assert ids.isdisjoint(c.completion_id for c in again.completions)


def test_stop_string_cuts_the_answer(served: Served) -> None:
    stub = served.stub()
    full = stub.Generate(raw("Cats and dogs", temperature=0, max_tokens=24), timeout=60).completions[0].text
    # A stop string that first occurs after the start, so the cut is visible.
    stop = next((full[i : i + 2] for i in range(1, len(full) - 1) if full.find(full[i : i + 2]) > 0), full[:2])
    request = raw("Cats and dogs", temperature=0, max_tokens=24, stop=[stop])
    cut = stub.Generate(request, timeout=60).completions[0]
    assert cut.text == full[: full.find(stop)]
    assert cut.finish_reason == STOP
    streamed = list(stub.GenerateStream(request, timeout=60))
    assert "".join(c.delta for c in streamed) == cut.text
    assert streamed[-1].finish_reason == STOP


def test_max_tokens_ends_with_length(served: Served) -> None:
    (completion,) = served.stub().Generate(raw("1 2 3", temperature=0, max_tokens=5), timeout=60).completions
    assert (completion.completion_tokens, completion.finish_reason) == (5, LENGTH)


def test_logprobs_on_request_only(served: Served) -> None:
    stub = served.stub()
    with_lp = stub.Generate(raw("Cats and dogs", temperature=0, max_tokens=8, logprobs=True), timeout=60)
    (completion,) = with_lp.completions
    assert len(completion.logprobs) == completion.completion_tokens == 8
    assert all(lp.logprob <= 0 for lp in completion.logprobs)
    assert "".join(lp.token for lp in completion.logprobs) == completion.text
    without = stub.Generate(raw("Cats and dogs", temperature=0, max_tokens=8), timeout=60)
    assert not without.completions[0].logprobs


@pytest.mark.parametrize(
    ("field", "request_"),
    [
        ("sampling.temperature", raw("x", temperature=2.5)),
        ("sampling.top_p", raw("x", top_p=0.0)),
        ("sampling.max_tokens", raw("x", max_tokens=0)),
        ("sampling.n", raw("x", n=9)),
        ("sampling.n", raw("x", n=0)),
        ("sampling.stop", raw("x", stop=["a", "b", "c", "d", "e"])),
        ("sampling.stop[1]", raw("x", stop=["a", ""])),
        ("prompt", generation_pb2.GenerateRequest()),
        ("prompt.raw", raw("")),
        (
            "prompt.chat.messages",
            generation_pb2.GenerateRequest(prompt=completion_pb2.Prompt(chat=completion_pb2.Conversation())),
        ),
        (
            "prompt.chat.messages[0].role",
            generation_pb2.GenerateRequest(
                prompt=completion_pb2.Prompt(
                    chat=completion_pb2.Conversation(messages=[completion_pb2.ChatMessage(role="robot", content="hi")])
                )
            ),
        ),
        ("prompt", raw("word " * 2000)),
    ],
)
def test_invalid_requests_name_the_field(served: Served, field: str, request_: generation_pb2.GenerateRequest) -> None:
    stub = served.stub()
    for err in (
        rpc_error(lambda: stub.Generate(request_, timeout=30)),
        rpc_error(lambda: list(stub.GenerateStream(request_, timeout=30))),
    ):
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_of(err) == field
        assert field in (err.details() or "")


def test_unknown_model_is_not_found(served: Served) -> None:
    stub = served.stub()
    request = raw("x", max_tokens=1)
    request.model = "v0999"
    assert rpc_error(lambda: stub.Generate(request, timeout=30)).code() == grpc.StatusCode.NOT_FOUND
    request.model = "production"
    assert stub.Generate(request, timeout=30).completions


def test_list_models(served: Served) -> None:
    (model,) = served.stub().ListModels(generation_pb2.ListModelsRequest(), timeout=30).models
    assert model.model == completion_pb2.ModelVersion(name="policy", version="v0001")
    assert list(model.aliases) == ["production"]
    assert model.engine == served.engine
    assert not model.adapter


def test_every_completion_reaches_kafka(served: Served, kafka_bootstrap: str) -> None:
    stub = served.stub()
    unary_request = chat("Hello there", temperature=0.8, max_tokens=6, n=2)
    unary_request.conversation_id, unary_request.tenant = "conv-1", "acme"
    unary = stub.Generate(unary_request, timeout=60)
    stream_request = raw("Cats and dogs", temperature=0, max_tokens=6)
    stream_request.request_id = "caller-chosen-id"
    chunks = list(stub.GenerateStream(stream_request, timeout=60))
    streamed_id = chunks[0].completion_id

    ids = [*(c.completion_id for c in unary.completions), streamed_id]
    records = {r.completion_id: r for r in read_records(kafka_bootstrap, ids)}
    for completion in unary.completions:
        record = records[completion.completion_id]
        assert record.completion == completion
        assert (record.request_id, record.conversation_id, record.tenant) == (unary.request_id, "conv-1", "acme")
        assert record.model == unary.model and record.prompt_tokens == unary.prompt_tokens
        assert record.prompt == unary_request.prompt
        assert record.rendered_prompt.endswith("<|im_start|>assistant\n")
        assert record.sampling.n == 2 and record.sampling.max_tokens == 6
        assert abs(record.sampling.temperature - 0.8) < 1e-6 and record.sampling.top_p == 1.0
        assert not record.sampling.HasField("seed")
    record = records[streamed_id]
    assert record.completion.text == "".join(c.delta for c in chunks)
    assert record.completion.finish_reason == LENGTH
    # No conversation id given: the request id keys the record.
    assert record.request_id == record.conversation_id == "caller-chosen-id"
    assert record.rendered_prompt == "Cats and dogs" and record.model.version == "v0001"


def test_deadline_aborts_the_generation(served: Served) -> None:
    before = served.metric("tuneloop_generation_completions_total", finish_reason="aborted")
    stub = served.stub()
    err = rpc_error(lambda: stub.Generate(raw("Cats and dogs", temperature=0, max_tokens=1024), timeout=0.3))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(
        lambda: served.metric("tuneloop_generation_completions_total", finish_reason="aborted") > before,
        30,
        "the generation to be aborted",
    )


def test_cancelled_stream_records_what_was_sent(served: Served, kafka_bootstrap: str) -> None:
    stream = served.stub().GenerateStream(raw("Cats and dogs", temperature=0, max_tokens=1024), timeout=60)
    first = next(stream)
    stream.cancel()
    (record,) = read_records(kafka_bootstrap, [first.completion_id])
    assert record.completion.finish_reason == ABORTED
    assert record.completion.text.startswith(first.delta)
    assert record.completion.completion_tokens < 1000


def test_engines_agree_under_greedy(transformers_server: Served, vllm_server: Served) -> None:
    """fp32 transformers and fp32 vLLM must produce the same greedy tokens."""
    for prompt in PROMPTS:
        answers = []
        for served in (transformers_server, vllm_server):
            for make in (raw, chat):
                request = make(prompt, temperature=0, max_tokens=24, logprobs=True)
                answers.append(served.stub().Generate(request, timeout=60).completions[0])
        t_raw, t_chat, v_raw, v_chat = answers
        for t, v in ((t_raw, v_raw), (t_chat, v_chat)):
            assert t.text == v.text, prompt
            assert [lp.token for lp in t.logprobs] == [lp.token for lp in v.logprobs]
            assert max(abs(a.logprob - b.logprob) for a, b in zip(t.logprobs, v.logprobs, strict=True)) < 1e-3


def test_hot_swap_under_load(served: Served) -> None:
    """Promote while requests are in flight: none fails, later answers carry the new version."""
    stub = served.stub()
    failures: list[BaseException] = []
    versions: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                if len(versions) % 2:
                    response = stub.Generate(raw("Cats and dogs", temperature=0, max_tokens=32), timeout=60)
                    versions.append(response.model.version)
                else:
                    chunks = list(stub.GenerateStream(chat("hi", temperature=0.7, max_tokens=32), timeout=60))
                    assert chunks[-1].finish_reason in (STOP, LENGTH)
                    assert len({c.model.version for c in chunks}) == 1  # one version per request
                    versions.append(chunks[-1].model.version)
            except BaseException as err:  # noqa: BLE001 (collected and asserted below)
                failures.append(err)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: len(versions) >= 8, 120, "requests before the promotion")
        served.registry.promote("policy", "v0002")
        wait_for(lambda: versions[-4:] == ["v0002"] * 4, 180, "answers from the promoted version")
    finally:
        stop.set()
        for worker in workers:
            worker.join(120)
    assert not failures, failures[:3]
    assert versions[0] == "v0001"
    (model,) = stub.ListModels(generation_pb2.ListModelsRequest(), timeout=30).models
    assert (model.model.version, list(model.aliases)) == ("v0002", ["production"])

    # Rollback is a swap too; it restores the first version (and its greedy answers).
    served.registry.rollback("policy")
    wait_for(
        lambda: stub.ListModels(generation_pb2.ListModelsRequest(), timeout=30).models[0].model.version == "v0001",
        120,
        "the rollback",
    )
    assert stub.Generate(raw("x", max_tokens=1), timeout=30).model.version == "v0001"
