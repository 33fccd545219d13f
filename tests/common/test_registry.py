"""Model registry: versions, lineage cards, atomic aliases, rollback, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneloop.common import models_cli
from tuneloop.common import registry as registry_mod
from tuneloop.common.registry import (
    InvalidRefError,
    NotFoundError,
    Registry,
    RegistryError,
    RegistrySettings,
)

Event = tuple[str, str, str, str | None, str | None]


def model_dir(path: Path, marker: str = "a") -> Path:
    """A stand-in model folder: a few files, one nested, contents tagged by `marker`."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"marker": marker}))
    (path / "model.safetensors").write_bytes(marker.encode() * 4096)
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "tokenizer.json").write_text(f'{{"m": "{marker}"}}')
    return path


@pytest.fixture
def events() -> list[Event]:
    return []


@pytest.fixture
def reg(tmp_path: Path, events: list[Event]) -> Registry:
    return Registry(tmp_path / "registry", on_event=lambda *args: events.append(args))


def staged(reg: Registry) -> list[Path]:
    folder = reg.root / registry_mod.STAGING
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_register_copies_files_and_writes_card(reg: Registry, tmp_path: Path, events: list[Event]) -> None:
    src = model_dir(tmp_path / "out", "a")
    (src / "card.json").write_text("{}")  # a stale card in the source never wins
    card = reg.register(
        "policy",
        src,
        kind="policy",
        dataset_snapshot={"tuneloop.feedback.v1": {0: 41, 1: 7}},
        training_config={"stage": "dpo", "beta": 0.1},
        metrics={"pair_accuracy": 0.8},
        code_version_="abc123",
    )
    assert (card.name, card.version, card.kind, card.parent) == ("policy", "v0001", "policy", None)
    folder = reg.resolve("policy@v0001")
    assert folder == reg.root / "policy" / "versions" / "v0001"
    assert (folder / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(card.files) == ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    assert card.files["model.safetensors"].size == 4096
    stored = reg.card("policy@v0001")
    assert stored == card
    assert stored.dataset_snapshot == {"tuneloop.feedback.v1": {0: 41, 1: 7}}
    assert stored.code_version == "abc123"
    assert src.is_dir()  # copied, not moved
    assert events == [("registered", "policy", "v0001", None, None)]
    reg.verify("policy@v0001")
    assert staged(reg) == []


def test_versions_are_monotonic_and_record_their_parent(reg: Registry, tmp_path: Path, events: list[Event]) -> None:
    reg.register("policy", model_dir(tmp_path / "a", "a"), kind="policy")
    reg.promote("policy", "v0001")
    second = reg.register("policy", model_dir(tmp_path / "b", "b"), kind="policy", parent="policy@production")
    reward = reg.register("reward", model_dir(tmp_path / "c", "c"), kind="reward", parent="policy@v0002")
    assert second.version == "v0002"
    assert second.parent == "policy@v0001"  # the alias is pinned to what it pointed at
    assert reward.version == "v0001" and reward.parent == "policy@v0002"
    assert [c.version for c in reg.list("policy")] == ["v0001", "v0002"]
    assert reg.names() == ["policy", "reward"]
    assert events[2] == ("registered", "policy", "v0002", None, "v0001")
    assert events[3] == ("registered", "reward", "v0001", None, None)


def test_move_renames_source_into_the_registry(reg: Registry, tmp_path: Path) -> None:
    src = model_dir(tmp_path / "out", "m")
    card = reg.register("policy", src, kind="policy", move=True)
    assert not src.exists()
    assert (reg.resolve(card.ref) / "config.json").read_text() == '{"marker": "m"}'
    reg.verify(card.ref)


def test_failed_move_gives_the_folder_back(reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = model_dir(tmp_path / "out", "m")

    def fail(_: Path) -> registry_mod.FileEntry:
        raise OSError("I/O error")

    monkeypatch.setattr(registry_mod, "_sync_file", fail)
    with pytest.raises(OSError, match="I/O error"):
        reg.register("policy", src, kind="policy", move=True)
    assert (src / "config.json").read_text() == '{"marker": "m"}'
    assert reg.list("policy") == [] and staged(reg) == []


def test_promote_and_rollback_walk_the_alias_history(reg: Registry, tmp_path: Path, events: list[Event]) -> None:
    for i in range(3):
        reg.register("policy", model_dir(tmp_path / str(i), str(i)), kind="policy")
    events.clear()
    assert reg.current("policy") is None
    reg.promote("policy", "v0001")
    reg.promote("policy", "v0002")
    reg.promote("policy", "v0002")  # no-op: no event, no history entry
    reg.promote("policy", "v0003")
    assert reg.resolve("policy@production") == reg.resolve("policy@v0003")
    assert reg.rollback("policy") == "v0002"
    assert reg.current("policy") == "v0002"
    assert reg.rollback("policy") == "v0001"
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("policy")
    assert reg.current("policy") == "v0001"
    assert events == [
        ("promoted", "policy", "v0001", "production", None),
        ("promoted", "policy", "v0002", "production", "v0001"),
        ("promoted", "policy", "v0003", "production", "v0002"),
        ("rolled_back", "policy", "v0002", "production", "v0003"),
        ("rolled_back", "policy", "v0001", "production", "v0002"),
    ]
    state = json.loads((reg.root / "policy" / "aliases" / "production.json").read_text())
    assert [h["event"] for h in state["history"]] == ["promoted"] * 3 + ["rolled_back"] * 2


def test_promote_by_alias_and_latest(reg: Registry, tmp_path: Path) -> None:
    for i in range(2):
        reg.register("policy", model_dir(tmp_path / str(i), str(i)), kind="policy")
    reg.promote("policy", "latest", alias="candidate")
    assert reg.current("policy", "candidate") == "v0002"
    reg.promote("policy", "candidate")  # promote whatever the candidate is
    assert reg.aliases("policy") == {"candidate": "v0002", "production": "v0002"}


def test_rollback_without_alias_and_bad_targets_raise(reg: Registry, tmp_path: Path) -> None:
    reg.register("policy", model_dir(tmp_path / "a"), kind="policy")
    with pytest.raises(NotFoundError, match="not set"):
        reg.rollback("policy")
    with pytest.raises(NotFoundError, match="policy@v0005 does not exist"):
        reg.promote("policy", "v0005")
    with pytest.raises(InvalidRefError, match="reserved"):
        reg.promote("policy", "v0001", alias="latest")


def test_resolve_refs(reg: Registry, tmp_path: Path) -> None:
    reg.register("policy", model_dir(tmp_path / "a"), kind="policy")
    reg.register("policy", model_dir(tmp_path / "b"), kind="policy")
    reg.promote("policy", "v0001")
    versions = reg.root / "policy" / "versions"
    assert reg.resolve("policy@v0002") == versions / "v0002"
    assert reg.resolve("policy@production") == versions / "v0001"
    assert reg.resolve("policy@latest") == versions / "v0002"
    plain = tmp_path / "a"
    assert reg.resolve(str(plain)) == plain
    assert reg.resolve(plain) == plain
    with pytest.raises(NotFoundError, match=r"has no card\.json"):
        reg.card(plain)


@pytest.mark.parametrize(
    ("ref", "error", "message"),
    [
        ("policy@", InvalidRefError, "nothing after '@'"),
        ("Policy@v0001", InvalidRefError, "invalid model name"),
        ("@production", InvalidRefError, "invalid model name"),
        ("policy@Prod!", InvalidRefError, "invalid alias or version"),
        ("policy", InvalidRefError, "expected NAME@ALIAS"),
        ("/no/such/folder", InvalidRefError, "expected NAME@ALIAS"),
        ("reward@production", NotFoundError, "no model named 'reward'.*known: policy"),
        ("policy@v0009", NotFoundError, "policy@v0009 does not exist"),
        ("policy@staging", NotFoundError, "alias policy@staging is not set"),
    ],
)
def test_invalid_refs_raise_clear_errors(
    reg: Registry, tmp_path: Path, ref: str, error: type[Exception], message: str
) -> None:
    reg.register("policy", model_dir(tmp_path / "a"), kind="policy")
    with pytest.raises(error, match=message):
        reg.resolve(ref)


def test_alias_readers_never_see_a_torn_file(reg: Registry, tmp_path: Path) -> None:
    for i in range(2):
        reg.register("policy", model_dir(tmp_path / str(i), str(i)), kind="policy")
    stop = threading.Event()
    seen: set[str | None] = set()
    failures: list[BaseException] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(reg.current("policy"))
            except BaseException as err:  # any failure is the finding
                failures.append(err)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            reg.promote("policy", f"v000{1 + i % 2}")
    finally:
        stop.set()
        reader.join()
    assert failures == []
    assert seen <= {None, "v0001", "v0002"} and seen & {"v0001", "v0002"}
    assert [p.name for p in (reg.root / "policy" / "aliases").iterdir()] == ["production.json"]


def test_failed_alias_write_keeps_the_old_target(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list[Event]
) -> None:
    for i in range(2):
        reg.register("policy", model_dir(tmp_path / str(i), str(i)), kind="policy")
    reg.promote("policy", "v0001")
    events.clear()

    def crash(*_: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(registry_mod.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        reg.promote("policy", "v0002")
    monkeypatch.undo()
    assert reg.current("policy") == "v0001"
    assert events == []
    assert [p.name for p in (reg.root / "policy" / "aliases").iterdir()] == ["production.json"]


def test_exception_mid_copy_leaves_nothing_visible(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list[Event]
) -> None:
    real_copy = registry_mod._copy_file
    copied: list[Path] = []

    def copy_then_fail(src: Path, dst: Path) -> registry_mod.FileEntry:
        if copied:
            raise OSError("no space left on device")
        copied.append(dst)
        return real_copy(src, dst)

    monkeypatch.setattr(registry_mod, "_copy_file", copy_then_fail)
    with pytest.raises(OSError, match="no space"):
        reg.register("policy", model_dir(tmp_path / "a"), kind="policy")
    assert copied and not copied[0].exists()  # the half-written staging copy is gone
    assert reg.list("policy") == [] and staged(reg) == [] and events == []
    with pytest.raises(NotFoundError):
        reg.resolve("policy@latest")
    monkeypatch.undo()
    assert reg.register("policy", model_dir(tmp_path / "b"), kind="policy").version == "v0001"


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from tuneloop.common import registry as r

real = r._copy_file
def slow_copy(src, dst):
    entry = real(src, dst)
    print("copying", flush=True)
    time.sleep(600)
    return entry

r._copy_file = slow_copy
r.Registry(sys.argv[1]).register("policy", Path(sys.argv[2]), kind="policy")
"""


def test_killed_registration_is_never_visible_and_is_cleaned_up(reg: Registry, tmp_path: Path) -> None:
    src = model_dir(tmp_path / "a")
    args = [sys.executable, "-c", _KILLED_WRITER, str(reg.root), str(src)]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "copying"
            leftovers = staged(reg)
            assert len(leftovers) == 1 and any(leftovers[0].iterdir())  # files were half written
        finally:
            proc.send_signal(signal.SIGKILL)  # no cleanup handler may run: a real crash
            proc.wait()
    assert reg.list("policy") == [] and reg.names() == []
    with pytest.raises(NotFoundError):
        reg.resolve("policy@latest")
    card = reg.register("policy", src, kind="policy")  # cleans up the dead writer's folder
    assert card.version == "v0001"
    assert staged(reg) == []
    reg.verify(card.ref)


def test_cleanup_keeps_live_writers_and_expires_foreign_ones(reg: Registry) -> None:
    staging = reg.root / registry_mod.STAGING
    live = staging / f"x+{registry_mod.socket.gethostname()}+{os.getppid()}+policy"
    foreign = staging / "y+other-host+1+policy"
    for folder in (live, foreign):
        folder.mkdir(parents=True)
    assert reg.cleanup_staging() == []  # the foreign one is young: its writer may be busy
    os.utime(foreign, (0, 0))
    assert reg.cleanup_staging() == [foreign]
    assert live.is_dir()


def test_concurrent_registrations_get_distinct_versions(reg: Registry, tmp_path: Path) -> None:
    sources = [model_dir(tmp_path / str(i), str(i)) for i in range(4)]
    cards = []
    threads = [
        threading.Thread(target=lambda s=s: cards.append(reg.register("policy", s, kind="policy"))) for s in sources
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c.version for c in cards) == ["v0001", "v0002", "v0003", "v0004"]
    for card in cards:
        marker = json.loads((reg.resolve(card.ref) / "config.json").read_text())["marker"]
        assert (tmp_path / marker / "config.json").is_file()
        assert reg.card(card.ref).version == card.version


def test_verify_detects_tampering(reg: Registry, tmp_path: Path) -> None:
    card = reg.register("policy", model_dir(tmp_path / "a"), kind="policy")
    (reg.resolve(card.ref) / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(RegistryError, match=r"model\.safetensors does not match"):
        reg.verify(card.ref)


def test_the_follower_hands_over_each_change(reg: Registry, tmp_path: Path) -> None:
    from tuneloop.common.alias_follower import AliasFollower

    for i in range(2):
        reg.register("policy", model_dir(tmp_path / str(i), str(i)), kind="policy")
    swaps: list[str] = []
    follower = AliasFollower(reg, "policy", "production", None, swaps.append)
    assert follower.check() is False and swaps == [], "an alias not set yet is nothing to follow"
    reg.promote("policy", "v0001")
    assert follower.check() is True and swaps == ["v0001"]
    assert follower.check() is False, "an unmoved alias is not handed over again"
    reg.promote("policy", "v0002")
    follower.check()
    assert swaps == ["v0001", "v0002"] and follower.current == "v0002"


def test_the_follower_does_not_retry_a_failed_version_until_the_alias_moves(reg: Registry, tmp_path: Path) -> None:
    from tuneloop.common.alias_follower import AliasFollower

    for i in range(3):
        reg.register("policy", model_dir(tmp_path / str(i), str(i)), kind="policy")
    tried: list[str] = []

    def swap(version: str) -> None:
        tried.append(version)
        if version == "v0002":
            raise RuntimeError("does not load")

    follower = AliasFollower(reg, "policy", "production", "v0001", swap)
    reg.promote("policy", "v0002")
    follower.check()
    follower.check()
    assert tried == ["v0002"] and follower.current == "v0001", "the old version stays, the bad one is tried once"
    reg.promote("policy", "v0003")
    follower.check()
    assert tried == ["v0002", "v0003"] and follower.current == "v0003"


def test_the_follower_runs_in_its_own_thread(reg: Registry, tmp_path: Path) -> None:
    from tuneloop.common.alias_follower import AliasFollower

    reg.register("policy", model_dir(tmp_path / "a"), kind="policy")
    moved = threading.Event()
    follower = AliasFollower(reg, "policy", "latest", None, lambda _: moved.set(), interval_s=0.01).start()
    try:
        assert moved.wait(10), "latest is followed like an alias"
    finally:
        follower.stop()


def test_failing_listener_does_not_undo_a_promotion(tmp_path: Path) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("kafka down")

    reg = Registry(tmp_path / "r", on_event=broken)
    reg.register("policy", model_dir(tmp_path / "a"), kind="policy")
    assert reg.promote("policy", "v0001") == "v0001"
    assert reg.current("policy") == "v0001"


def test_settings_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_REGISTRY_ROOT", str(tmp_path / "pvc"))
    monkeypatch.setenv("TUNELOOP_REGISTRY_STALE_STAGING_S", "60")
    reg = Registry.from_settings()
    assert reg.root == tmp_path / "pvc" and reg.stale_staging_s == 60
    assert all(f.description for f in RegistrySettings.model_fields.values())


def test_cli_list_show_promote_rollback(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    reg = Registry(root)
    for i in range(2):
        reg.register("policy", model_dir(tmp_path / str(i), str(i)), kind="policy")
    run = CliRunner(env={"TUNELOOP_REGISTRY_ROOT": str(root)}).invoke
    app = models_cli.cli

    result = run(app, ["promote", "policy", "v0001"])
    assert result.exit_code == 0, result.output
    assert run(app, ["promote", "policy", "v0002"]).exit_code == 0
    listing = run(app, ["list"]).output.splitlines()
    assert [line.split("\t")[0] for line in listing] == ["policy@v0001", "policy@v0002"]
    assert listing[1].endswith("aliases=production")
    shown = run(app, ["show", "policy@production"])
    assert json.loads(shown.output.split("\npath: ")[0])["version"] == "v0002"
    result = run(app, ["rollback", "policy"])
    assert result.exit_code == 0 and "policy@production -> v0001" in result.output
    bad = run(app, ["show", "policy@nope"])
    assert bad.exit_code == 1 and "alias policy@nope is not set" in bad.output


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe", b"[]", b"null", b'{"version": 5}',
                                     b'{"version": "../../etc"}', b'{"stack": []}'])
def test_a_damaged_alias_file_is_a_registry_error_and_never_stops_the_watcher(
    reg: Registry, tmp_path: Path, content: bytes
) -> None:
    from tuneloop.common.alias_follower import AliasFollower

    for i in range(2):
        reg.register("policy", model_dir(tmp_path / str(i), str(i)), kind="policy")
    reg.promote("policy", "v0001")
    reg.promote("policy", "v0002", alias="candidate")
    (reg.root / "policy" / "aliases" / "production.json").write_bytes(content)
    with pytest.raises(RegistryError, match="not an alias file"):
        reg.current("policy")
    assert reg.aliases("policy") == {"candidate": "v0002"}, "the damaged alias hides itself, not the others"
    swaps: list[str] = []
    watcher = AliasFollower(reg, "policy", "production", "v0001", swaps.append)
    watcher.check()  # logs and keeps serving
    (reg.root / "policy" / "aliases" / "production.json").write_bytes(
        (reg.root / "policy" / "aliases" / "candidate.json").read_bytes())
    watcher.check()
    assert swaps == ["v0002"], "the watcher reads on once the file is whole again"
