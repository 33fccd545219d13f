"""Regenerate services/v1 (import name tuneloop.v1) from protos/ with grpcio-tools.

Deterministic: the same protos always give byte-identical files, so a test can compare a
fresh generation with the committed one.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
PACKAGE = "tuneloop/v1"


def generate(out: Path) -> None:
    """Write the generated modules of protos/tuneloop/v1 into `out` (a folder)."""
    protos = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / PACKAGE).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            ["protoc", f"-I{PROTOS}", f"-I{well_known}", f"--python_out={tmp}",
             f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*_pb2*.py*"):
            old.unlink()
        for f in sorted((Path(tmp) / PACKAGE).iterdir()):
            shutil.copyfile(f, out / f.name)
    (out / "__init__.py").write_text('"""Generated from protos/tuneloop/v1 by `make proto`; do not edit."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "services" / "v1")
