"""Generates the Python stubs of the control API from ``proto/`` with grpcio-tools.

Nothing generated is committed: run this before using ``nine9s_client`` (the
tests do it themselves when ``NINE9S_PY_STUBS`` does not name a directory
that already holds them)::

    python generate_stubs.py build/stubs
    PYTHONPATH=build/stubs python -c 'import nine9s_client'

The stubs land in ``OUT/nine9s/control/v1/`` as ``control_pb2.py``,
``control_pb2_grpc.py`` and ``control_pb2.pyi`` (namespace packages, no
``__init__.py``), so ``OUT`` is what goes on ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: ``proto/proto`` of this repository: the include root the proto's own
#: import path (``nine9s/control/v1/control.proto``) is relative to.
PROTO_ROOT = Path(__file__).resolve().parent.parent.parent / "proto" / "proto"
PROTO_FILE = "nine9s/control/v1/control.proto"


def generate(out: Path, proto_root: Path = PROTO_ROOT) -> Path:
    """Runs ``grpc_tools.protoc`` into ``out`` (created if missing); returns ``out``.

    Raises ``RuntimeError`` with protoc's exit code if generation fails (protoc
    prints its own diagnostics on stderr).
    """
    # Imported here so that `--help`-style use of this module needs no grpcio-tools.
    import grpc_tools
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    # grpc_tools ships the well-known types (google/protobuf/*.proto); protoc
    # run as a library does not find them unless told.
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        PROTO_FILE,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"grpc_tools.protoc exited {code} for {proto_root / PROTO_FILE}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1].startswith("-"):
        print(f"usage: {argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    out = generate(Path(argv[1]))
    print(f"generated {PROTO_FILE} stubs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
