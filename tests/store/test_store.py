"""The preference store against a real broker: joins for every judgement kind, waiting and
dead-lettering, exactly once across kill -9, snapshots, the TRL export, and the pair rules."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pandas as pd
import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from tests.support.s3server import S3Server
from tuneloop.common.kafka import KafkaSettings, ensure_topics
from tuneloop.common.processes import ServiceProcess
from tuneloop.store import agreement
from tuneloop.store import consumer as store_consumer
from tuneloop.store.consumer import PreferenceStore
from tuneloop.store.pairs import PairRules, Rating, pairwise_pairs, ranking_pairs, rating_pairs
from tuneloop.store.read import (
    current_snapshot,
    load_judgements,
    load_rows,
    parse_snapshot,
    snapshot_id,
    to_trl_dataset,
    versions,
)
from tuneloop.store.report import cli
from tuneloop.store.settings import StoreSettings
from tuneloop.store.tables import Source, WriteFailed, append_by_halves, source_of
from tuneloop.v1 import completion_pb2, dead_letter_pb2, feedback_pb2
from tests.support.store import QUESTION, Sender, cid, completion, drive, event, rows_of

A, B, TIE, BOTH_BAD = (
    feedback_pb2.PAIRWISE_CHOICE_A,
    feedback_pb2.PAIRWISE_CHOICE_B,
    feedback_pb2.PAIRWISE_CHOICE_TIE,
    feedback_pb2.PAIRWISE_CHOICE_BOTH_BAD,
)

REASONS = ("unparseable", "invalid", "unknown_completion", "tenant_mismatch", "different_prompts")


def done_offsets(store: PreferenceStore) -> dict[int, int]:
    """Per feedback partition, the offset below which the newest pairs version is final."""
    topic = store.settings.feedback_topic
    return current_snapshot(store.root, [topic]).offsets[topic]


def dead_letters(
    kafka: KafkaSettings, topic: str, count: int, timeout_s: float = 30.0
) -> list[dead_letter_pb2.DeadLetter]:
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out: list[dead_letter_pb2.DeadLetter] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(dead_letter_pb2.DeadLetter.FromString(r.value) for r in records)
        return out
    finally:
        consumer.close()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- pair rules (pure) ---


def _rating(
    eid: str,
    completion_id: str,
    value: float,
    *,
    kind: str = "score",
    annotator: str = "a",
    request: str = "r1",
    prompt: str = "p1",
    scale: tuple[float, float] = (1, 5),
) -> Rating:
    return Rating(eid, completion_id, "t", annotator, request, prompt, kind, value, *scale)  # type: ignore[arg-type]


def test_pairwise_rule_keeps_order_ties_and_both_bad() -> None:
    assert [(p.chosen_id, p.rejected_id, p.label) for p in pairwise_pairs(A, "x", "y")] == [("x", "y", "preference")]
    assert [(p.chosen_id, p.rejected_id, p.label) for p in pairwise_pairs(B, "x", "y")] == [("y", "x", "preference")]
    assert [p.label for p in pairwise_pairs(TIE, "x", "y")] == ["tie"]
    assert [p.label for p in pairwise_pairs(BOTH_BAD, "x", "y")] == ["both_bad"]
    with pytest.raises(ValueError):
        pairwise_pairs(feedback_pb2.PAIRWISE_CHOICE_UNSPECIFIED, "x", "y")


def test_ranking_rules_all_pairs_or_adjacent() -> None:
    ranked = ["c1", "c2", "c3", "c4"]
    every = ranking_pairs(ranked, PairRules(ranking="all"))
    assert [(p.chosen_id, p.rejected_id) for p in every] == [  # closest ranks first
        ("c1", "c2"),
        ("c2", "c3"),
        ("c3", "c4"),
        ("c1", "c3"),
        ("c2", "c4"),
        ("c1", "c4"),
    ]
    assert {p.rule for p in every} == {"ranking_all"}
    adjacent = ranking_pairs(ranked, PairRules(ranking="adjacent"))
    assert [(p.chosen_id, p.rejected_id, p.rule) for p in adjacent] == [
        ("c1", "c2", "ranking_adjacent"),
        ("c2", "c3", "ranking_adjacent"),
        ("c3", "c4", "ranking_adjacent"),
    ]


def test_one_event_adds_at_most_max_pairs() -> None:
    """Amplification: a 64-id ranking would be 2,016 pairs, a rating on a busy prompt one
    pair per earlier rating; the cap keeps the closest ranks and the latest ratings."""
    ranked = [f"c{i:02d}" for i in range(64)]
    capped = ranking_pairs(ranked, PairRules(ranking="all", max_pairs=70))
    assert len(capped) == 70 and len(ranking_pairs(ranked, PairRules(ranking="all", max_pairs=10_000))) == 2016
    assert all(int(p.rejected_id[1:]) - int(p.chosen_id[1:]) <= 2 for p in capped)
    assert len(ranking_pairs(ranked, PairRules(ranking="adjacent", max_pairs=5))) == 5
    earlier = [_rating(f"e{i}", f"c{i}", 1.0) for i in range(100)]
    latest = rating_pairs(_rating("new", "cn", 5.0), earlier, PairRules(max_pairs=3))
    assert [p.other_event_id for p in latest] == ["e99", "e98", "e97"]


def test_no_tenant_exceeds_its_share_of_a_training_snapshot() -> None:
    from tuneloop.store.read import cap_tenant_share

    rows = pd.DataFrame({"tenant": ["big"] * 90 + ["small"] * 10, "n": range(100)})
    kept = cap_tenant_share(rows, 0.6)
    assert kept["tenant"].value_counts().to_dict() == {"big": 15, "small": 10}  # 15/25 = 0.6, the most allowed
    assert list(kept[kept["tenant"] == "big"]["n"]) == list(range(75, 90)), "the latest rows, in order"
    three = pd.DataFrame({"tenant": ["a"] * 50 + ["b"] * 30 + ["c"] * 20, "n": range(100)})
    shares = cap_tenant_share(three, 0.4)["tenant"].value_counts(normalize=True)
    assert shares.max() <= 0.4 and len(cap_tenant_share(three, 0.4)) == 83
    assert cap_tenant_share(rows[rows["tenant"] == "big"], 0.1).equals(rows[rows["tenant"] == "big"])


def test_rating_rule_margin_scale_scope_and_annotator() -> None:
    rules = PairRules(rating_margin=1.0)
    new = _rating("e9", "c9", 4.0)
    earlier = [
        _rating("e1", "c1", 2.0),  # gap 2: pair, new is better
        _rating("e2", "c2", 5.0),  # gap 1 == margin: pair, old is better
        _rating("e3", "c3", 3.5),  # gap 0.5 < margin: no pair
        _rating("e4", "c4", 1.0, scale=(0, 10)),  # another scale: not comparable
        _rating("e5", "c5", 1.0, annotator="b"),  # another annotator
        _rating("e6", "c6", 1.0, prompt="p2", request="r2"),  # another prompt
        _rating("e7", "c9", 1.0),  # the same completion
        _rating("e8", "c8", 1.0, request="r2"),  # same prompt, another request
    ]
    made = {(p.chosen_id, p.rejected_id, p.other_event_id) for p in rating_pairs(new, earlier, rules)}
    assert made == {("c9", "c1", "e1"), ("c2", "c9", "e2"), ("c9", "c8", "e8")}
    by_request = rating_pairs(new, earlier, PairRules(rating_scope="request"))
    assert {(p.chosen_id, p.rejected_id) for p in by_request} == {("c9", "c1"), ("c2", "c9")}
    any_annotator = rating_pairs(new, earlier, PairRules(rating_same_annotator=False))
    assert ("c9", "c5") in {(p.chosen_id, p.rejected_id) for p in any_annotator}
    assert rating_pairs(new, earlier, PairRules(rating_pairs=False)) == []
    assert {p.rule for p in rating_pairs(new, earlier, rules)} == {"rating_margin"}


def test_thumbs_rule_pairs_up_with_down_only() -> None:
    rules = PairRules()
    up = _rating("e1", "c1", 1.0, kind="thumb")
    others = [_rating("e2", "c2", 0.0, kind="thumb"), _rating("e3", "c3", 1.0, kind="thumb"), _rating("e4", "c4", 1.0)]
    assert [(p.chosen_id, p.rejected_id, p.rule) for p in rating_pairs(up, others, rules)] == [("c1", "c2", "thumbs")]
    down = _rating("e5", "c5", 0.0, kind="thumb")
    assert [(p.chosen_id, p.rejected_id) for p in rating_pairs(down, [up], rules)] == [("c1", "c5")]
    assert rating_pairs(down, [up], PairRules(thumbs_pairs=False)) == []


# --- joins ---


def test_every_kind_becomes_rows_and_judgements(store: PreferenceStore, send: Sender) -> None:
    c = [cid() for _ in range(4)]
    send.completions(*(completion(c[i], f"answer {i}", version=f"v000{i}") for i in range(4)))
    before = {label: metric("tuneloop_store_rows_total", label=label) for label in ("preference", "tie", "both_bad")}
    events = {
        "a": event(pairwise=(c[0], c[1], A), criteria=["helpfulness"], calibration=True, project="q1"),
        "b": event(pairwise=(c[0], c[1], B), anchor=True),
        "tie": event(pairwise=(c[2], c[3], TIE)),
        "both_bad": event(pairwise=(c[2], c[3], BOTH_BAD)),
        "ranking": event(ranking=[c[2], c[0], c[1]]),
        "r0": event(score=(c[0], 5.0)),
        "r1": event(score=(c[1], 2.0)),
        "r2": event(score=(c[2], 4.5)),
        "up": event(thumb=(c[0], True), annotator="user-7", source=feedback_pb2.FEEDBACK_SOURCE_END_USER),
        "down": event(thumb=(c[3], False), annotator="user-7", source=feedback_pb2.FEEDBACK_SOURCE_END_USER),
    }
    send.feedback(*events.values())
    ids = {name: e.event_id for name, e in events.items()}
    drive(store, lambda: len(load_judgements(store.root)) == len(events))
    rows = rows_of(store)
    by_event = {name: rows[rows["event_id"] == eid] for name, eid in ids.items()}

    a = by_event["a"].iloc[0]
    assert (a["chosen_id"], a["rejected_id"], a["label"], a["rule"], a["kind"]) == (
        c[0],
        c[1],
        "preference",
        "pairwise",
        "pairwise",
    )
    assert (a["chosen"], a["rejected"], a["chosen_model"], a["rejected_model"]) == (
        "answer 0",
        "answer 1",
        "policy@v0000",
        "policy@v0001",
    )
    assert [dict(m) for m in a["prompt"]] == QUESTION and a["prompt_raw"] == ""
    assert list(a["criteria"]) == ["helpfulness"] and a["calibration"] and not a["anchor"] and a["project"] == "q1"
    assert a["item_id"] == "|".join(sorted(c[:2])) and a["tenant"] == "acme" and a["annotator_id"] == "ann-1"
    assert list(a["source_event_ids"]) == [ids["a"]] and a["topic"] == store.settings.feedback_topic
    b = by_event["b"].iloc[0]
    assert (b["chosen_id"], b["rejected_id"], b["anchor"]) == (c[1], c[0], True)
    for name in ("tie", "both_bad"):
        (row,) = by_event[name].itertuples()
        assert (row.label, row.chosen_id, row.rejected_id) == (name, c[2], c[3])
    ranking = by_event["ranking"]
    ranked_pairs = set(zip(ranking["chosen_id"], ranking["rejected_id"], strict=True))
    assert ranked_pairs == {(c[2], c[0]), (c[2], c[1]), (c[0], c[1])}
    assert set(ranking["rule"]) == {"ranking_all"}

    # Ratings pair among themselves whichever arrived first: 5 vs 2 and 4.5 vs 2 differ by
    # the margin, 5 vs 4.5 does not.
    rated = rows[rows["kind"] == "rating"]
    assert set(zip(rated["chosen_id"], rated["rejected_id"], strict=True)) == {(c[0], c[1]), (c[2], c[1])}
    assert all(len(s) == 2 for s in rated["source_event_ids"])
    thumbs = rows[rows["kind"] == "thumbs"]
    assert list(zip(thumbs["chosen_id"], thumbs["rejected_id"], strict=True)) == [(c[0], c[3])]
    assert thumbs.iloc[0]["source"] == "end_user" and set(thumbs.iloc[0]["source_event_ids"]) == {
        ids["up"],
        ids["down"],
    }
    assert thumbs.iloc[0]["weight"] == 0.5 and set(rows[rows["source"] == "annotator"]["weight"]) == {1.0}

    judgements = load_judgements(store.root).set_index("event_id")
    assert len(judgements) == len(events) and judgements.index.is_unique
    assert judgements.at[ids["a"], "choice"] == c[0] and judgements.at[ids["tie"], "choice"] == "tie"
    assert judgements.at[ids["r2"], "score"] == 4.5 and judgements.at[ids["down"], "choice"] == "down"
    assert judgements.at[ids["ranking"], "choice"] == f"{c[2]}>{c[0]}>{c[1]}"
    assert metric("tuneloop_store_rows_total", label="tie") - before["tie"] == 1
    assert metric("tuneloop_store_rows_total", label="both_bad") - before["both_bad"] == 1
    assert metric("tuneloop_store_rows_total", label="preference") - before["preference"] == len(rows) - 2


def test_feedback_before_its_completion_waits_then_joins(store: PreferenceStore, send: Sender) -> None:
    c1, c2 = cid(), cid()
    ev = event(pairwise=(c1, c2, A))
    send.feedback(ev)
    drive(store, lambda: store.pending_count() == 1)
    assert rows_of(store).empty
    # The waiting event (offset 0) holds its partition's snapshot offset back.
    assert list(done_offsets(store).values()) == [0]

    send.completions(completion(c1, "first"), completion(c2, "second"))
    drive(store, lambda: store.pending_count() == 0)
    (row,) = rows_of(store).itertuples()
    assert (row.event_id, row.chosen, row.rejected) == (ev.event_id, "first", "second")
    assert done_offsets(store)[row.partition] == row.offset + 1


def test_unknown_completion_is_dead_lettered_after_the_join_timeout(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender
) -> None:
    settings = store_settings.model_copy(update={"join_timeout_s": 0.5})
    known, unknown = cid(), cid()
    with PreferenceStore(settings, kafka_settings) as store:
        send.completions(completion(known, "here"))
        ev = event(pairwise=(known, unknown, A))
        before = metric("tuneloop_store_dead_letters_total", reason="unknown_completion")
        send.feedback(ev)
        drive(store, lambda: metric("tuneloop_store_dead_letters_total", reason="unknown_completion") > before)
        assert store.pending_count() == 0
        (letter,) = dead_letters(kafka_settings, settings.dlq_topic, 1)
        assert letter.reason.startswith(f"unknown completion id {unknown}")
        assert letter.field == "pairwise.completion_b_id"
        assert letter.topic == settings.feedback_topic and letter.value == ev.SerializeToString()
        assert rows_of(store).empty


def test_unusable_records_are_dead_lettered_with_field_and_reason(
    store: PreferenceStore, send: Sender, kafka_settings: KafkaSettings
) -> None:
    c = [cid() for _ in range(4)]
    other_question = [{"role": "user", "content": "What is the capital of Italy?"}]
    send.completions(
        completion(c[0], "a"),
        completion(c[1], "b", tenant="globex"),
        completion(c[2], "c", question=other_question),
        completion(c[3], "d"),
    )
    send.producer.send(store.settings.completions_topic, key=b"k", value=b"\xff\xff not a protobuf")
    good = event(pairwise=(c[0], c[3], A))
    before = sum(metric("tuneloop_store_dead_letters_total", reason=r) for r in REASONS)
    send.feedback(
        b"\x08\x96\x01 garbage \xff",
        event(pairwise=(c[0], c[1], A)),  # c1 belongs to another tenant
        event(pairwise=(c[0], c[2], B)),  # c2 answers another prompt
        event(ranking=[c[0], c[3], c[2]]),  # the ranking's third answers another prompt
        event(pairwise=(c[0], c[3], A), event_id=""),  # no event id
        good,
    )
    drive(store, lambda: sum(metric("tuneloop_store_dead_letters_total", reason=r) for r in REASONS) - before == 6)
    letters = dead_letters(kafka_settings, store.settings.dlq_topic, 6)
    found = sorted((letter.field, letter.reason.split(" ")[0]) for letter in letters)
    assert found == sorted(
        [
            ("", "not"),
            ("", "not"),
            ("tenant", "feedback"),
            ("pairwise.completion_b_id", "completions"),
            ("ranking.completion_ids[2]", "completions"),
            ("event_id", "required"),
        ]
    )
    garbage = [letter for letter in letters if letter.field == "" and letter.topic == store.settings.completions_topic]
    assert garbage and garbage[0].value == b"\xff\xff not a protobuf"
    tenant = next(letter for letter in letters if letter.field == "tenant")
    assert "globex" in tenant.reason
    # The good event behind them was stored: unusable records block nothing.
    drive(store, lambda: good.event_id in set(rows_of(store)["event_id"]))
    assert len(rows_of(store)) == 1
    assert metric("tuneloop_store_dead_letters_total", reason="tenant_mismatch") >= 1


def test_an_event_sent_twice_is_stored_once_also_after_restart(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender
) -> None:
    c1, c2 = cid(), cid()
    ev = event(pairwise=(c1, c2, B))
    with PreferenceStore(store_settings, kafka_settings) as store:
        send.completions(completion(c1, "x"), completion(c2, "y"))
        send.feedback(ev, ev)
        drive(store, lambda: sum(done_offsets(store).values()) == 2)
        assert len(rows_of(store)) == 1
    send.feedback(ev)
    # Where to resume comes from the tables, not from the group's offsets: a new group
    # (a new deployment) resumes at the same place.
    restarted = store_settings.model_copy(update={"group_id": store_settings.group_id + "-restarted"})
    with PreferenceStore(restarted, kafka_settings) as store:
        drive(store, lambda: sum(done_offsets(store).values()) == 3)
        assert list(rows_of(store)["event_id"]) == [ev.event_id]
        assert len(load_judgements(store.root)) == 1


# --- snapshots and export ---


def test_rows_at_an_older_snapshot_do_not_change(store: PreferenceStore, send: Sender) -> None:
    c = [cid() for _ in range(3)]
    send.completions(*(completion(x, x) for x in c[:2]))
    send.feedback(*(event(pairwise=(c[0], c[1], A)) for _ in range(5)))
    drive(store, lambda: len(rows_of(store)) == 5)
    old = current_snapshot(store.root)
    assert parse_snapshot(snapshot_id(old.version)) == old.version == parse_snapshot(old.id)
    assert old.version == versions(store.root)["pairs"] >= 1
    at_old = load_rows(store.root, old.version)

    # More events, one of them waiting for a completion that comes later.
    late = event(pairwise=(c[0], c[2], TIE))
    send.feedback(late, *(event(pairwise=(c[0], c[1], B)) for _ in range(4)))
    drive(store, lambda: len(load_judgements(store.root)) == 9 and store.pending_count() == 1)
    # The waiting event holds its partition's offset back; the events after it are stored.
    assert len(rows_of(store)) == 9 and sum(done_offsets(store).values()) < 10
    send.completions(completion(c[2], "late"))
    drive(store, lambda: store.pending_count() == 0)

    assert len(load_rows(store.root)) == 10
    pd.testing.assert_frame_equal(load_rows(store.root, old.version), at_old)
    assert load_rows(store.root, -1).empty
    with pytest.raises(ValueError):
        parse_snapshot("tuneloop.feedback.v1@0:12")


def _rows_for_export(store: PreferenceStore, send: Sender) -> pd.DataFrame:
    c = [cid() for _ in range(2)]
    send.completions(completion(c[0], "Paris."), completion(c[1], "It is Lyon, I think."))
    send.feedback(
        event(pairwise=(c[0], c[1], A)), event(pairwise=(c[0], c[1], TIE)), event(pairwise=(c[0], c[1], BOTH_BAD))
    )
    drive(store, lambda: len(rows_of(store)) == 3)
    return rows_of(store)


def test_trl_dataset_in_trl_conversational_preference_format(store: PreferenceStore, send: Sender) -> None:
    from trl.data_utils import apply_chat_template, is_conversational

    from tuneloop.common.tiny_models import tiny_tokenizer

    rows = _rows_for_export(store, send)
    dropped = to_trl_dataset(rows)
    assert len(dropped) == 1 and dropped[0]["label"] == "preference"
    kept = to_trl_dataset(rows, tie_policy="keep", both_bad_policy="keep")
    assert sorted(kept["label"]) == ["both_bad", "preference", "tie"]
    assert len(to_trl_dataset(rows, tie_policy="keep")) == 2
    with pytest.raises(ValueError):
        to_trl_dataset(rows, tie_policy="maybe")  # type: ignore[arg-type]

    example = dropped[0]
    assert is_conversational(example)
    assert example["prompt"] == QUESTION
    assert example["chosen"] == [{"role": "assistant", "content": "Paris."}]
    assert example["rejected"] == [{"role": "assistant", "content": "It is Lyon, I think."}]
    # TRL's own formatting of a conversational preference example (its three columns; the
    # trainers carry the extra columns along).
    text = apply_chat_template({k: example[k] for k in ("prompt", "chosen", "rejected")}, tiny_tokenizer())
    assert text["prompt"].endswith("<|im_start|>assistant\n")
    assert text["chosen"].startswith("Paris.") and text["rejected"].startswith("It is Lyon")


@pytest.mark.heavy
def test_trl_dataset_is_accepted_by_dpo_trainer(store: PreferenceStore, send: Sender, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from tuneloop.common.tiny_models import tiny_tokenizer

    dataset = to_trl_dataset(_rows_for_export(store, send), tie_policy="keep", both_bad_policy="keep")
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tok.pad_token_id,
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        bf16=False,
        report_to=[],
        per_device_train_batch_size=1,
        gradient_checkpointing=False,
        use_cpu=True,
    )
    trainer = DPOTrainer(
        model=LlamaForCausalLM(config),
        ref_model=LlamaForCausalLM(config),
        args=args,
        train_dataset=dataset,
        processing_class=tok,
    )
    assert len(trainer.train_dataset) == 3
    tokenized = trainer.train_dataset[0]
    assert tokenized["prompt_ids"] and tokenized["chosen_ids"] and tokenized["rejected_ids"]
    assert tok.decode(tokenized["chosen_ids"]).startswith("Paris.")
    assert trainer.train_dataset["label"] == dataset["label"]


def test_raw_prompts_export_in_standard_format(store: PreferenceStore, send: Sender) -> None:
    c1, c2 = cid(), cid()
    send.completions(completion(c1, " blue.", raw="The sky is"), completion(c2, " green.", raw="The sky is"))
    send.feedback(event(pairwise=(c1, c2, A)))
    drive(store, lambda: len(rows_of(store)) == 1)
    (example,) = to_trl_dataset(rows_of(store))
    assert (example["prompt"], example["chosen"], example["rejected"]) == ("The sky is", " blue.", " green.")


def test_cli_export_and_report(store: PreferenceStore, send: Sender, tmp_path: Path) -> None:
    from datasets import load_from_disk

    _rows_for_export(store, send)
    snap = current_snapshot(store.root).id
    runner = CliRunner()
    out = tmp_path / "export"
    done = runner.invoke(
        cli, ["export", "--root", str(store.root), "--snapshot", snap, "--out", str(out), "--tie-policy", "keep"]
    )
    assert done.exit_code == 0, done.output
    assert sorted(load_from_disk(str(out))["label"]) == ["preference", "tie"]
    assert json.loads((out / "snapshot.json").read_text())["snapshot"] == snap
    wrong = runner.invoke(
        cli, ["export", "--root", str(store.root), "--snapshot", "other.topic@0:1", "--out", str(out)]
    )
    assert wrong.exit_code != 0

    done = runner.invoke(
        cli, ["report", "--tenant", "acme", "--root", str(store.root), "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]
    )
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "r.json").read_text())
    # One annotator judged the one item three times: nothing to compare, so no kappa.
    assert report["items"] == 0 and report["kappa"] is None and report["annotators"][0]["annotator_id"] == "ann-1"
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("annotator_id,anchors")


def test_agreement_report_over_the_stored_judgements(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender
) -> None:
    settings = store_settings.model_copy(update={"agreement_interval_s": 0.01})
    with PreferenceStore(settings, kafka_settings) as store:
        _agreement_checks(store, send)


def _agreement_checks(store: PreferenceStore, send: Sender) -> None:
    c = [cid() for _ in range(4)]
    send.completions(*(completion(x, x) for x in c))
    item1, item2 = (c[0], c[1]), (c[2], c[3])
    send.feedback(
        event(pairwise=(*item1, A), annotator="ann-1", calibration=True),
        event(pairwise=(item1[1], item1[0], B), annotator="ann-2", calibration=True),  # same verdict, shown swapped
        event(pairwise=(*item2, A), annotator="ann-1"),
        event(pairwise=(*item2, B), annotator="ann-2"),
        event(pairwise=(*item2, TIE), annotator="ann-3", project="other"),
    )
    # Attacker: another tenant's annotators judge the same item ids (and name themselves
    # like acme's); acme's figures must not move.
    g = [cid() for _ in range(2)]
    send.completions(*(completion(x, x, tenant="globex") for x in g))
    send.feedback(*(event(pairwise=(g[0], g[1], TIE), annotator=a, tenant="globex", item_id="|".join(sorted(item)))
                    for a in ("ann-1", "ann-2", "ann-4") for item in (item1, item2)))
    drive(store, lambda: len(load_judgements(store.root)) == 11)
    everything = agreement.report(store.root, "acme")
    assert (everything.items, everything.judgements, everything.annotators) == (2, 5, 3)
    assert everything.kappa_method == "fleiss"
    assert everything.percent_agreement == pytest.approx((1.0 + 0.0) / 2)
    calibration = agreement.report(store.root, "acme", calibration_only=True)
    assert (calibration.items, calibration.percent_agreement, calibration.kappa_method) == (1, 1.0, "cohen")
    assert agreement.report(store.root, "acme", project="other").items == 0
    assert agreement.report(store.root, "globex").percent_agreement == 1.0

    # Item 1 becomes an anchor whose known answer is c0: both annotators who judged it were right.
    (Path(store.root) / "anchors.json").write_text(json.dumps({"answers": {"|".join(sorted(item1)): c[0]}}))
    quality = {q.annotator_id: q for q in agreement.report(store.root, "acme").annotators_quality}
    assert (quality["ann-1"].anchors, quality["ann-1"].anchor_accuracy) == (1, 1.0)
    assert (quality["ann-2"].anchors, quality["ann-2"].anchor_accuracy) == (1, 1.0)
    assert quality["ann-3"].anchors == 0
    # The store's gauges follow the judgements (recomputed at most once an interval).
    drive(store, lambda: metric("tuneloop_store_anchor_accuracy", tenant="acme", annotator="ann-2") == 1.0)
    assert metric("tuneloop_store_percent_agreement", tenant="acme") == pytest.approx(0.5)
    assert metric("tuneloop_store_percent_agreement", tenant="globex") == 1.0


# --- exactly once across kill -9, one writer or two ---


def _store_env(kafka: KafkaSettings, settings: StoreSettings) -> dict[str, str]:
    return {
        "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "TUNELOOP_STORE_ROOT": str(settings.root),
        "TUNELOOP_STORE_FEEDBACK_TOPIC": settings.feedback_topic,
        "TUNELOOP_STORE_COMPLETIONS_TOPIC": settings.completions_topic,
        "TUNELOOP_STORE_DLQ_TOPIC": settings.dlq_topic,
        "TUNELOOP_STORE_GROUP_ID": settings.group_id,
        "TUNELOOP_STORE_BATCH_MAX_RECORDS": "7",
        "TUNELOOP_STORE_BATCH_LINGER_S": "0.05",
    }


@pytest.mark.parametrize("replicas", [1, 2], ids=["one-writer", "two-writers-four-partitions"])
def test_exactly_once_across_kill_9(
    replicas: int, store_settings: StoreSettings, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """Writers are killed -9 while the stream flows (mid-batch, mid-commit) and restarted;
    with two, they share four partitions in one consumer group and the survivor takes the
    killed one's partitions over. Every event ends up stored exactly once."""
    root = store_settings.root
    ensure_topics(
        kafka_settings.model_copy(update={"partitions": 4}),
        [store_settings.feedback_topic, store_settings.completions_topic, store_settings.dlq_topic],
    )
    env = _store_env(kafka_settings, store_settings)
    sender = Sender(kafka_settings, store_settings)
    completions = [cid() for _ in range(8)]
    events = [event(pairwise=(completions[i % 4], completions[4 + i % 4], A if i % 3 else B)) for i in range(600)]
    stop = threading.Event()

    def produce() -> None:
        # The stream keeps flowing while writers are killed and restarted.
        for i in range(0, len(events), 10):
            if stop.is_set():
                return
            sender.feedback(*events[i : i + 10])
            time.sleep(0.05)

    def judgements_version() -> int:
        return versions(root)["judgements"]

    stores = [ServiceProcess("store", env=env, log_dir=tmp_path / f"w{i}") for i in range(replicas)]
    for store in stores:
        store.start(timeout=120)
    sender.completions(*(completion(x, x) for x in completions))
    producer = threading.Thread(target=produce)
    producer.start()
    try:
        for kill in range(2):
            victim = kill % replicas
            seen = judgements_version()
            deadline = time.monotonic() + 120
            while judgements_version() < seen + 3:
                assert time.monotonic() < deadline, stores[victim].log_tail()
                time.sleep(0.01)
            # Land anywhere in the next batch: collecting, writing Parquet, or committing.
            time.sleep(random.uniform(0, 0.05))
            stores[victim].kill()
            stores[victim] = ServiceProcess("store", env=env, log_dir=tmp_path / f"w{victim}-{kill}")
            stores[victim].start(timeout=120)
        producer.join()
        deadline = time.monotonic() + 180
        while len(load_judgements(root)) < len(events):
            assert time.monotonic() < deadline, "\n".join(s.log_tail() for s in stores)
            time.sleep(0.2)
        for store in stores:
            assert store.stop() == 0
    finally:
        stop.set()
        producer.join()
        for store in stores:
            store.kill()
        sender.producer.close()

    rows, judgements = load_rows(root), load_judgements(root)
    sent = sorted(e.event_id for e in events)
    assert sorted(rows["event_id"]) == sent, "every event stored exactly once"
    assert sorted(judgements["event_id"]) == sent
    assert rows["row_id"].is_unique
    topic = store_settings.feedback_topic
    done = current_snapshot(root, [topic]).offsets[topic]
    if replicas > 1:
        assert len(done) == 4 and set(rows["partition"]) == {0, 1, 2, 3}
    # The group's committed offsets mirror the tables' once the writers stop cleanly.
    reader = KafkaConsumer(
        bootstrap_servers=kafka_settings.bootstrap_servers, group_id=store_settings.group_id, enable_auto_commit=False
    )
    try:
        committed = {p: reader.committed(TopicPartition(topic, p)) for p in done}
    finally:
        reader.close(autocommit=False)
    assert committed == done


def test_a_store_stopped_while_its_group_waits_for_a_killed_member_exits_promptly(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender, tmp_path: Path
) -> None:
    """A writer killed -9 stays in the group until its session expires (45 s); a new writer's
    JoinGroup waits for it, and a SIGTERM in that window must still end the process cleanly
    well within a pod's grace period (the LeaveGroup queues behind that JoinGroup)."""
    env = _store_env(kafka_settings, store_settings)
    first = ServiceProcess("store", env=env, log_dir=tmp_path / "first").start(timeout=120)
    second = None
    try:
        c = [cid() for _ in range(2)]
        send.completions(*(completion(x, x) for x in c))
        send.feedback(event(pairwise=(c[0], c[1], A)))
        deadline = time.monotonic() + 60
        while len(load_judgements(store_settings.root)) < 1:  # the first writer owns the partitions
            assert time.monotonic() < deadline, first.log_tail()
            time.sleep(0.1)
        first.kill()
        second = ServiceProcess("store", env=env, log_dir=tmp_path / "second").start(timeout=120)
        time.sleep(2)  # its first poll has sent the JoinGroup the coordinator now holds
        began = time.monotonic()
        assert second.stop(timeout=20) == 0, second.log_tail()
        assert time.monotonic() - began < 15
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_a_reader_holding_a_version_sees_the_same_rows_while_writes_go_on(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender, tmp_path: Path
) -> None:
    """Another process reads version v through the read API while the store appends."""
    c = [cid() for _ in range(2)]
    with PreferenceStore(store_settings, kafka_settings) as store:
        send.completions(*(completion(x, x) for x in c))
        send.feedback(*(event(pairwise=(c[0], c[1], A)) for _ in range(20)))
        drive(store, lambda: len(rows_of(store)) == 20)
        held = current_snapshot(store.root)
        script = (
            "import sys, time; from tuneloop.store.read import load_rows\n"
            "root, version = sys.argv[1], int(sys.argv[2])\n"
            "counts = set()\n"
            "end = time.monotonic() + 6\n"
            "while time.monotonic() < end: counts.add(len(load_rows(root, version)))\n"
            "print(sorted(counts))\n"
        )
        reader = subprocess.Popen(
            [sys.executable, "-c", script, str(store.root), str(held.version)], stdout=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while reader.poll() is None:
            send.feedback(event(pairwise=(c[0], c[1], B)))
            store.step()
            assert time.monotonic() < deadline
        out, _ = reader.communicate()
        assert reader.returncode == 0
        assert out.strip() == "[20]"
        assert len(rows_of(store)) > 20 and current_snapshot(store.root).version > held.version


def test_training_keeps_each_judges_latest_answer_per_item(store: PreferenceStore, send: Sender) -> None:
    """An annotator who answers the same item again replaces their answer (repeating it 20
    times adds no weight); other annotators and other tenants keep theirs."""
    from tuneloop.store.read import latest_judgement_rows

    c = [cid() for _ in range(2)]
    g = [cid() for _ in range(2)]
    send.completions(*(completion(x, x) for x in c), *(completion(x, x, tenant="globex") for x in g))
    send.feedback(*(event(pairwise=(c[0], c[1], A)) for _ in range(20)))
    send.feedback(event(pairwise=(c[0], c[1], B)), event(pairwise=(c[0], c[1], A), annotator="ann-2"),
                  event(pairwise=(g[0], g[1], A), tenant="globex"))
    drive(store, lambda: len(rows_of(store)) == 23)
    kept = latest_judgement_rows(rows_of(store))
    assert sorted(zip(kept["tenant"], kept["annotator_id"], kept["chosen_id"], strict=True)) == sorted(
        [("acme", "ann-1", c[1]), ("acme", "ann-2", c[0]), ("globex", "ann-1", g[0])])


def test_duckdb_reads_the_same_tables_as_the_readme_shows(store: PreferenceStore, send: Sender) -> None:
    import duckdb
    from deltalake import DeltaTable

    _rows_for_export(store, send)
    pairs = DeltaTable(str(Path(store.root) / "pairs")).to_pyarrow_dataset()  # noqa: F841 (read by DuckDB)
    counted = dict(duckdb.sql("SELECT label, count(*) AS n FROM pairs GROUP BY label").fetchall())
    assert counted == rows_of(store)["label"].value_counts().to_dict() == {"preference": 1, "tie": 1, "both_bad": 1}


def test_waiting_feedback_is_bounded_and_reading_goes_on_once_it_joins(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender
) -> None:
    """One partition holds all three: the first waits, the other two were already fetched
    when the partition paused, and must be read once it resumes."""
    settings = store_settings.model_copy(update={"pending_max": 1, "batch_max_records": 1})
    c = [cid() for _ in range(2)]
    with PreferenceStore(settings, kafka_settings) as store:
        send.feedback(*(event(pairwise=(c[0], c[1], A), item_id="one-key") for _ in range(3)))
        drive(store, lambda: store.pending_count() == 1)
        for _ in range(5):  # feedback partitions are paused: nothing more is read
            store.step()
            # (A rebalance may drop the waiting event and read it again: never more than one.)
            assert store.pending_count() <= 1 and rows_of(store).empty
        send.completions(*(completion(x, x) for x in c))
        drive(store, lambda: len(rows_of(store)) == 3)
        assert store.pending_count() == 0


def test_one_tenant_cannot_fill_the_waiting_room(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender
) -> None:
    """Attacker: globex floods feedback naming completions that never come. Its oldest waiting
    events beyond its share are dead-lettered; acme's waiting event is kept and joins."""
    settings = store_settings.model_copy(update={"pending_max": 4, "pending_max_per_tenant": 2})
    c = [cid() for _ in range(2)]
    flood = [event(pairwise=(cid(), cid(), A), tenant="globex", item_id="flood") for _ in range(5)]
    mine = event(pairwise=(c[0], c[1], A))
    with PreferenceStore(settings, kafka_settings) as store:
        send.feedback(*flood, mine)
        drive(store, lambda: metric("tuneloop_store_dead_letters_total", reason="pending_limit") >= 3
              and store.pending_count() == 3)
        send.completions(*(completion(x, x) for x in c))
        drive(store, lambda: mine.event_id in set(load_judgements(store.root)["event_id"]))
    letters = dead_letters(kafka_settings, settings.dlq_topic, 3)
    shed = [feedback_pb2.FeedbackEvent.FromString(letter.value).event_id for letter in letters
            if letter.reason.startswith("tenant globex has more than 2")]
    assert shed == [e.event_id for e in flood[:3]], "the oldest go first"


def test_a_backlog_whose_completions_are_still_to_read_is_not_shed(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender
) -> None:
    """A store catching up reads one tenant's feedback ahead of the completions it names
    (here: the completions partitions held paused). Those events are past the tenant's share of
    the waiting room, but their completions are in the log: they wait and join, none is shed."""
    settings = store_settings.model_copy(update={"pending_max_per_tenant": 2})
    c = [cid() for _ in range(10)]
    backlog = [event(pairwise=(c[i], c[i + 1], A), item_id=f"backlog-{i}") for i in range(0, 10, 2)]
    shed_before = metric("tuneloop_store_dead_letters_total", reason="pending_limit")
    with PreferenceStore(settings, kafka_settings) as store:
        drive(store, lambda: any(tp.topic == settings.completions_topic for tp in store.consumer.assignment()))
        held = [tp for tp in store.consumer.assignment() if tp.topic == settings.completions_topic]
        store.consumer.pause(*held)
        send.completions(*(completion(x, x) for x in c))
        send.feedback(*backlog)
        drive(store, lambda: store.pending_count() == len(backlog))
        for _ in range(3):
            store.step()
        assert store.pending_count() == len(backlog), "past the tenant's share, and all kept"
        store.consumer.resume(*held)
        drive(store, lambda: len(rows_of(store)) == len(backlog))
        assert metric("tuneloop_store_dead_letters_total", reason="pending_limit") == shed_before


def test_waiting_feedback_is_bounded_in_bytes_and_reading_goes_on_once_it_joins(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender
) -> None:
    """The count bound is far away (pending_max 10000); the byte bound, one event's size, pauses
    feedback once the first event waits: without it all three would wait."""
    c = [cid() for _ in range(2)]
    events = [event(pairwise=(c[0], c[1], A), item_id="one-key") for _ in range(3)]
    one_event = min(len(e.SerializeToString()) for e in events)
    settings = store_settings.model_copy(update={"pending_max_bytes": one_event, "batch_max_records": 1})
    with PreferenceStore(settings, kafka_settings) as store:
        send.feedback(*events)
        drive(store, lambda: store.pending_count() == 1)
        for _ in range(5):  # feedback partitions are paused: nothing more is read
            store.step()
            assert store.pending_count() <= 1 and rows_of(store).empty
            assert store.pending_bytes() <= one_event + 8  # timestamps' varints differ by a few bytes
        send.completions(*(completion(x, x) for x in c))
        drive(store, lambda: len(rows_of(store)) == 3)
        assert store.pending_count() == 0 and store.pending_bytes() == 0


def test_one_tenants_large_events_cannot_fill_the_waiting_room(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender
) -> None:
    """Attacker: globex sends few but large events naming completions that never come. Far below
    the per-tenant count (1000), its oldest is dead-lettered once its bytes pass the per-tenant
    byte bound; acme's small waiting event is kept and joins."""
    c = [cid() for _ in range(2)]
    flood = [event(pairwise=(cid(), cid(), A), tenant="globex", item_id="flood", comment="x" * 4000)
             for _ in range(3)]
    mine = event(pairwise=(c[0], c[1], A))
    limit = 10_000  # two of globex's events fit, three do not
    settings = store_settings.model_copy(update={"pending_max_bytes_per_tenant": limit})
    with PreferenceStore(settings, kafka_settings) as store:
        send.feedback(*flood, mine)
        drive(store, lambda: metric("tuneloop_store_dead_letters_total", reason="pending_limit") >= 1
              and store.pending_count() == 3)
        for _ in range(3):
            store.step()
        assert store.pending_count() == 3, "only globex's oldest went"
        assert 2 * 4000 < store.pending_bytes() < limit
        send.completions(*(completion(x, x) for x in c))
        drive(store, lambda: mine.event_id in set(load_judgements(store.root)["event_id"]))
    letters = dead_letters(kafka_settings, settings.dlq_topic, 1)
    shed = [feedback_pb2.FeedbackEvent.FromString(letter.value).event_id for letter in letters
            if letter.reason.startswith(f"tenant globex has more than {limit} bytes")]
    assert shed == [flood[0].event_id], "the oldest goes first, and only it"
    assert all(letter.field == "tenant" for letter in letters)


# --- a commit that fails: written by halves, the record no commit takes dead-lettered ---


class _RefusingTable:
    """A table that refuses every commit holding a row of a `bad` record (or every commit),
    and checks at each commit it takes that no version passes a record still to be written."""

    def __init__(self, rows: list[dict], bad: set[Source] = frozenset(), refuse_all: bool = False) -> None:
        self.sources = {source_of(row) for row in rows}
        self.bad, self.refuse_all = bad, refuse_all
        self.rows: list[dict] = []
        self.given_up: list[Source] = []
        self.versions: dict[tuple[str, int], int] = {}

    def write(self, rows: list[dict], versions: dict[tuple[str, int], int], force: bool) -> None:
        if self.refuse_all or any(source_of(row) in self.bad for row in rows):
            raise WriteFailed("refused")
        self.rows += rows
        done = {source_of(row) for row in self.rows} | set(self.given_up)
        for topic, partition, offset in self.sources - done:
            assert versions.get((topic, partition), 0) <= offset, f"version passed unwritten {offset}"
        for key, version in versions.items():
            assert version >= self.versions.get(key, 0), "a version went back"
        self.versions.update(versions)

    def give_up(self, source: Source, err: WriteFailed) -> None:
        assert source in self.bad and source not in self.given_up
        self.given_up.append(source)


def _rows_of_records(*sources: Source) -> list[dict]:
    return [{"topic": t, "partition": p, "offset": o, "n": n} for t, p, o in sources for n in range(2)]


def test_a_failed_commit_is_written_by_halves_and_versions_never_pass_an_unwritten_record() -> None:
    """Two bad records on two partitions, rows behind a record still waiting (f/0 at 15, so its
    version stays 15), a partition with no rows: every good row once, each bad record given up
    once, and the last versions are the batch's."""
    sources = [("f", 0, o) for o in (10, 11, 12, 13, 14, 16, 17)] + [("f", 1, o) for o in range(3, 7)]
    rows = _rows_of_records(*reversed(sources))
    versions = {("f", 0): 15, ("f", 1): 7, ("f", 2): 9}
    table = _RefusingTable(rows, bad={("f", 0, 12), ("f", 1, 5)})
    append_by_halves(table.write, rows, versions, table.give_up)
    written = [source_of(row) for row in table.rows]
    assert sorted(written) == sorted(s for s in sources if s not in table.bad for _ in range(2))
    assert sorted(table.given_up) == sorted(table.bad)
    assert table.versions == versions


def test_a_table_that_refuses_every_commit_gives_no_record_up() -> None:
    """The table, not a record, is at fault: the commit of no rows fails too, and nothing is
    dead-lettered (the store stops and resumes from the tables)."""
    rows = _rows_of_records(("f", 0, 1), ("f", 0, 2), ("f", 0, 3))
    table = _RefusingTable(rows, refuse_all=True)
    with pytest.raises(WriteFailed):
        append_by_halves(table.write, rows, {("f", 0): 4}, table.give_up)
    assert table.given_up == [] and table.rows == []


class _Unwritable(Exception):
    """What the mocked Delta writer raises for the marked event's rows."""


@pytest.mark.parametrize("refusing_table", ["pairs", "judgements"])
def test_a_record_no_commit_takes_is_dead_lettered_and_the_rest_land_once_mocked_writer(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender, monkeypatch: pytest.MonkeyPatch,
    refusing_table: str,
) -> None:
    """No value was found that arrow and Delta both accept in a row but refuse in a commit, so
    the store's Delta writer is mocked: it refuses every commit holding the rows of one event
    (item "unwritable") in one table. The batch is written by halves: every other event lands
    once, the refused one is on the dead-letter topic with the reason, and the versions pass
    every record, so a restart with a working writer stores nothing again and nothing more."""
    real_append = store_consumer.append
    column = {"pairs": "row_id", "judgements": "choice"}[refusing_table]

    def refusing(table: object, rows: object, versions: object, commit_id: str | None = None) -> None:
        if column in rows.column_names and "unwritable" in rows.column("item_id").to_pylist():
            raise _Unwritable("this row cannot be written")
        real_append(table, rows, versions, commit_id)

    monkeypatch.setattr(store_consumer, "append", refusing)
    c = [cid() for _ in range(2)]
    good = [event(pairwise=(c[0], c[1], A), item_id=f"item-{n}") for n in range(7)]
    bad = event(pairwise=(c[0], c[1], B), item_id="unwritable")
    refused_before = metric("tuneloop_store_dead_letters_total", reason="write_failed")
    with PreferenceStore(store_settings, kafka_settings) as store:
        send.completions(*(completion(x, x) for x in c))
        send.feedback(*good[:3], bad, *good[3:])
        good_ids = {e.event_id for e in good}
        drive(store, lambda: good_ids <= set(load_judgements(store.root)["event_id"])
              and metric("tuneloop_store_dead_letters_total", reason="write_failed") > refused_before)
        ends = {tp.partition: store.consumer.highwater(tp) for tp in store.consumer.assignment()
                if tp.topic == store_settings.feedback_topic}
    assert sorted(load_judgements(store_settings.root)["event_id"]) == sorted(good_ids)
    rows = rows_of(store)
    stored_rows = sorted(good_ids) + ([bad.event_id] if refusing_table == "judgements" else [])
    assert sorted(rows["event_id"]) == sorted(stored_rows), "pairs are written before judgements"
    letters = [letter for letter in dead_letters(kafka_settings, store_settings.dlq_topic, 1)
               if letter.reason.startswith("write_failed: ")]
    assert len(letters) == 1
    assert letters[0].reason.startswith(f"write_failed: _Unwritable: the {refusing_table} table refused its rows")
    assert feedback_pb2.FeedbackEvent.FromString(letters[0].value).event_id == bad.event_id
    assert {p: o for p, o in done_offsets(store).items() if ends.get(p)} == {p: o for p, o in ends.items() if o}

    monkeypatch.setattr(store_consumer, "append", real_append)
    with PreferenceStore(store_settings, kafka_settings) as again:
        topic = store_settings.feedback_topic
        drive(again, lambda: all(again.positions.get((topic, p)) == end for p, end in ends.items() if end))
        for _ in range(3):
            again.step()
    assert sorted(load_judgements(store_settings.root)["event_id"]) == sorted(good_ids)
    assert sorted(rows_of(again)["event_id"]) == sorted(stored_rows)


def test_the_store_on_object_storage_joins_and_another_process_reads_the_version(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender, s3: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An s3:// root on a real S3-compatible server (moto): delta-rs takes its endpoint,
    credentials and conditional PUT from the AWS_* environment, as the chart sets it."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    settings = store_settings.model_copy(update={"root": s3.uri("store")})
    c = [cid() for _ in range(2)]
    with PreferenceStore(settings, kafka_settings) as store:
        send.completions(*(completion(x, x) for x in c))
        send.feedback(event(pairwise=(c[0], c[1], A)), event(pairwise=(c[0], c[1], TIE)))
        drive(store, lambda: len(load_rows(settings.root)) == 2)
    assert not list(Path(".").glob("s3:*")), "nothing written to a local folder named like the URL"
    assert any(key.endswith(".parquet") for key in s3.list_keys(settings.root + "/pairs"))
    version = current_snapshot(settings.root).version
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from tuneloop.store.read import load_rows; "
         "print(sorted(load_rows(sys.argv[1], int(sys.argv[2]))['label']))", settings.root, str(version)],
        env={**os.environ, **s3.env}, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['preference', 'tie']"


# --- no record stops the store (property test on the real broker) ---

_TEXT = st.text(max_size=30)


@st.composite
def _hostile_event(draw: st.DrawFn, known: list[str]) -> feedback_pb2.FeedbackEvent:
    """Well-formed protobufs whose values are anything the wire allows."""
    some_id = st.one_of(st.sampled_from(known), _TEXT)
    ev = feedback_pb2.FeedbackEvent(
        event_id=draw(st.one_of(st.just(uuid.uuid4().hex), _TEXT)),
        tenant=draw(st.one_of(st.just("acme"), _TEXT)),
        annotator_id=draw(st.one_of(st.just("ann-1"), _TEXT)),
        source=draw(st.integers(-(2**31), 2**31 - 1)),
        project=draw(_TEXT),
        item_id=draw(_TEXT),
        calibration=draw(st.booleans()),
        anchor=draw(st.booleans()),
    )
    ev.criteria.extend(draw(st.lists(_TEXT, max_size=3)))
    ev.created_at.seconds = draw(st.integers(-(2**63), 2**63 - 1))
    ev.created_at.nanos = draw(st.integers(-(2**31), 2**31 - 1))
    kind = draw(st.sampled_from(["pairwise", "rating", "ranking"]))
    if kind == "pairwise":
        ev.pairwise.completion_a_id, ev.pairwise.completion_b_id = draw(some_id), draw(some_id)
        ev.pairwise.choice = draw(st.integers(-(2**31), 2**31 - 1))
    elif kind == "rating":
        ev.rating.completion_id = draw(some_id)
        ev.rating.score = draw(st.floats(allow_nan=True, allow_infinity=True))
        ev.rating.scale_min = draw(st.floats(allow_nan=True, allow_infinity=True))
        ev.rating.scale_max = draw(st.floats(allow_nan=True, allow_infinity=True))
    else:
        ev.ranking.completion_ids.extend(draw(st.lists(some_id, max_size=6)))
    return ev


@st.composite
def _hostile_completion(draw: st.DrawFn) -> completion_pb2.CompletionRecord:
    rec = completion(cid(), draw(_TEXT), tenant=draw(st.one_of(st.just("acme"), _TEXT)),
                     request_id=draw(_TEXT), version=draw(_TEXT))
    rec.created_at.seconds = draw(st.integers(-(2**63), 2**63 - 1))
    rec.prompt_tokens = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        rec.prompt.chat.messages.add(role=draw(_TEXT), content=draw(_TEXT))
    return rec


def test_no_record_stops_the_store_and_valid_ones_are_kept(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender
) -> None:
    """Arbitrary bytes and hostile protobufs on both topics, then a valid event: the store
    never raises, the valid event is stored, and every other record ends up stored, skipped or
    dead-lettered (nothing left waiting, every partition read to its end)."""
    settings = store_settings.model_copy(update={"join_timeout_s": 0.5})
    known = [cid() for _ in range(2)]
    with PreferenceStore(settings, kafka_settings) as store:
        send.completions(*(completion(x, x) for x in known))

        @hypothesis.settings(max_examples=15, deadline=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(
            feedback=st.lists(st.one_of(st.binary(max_size=64), _hostile_event(known)), max_size=6),
            completions=st.lists(st.one_of(st.binary(max_size=64), _hostile_completion()), max_size=3),
        )
        def hostile(feedback: list, completions: list) -> None:
            for c in completions:
                raw = c if isinstance(c, bytes) else c.SerializeToString()
                send.producer.send(settings.completions_topic, key=b"k", value=raw)
            send.feedback(*feedback)
            valid = event(pairwise=(known[0], known[1], A))
            send.feedback(valid)
            drive(store, lambda: valid.event_id in set(load_judgements(store.root)["event_id"])
                  and store.pending_count() == 0, timeout_s=60)

        hostile()
        ends = {(tp.topic, tp.partition): store.consumer.highwater(tp) for tp in store.consumer.assignment()}
        drive(store, lambda: all(store.positions.get(k) == end for k, end in ends.items() if end), timeout_s=60)
