"""Generate (or, with --check, verify) the Python code for protos/.

The generated modules live in client/lockgate_client/_proto and are never
edited by hand. ``--check`` regenerates into a temporary directory and fails
if anything differs, so CI proves the checked-in code matches protos/.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "client"
PACKAGE = Path("lockgate_client/_proto")
#: Only the file that declares the service gets a _grpc module.
SERVICE_FILES = {"inference_service.proto"}


def generate(out: Path) -> None:
    sources = sorted((PROTOS / PACKAGE).glob("*.proto"))
    for source in sources:
        relative = str(source.relative_to(PROTOS))
        args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}"]
        if source.name in SERVICE_FILES:
            args.append(f"--grpc_python_out={out}")
        if protoc.main([*args, relative]) != 0:
            raise SystemExit(f"protoc failed on {relative}")
    (out / PACKAGE / "__init__.py").write_text('"""Generated from protos/: do not edit."""\n')


def generated_files(base: Path) -> set[str]:
    return {p.name for p in (base / PACKAGE).iterdir() if p.suffix in (".py", ".pyi")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="verify instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        print(f"generated {sorted(generated_files(OUT))}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        (fresh / PACKAGE).mkdir(parents=True)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(OUT)
        stale = sorted(want ^ have)
        stale += [
            name
            for name in sorted(want & have)
            if not filecmp.cmp(fresh / PACKAGE / name, OUT / PACKAGE / name, shallow=False)
        ]
    if stale:
        print(f"generated code is out of date with protos/: {stale}; run `make protos`")
        return 1
    print("generated code matches protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
