"""The reward stage on a real preference-store snapshot (Kafka → store → rows), with the
snapshot's offsets recorded as the version's lineage."""

from __future__ import annotations

from pathlib import Path

from tests.support.store import Sender, cid, completion, drive, event, rows_of
from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.registry import Registry
from tuneloop.store.consumer import PreferenceStore
from tuneloop.store.read import current_snapshot
from tuneloop.store.settings import StoreSettings
from tuneloop.trainer.reward_stage import RewardStageConfig, run
from tuneloop.v1 import feedback_pb2


def _judge_prompts(sender: Sender, first: int, count: int, tenant: str = "acme") -> None:
    """One A-better judgement per prompt: the polite answer over the curt one."""
    for i in range(first, first + count):
        good, bad = cid(), cid()
        question = [{"role": "user", "content": f"Question {i}: can you help?"}]
        sender.completions(
            completion(good, "Sure. Thank you for your help!", question=question, request_id=f"r{i}", tenant=tenant),
            completion(bad, "Sure. That answer is worse.", question=question, request_id=f"r{i}", tenant=tenant),
        )
        sender.feedback(event(pairwise=(good, bad, feedback_pb2.PAIRWISE_CHOICE_A), tenant=tenant))


def test_stage_trains_on_a_store_snapshot_and_records_it(
    store: PreferenceStore,
    send: Sender,
    store_settings: StoreSettings,
    tmp_path: Path,
) -> None:
    _judge_prompts(send, 0, 8)
    _judge_prompts(send, 100, 5, tenant="globex")  # another tenant's: must not be trained on
    drive(store, lambda: len(rows_of(store)) == 13)
    root = store_settings.root
    held = current_snapshot(root)
    snap = held.id
    _judge_prompts(send, 8, 4)  # after the snapshot: must not be trained on
    drive(store, lambda: len(rows_of(store)) == 17)

    config = RewardStageConfig(
        base_model=str(make_tiny(tmp_path / "tiny")[1]),
        store_root=root,
        snapshot=snap,
        tenants=["acme"],
        registry_root=tmp_path / "registry",
        max_steps=1,
        batch_size=4,
        min_eval_pairs=1,
        eval_fraction=0.25,
    )
    out = run(config).registered
    assert out is not None

    metrics = out.metrics
    assert metrics["data"] == snap
    assert metrics["train_prompts"] + metrics["eval_prompts"] == 8
    card = Registry(tmp_path / "registry").card(out.ref)
    assert card.dataset_snapshot == held.offsets
    assert sum(held.offsets[store_settings.feedback_topic].values()) == 13  # all read, acme's trained on
    assert card.training_config["snapshot"] == snap
