"""Generate the gRPC stubs in nestvec/wire/_pb/ from protos/ with grpcio-tools.

The proto is mapped to the virtual path nestvec/wire/_pb/nestvec/v1/, so the generated modules
import each other as nestvec.wire._pb.nestvec.v1.* with no post-processing.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
PROTO = PROTO_ROOT / "nestvec" / "v1" / "nestvec.proto"
PACKAGE_DIR = Path(__file__).resolve().parent / "_pb"
VIRTUAL = "nestvec/wire/_pb"


def generate(out_root: Path) -> Path:
    """Run protoc; returns the folder holding the generated _pb package (out_root/nestvec/wire/_pb)."""
    from grpc_tools import protoc

    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{VIRTUAL}={PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", f"{VIRTUAL}/nestvec/v1/nestvec.proto"]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    pb = out_root / VIRTUAL
    for folder in (pb, pb / "nestvec", pb / "nestvec" / "v1"):
        (folder / "__init__.py").touch()
    (pb / "PROTO_SHA256").write_text(hashlib.sha256(PROTO.read_bytes()).hexdigest() + "\n")
    return pb


def generated_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the installed stubs are stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generated_files(generate(Path(tmp)))
        if args.check:
            stale = not PACKAGE_DIR.exists() or generated_files(PACKAGE_DIR) != fresh
            print("stubs are stale: run python -m nestvec.wire.generate" if stale else "stubs are current")
            return int(stale)
        shutil.rmtree(PACKAGE_DIR, ignore_errors=True)
        shutil.copytree(Path(tmp) / VIRTUAL, PACKAGE_DIR)
    print(f"generated {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
