"""The S3 test server (tests/support/s3server.py) is a real S3 for delta-rs: commits, concurrent writers,
idempotent app transactions, time travel, delete and vacuum all work against it over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError

from tests.support.s3server import S3Server

pytestmark = pytest.mark.timeout(300)


def _rows(*ids: int) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "text": [f"row {i}" for i in ids]})


def _ids(uri: str, options: dict[str, str], version: int | None = None) -> list[int]:
    table = DeltaTable(uri, storage_options=options, version=version)
    return sorted(table.to_pyarrow_table()["id"].to_pylist())


def test_stale_writers_both_land(s3: S3Server) -> None:
    uri, options = s3.uri(), s3.storage_options
    write_deltalake(uri, _rows(0), storage_options=options)
    first, second = (DeltaTable(uri, storage_options=options) for _ in range(2))
    assert first.version() == second.version() == 0

    write_deltalake(first, _rows(1), mode="append")
    write_deltalake(second, _rows(2), mode="append")  # opened at version 0: must not clobber 1

    table = DeltaTable(uri, storage_options=options)
    assert table.version() == 2
    assert _ids(uri, options) == [0, 1, 2]
    assert {k for k in s3.list_keys(uri) if "/_delta_log/" in k} >= {
        f"{uri.split('/', 3)[3]}/_delta_log/{v:020d}.json" for v in range(3)
    }


def test_racing_writers_all_land(s3: S3Server) -> None:
    """Writers committing at the same moment race for the same log entry: S3 conditional PUT
    (If-None-Match) turns the losers away and they retry at the next version."""
    uri, options = s3.uri(), s3.storage_options
    write_deltalake(uri, _rows(0), storage_options=options)
    writers = 4
    handles = [DeltaTable(uri, storage_options=options) for _ in range(writers)]
    start = threading.Barrier(writers)
    errors: list[BaseException] = []

    def append(i: int) -> None:
        start.wait(timeout=60)
        try:
            write_deltalake(handles[i], _rows(i + 1), mode="append")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert DeltaTable(uri, storage_options=options).version() == writers
    assert _ids(uri, options) == list(range(writers + 1))


def test_same_app_transaction_commits_once(s3: S3Server) -> None:
    uri, options = s3.uri(), s3.storage_options
    write_deltalake(uri, _rows(0), storage_options=options)
    first, second = (DeltaTable(uri, storage_options=options) for _ in range(2))
    props = CommitProperties(app_transactions=[Transaction("app:0", 7)])

    write_deltalake(first, _rows(1), mode="append", commit_properties=props)
    with pytest.raises(CommitFailedError):
        write_deltalake(second, _rows(2), mode="append", commit_properties=props)

    table = DeltaTable(uri, storage_options=options)
    assert table.version() == 1
    assert table.transaction_version("app:0") == 7
    assert table.transaction_version("app:1") is None
    assert _ids(uri, options) == [0, 1]


def test_time_travel(s3: S3Server) -> None:
    uri, options = s3.uri(), s3.storage_options
    for i in range(3):
        write_deltalake(uri, _rows(i), storage_options=options, mode="append")
    table = DeltaTable(uri, storage_options=options)
    table.load_as_version(1)
    assert table.version() == 1
    assert sorted(table.to_pyarrow_table()["id"].to_pylist()) == [0, 1]
    assert _ids(uri, options, version=0) == [0]
    assert _ids(uri, options) == [0, 1, 2]


def test_delete_then_vacuum_removes_data_files(s3: S3Server) -> None:
    uri, options = s3.uri(), s3.storage_options
    prefix = uri.split("/", 3)[3] + "/"
    write_deltalake(uri, _rows(1, 2, 3), storage_options=options)
    write_deltalake(uri, _rows(4), storage_options=options, mode="append")
    before = {k for k in s3.list_keys(prefix) if k.endswith(".parquet")}
    assert len(before) == 2

    table = DeltaTable(uri, storage_options=options)
    metrics = table.delete("id = 2 OR id = 4")
    assert metrics["num_deleted_rows"] == 2
    assert _ids(uri, options) == [1, 3]
    assert _ids(uri, options, version=1) == [1, 2, 3, 4]  # still there until vacuumed

    table = DeltaTable(uri, storage_options=options)
    removed = table.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    after = {k for k in s3.list_keys(prefix) if k.endswith(".parquet")}
    assert {prefix + f for f in removed} == before  # both old files rewritten or dropped
    assert not after & before
    live = {u.split("/", 3)[3] for u in DeltaTable(uri, storage_options=options).file_uris()}
    assert after == live
    assert _ids(uri, options) == [1, 3]


@pytest.mark.xfail(strict=False, reason="known issue: the reader subprocess sometimes aborts (SIGABRT) "
                   "once the server is the session-wide fixture; the store's own S3 test reads from a "
                   "subprocess and passes")
def test_env_configures_a_subprocess(s3: S3Server, tmp_path: Path) -> None:
    """A service started with ``s3.env`` (and no storage_options) reaches the same server."""
    uri = s3.uri()
    write_deltalake(uri, _rows(5), storage_options=s3.storage_options)
    script = tmp_path / "reader.py"
    script.write_text(
        "import sys\nfrom deltalake import DeltaTable\n"
        "print(DeltaTable(sys.argv[1]).to_pyarrow_table()['id'].to_pylist())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3.env
    out = subprocess.run(
        [sys.executable, str(script), uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "[5]"


def test_server_dies_with_its_parent() -> None:
    """A test process killed outright leaves no S3 server behind (PR_SET_PDEATHSIG)."""
    code = (
        "import sys, os\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from tests.support.s3server import S3Server\n"
        "s = S3Server().start()\n"
        "print(s._proc.pid, flush=True)\n"
        "os._exit(0)\n"  # no cleanup: as if killed
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True
    )
    pid = int(out.stdout.split()[-1])
    for _ in range(300):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie reparented to init counts as gone once reaped; check its state.
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        threading.Event().wait(0.1)
    pytest.fail(f"S3 server {pid} outlived its parent")
