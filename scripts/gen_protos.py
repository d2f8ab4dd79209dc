"""Regenerate the committed Python stubs under src/embedrpc/v1 from protos/.

    python scripts/gen_protos.py            # write the stubs
    python scripts/gen_protos.py --check    # exit 1 when the committed stubs are stale

The stubs are committed (so installing embedrpc needs no code generator);
tests/test_stubs.py runs --check so a proto change without regenerated stubs
fails CI. grpcio-tools is pinned in the `test` extra because the generated
text depends on its version.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "src"
GENERATED = ("embedder_pb2.py", "embedder_pb2.pyi", "embedder_pb2_grpc.py")


def generate(out: Path) -> None:
    from grpc_tools import protoc  # imported late: only the test extra has it

    proto = PROTOS / "embedrpc" / "v1" / "embedder.proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(proto),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    ns = parser.parse_args()
    if not ns.check:
        generate(OUT)
        print(f"wrote {', '.join(GENERATED)} under {OUT / 'embedrpc' / 'v1'}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in GENERATED
            if (Path(tmp) / "embedrpc" / "v1" / name).read_text()
            != (OUT / "embedrpc" / "v1" / name).read_text()
        ]
    if stale:
        print(f"stale stubs: {stale}; run python scripts/gen_protos.py", file=sys.stderr)
        return 1
    print("stubs are fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
