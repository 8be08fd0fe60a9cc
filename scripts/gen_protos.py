"""Regenerate poolkit's protobuf code from protos/, or check that it is current.

python scripts/gen_protos.py          # write src/poolkit/_proto/
python scripts/gen_protos.py --check  # exit 1 if the committed code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "src" / "poolkit" / "_proto"
# grpc_tools writes absolute imports ("import echo_pb2"); the package needs relative ones.
_ABSOLUTE_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.glob("*.proto"))
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins sit beside the interpreter
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.glob("*.py*"):
        text = path.read_text()
        path.write_text(_ABSOLUTE_IMPORT.sub(r"from . import \1 as \2", text))
    (out / "__init__.py").write_text('"""Generated protobuf code. Do not edit: run scripts/gen_protos.py."""\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    check = parser.parse_args().check
    if not check:
        shutil.rmtree(OUT, ignore_errors=True)
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        names = sorted(p.name for p in fresh.iterdir())
        committed = sorted(p.name for p in OUT.iterdir() if p.is_file())
        _, mismatch, errors = filecmp.cmpfiles(fresh, OUT, names, shallow=False)
        if mismatch or errors or names != committed:
            print(f"generated code is stale: {mismatch + errors or committed}; run scripts/gen_protos.py")
            return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
