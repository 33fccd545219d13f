"""Whether each answer of a pair was cut at the token limit, against a real broker: the
store keeps the completion's finish_reason and writes chosen_cut/rejected_cut of it, and a
table written before those columns existed is still read and appended to."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from tests.support.store import QUESTION, Sender, cid, completion, drive, event, rows_of
from tuneloop.common.kafka import KafkaSettings
from tuneloop.store.consumer import PreferenceStore
from tuneloop.store.read import load_completions, load_rows
from tuneloop.store.settings import StoreSettings
from tuneloop.store.tables import (
    ADDED_COLUMNS,
    COMPLETIONS,
    PAIRS,
    SCHEMAS,
    TABLES,
    ensure_tables,
    open_table,
    table_uri,
)
from tuneloop.trainer.config import PreferenceSource
from tuneloop.trainer.data import load_preferences, to_dpo_dataset
from tuneloop.v1 import completion_pb2, feedback_pb2

A, B = feedback_pb2.PAIRWISE_CHOICE_A, feedback_pb2.PAIRWISE_CHOICE_B
STOP, LENGTH, ABORTED = (
    completion_pb2.FINISH_REASON_STOP,
    completion_pb2.FINISH_REASON_LENGTH,
    completion_pb2.FINISH_REASON_ABORTED,
)


def ended(completion_id: str, text: str, reason: int, request_id: str = "req-1") -> completion_pb2.CompletionRecord:
    record = completion(completion_id, text, request_id=request_id)
    record.completion.finish_reason = reason  # type: ignore[assignment]
    return record


def cuts(store: PreferenceStore) -> dict[tuple[str, str], tuple[bool | None, bool | None]]:
    rows = rows_of(store)
    return {(r["chosen_id"], r["rejected_id"]): (r["chosen_cut"], r["rejected_cut"]) for r in rows.to_dict("records")}


def test_the_store_writes_chosen_cut_and_rejected_cut_from_finish_reason(
    store: PreferenceStore, send: Sender
) -> None:
    full, cut, aborted, unsaid = cid(), cid(), cid(), cid()
    send.completions(
        ended(full, "Paris.", STOP),
        ended(cut, "The capital of France is a city that", LENGTH),
        ended(aborted, "Par", ABORTED),
        completion(unsaid, "Paris, of course."),  # finish_reason unspecified
    )
    send.feedback(
        event(pairwise=(full, cut, A)),
        event(pairwise=(full, cut, B)),
        event(pairwise=(aborted, unsaid, A)),
        event(pairwise=(unsaid, full, A)),
    )
    drive(store, lambda: len(rows_of(store)) == 4)

    assert cuts(store) == {
        (full, cut): (False, True),
        (cut, full): (True, False),
        # Only the token limit counts as cut; an answer that did not say is unknown.
        (aborted, unsaid): (False, None),
        (unsaid, full): (None, False),
    }
    table = open_table(store.root, COMPLETIONS).to_pyarrow_dataset()  # type: ignore[union-attr]
    reasons = {r["completion_id"]: r["finish_reason"] for r in table.to_table().to_pylist()}
    assert reasons == {full: "stop", cut: "length", aborted: "aborted", unsaid: None}


def test_completions_read_back_from_the_table_keep_their_finish_reason(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender
) -> None:
    """Feedback joined by a store that did not read the completions itself (a restart, or another
    replica) looks them up in the completions table."""
    full, cut = cid(), cid()
    with PreferenceStore(store_settings, kafka_settings) as first:
        send.completions(ended(full, "Paris.", STOP), ended(cut, "The capital is", LENGTH))
        drive(first, lambda: len(load_completions(first.root)) == 2)
    with PreferenceStore(store_settings, kafka_settings) as second:
        assert not second._completions  # nothing cached: the join reads the table
        send.feedback(event(pairwise=(full, cut, A)))
        drive(second, lambda: len(rows_of(second)) == 1)
        assert cuts(second) == {(full, cut): (False, True)}


# --- a table written before the columns were added ---


def _old_schema(name: str) -> pa.Schema:
    return pa.schema([f for f in SCHEMAS[name] if f.name not in ADDED_COLUMNS[name]])


def _old_pair_row() -> dict:
    return {
        "row_id": "old-event#0", "event_id": "old-event", "source_event_ids": ["old-event"], "item_id": "item-old",
        "tenant": "acme", "project": "", "source": "annotator", "annotator_id": "ann-old", "kind": "pairwise",
        "rule": "pairwise", "label": "preference", "prompt": QUESTION, "prompt_raw": "",
        "rendered_prompt": "<rendered old>", "chosen": "An old, long and complete answer.",
        "rejected": "Short.", "chosen_id": "old-a", "rejected_id": "old-b", "chosen_model": "policy@v0001",
        "rejected_model": "policy@v0001", "criteria": [], "weight": 1.0, "calibration": False, "anchor": False,
        "created_at": None, "topic": "an.older.feedback.topic", "partition": 0, "offset": 0,
    }


def _old_tables(root: Path) -> int:
    """The three tables as the store wrote them before chosen_cut, rejected_cut and
    finish_reason, one pair row in; the pairs table's version."""
    for name in TABLES:
        DeltaTable.create(table_uri(root, name), _old_schema(name), name=name,
                          configuration={"delta.enableChangeDataFeed": "true"})
    pairs = open_table(root, PAIRS)
    assert pairs is not None
    write_deltalake(pairs, pa.Table.from_pylist([_old_pair_row()], schema=_old_schema(PAIRS)), mode="append")
    return pairs.version()


def test_a_table_without_the_columns_is_read_and_appended_to(
    store_settings: StoreSettings, kafka_settings: KafkaSettings, send: Sender
) -> None:
    old_version = _old_tables(store_settings.root)
    # Before any store of the new schema opened it: read as it is, the new columns null.
    before = load_rows(store_settings.root)
    assert list(before["row_id"]) == ["old-event#0"] and before["chosen_cut"].isna().all()

    with PreferenceStore(store_settings, kafka_settings) as store:
        for name in (PAIRS, COMPLETIONS):
            have = {f.name for f in open_table(store.root, name).schema().fields}  # type: ignore[union-attr]
            assert set(ADDED_COLUMNS[name]) <= have
        full, cut = cid(), cid()
        send.completions(ended(full, "Paris.", STOP), ended(cut, "The capital is", LENGTH))
        send.feedback(event(pairwise=(cut, full, B)))
        drive(store, lambda: len(rows_of(store)) == 2)

        rows = {r["row_id"]: r for r in rows_of(store).to_dict("records")}
        assert rows["old-event#0"]["chosen"] == "An old, long and complete answer."
        assert rows["old-event#0"]["chosen_cut"] is None and rows["old-event#0"]["rejected_cut"] is None
        (new,) = [r for r in rows.values() if r["row_id"] != "old-event#0"]
        assert (new["chosen_id"], new["chosen_cut"], new["rejected_cut"]) == (full, False, True)

    # The version written before the change still reads, with the same columns as the newest.
    at_old = load_rows(store_settings.root, old_version)
    assert list(at_old["row_id"]) == ["old-event#0"]
    assert list(at_old.columns) == list(load_rows(store_settings.root).columns)

    # A second store on the evolved tables changes nothing more about them.
    version = open_table(store_settings.root, PAIRS).version()  # type: ignore[union-attr]
    with PreferenceStore(store_settings, kafka_settings):
        assert open_table(store_settings.root, PAIRS).version() == version  # type: ignore[union-attr]

    # The trainer reads the mixed table: the old row does not say, so no rule drops it as cut.
    source = PreferenceSource(store_root=str(store_settings.root), tenants=["acme"])
    data = load_preferences(source)
    assert len(to_dpo_dataset(data)) == 1  # the new pair's rejected answer was cut
    assert data.summary is not None and data.summary["dropped"]["cut"] == 1
    assert data.summary["cut_in_trained"] == {"chosen": 0, "rejected": 0, "unknown": 1}
    assert len(to_dpo_dataset(load_preferences(source.model_copy(update={"cut_answers": "drop_if_chosen_cut"})))) == 2
    old = load_preferences(source.model_copy(update={"snapshot": f"pairs@{old_version}"}))
    assert len(to_dpo_dataset(old)) == 1 and old.summary["dropped"]["cut"] == 0  # type: ignore[index]


def test_an_older_writer_on_an_evolved_table_stops_without_losing_a_record(tmp_path: Path) -> None:
    """A replica still running the old code cannot append to the evolved table; it fails the
    empty commit too, so the store exits instead of dead-lettering (tables.append_by_halves)."""
    root = tmp_path / "store"
    _old_tables(root)
    pairs = ensure_tables(root)[PAIRS]
    with pytest.raises(Exception, match="(?i)schema"):
        write_deltalake(pairs, _old_schema(PAIRS).empty_table(), mode="append")
