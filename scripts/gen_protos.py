"""Regenerates the Python gRPC stubs from protos/ (one command, reproducible).

    python scripts/gen_protos.py          # write neoserve/v1/*_pb2*.py and neoserve/internal/v1/*_pb2*.py
    python scripts/gen_protos.py --check  # exit 1 if the committed stubs differ from what protoc makes now

NOTE: proto packages mirror Python packages (`neoserve.v1` -> neoserve/v1/), so generated imports need no rewriting.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        return []
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}"] + [str(p) for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*_pb2*.py*"))
    for rel in generated:  # package markers for the generated folders
        for parent in list(rel.parents)[:-1]:
            (out_dir / parent / "__init__.py").touch()
    return generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        generated = generate(tmp_path)
        stale = []
        for rel in generated:
            target = ROOT / rel
            if args.check:
                if not target.exists() or not filecmp.cmp(tmp_path / rel, target, shallow=False):
                    stale.append(str(rel))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes((tmp_path / rel).read_bytes())
                for parent in list(rel.parents)[:-1]:  # every generated folder is a regular package
                    (ROOT / parent / "__init__.py").touch()
        if args.check:
            if stale:
                print("stale generated stubs (run `python scripts/gen_protos.py`):", *stale, sep="\n  ")
                return 1
            print(f"{len(generated)} generated stub files are up to date")
        else:
            print(f"wrote {len(generated)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
