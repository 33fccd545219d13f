"""The configuration reference is generated from the settings classes and must be fresh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "configuration.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), str(out)], check=True)
    assert out.read_text() == (ROOT / "docs" / "configuration.md").read_text(), "stale: run `make docs`"


def test_every_setting_is_described() -> None:
    undocumented = [line for line in (ROOT / "docs" / "configuration.md").read_text().splitlines()
                    if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, undocumented
