"""Drives the real agent through the Python helper: stage, upgrade and wait
via Watch, status, rollback; credentials, idempotent retries, health, TLS."""

from __future__ import annotations

import http.client
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from conftest import ROOT, RunningAgent, binary, start_agent
from nine9s_client import Client, Nine9sError, NotPermanent, WaitTimeout, connect, new_request_id

RELEASE_0_2_0 = ROOT / "plugins" / "nine9s-0.2.0"
#: A test fixture release, 0.6.0: like 0.2.0, but its health check fails once
#: it has served a request.
UNHEALTHY = ROOT / "tests" / "plugins" / "unhealthy"


def eventually(condition: Callable[[], bool], within: float = 20.0) -> bool:
    """Polls ``condition`` until it holds or ``within`` seconds passed."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def get(agent: RunningAgent, path: str) -> tuple[int, str, str | None]:
    """``GET path`` on the data plane: status, body and the release that answered."""
    host, port = agent.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read().decode(), reply.getheader("x-nine9s-release")
    finally:
        conn.close()


@pytest.fixture
def client(agent: RunningAgent) -> Iterator[Client]:
    with connect(agent.grpc, token_file=agent.token_file) as c:
        yield c


def test_stage_upgrade_wait_status_rollback(agent: RunningAgent, client: Client) -> None:
    start = client.status()
    assert (start.active_version, start.permanent_version) == ("0.1.0", "0.1.0")
    assert get(agent, "/") == (200, "Hello world!", "0.1.0")

    staged = client.stage(RELEASE_0_2_0, binary("libnine9s_0_2_0.so"))
    assert (staged.release.version, staged.release.state) == ("0.2.0", "STAGED")
    assert not staged.already_staged
    # Staging the same bytes again is no error: a deploy script may re-run.
    assert client.stage(RELEASE_0_2_0, binary("libnine9s_0_2_0.so")).already_staged

    # The compare-and-set: refused, nothing changed, and ErrorInfo says who is active.
    with pytest.raises(Nine9sError) as refused:
        client.upgrade("0.2.0", expected_active="0.3.0")
    assert refused.value.code == grpc.StatusCode.ABORTED
    assert refused.value.reason == "EXPECTED_ACTIVE_MISMATCH"
    assert refused.value.metadata.get("active") == "0.1.0"
    assert client.status().active_version == "0.1.0"

    # Upgrade and wait (ctl upgrade --wait): returns once the Watch stream
    # says 0.2.0 became permanent after its soak (1 s here).
    request_id = new_request_id()
    upgraded = client.upgrade(
        "0.2.0", expected_active="0.1.0", soak=1.0, request_id=request_id,
        wait=True, wait_timeout=60,
    )  # fmt: skip
    t = upgraded.transition
    assert t is not None and not upgraded.unchanged
    assert (t.kind, t.from_version, t.to_version, t.result) == ("UPGRADE", "0.1.0", "0.2.0", "OK")
    assert (t.request_id, t.identity, t.automatic) == (request_id, "admin", False)
    assert upgraded.steps and "SWITCH" in upgraded.steps

    # Permanent as soon as the wait returned: no polling needed.
    status = client.status()
    assert status.active_version == "0.2.0"
    assert status.permanent_version == "0.2.0"
    assert status.current_version == ""
    assert status.soak.mode == "IDLE"
    assert status.running is None
    new, old = status.release("0.2.0"), status.release("0.1.0")
    assert new is not None and new.state == "PERMANENT" and new.permanent_since_ms > 0
    assert old is not None and old.state == "OLD"
    # Already permanent: a later wait returns at once.
    assert client.wait_permanent("0.2.0", timeout=10) is None

    assert get(agent, "/") == (200, "Hello world 2 !", "0.2.0")
    assert get(agent, "/count") == (200, "1", "0.2.0")

    # A retry with the same request id (after a lost reply, say) gets the
    # recorded outcome, and nothing runs twice, though 0.1.0 is no longer
    # the expected active release.
    again = client.upgrade("0.2.0", expected_active="0.1.0", soak=1.0, request_id=request_id)
    assert again.transition is not None and again.transition.id == t.id
    upgrades = [h for h in client.history() if h.request_id == request_id]
    assert [(h.id, h.kind) for h in upgrades] == [(t.id, "UPGRADE")]
    assert client.status().active_version == "0.2.0"

    rolled = client.rollback(expected_active="0.2.0", reason="python client test")
    r = rolled.transition
    assert r is not None
    assert (r.kind, r.from_version, r.to_version, r.result) == ("ROLLBACK", "0.2.0", "0.1.0", "OK")
    assert r.reason == "python client test"
    status = client.status()
    assert (status.active_version, status.permanent_version) == ("0.1.0", "0.1.0")
    assert status.current_version == ""
    after_rollback = status.release("0.1.0")
    assert after_rollback is not None and after_rollback.state == "PERMANENT"
    assert get(agent, "/") == (200, "Hello world!", "0.1.0")

    # The release rolled back from can no longer become permanent: a wait says so.
    with pytest.raises(NotPermanent):
        client.wait_permanent("0.2.0", timeout=10)


def test_wait_raises_when_the_health_gate_rolls_the_release_back(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "data")
    try:
        with connect(agent.grpc, token_file=agent.token_file) as client:
            client.stage(RELEASE_0_2_0, binary("libnine9s_0_2_0.so"))
            client.upgrade("0.2.0", permanence="immediate")
            client.stage(UNHEALTHY, binary("libfixture_unhealthy.so"))
            with ThreadPoolExecutor(max_workers=1) as pool:
                waiting = pool.submit(
                    client.upgrade, "0.6.0", soak=60, wait=True, wait_timeout=60, reason="canary"
                )
                # Once 0.6.0 serves a request its health check fails.
                # (If the upgrade itself failed, result() below says how.)
                assert eventually(lambda: waiting.done() or get(agent, "/")[2] == "0.6.0")
                with pytest.raises(NotPermanent) as left:
                    waiting.result(timeout=60)
            assert left.value.rolled_back
            assert left.value.to_version == "0.2.0"
            status = client.status()
            assert (status.active_version, status.permanent_version) == ("0.2.0", "0.2.0")
            failed = status.release("0.6.0")
            assert failed is not None and failed.state == "FAILED" and failed.failure
            rollback = client.history()[-1]
            assert (rollback.kind, rollback.automatic, rollback.to_version) == (
                "ROLLBACK",
                True,
                "0.2.0",
            )
    finally:
        code = agent.stop()
    assert code == 0, f"the agent exited {code} on SIGTERM; its log:\n{agent.log()}"


def test_a_held_release_is_not_waited_for_until_made_permanent(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "data")
    try:
        with connect(agent.grpc, token_file=agent.token_file) as client:
            client.stage(RELEASE_0_2_0, binary("libnine9s_0_2_0.so"))
            client.upgrade("0.2.0", permanence="never")
            status = client.status()
            assert (status.current_version, status.soak.mode) == ("0.2.0", "HELD")
            # Nothing will make it permanent on its own: the wait runs out.
            with pytest.raises(WaitTimeout) as waited:
                client.wait_permanent("0.2.0", timeout=0.3)
            assert waited.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            # Asking again with wait=True says why at once.
            with pytest.raises(NotPermanent, match="held current"):
                client.upgrade("0.2.0", wait=True)
            made = client.make_permanent("0.2.0", expected_active="0.2.0")
            assert made.transition is not None and made.transition.kind == "MAKE_PERMANENT"
            assert client.status().permanent_version == "0.2.0"
    finally:
        code = agent.stop()
    assert code == 0, f"the agent exited {code} on SIGTERM; its log:\n{agent.log()}"


def test_events_resume_after_the_agent_replaces_its_worker(tmp_path: Path) -> None:
    """SIGHUP makes the supervisor start a new worker and retire the old
    one, which closes the Watch stream: the helper reconnects and resumes
    after the last event it saw, so it sees the new worker's start."""
    agent = start_agent(tmp_path / "data")
    try:
        with connect(agent.grpc, token_file=agent.token_file) as client:
            start = client.status()
            old_worker = start.raw.agent.worker_pid
            seen: list[str] = []
            with ThreadPoolExecutor(max_workers=1) as pool:

                def follow() -> int:
                    for event in client.events(start.last_event_id, timeout=60):
                        seen.append(event.kind)
                        if event.kind == "AGENT_STARTED":
                            return event.id
                    raise AssertionError("unreachable")

                following = pool.submit(follow)
                agent.process.send_signal(signal.SIGHUP)
                started = following.result(timeout=60)
            assert started > start.last_event_id
            assert seen.count("AGENT_STARTED") == 1, seen
            assert client.status().raw.agent.worker_pid != old_worker
    finally:
        code = agent.stop()
    assert code == 0, f"the agent exited {code} on SIGTERM; its log:\n{agent.log()}"


def test_a_call_without_credentials_is_unauthenticated(agent: RunningAgent) -> None:
    with connect(agent.grpc) as anonymous:
        with pytest.raises(Nine9sError) as refused:
            anonymous.status()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.reason == "UNAUTHENTICATED"
        # A mutating call too, before the agent reads its request.
        with pytest.raises(Nine9sError) as refused:
            anonymous.upgrade("0.2.0")
        assert (refused.value.code, refused.value.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "UNAUTHENTICATED",
        )
    with connect(agent.grpc, token="not-the-token-0123456789") as stranger:
        with pytest.raises(Nine9sError) as refused:
            stranger.status()
        assert refused.value.reason == "UNAUTHENTICATED"


def test_health_answers_serving_without_a_token(agent: RunningAgent) -> None:
    with connect(agent.grpc) as anonymous:
        assert anonymous.health() == "SERVING"
        assert anonymous.health("nine9s.control.v1.Control") == "SERVING"


def test_mtls_certificate_identity_and_roles(tmp_path: Path) -> None:
    """TLS with a client certificate: the certificate is the identity (a
    `read` one here), so reads work without a token and a deploy is
    PERMISSION_DENIED."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl (Debian: openssl) makes the test certificates")
    pki = tmp_path / "pki"
    pki.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

    def key_and_request(name: str, subject: str) -> list[str]:
        return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-subj", subject]  # fmt: skip

    openssl("req", "-x509", *key_and_request("ca", "/CN=ca"), "-out", "ca.pem", "-days", "2")
    for name, ext in [
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("viewer", "basicConstraints=CA:FALSE"),
    ]:
        openssl("req", *key_and_request(name, f"/CN={name}"), "-out", f"{name}.csr")
        (pki / f"{name}.ext").write_text(ext)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                "-extfile", f"{name}.ext")  # fmt: skip
    tokens = tmp_path / "tokens"
    tokens.write_text("viewer read -\n")
    tokens.chmod(0o600)  # the agent refuses a tokens file others can read

    agent = start_agent(
        tmp_path / "data",
        ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
         "--client-ca", str(pki / "ca.pem"), "--tokens", str(tokens)],
    )  # fmt: skip
    try:
        with connect(
            f"https://{agent.grpc}",
            ca=pki / "ca.pem",
            cert=pki / "viewer.pem",
            key=pki / "viewer.key",
        ) as viewer:
            assert viewer.status().active_version == "0.1.0"
            with pytest.raises(Nine9sError) as refused:
                viewer.upgrade("0.2.0")
            assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert refused.value.reason == "PERMISSION_DENIED"
    finally:
        code = agent.stop()
    assert code == 0, f"the agent exited {code} on SIGTERM; its log:\n{agent.log()}"
