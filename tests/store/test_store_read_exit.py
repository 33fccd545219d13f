"""A process that reads the store exits cleanly: a trainer Job or a report that read its rows
and then aborted at exit would count as failed (and be run again).

delta-rs's default Arrow dataset reads its files through a Python filesystem over its own
object store; a fresh interpreter that read one table through it and exited aborted ("terminate
called without an active exception", exit -6) in 10 to 15 of 20 runs here (deltalake 1.6.6,
pyarrow 26). The store reads through pyarrow's own filesystem instead (tables.dataset).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
from deltalake import write_deltalake

from tuneloop.store.tables import dataset, open_table

# deltalake imported before pyarrow, as a user's script may do, made the abort most likely.
_READER = (
    "import sys\n"
    "from deltalake import DeltaTable\n"
    "from tuneloop.store.tables import dataset\n"
    "print(dataset(DeltaTable(sys.argv[1])).to_table().num_rows)\n"
)
_RUNS = 8


def test_processes_that_read_a_table_exit_with_zero(tmp_path: Path) -> None:
    root = tmp_path / "t"
    for part in range(3):
        write_deltalake(str(root), pa.table({"id": list(range(part * 10, part * 10 + 10)), "text": ["x" * 64] * 10}),
                        mode="append")
    runs = [subprocess.run([sys.executable, "-c", _READER, str(root)], capture_output=True, text=True, timeout=120)
            for _ in range(_RUNS)]
    assert [(r.returncode, r.stdout.strip()) for r in runs] == [(0, "30")] * _RUNS, [r.stderr for r in runs]


def test_a_table_under_a_path_with_spaces_reads_its_rows(tmp_path: Path) -> None:
    """The table's URI is percent-encoded (file:///...%20...); pyarrow's filesystem gets the path."""
    root = tmp_path / "a store" / "pairs"
    write_deltalake(str(root), pa.table({"id": [1, 2, 3]}))
    table = open_table(tmp_path / "a store", "pairs")
    assert table is not None
    assert sorted(dataset(table).to_table().column("id").to_pylist()) == [1, 2, 3]
