"""A small typed client of the nine9s control plane (``nine9s.control.v1``).

It wraps the stubs that ``generate_stubs.py`` makes from ``proto/`` (nothing
generated is committed: generate them, then put their directory on
``sys.path`` or ``PYTHONPATH``)::

    from nine9s_client import connect

    with connect("127.0.0.1:50051", token_file="nine9s-data/admin.token") as agent:
        agent.stage("plugins/nine9s-0.2.0", "target/release/libnine9s_0_2_0.so")
        agent.upgrade("0.2.0", expected_active="0.1.0", wait=True, wait_timeout=60)
        print(agent.status().permanent_version)          # 0.2.0

What it does for you, as ``ctl`` does:

- every call carries ``authorization: Bearer TOKEN``;
- every mutating call carries a request id (a fresh uuid4 unless you give
  one), and a call that failed in transport (UNAVAILABLE without the agent's
  ErrorInfo) is retried with the *same* request, so a retry never acts twice;
- a refusal is raised as :class:`Nine9sError` with the gRPC code and the
  agent's stable ``ErrorInfo.reason`` (branch on ``reason``, not on the text);
- enum values are given as short names (``"PERMANENT"``, ``"UPGRADE"``,
  ``"SOAK_PASSED"``) rather than the ints protobuf hands out; every wrapper
  keeps the protobuf message it came from in ``raw``.
"""

from __future__ import annotations

import hashlib
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

try:
    from nine9s.control.v1 import control_pb2 as pb
    from nine9s.control.v1 import control_pb2_grpc as pb_grpc
except ImportError as missing:  # pragma: no cover - a setup error, said plainly
    raise ImportError(
        "the nine9s control stubs are not importable: generate them with "
        "`python clients/python/generate_stubs.py DIR` and put DIR on PYTHONPATH"
    ) from missing

__all__ = [
    "Client",
    "Event",
    "NotPermanent",
    "Nine9sError",
    "Release",
    "Soak",
    "Staged",
    "Status",
    "Transition",
    "TransitionOutcome",
    "WaitTimeout",
    "connect",
    "new_request_id",
]

#: Bytes per Stage data message (as ctl sends them; gRPC's default limit is 4 MiB).
CHUNK = 1024 * 1024
#: Largest reply accepted: a Status or History of a busy agent exceeds gRPC's 4 MiB default.
MAX_REPLY = 64 * 1024 * 1024
#: Transport failures retried after the first try, and the first pause (doubling).
RETRIES = 3
FIRST_PAUSE = 0.2
#: The longest pause between two reconnects of a Watch stream.
MAX_WATCH_PAUSE = 5.0

Permanence = Literal["soak", "immediate", "never"]
StateSource = Literal["migrate", "snapshot"]
T = TypeVar("T")


# ---------------------------------------------------------------------------
# Errors


class Nine9sError(Exception):
    """A call the agent refused, or that could not reach it.

    ``code`` is the gRPC status code (``None`` for failures of this helper
    that are no gRPC status); ``reason`` the agent's stable
    ``google.rpc.ErrorInfo.reason`` (``"UNKNOWN_RELEASE"``,
    ``"EXPECTED_ACTIVE_MISMATCH"``, ...) or ``None`` when the status carried
    none (a transport failure); ``metadata`` the ErrorInfo's metadata (for
    EXPECTED_ACTIVE_MISMATCH: ``expected_active`` and ``active``).
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        code = self.code.name if self.code is not None else None
        tags = ", ".join(t for t in (code, self.reason) if t)
        return f"{self.message} [{tags}]" if tags else self.message

    @property
    def is_transport(self) -> bool:
        """The agent did not answer this: the call may not have reached it."""
        return self.reason is None and self.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
        )


class NotPermanent(Nine9sError):
    """:meth:`Client.wait_permanent` saw the release leave before it became permanent.

    ``rolled_back`` is true when the health gate rolled it back (ctl exits 4
    for this); ``to_version`` is the release that replaced it, if known.
    """

    def __init__(self, message: str, *, rolled_back: bool, to_version: str | None) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back
        self.to_version = to_version


class WaitTimeout(Nine9sError):
    """A wait (:meth:`Client.wait_permanent`, :meth:`Client.events`) ran out of time."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=grpc.StatusCode.DEADLINE_EXCEEDED)


def _error(what: str, failure: grpc.RpcError) -> Nine9sError:
    """An error status as a :class:`Nine9sError`, with the agent's ErrorInfo decoded."""
    # Every RpcError grpcio raises for a call is also a grpc.Call, which is
    # what rpc_status.from_call reads (the grpc-status-details-bin trailer).
    call = failure if isinstance(failure, grpc.Call) else None
    code = call.code() if call is not None else None
    message = (call.details() if call is not None else None) or str(failure)
    reason: str | None = None
    metadata: dict[str, str] = {}
    try:
        status = rpc_status.from_call(call) if call is not None else None
    except ValueError:
        # from_call refuses details whose code or message differ from the
        # call's; the agent never sends such, so fall back to no reason.
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                metadata = dict(info.metadata)
                break
    return Nine9sError(f"{what}: {message}", code=code, reason=reason, metadata=metadata)


# ---------------------------------------------------------------------------
# Replies


def _name(enum: object, value: int, prefix: str) -> str:
    """An enum value's name without its prefix; the number for a value this stub does not know."""
    try:
        name: str = enum.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    #: STAGED, CURRENT, PERMANENT, OLD or FAILED.
    state: str
    sha256: str
    size: int
    staged_at_ms: int
    state_version: int
    routes: tuple[str, ...]
    #: When it last became permanent; 0 if never (or rolled back from since).
    permanent_since_ms: int
    #: Why it is failed, when it is.
    failure: str
    raw: pb.Release = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, r: pb.Release) -> Release:
        return cls(
            name=r.name,
            version=r.version,
            state=_name(pb.ReleaseState, r.state, "RELEASE_STATE_"),
            sha256=r.sha256,
            size=r.size,
            staged_at_ms=r.staged_at_ms,
            state_version=r.state_version,
            routes=tuple(r.routes),
            permanent_since_ms=r.permanent_since_ms,
            failure=r.failure,
            raw=r,
        )


@dataclass(frozen=True)
class Transition:
    #: Monotonic across restarts.
    id: int
    #: INSTALL, STAGE, UPGRADE, DOWNGRADE, ROLLBACK, MAKE_PERMANENT, REMOVE or RESTART.
    kind: str
    from_version: str
    to_version: str
    #: RUNNING, OK, FAILED or ABORTED.
    result: str
    started_at_ms: int
    duration_us: int
    #: How long new requests were held at the switch.
    switch_wait_us: int
    error: str
    error_reason: str
    #: Started by the agent itself (a health-gated rollback, a restart).
    automatic: bool
    reason: str
    request_id: str
    #: Who asked: the token's or certificate's name ("admin" for DATA/admin.token).
    identity: str
    raw: pb.Transition = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, t: pb.Transition) -> Transition:
        return cls(
            id=t.id,
            kind=_name(pb.TransitionKind, t.kind, "TRANSITION_KIND_"),
            from_version=t.from_version,
            to_version=t.to_version,
            result=_name(pb.TransitionResult, t.result, "TRANSITION_RESULT_"),
            started_at_ms=t.started_at_ms,
            duration_us=t.duration_us,
            switch_wait_us=t.switch_wait_us,
            error=t.error,
            error_reason=t.error_reason,
            automatic=t.automatic,
            reason=t.reason,
            request_id=t.request_id,
            identity=t.identity,
            raw=t,
        )


@dataclass(frozen=True)
class TransitionOutcome:
    """What Upgrade, Downgrade, Rollback and MakePermanent answered."""

    #: None for a dry run and when nothing changed.
    transition: Transition | None
    #: The requested release was already active: nothing was done.
    unchanged: bool
    #: The plan's steps ("LOAD", "MIGRATE", "HOOK:check_config", "SWITCH", ...);
    #: empty for MakePermanent and when nothing changed.
    steps: tuple[str, ...]
    #: What the checks found, one line each.
    checks: tuple[str, ...]
    raw: pb.TransitionReply = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, r: pb.TransitionReply) -> TransitionOutcome:
        steps = []
        for s in r.plan.steps:
            kind = _name(pb.StepKind, s.kind, "STEP_KIND_")
            steps.append(f"{kind}:{s.hook}" if s.hook else kind)
        return cls(
            # Proto3 message fields: HasField, not truthiness, tells "absent".
            transition=Transition.from_pb(r.transition) if r.HasField("transition") else None,
            unchanged=r.unchanged,
            steps=tuple(steps),
            checks=tuple(r.plan.checks),
            raw=r,
        )


@dataclass(frozen=True)
class Staged:
    release: Release
    #: The same version with the same bytes was already staged.
    already_staged: bool
    raw: pb.StageReply = field(repr=False, compare=False)


@dataclass(frozen=True)
class Soak:
    #: IDLE (the active release is permanent), SOAKING, ROLLING_BACK or HELD.
    mode: str
    #: The release watched; empty when idle.
    version: str
    remaining_ms: int
    reason: str
    attempts: int
    last_error: str


@dataclass(frozen=True)
class Status:
    #: The release serving new requests.
    active_version: str
    #: The release a restart comes back on.
    permanent_version: str
    #: Empty unless a release is installed but not yet permanent.
    current_version: str
    releases: tuple[Release, ...]
    soak: Soak
    #: The transition under way, if any.
    running: Transition | None
    #: The newest event's id: Watch after it for what happens next.
    last_event_id: int
    #: Why the store cannot be written, while it cannot (transitions are refused meanwhile).
    store_error: str
    uptime_ms: int
    raw: pb.StatusReply = field(repr=False, compare=False)

    def release(self, version: str) -> Release | None:
        """The release ``version``, if the agent knows it."""
        return next((r for r in self.releases if r.version == version), None)

    @classmethod
    def from_pb(cls, s: pb.StatusReply) -> Status:
        return cls(
            active_version=s.active_version,
            permanent_version=s.permanent_version,
            current_version=s.current_version,
            releases=tuple(Release.from_pb(r) for r in s.releases),
            soak=Soak(
                mode=_name(pb.SoakMode, s.soak.mode, "SOAK_MODE_"),
                version=s.soak.version,
                remaining_ms=s.soak.remaining_ms,
                reason=s.soak.reason,
                attempts=s.soak.attempts,
                last_error=s.soak.last_error,
            ),
            running=Transition.from_pb(s.running) if s.HasField("running") else None,
            last_event_id=s.last_event_id,
            store_error=s.store_error,
            uptime_ms=s.uptime_ms,
            raw=s,
        )


@dataclass(frozen=True)
class Event:
    #: Monotonic across restarts: resume a watch after it.
    id: int
    at_ms: int
    #: TRANSITION_STARTED, TRANSITION_FINISHED, RELEASE_STATE_CHANGED, SOAK_STARTED,
    #: SOAK_PROGRESS, SOAK_PASSED, SOAK_FAILED, ROLLBACK_RETRY, AGENT_STARTED, ...
    kind: str
    version: str
    #: For RELEASE_STATE_CHANGED: the new state (else "UNSPECIFIED").
    state: str
    soak_remaining_ms: int
    message: str
    #: For TRANSITION_STARTED / TRANSITION_FINISHED.
    transition: Transition | None
    raw: pb.Event = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, e: pb.Event) -> Event:
        return cls(
            id=e.id,
            at_ms=e.at_ms,
            kind=_name(pb.EventKind, e.kind, "EVENT_KIND_"),
            version=e.version,
            state=_name(pb.ReleaseState, e.state, "RELEASE_STATE_"),
            soak_remaining_ms=e.soak_remaining_ms,
            message=e.message,
            transition=Transition.from_pb(e.transition) if e.HasField("transition") else None,
            raw=e,
        )


# ---------------------------------------------------------------------------
# The client


def new_request_id() -> str:
    """A fresh request id (the agent takes up to 128 printable ASCII characters)."""
    return f"py-{uuid.uuid4()}"


def _millis(duration: float | timedelta) -> int:
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    if seconds <= 0:
        raise ValueError(f"a soak must be positive, not {duration!r}")
    return round(seconds * 1000)


def connect(
    address: str = "127.0.0.1:50051",
    *,
    token: str | None = None,
    token_file: str | Path | None = None,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    server_name: str | None = None,
    call_timeout: float | None = 60.0,
) -> Client:
    """A :class:`Client` of the agent at ``address`` (see there)."""
    return Client(
        address,
        token=token,
        token_file=token_file,
        ca=ca,
        cert=cert,
        key=key,
        server_name=server_name,
        call_timeout=call_timeout,
    )


class Client:
    """One channel to an agent's control plane.

    ``address`` is ``host:port``, or ``http://host:port`` / ``https://host:port``
    as ctl's ``--agent`` takes it. Credentials: ``token`` or ``token_file``
    (the agent's own ``DATA/admin.token``, or a token from its ``--tokens``
    file); neither sends no ``authorization`` (the agent then answers
    UNAUTHENTICATED, except for the health service and reflection). TLS:
    ``https://`` or ``ca`` (the PEM the agent's certificate chains to; the
    system's roots when ``https://`` comes without it), plus ``cert`` and
    ``key`` for mTLS; ``server_name`` overrides the name checked against the
    agent's certificate. ``call_timeout`` is the deadline of each unary call
    in seconds (``None``: none).
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
        call_timeout: float | None = 60.0,
    ) -> None:
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs its key: give cert and key together")
        if token_file is not None:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        if token is not None and not token:
            raise ValueError("the token is empty")
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.call_timeout = call_timeout

        secure = address.startswith("https://") or ca is not None or cert is not None
        target = address.removeprefix("https://").removeprefix("http://").rstrip("/")
        options: list[tuple[str, object]] = [("grpc.max_receive_message_length", MAX_REPLY)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if secure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(ca).read_bytes() if ca is not None else None,
                private_key=Path(key).read_bytes() if key is not None else None,
                certificate_chain=Path(cert).read_bytes() if cert is not None else None,
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self.address = target
        self._stub = pb_grpc.ControlStub(self._channel)

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls -------------------------------------------------------------

    def _call(self, what: str, invoke: Callable[[], T]) -> T:
        """Runs ``invoke`` (one RPC), again after a transport failure.

        ``invoke`` must send the same request each time (same request id):
        the agent answers a repeated id with the outcome it recorded, so a
        retry of a call that did reach it does not act twice.
        """
        pause = FIRST_PAUSE
        for attempt in range(RETRIES + 1):
            try:
                return invoke()
            except grpc.RpcError as failure:
                error = _error(what, failure)
                if not error.is_transport or attempt == RETRIES:
                    raise error from None
            time.sleep(pause)
            pause *= 2
        raise AssertionError("unreachable")

    def stage(
        self,
        release_dir: str | Path,
        library: str | Path | None = None,
        *,
        request_id: str | None = None,
        reason: str = "",
        timeout: float | None = None,
    ) -> Staged:
        """Uploads a release: ``release_dir/release.toml`` and its library.

        ``library`` defaults to the file the manifest's ``library`` names
        beside ``release.toml`` (ctl also looks in cargo's target dirs; this
        helper does not guess). ``release_dir/release.sig``, if present, is
        sent as the signature. The library is hashed, then streamed from
        disk in 1 MiB chunks after a header, as the proto describes. There is
        no deadline unless ``timeout`` is given: the agent itself drops an
        upload that stalls (``--upload-idle-timeout``).
        """
        release_dir = Path(release_dir)
        manifest_toml = (release_dir / "release.toml").read_text(encoding="utf-8")
        if library is None:
            name = tomllib.loads(manifest_toml).get("library")
            if not isinstance(name, str):
                raise ValueError(f"{release_dir / 'release.toml'} names no library")
            library = release_dir / name
            if not library.is_file():
                raise FileNotFoundError(
                    f"{library} does not exist: pass library= (the built .so, e.g. "
                    f"target/release/{name})"
                )
        library = Path(library)
        digest = hashlib.sha256()
        size = 0
        with library.open("rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
                size += len(block)
        signature_path = release_dir / "release.sig"
        header = pb.StageHeader(
            manifest_toml=manifest_toml,
            sha256=digest.hexdigest(),
            size=size,
            request_id=request_id or new_request_id(),
            reason=reason,
            signature=(
                signature_path.read_text(encoding="utf-8") if signature_path.exists() else ""
            ),
        )

        def chunks() -> Iterator[pb.StageChunk]:
            # A new generator per attempt: a retry re-sends everything, with
            # the same header (and request id). If the file changed since it
            # was hashed, the agent refuses it (DATA_LOSS, CHECKSUM_MISMATCH).
            yield pb.StageChunk(header=header)
            with library.open("rb") as f:
                while block := f.read(CHUNK):
                    yield pb.StageChunk(data=block)

        reply: pb.StageReply = self._call(
            f"staging {library.name}",
            lambda: self._stub.Stage(chunks(), metadata=self._metadata, timeout=timeout),
        )
        return Staged(
            release=Release.from_pb(reply.release), already_staged=reply.already_staged, raw=reply
        )

    def upgrade(
        self,
        version: str,
        *,
        expected_active: str | None = None,
        soak: float | timedelta | None = None,
        permanence: Permanence = "soak",
        dry_run: bool = False,
        request_id: str | None = None,
        reason: str = "",
        wait: bool = False,
        wait_timeout: float | None = None,
    ) -> TransitionOutcome:
        """Switches to a higher ``version`` (``ctl upgrade --to VERSION``).

        ``expected_active``: refused with ABORTED (EXPECTED_ACTIVE_MISMATCH),
        changing nothing, unless that version is active. ``soak`` (seconds or
        a timedelta; default the agent's ``--soak``) with
        ``permanence="soak"``. ``wait=True`` then follows the agent's events
        until ``version`` is permanent (``ctl upgrade --wait``): raises
        :class:`NotPermanent` if it was rolled back or left, and
        :class:`WaitTimeout` after ``wait_timeout`` seconds.
        """
        return self._switch(
            "Upgrade", version, expected_active, soak, permanence, dry_run,
            request_id, reason, wait, wait_timeout,
        )  # fmt: skip

    def downgrade(
        self,
        version: str,
        *,
        expected_active: str | None = None,
        soak: float | timedelta | None = None,
        permanence: Permanence = "soak",
        dry_run: bool = False,
        request_id: str | None = None,
        reason: str = "",
        wait: bool = False,
        wait_timeout: float | None = None,
    ) -> TransitionOutcome:
        """Switches to a lower ``version``; otherwise as :meth:`upgrade`."""
        return self._switch(
            "Downgrade", version, expected_active, soak, permanence, dry_run,
            request_id, reason, wait, wait_timeout,
        )  # fmt: skip

    def _switch(
        self,
        rpc: Literal["Upgrade", "Downgrade"],
        version: str,
        expected_active: str | None,
        soak: float | timedelta | None,
        permanence: Permanence,
        dry_run: bool,
        request_id: str | None,
        reason: str,
        wait: bool,
        wait_timeout: float | None,
    ) -> TransitionOutcome:
        if wait and permanence == "never":
            raise ValueError("wait=True with permanence='never' would wait for MakePermanent")
        request = pb.TransitionRequest(
            version=version,
            permanence={
                "soak": pb.PERMANENCE_SOAK,
                "immediate": pb.PERMANENCE_IMMEDIATE,
                "never": pb.PERMANENCE_NEVER,
            }[permanence],
            soak_ms=_millis(soak) if soak is not None else 0,
            dry_run=dry_run,
            request_id=request_id or new_request_id(),
            expected_active=expected_active or "",
            reason=reason,
        )
        # As ctl: read before the command, so that no event of its own is missed.
        before = self.status() if wait and permanence == "soak" and not dry_run else None
        method = self._stub.Upgrade if rpc == "Upgrade" else self._stub.Downgrade
        reply: pb.TransitionReply = self._call(
            f"{rpc.lower()} to {version}",
            lambda: method(request, metadata=self._metadata, timeout=self.call_timeout),
        )
        outcome = TransitionOutcome.from_pb(reply)
        if before is None:
            return outcome
        if outcome.unchanged:
            if before.permanent_version == version:
                return outcome
            if before.soak.mode == "HELD" and before.soak.version == version:
                raise NotPermanent(
                    f"{version} is held current: make_permanent({version!r}) makes it permanent",
                    rolled_back=False,
                    to_version=None,
                )
        self.wait_permanent(version, after=before.last_event_id, timeout=wait_timeout)
        return outcome

    def rollback(
        self,
        *,
        state: StateSource = "migrate",
        dry_run: bool = False,
        expected_active: str | None = None,
        request_id: str | None = None,
        reason: str = "",
    ) -> TransitionOutcome:
        """Back to the previous permanent release, which becomes permanent at once.

        ``state="migrate"`` carries the running state down (the snapshot if
        that fails); ``"snapshot"`` restores the one taken when the target was left.
        """
        request = pb.RollbackRequest(
            state={"migrate": pb.STATE_SOURCE_MIGRATE, "snapshot": pb.STATE_SOURCE_SNAPSHOT}[state],
            dry_run=dry_run,
            request_id=request_id or new_request_id(),
            expected_active=expected_active or "",
            reason=reason,
        )
        reply: pb.TransitionReply = self._call(
            "rollback",
            lambda: self._stub.Rollback(
                request, metadata=self._metadata, timeout=self.call_timeout
            ),
        )
        return TransitionOutcome.from_pb(reply)

    def make_permanent(
        self,
        version: str,
        *,
        expected_active: str | None = None,
        request_id: str | None = None,
        reason: str = "",
    ) -> TransitionOutcome:
        """Makes the current release ``version`` permanent now."""
        request = pb.MakePermanentRequest(
            version=version,
            request_id=request_id or new_request_id(),
            expected_active=expected_active or "",
            reason=reason,
        )
        reply: pb.TransitionReply = self._call(
            f"making {version} permanent",
            lambda: self._stub.MakePermanent(
                request, metadata=self._metadata, timeout=self.call_timeout
            ),
        )
        return TransitionOutcome.from_pb(reply)

    def status(self) -> Status:
        reply: pb.StatusReply = self._call(
            "status",
            lambda: self._stub.Status(
                pb.StatusRequest(), metadata=self._metadata, timeout=self.call_timeout
            ),
        )
        return Status.from_pb(reply)

    def releases(self) -> list[Release]:
        """Every release the agent knows, lowest version first."""
        reply: pb.ListReleasesReply = self._call(
            "listing releases",
            lambda: self._stub.ListReleases(
                pb.ListReleasesRequest(), metadata=self._metadata, timeout=self.call_timeout
            ),
        )
        return [Release.from_pb(r) for r in reply.releases]

    def history(self, *, limit: int = 0, after_id: int | None = None) -> list[Transition]:
        """Transitions, oldest first: the last ``limit`` (0: all), or a page after ``after_id``."""
        # after_id is `optional` in the proto: unset and 0 mean different pages.
        request = (
            pb.HistoryRequest(limit=limit)
            if after_id is None
            else pb.HistoryRequest(limit=limit, after_id=after_id)
        )
        reply: pb.HistoryReply = self._call(
            "history",
            lambda: self._stub.History(request, metadata=self._metadata, timeout=self.call_timeout),
        )
        return [Transition.from_pb(t) for t in reply.transitions]

    def agent_info(self) -> pb.AgentInfoReply:
        """What the agent is: versions, service and defaults (the raw reply)."""
        reply: pb.AgentInfoReply = self._call(
            "agent info",
            lambda: self._stub.AgentInfo(
                pb.AgentInfoRequest(), metadata=self._metadata, timeout=self.call_timeout
            ),
        )
        return reply

    def health(self, service: str = "") -> str:
        """``grpc.health.v1.Health/Check``: ``"SERVING"``, ``"NOT_SERVING"``, ...

        Sent without the token: the agent answers it for anyone (probes).
        ``service`` is ``""`` for the agent or ``"nine9s.control.v1.Control"``.
        """
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.call_timeout
            )
        except grpc.RpcError as failure:
            raise _error("health check", failure) from None
        return _name(health_pb2.HealthCheckResponse.ServingStatus, reply.status, "")

    # -- events ------------------------------------------------------------

    def events(self, after: int = 0, *, timeout: float | None = None) -> Iterator[Event]:
        """Every lifecycle event after the id ``after``, then each new one as it happens.

        The stream survives disconnects (an agent restarting its worker, a
        broken connection): it reconnects with back-off and resumes after the
        last event seen. Ends only by :class:`WaitTimeout` after ``timeout``
        seconds, an error the agent sent (credentials), or the caller leaving
        the loop (which cancels the call).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(f"no end to the wait after {timeout} s (last event {after})")
            stream = self._stub.Watch(
                pb.WatchRequest(after_id=after), metadata=self._metadata, timeout=remaining
            )
            try:
                for event in stream:
                    after = event.id
                    pause = 0.0
                    yield Event.from_pb(event)
                # The agent closed the stream (a worker handing over): resume.
            except grpc.RpcError as failure:
                error = _error("watching events", failure)
                if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and error.reason is None:
                    raise WaitTimeout(
                        f"no end to the wait after {timeout} s (last event {after})"
                    ) from None
                if not error.is_transport:
                    raise error from None
            finally:
                stream.cancel()
            pause = min(pause * 2, MAX_WATCH_PAUSE) if pause else 0.2
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)

    def wait_permanent(
        self, version: str, *, after: int | None = None, timeout: float | None = None
    ) -> Event | None:
        """Follows the events until ``version`` is permanent (ctl's ``--wait``).

        ``after``: the ``Status.last_event_id`` read *before* the command
        that installed ``version`` (what ``upgrade(wait=True)`` does), so
        that none of its events is missed. Without it, the status now tells:
        already permanent returns at once; not current raises.

        Returns the RELEASE_STATE_CHANGED event that made it permanent (None
        if it already was). Raises :class:`NotPermanent` when it was rolled
        back by the health gate (``rolled_back``), switched away from, or the
        agent restarted on another release; :class:`WaitTimeout` after
        ``timeout`` seconds.
        """
        if after is None:
            now = self.status()
            if now.permanent_version == version:
                return None
            if now.current_version != version:
                raise NotPermanent(
                    f"{version} is not current (active {now.active_version}, permanent "
                    f"{now.permanent_version}): nothing will make it permanent",
                    rolled_back=False,
                    to_version=None,
                )
            after = now.last_event_id
        # Why the release failed, once it did: the automatic rollback follows.
        failed: str | None = None
        for event in self.events(after, timeout=timeout):
            about_target = event.version == version
            if event.kind == "RELEASE_STATE_CHANGED" and about_target:
                if event.state == "PERMANENT":
                    return event
                if event.state == "FAILED" and failed is None:
                    failed = event.message or "it failed"
            elif event.kind == "SOAK_FAILED" and about_target:
                failed = event.message or "it failed its soak"
            elif event.kind == "TRANSITION_FINISHED" and event.transition is not None:
                t = event.transition
                if t.from_version != version or t.to_version == version or t.result != "OK":
                    continue
                if t.automatic and t.kind == "ROLLBACK":
                    why = failed or t.reason or "it failed its soak"
                    raise NotPermanent(
                        f"{version} was rolled back to {t.to_version} by the health gate: {why}",
                        rolled_back=True,
                        to_version=t.to_version,
                    )
                by = f", request {t.request_id}" if t.request_id else ""
                raise NotPermanent(
                    f"{version} was left for {t.to_version} ({t.kind.lower()}{by}) "
                    "before it became permanent",
                    rolled_back=False,
                    to_version=t.to_version,
                )
            elif event.kind == "AGENT_STARTED" and not about_target:
                raise NotPermanent(
                    f"the agent restarted on {event.version}; {version} is not permanent",
                    rolled_back=False,
                    to_version=event.version,
                )
        raise AssertionError("unreachable: events() ends only by raising")
