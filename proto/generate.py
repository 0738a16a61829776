"""Regenerate clipstore/v1/*_pb2*.py(i) from proto/ — the one codegen script.

    python proto/generate.py          # rewrite the checked-in code
    python proto/generate.py --check  # exit 1 if the checked-in code is stale (CI)

Versions of grpcio-tools and mypy-protobuf are pinned in pyproject.toml so
the output is reproducible.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PACKAGE_DIR = Path("clipstore") / "v1"
INIT_TEXT = '"""Generated protobuf and gRPC code for clipstore.v1 (see proto/generate.py)."""\n'


def generate(out_root: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    wkt = str(resources.files("grpc_tools") / "_proto")
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_ROOT}", f"-I{wkt}",
        f"--python_out={out_root}", f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}", f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    (out_root / PACKAGE_DIR / "__init__.py").write_text(INIT_TEXT)
    (out_root / "clipstore" / "__init__.py").unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if checked-in code is stale")
    args = parser.parse_args()
    target = REPO / PACKAGE_DIR
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / PACKAGE_DIR
        if args.check:
            cmp = filecmp.dircmp(fresh, target)
            stale = cmp.left_only + cmp.right_only + cmp.diff_files
            if stale:
                print(f"generated code is stale: {sorted(stale)}; run python proto/generate.py", file=sys.stderr)
                return 1
            print("generated code is up to date")
            return 0
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(fresh, target)
    print(f"wrote {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
