"""The harness of the Python client's tests: the stubs, and the real agent.

Stubs: ``NINE9S_PY_STUBS`` names a directory ``generate_stubs.py`` already
filled (``run-tests.sh`` does that); otherwise they are generated into a
temp dir here, before the test module imports ``nine9s_client``.

Agent: the real ``agent`` binary from ``NINE9S_BIN_DIR`` (default: the
workspace's ``target/debug``), started as tests/src/lib.rs starts it: free
ports on 127.0.0.1 (port 0; the ready line on stdout says which), a temp
data dir, the admin token the agent writes to ``DATA/admin.token``.
Nothing here is a mock.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN_DIR = Path(os.environ.get("NINE9S_BIN_DIR") or ROOT / "target" / "debug")
#: The line the agent prints on stdout once it serves (agent/src/main.rs).
READY = "nine9s agent ready"
READY_WITHIN = 30.0
STOP_WITHIN = 30.0

_generated: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    stubs = os.environ.get("NINE9S_PY_STUBS")
    if not (stubs and (Path(stubs) / "nine9s" / "control" / "v1" / "control_pb2.py").is_file()):
        import generate_stubs

        stubs = tempfile.mkdtemp(prefix="nine9s-py-stubs-")
        _generated.append(stubs)
        generate_stubs.generate(Path(stubs))
    sys.path.insert(0, stubs)


def pytest_unconfigure(config: pytest.Config) -> None:
    for path in _generated:
        shutil.rmtree(path, ignore_errors=True)


def binary(name: str) -> Path:
    """A file of the cargo build, or a test failure that says how to make it."""
    path = BIN_DIR / name
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: run `cargo build --workspace` first "
            "(or set NINE9S_BIN_DIR to the directory holding agent and the sample libraries)",
            pytrace=False,
        )
    return path


@dataclass
class RunningAgent:
    process: subprocess.Popen[bytes]
    #: host:port of the gRPC control plane and of the HTTP data plane.
    grpc: str
    http: str
    data_dir: Path
    log_path: Path

    @property
    def token_file(self) -> Path:
        return self.data_dir / "admin.token"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM, then the exit code (the agent drains and exits 0 on its own)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_WITHIN)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the agent did not stop on SIGTERM; its log:\n{self.log()}")
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


def start_agent(data_dir: Path, extra: Sequence[str] = ()) -> RunningAgent:
    """Starts the agent over ``data_dir`` on free ports and waits for its ready line."""
    agent = binary("agent")
    log_path = data_dir.with_name(data_dir.name + ".log")
    # The agent reads NINE9S_DATA_DIR / NINE9S_TOKENS: none of the caller's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NINE9S_")}
    env["RUST_LOG"] = "info"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(agent), "--data-dir", str(data_dir), "--http", "127.0.0.1:0",
             "--grpc", "127.0.0.1:0", *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )  # fmt: skip
    assert process.stdout is not None
    # Read the ready line as it comes (select, never a fixed sleep). The
    # pipe stays open afterwards: a new worker prints the line again.
    line = b""
    deadline = time.monotonic() + READY_WITHIN
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(remaining, 0))
        chunk = os.read(process.stdout.fileno(), 4096) if ready else b""
        if not chunk:
            process.kill()
            process.wait()
            why = "exited" if ready else f"said nothing in {READY_WITHIN:.0f} s"
            pytest.fail(f"the agent {why} before it was ready; its log:\n{log_path.read_text()}")
        line += chunk
    text = line.decode()
    if not text.startswith(READY):
        process.kill()
        process.wait()
        pytest.fail(f"unexpected first line {text!r}; log:\n{log_path.read_text()}")
    words = dict(w.split("=", 1) for w in text.split() if "=" in w)
    return RunningAgent(process, words["grpc"], words["http"], data_dir, log_path)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    """One agent for the module, on 0.1.0, with a 1 s default soak; stopped
    with SIGTERM at the end, which must exit 0."""
    running = start_agent(tmp_path_factory.mktemp("agent") / "data", ["--soak", "1s"])
    try:
        yield running
    finally:
        code = running.stop()
    assert code == 0, f"the agent exited {code} on SIGTERM; its log:\n{running.log()}"
