"""Watches for the version this cell is assigned, fetches and checks it, and hands it over.

All of it runs on a thread beside the control loop: the watch stream, the chunked weight
fetch (resumed from the last byte received after any error, so a large file survives a
flaky link), the Ed25519 signature check (fleet/common/signing.py: the learner's key over version id
+ SHA-256, checked before a byte is fetched), the SHA-256 check of the bytes, the on-disk
version cache (actors/version_cache.py: a restart or a rollback needs no refetch), and
building the PolicyRunner. The loop only ever calls `take_new()`, which never blocks. Any
failure keeps the last good version running and is reported through `on_fault`.

Shadow evaluation: an assignment may also name a version to run in shadow (the candidate
inferring beside the acting version, its actions logged, never executed). The watcher gets
it through the very same path (signature, sha256, version cache, resumable fetch, load and
warm-up) once the acting version is settled, and offers it as `shadow_runner` (None while
there is none). It is dropped as soon as an assignment no longer names it. A shadow that
cannot be fetched or loaded is reported like any fault and never touches the acting version.

Prefetch: an assignment also lists versions the cell may soon run (`Assignment.prefetch`:
the candidate while the cell runs stable, stable while it runs the candidate). A second
thread, at a lower priority than the watcher's and capped at `prefetch_bytes_per_s`, fetches
each one the cache lacks, checks its signature and SHA-256 like any version, caches it, and
loads and warms up the first one (kept ready, not offered). When an assignment then names
it, the watcher hands that runner over at once: a promotion or rollout stage is a swap (the
others come from the cache: a hash and a copy, no fetch). A prefetch that fails its checks
is discarded and reported, and never run; one the learner stops listing is abandoned. If
the assignment names the version being prefetched, the cap is lifted and the watcher waits
for it rather than fetching it twice. A shadow runner promoted to acting is handed over as
it is.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from actors.thread_priority import lower_this_thread
from actors.uplink import Backoff, open_channel
from actors.version_cache import VersionCache
from fleet.common.signing import SignatureError, verify
from protos.fleetlearn.v1 import policy_pb2, policy_pb2_grpc

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from fleet.common.policy.runtime import PolicyRunner

log = logging.getLogger(__name__)

#: builds a runner from verified weights and the assignment that named them; the buffer is
#: the factory's to keep (the watcher only reads it afterwards, to cache it), so the model
#: may alias it
RunnerFactory = Callable[[bytearray, policy_pb2.Assignment], "PolicyRunner"]

# Fetch errors that retrying the same request cannot fix.
_PERMANENT = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def load_runner(weights: bytearray, assignment: policy_pb2.Assignment) -> PolicyRunner:
    """The real factory: manifest from the assignment, the model built around the weights
    (zero-copy: its tensors are views into the checked buffer) and warmed up.

    The watcher has checked the bytes against the assignment's sha256 (and signature) just
    before; the manifest must name the same version and digest, so the bytes are not hashed
    a second time here (100 MB take ~0.07 s of a cell's CPU)."""
    from fleet.common.policy.config import PolicyConfig
    from fleet.common.policy.manifest import Manifest
    from fleet.common.policy.runtime import PolicyRunner
    from fleet.common.policy.weights import model_from_bytes

    manifest = Manifest.from_json(assignment.manifest_json)
    if manifest.version_id != assignment.version_id or manifest.sha256 != assignment.sha256:
        raise ValueError(
            f"assignment names version {assignment.version_id!r} sha256 "
            f"{assignment.sha256[:16]}... but its manifest is {manifest.version_id!r} sha256 "
            f"{manifest.sha256[:16]}..."
        )
    model = model_from_bytes(PolicyConfig.from_dict(manifest.model_config), weights)
    runner = PolicyRunner(model, manifest.version_id)
    warm_up(runner)
    return runner


def warm_up(runner: PolicyRunner) -> None:
    """One inference on blank inputs, here on the watch thread: a fresh model's first forward
    pass allocates its buffers and is many times slower than the next, and it must not land
    on a control tick when the loop adopts the version."""
    import numpy as np

    from protos.joint_layout import JOINT_DIM

    config = runner.config
    height, width = (int(x) for x in config.image_size)
    frames = {cam: np.zeros((height, width, 3), np.uint8) for cam in config.cameras}
    runner.predict(frames, np.zeros(JOINT_DIM, np.float32), config.tasks[0])


class FetchError(RuntimeError):
    """The weights could not be fetched now; the watch reconnects and tries again."""


class _Stopping(Exception):
    pass


class _Superseded(Exception):
    """The version being prefetched is no longer wanted."""


class PolicyWatcher:
    """Keeps the newest verified version of this cell's assignment ready for the loop."""

    def __init__(
        self,
        address: str,
        cell_id: str,
        *,
        deadline_s: float,
        on_fault: Callable[[str], None],
        runner_factory: RunnerFactory | None = None,
        stream_lifetime_s: float = 300.0,
        fetch_chunk_bytes: int = 0,
        max_fetch_errors: int = 5,
        verify_attempts: int = 2,
        verify_key: Ed25519PublicKey | None = None,
        cache: VersionCache | None = None,
        nice: int = 10,
        prefetch_bytes_per_s: float = 25e6,
        prefetch_nice: int = 15,
    ) -> None:
        self.address = address
        self.cell_id = cell_id
        self.deadline_s = float(deadline_s)
        self.on_fault = on_fault
        self.runner_factory: RunnerFactory = runner_factory or load_runner
        self.stream_lifetime_s = float(stream_lifetime_s)
        self.fetch_chunk_bytes = int(fetch_chunk_bytes)
        self.max_fetch_errors = int(max_fetch_errors)
        self.verify_attempts = max(1, int(verify_attempts))
        # None = signatures are not checked (a cell without the learner's public key).
        self.verify_key = verify_key
        self.cache = cache
        self.nice = int(nice)
        # 0 turns prefetching off; otherwise the most bytes a second a prefetch may take.
        # (the learner serves no paced fetch below 64 KiB/s: policy_service.MIN_PACED_BYTES_PER_S)
        if not (prefetch_bytes_per_s == 0 or prefetch_bytes_per_s >= 64 << 10):
            raise ValueError(
                f"prefetch_bytes_per_s must be 0 (off) or at least 65536, got "
                f"{prefetch_bytes_per_s}"
            )
        self.prefetch_bytes_per_s = float(prefetch_bytes_per_s)
        self.prefetch_nice = int(prefetch_nice)
        if verify_key is None:
            log.warning("cell %s: no verify key; policy signatures are NOT checked", cell_id)
        self._lock = threading.Lock()
        self._assignment = ""
        self._loaded = ""  # newest version built into a runner (taken or not)
        self._new: PolicyRunner | None = None
        self._shadow_assignment = ""
        self._shadow: PolicyRunner | None = None  # the loaded shadow runner, offered as is
        # version -> (sha256, signature) that failed to verify or load: not tried again
        self._failed: dict[str, tuple[str, str]] = {}
        self._stopping = threading.Event()
        self._calls: set[Any] = set()
        self._thread: threading.Thread | None = None
        self._channel: grpc.Channel | None = None
        self.fetches = 0  # fetch calls made, resumptions included
        self.bytes_fetched = 0  # prefetches included
        # Prefetch: what the learner lists (bumping _want_gen), the version being fetched,
        # whether its cap is lifted, and the one version loaded ahead. All under _pf.
        self._pf = threading.Condition()
        self._want: list[policy_pb2.Assignment] = []
        self._want_gen = 0
        self._prefetching: tuple[str, str] | None = None
        self._hurry = False
        self._staged: tuple[str, str, PolicyRunner] | None = None  # (version, sha256, runner)
        self._prefetcher: threading.Thread | None = None
        self.prefetched: list[str] = []  # versions verified and cached ahead, in order
        self.prefetch_bytes = 0

    # -- the control loop's side ---------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("policy watcher already started")
        self._channel = open_channel(self.address)
        self._thread = threading.Thread(
            target=self._run, name=f"policy-watch-{self.cell_id}", daemon=True
        )
        self._thread.start()
        if self.prefetch_bytes_per_s > 0:
            self._prefetcher = threading.Thread(
                target=self._prefetch_run, name=f"policy-prefetch-{self.cell_id}", daemon=True
            )
            self._prefetcher.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._pf:
            self._pf.notify_all()
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.cancel()
        for thread in (self._thread, self._prefetcher):
            if thread is not None:
                thread.join(timeout=self.deadline_s + 5.0)
                if thread.is_alive():
                    log.error("cell %s: %s did not stop", self.cell_id, thread.name)
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def take_new(self) -> PolicyRunner | None:
        """The newest loaded runner not taken yet, or None; never blocks."""
        with self._lock:
            runner, self._new = self._new, None
            return runner

    @property
    def current_assignment(self) -> str:
        """The version id the learner assigns this cell now ("" = none yet)."""
        with self._lock:
            return self._assignment

    @property
    def loaded_version(self) -> str:
        with self._lock:
            return self._loaded

    @property
    def shadow_runner(self) -> PolicyRunner | None:
        """The version to run in shadow now (verified, loaded, warmed up), or None; never
        blocks. The loop reads it every tick and notices a change by identity."""
        with self._lock:
            return self._shadow

    @property
    def current_shadow_assignment(self) -> str:
        """The version id the learner assigns this cell in shadow now ("" = none)."""
        with self._lock:
            return self._shadow_assignment

    @property
    def staged_version(self) -> str:
        """The prefetched version loaded and kept ready for a swap ("" = none)."""
        with self._pf:
            return self._staged[0] if self._staged is not None else ""

    @property
    def shadow_version(self) -> str:
        """The shadow version loaded and offered now ("" = none)."""
        with self._lock:
            return self._shadow.version_id if self._shadow is not None else ""

    # -- the watch thread ----------------------------------------------------------------

    def _fault(self, message: str) -> None:
        log.error("cell %s: %s", self.cell_id, message)
        try:
            self.on_fault(message)
        except Exception:
            log.exception("cell %s: on_fault callback failed", self.cell_id)

    def _track(self, call: Any) -> Any:
        with self._lock:
            self._calls.add(call)
        if self._stopping.is_set():
            call.cancel()
        return call

    def _untrack(self, call: Any) -> None:
        with self._lock:
            self._calls.discard(call)
        call.cancel()

    def _run(self) -> None:
        assert self._channel is not None
        lower_this_thread(self.nice, cell_id=self.cell_id, what="the version watcher")
        stub = policy_pb2_grpc.PolicyServiceStub(self._channel)
        backoff = Backoff()
        while not self._stopping.is_set():
            request = policy_pb2.WatchRequest(
                cell_id=self.cell_id, current_version=self.loaded_version
            )
            opened = time.monotonic()
            call = self._track(stub.WatchAssignment(request, timeout=self.stream_lifetime_s))
            retry_now = False
            try:
                for assignment in call:
                    backoff.reset()
                    self._on_assignment(stub, assignment)
                if not self._stopping.is_set():
                    log.warning("cell %s: learner closed the assignment watch", self.cell_id)
            except _Stopping:
                break
            except FetchError as exc:
                self._fault(f"{exc}; keeping version {self.loaded_version!r}")
            except grpc.RpcError as exc:
                if self._stopping.is_set():
                    break
                code = exc.code()
                if code is grpc.StatusCode.DEADLINE_EXCEEDED and (
                    time.monotonic() - opened >= self.stream_lifetime_s * 0.9
                ):
                    retry_now = True  # the watch reached its lifetime: reopen at once
                elif code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    self._fault(f"assignment watch refused ({code.name}): {exc.details()}")
                else:
                    log.warning(
                        "cell %s: assignment watch failed (%s: %s); reconnecting",
                        self.cell_id,
                        code.name if code is not None else "?",
                        exc.details(),
                    )
            finally:
                self._untrack(call)
            if not retry_now:
                self._stopping.wait(backoff.next())

    def _on_assignment(
        self, stub: policy_pb2_grpc.PolicyServiceStub, assignment: policy_pb2.Assignment
    ) -> None:
        """The acting version first, then the shadow: a shadow never delays the acting one."""
        version = assignment.version_id
        shadow_id = assignment.shadow_version_id
        with self._lock:
            self._assignment = version
            self._shadow_assignment = shadow_id
            loaded = self._loaded
            dropped = (
                self._shadow if self._shadow and self._shadow.version_id != shadow_id else None
            )
            if dropped is not None:
                self._shadow = None
        if dropped is not None:
            log.info(
                "cell %s: shadow version %s dropped (the assignment names %r)",
                self.cell_id,
                dropped.version_id,
                shadow_id,
            )
        if not version:
            log.info("cell %s: no policy version assigned yet", self.cell_id)
        elif version != loaded and dropped is not None and dropped.version_id == version:
            # The shadow candidate now acts (shadow -> canary): already verified and loaded.
            self._offer(dropped, version)
            log.info(
                "cell %s: shadow version %s now acts; swapped in with no fetch",
                self.cell_id,
                version,
            )
        elif version != loaded:
            self._obtain(stub, assignment, "version", self._offer, keeping=loaded)
        if shadow_id and self.shadow_version != shadow_id:
            shadow = assignment.shadow
            if shadow.version_id != shadow_id:
                self._fault(
                    f"shadow assignment names {shadow_id!r} but carries version "
                    f"{shadow.version_id!r}; no shadow run"
                )
                return
            try:
                self._obtain(
                    stub, shadow, "shadow version", self._offer_shadow, keeping=self.loaded_version
                )
            except FetchError as exc:
                raise FetchError(f"shadow {exc}") from None
        self._set_prefetch(list(assignment.prefetch))

    def _offer(self, runner: PolicyRunner, version: str) -> None:
        with self._lock:
            self._new = runner
            self._loaded = version

    def _offer_shadow(self, runner: PolicyRunner, version: str) -> None:
        with self._lock:
            # Only while it is still the shadow the learner wants (not cleared as it loaded).
            if self._shadow_assignment == version:
                self._shadow = runner

    def _obtain(
        self,
        stub: policy_pb2_grpc.PolicyServiceStub,
        assignment: policy_pb2.Assignment,
        role: str,
        hand_over: Callable[[PolicyRunner, str], None],
        *,
        keeping: str,
    ) -> None:
        """Verify, fetch (or read from the cache), load one version and `hand_over` its
        runner; a failure is reported instead. `role` ("version" / "shadow version") names
        it in the logs. FetchError (retry after reconnecting) propagates."""
        version = assignment.version_id
        loaded = keeping
        if self._failed.get(version) == (assignment.sha256, assignment.signature):
            log.info(
                "cell %s: %s %s failed its checks before; keeping version %r",
                self.cell_id,
                role,
                version,
                loaded,
            )
            return
        log.info(
            "cell %s: assigned %s %s (%d bytes, sha256 %s...); fetching",
            self.cell_id,
            role,
            version,
            assignment.size_bytes,
            assignment.sha256[:12],
        )
        started = time.monotonic()
        failed_key = (assignment.sha256, assignment.signature)
        staged = self._take_prefetched(version, assignment.sha256)
        if staged is not None:
            hand_over(staged, version)
            log.info(
                "cell %s: %s %s was prefetched (verified, loaded); swapped in after %.3f s",
                self.cell_id,
                role,
                version,
                time.monotonic() - started,
            )
            return
        if self._failed.get(version) == failed_key:  # its prefetch just failed its checks
            log.info(
                "cell %s: %s %s failed its checks; keeping %r", self.cell_id, role, version, loaded
            )
            return
        if self.verify_key is not None:
            try:
                verify(self.verify_key, version, assignment.sha256, assignment.signature)
            except SignatureError as exc:
                self._failed[version] = failed_key
                self._fault(f"{role} {version}: {exc}; rejected, keeping version {loaded!r}")
                return
        data = self.cache.get(assignment.sha256) if self.cache is not None else None
        from_cache = data is not None
        if data is None:
            for attempt in range(1, self.verify_attempts + 1):
                data, digest = self._fetch(stub, assignment)
                if digest == assignment.sha256:
                    break
                self._fault(
                    f"{role} {version}: fetched weights sha256 {digest[:16]}... do not match "
                    f"the assignment's {assignment.sha256[:16]}... (attempt {attempt}); "
                    f"keeping version {loaded!r}"
                )
            else:
                self._failed[version] = failed_key
                return
        assert data is not None
        try:
            runner = self.runner_factory(data, assignment)
        except Exception as exc:
            self._failed[version] = failed_key
            self._fault(f"{role} {version} does not load: {exc}; keeping version {loaded!r}")
            return
        hand_over(runner, version)
        log.info(
            "cell %s: %s %s verified (%s) and loaded in %.2f s%s; %s",
            self.cell_id,
            role,
            version,
            "sha256 + signature" if self.verify_key is not None else "sha256 only",
            time.monotonic() - started,
            " from the local cache" if from_cache else "",
            "it runs in shadow, never acting"
            if role.startswith("shadow")
            else "the loop adopts it at its next chunk boundary",
        )
        if self.cache is not None and not from_cache:  # after the hand-over: never delays it
            try:
                self.cache.put(data, assignment.sha256, verified=True)
            except (OSError, ValueError) as exc:
                log.warning("cell %s: version %s not cached: %s", self.cell_id, version, exc)

    def _fetch(
        self,
        stub: policy_pb2_grpc.PolicyServiceStub,
        assignment: policy_pb2.Assignment,
        *,
        prefetch_gen: int | None = None,
    ) -> tuple[bytearray, str]:
        """The version's whole file and its SHA-256 (hex), resuming from the bytes already
        received after errors.

        Each chunk is appended once to one growing bytearray and hashed as it arrives
        (hashlib releases the GIL): no list of chunks to join (a second 100 MB of fresh pages
        and a copy holding the GIL for ~0.1 s), no second pass over the file to hash it. Not
        `bytearray(total)` up front either: that zero-fills 100 MB in one GIL hold (50-80 ms,
        far more while this niced thread is preempted), whereas a large bytearray is an mmap
        that glibc grows with mremap (no copy), so each append holds the GIL for a few ms at
        most. The buffer is what the model is built on (it aliases it).

        A prefetch (`prefetch_gen`: the learner's list it serves) is paced to
        prefetch_bytes_per_s, by the learner (FetchRequest.max_bytes_per_s) and checked here,
        until the cap is lifted (the version got assigned: the call is resumed unpaced), and
        gives up (_Superseded) once the learner no longer wants it."""
        version = assignment.version_id
        rate = self.prefetch_bytes_per_s if prefetch_gen is not None else 0.0
        paced_from = time.monotonic()
        buffer = bytearray()
        hasher = hashlib.sha256()
        received = 0
        total: int | None = None
        errors = 0
        backoff = Backoff()
        while True:
            if self._stopping.is_set():
                raise _Stopping
            request = policy_pb2.FetchRequest(
                cell_id=self.cell_id,
                version_id=version,
                offset=received,
                chunk_bytes=self.fetch_chunk_bytes,
                max_bytes_per_s=round(rate),  # the learner paces it: no burst on the link
            )
            before = received
            lifted = False
            self.fetches += 1
            # The deadline bounds each call, not the file: a call that runs out of time just
            # resumes from where it got to. A paced call gets the time its bytes take too.
            timeout = self.deadline_s
            if rate > 0 and assignment.size_bytes:
                timeout += (assignment.size_bytes - received) / rate
            call = self._track(stub.FetchWeights(request, timeout=timeout))
            try:
                for msg in call:
                    if msg.offset != received:
                        raise FetchError(
                            f"version {version}: fetch sent offset {msg.offset}, "
                            f"expected {received}"
                        )
                    chunk = msg.data
                    end = received + len(chunk)
                    if total is None:
                        total = int(msg.total_bytes)
                        if assignment.size_bytes and total != assignment.size_bytes:
                            raise FetchError(
                                f"version {version}: file is {total} bytes, the assignment "
                                f"says {assignment.size_bytes}"
                            )
                    elif int(msg.total_bytes) != total:
                        raise FetchError(
                            f"version {version}: fetch says the file is {msg.total_bytes} "
                            f"bytes, earlier {total}"
                        )
                    if end > total:
                        raise FetchError(f"version {version}: fetch sent {end} bytes of {total}")
                    buffer += chunk
                    hasher.update(chunk)
                    received = end
                    self.bytes_fetched += len(chunk)
                    if prefetch_gen is not None:
                        self.prefetch_bytes += len(chunk)
                        paced = self._pace(version, prefetch_gen, rate, paced_from, received)
                        if rate > 0 and paced == 0:  # assigned now: resume at full speed
                            rate, lifted = 0.0, True
                            break
                if total is not None and received == total:
                    return buffer, hasher.hexdigest()
                if lifted:
                    continue
                problem = f"stream ended at byte {received} of {total}"
            except grpc.RpcError as exc:
                if self._stopping.is_set():
                    raise _Stopping from None
                code = exc.code()
                if code in _PERMANENT:
                    raise FetchError(
                        f"version {version}: fetch refused ({code.name}): {exc.details()}"
                    ) from None
                problem = f"{code.name if code is not None else '?'}: {exc.details()}"
            finally:
                self._untrack(call)
            errors = 0 if received > before else errors + 1
            if errors > self.max_fetch_errors:
                raise FetchError(
                    f"version {version}: fetch failed {errors} times in a row at byte "
                    f"{received} ({problem})"
                )
            log.warning(
                "cell %s: fetching version %s interrupted at byte %d of %s (%s); resuming",
                self.cell_id,
                version,
                received,
                total if total is not None else "?",
                problem,
            )
            if errors:
                self._stopping.wait(backoff.next())

    # -- prefetch (its own thread) -------------------------------------------------------

    def _set_prefetch(self, wanted: list[policy_pb2.Assignment]) -> None:
        """The learner's newest list of versions to fetch ahead; wakes the prefetcher."""
        ids = [a.version_id for a in wanted]
        with self._pf:
            if ids == [a.version_id for a in self._want]:
                return
            self._want = wanted
            self._want_gen += 1
            self._pf.notify_all()
        if ids:
            log.info("cell %s: versions to prefetch: %s", self.cell_id, ", ".join(ids))

    def _still_wanted(self, version: str, gen: int) -> bool:
        """Caller holds _pf. A version is wanted while listed, or assigned (then the watcher
        waits for it)."""
        if gen == self._want_gen or any(a.version_id == version for a in self._want):
            return True
        with self._lock:
            return version in (self._assignment, self._shadow_assignment)

    def _pace(self, version: str, gen: int, rate: float, since: float, received: int) -> float:
        """Sleeps until `received` bytes are within the cap; returns the rate to keep (0 once
        the cap is lifted). Raises _Stopping, or _Superseded when the version is no longer
        wanted."""
        with self._pf:
            while True:
                if self._stopping.is_set():
                    raise _Stopping
                if not self._still_wanted(version, gen):
                    raise _Superseded
                if self._hurry or rate <= 0:
                    return 0.0
                wait = since + received / rate - time.monotonic()
                if wait <= 0:
                    return rate
                self._pf.wait(wait)

    def _take_prefetched(self, version: str, sha256: str) -> PolicyRunner | None:
        """The runner prefetched for this version and digest, waiting (cap lifted) for a
        prefetch of it in progress; None when there is none."""
        with self._pf:
            if self._prefetching == (version, sha256):
                log.info(
                    "cell %s: version %s is being prefetched; lifting its cap and waiting",
                    self.cell_id,
                    version,
                )
                self._hurry = True
                self._pf.notify_all()
                while self._prefetching == (version, sha256) and not self._stopping.is_set():
                    self._pf.wait(1.0)
                if self._stopping.is_set():
                    raise _Stopping
            staged = self._staged
            if staged is not None and staged[:2] == (version, sha256):
                self._staged = None
                return staged[2]
        return None

    def _prefetch_run(self) -> None:
        assert self._channel is not None
        lower_this_thread(self.prefetch_nice, cell_id=self.cell_id, what="the prefetcher")
        stub = policy_pb2_grpc.PolicyServiceStub(self._channel)
        backoff = Backoff()
        done = 0  # the list generation last worked through without error
        while not self._stopping.is_set():
            with self._pf:
                while not self._stopping.is_set() and self._want_gen == done:
                    self._pf.wait(1.0)
                gen, wanted = self._want_gen, list(self._want)
                staged = self._staged
                if staged is not None and not any(a.version_id == staged[0] for a in wanted):
                    self._staged = None  # no longer a version this cell may run next
                    log.info("cell %s: prefetched version %s dropped", self.cell_id, staged[0])
            try:
                for i, assignment in enumerate(wanted):
                    self._prefetch_one(stub, assignment, gen, load=i == 0)
                done = gen
                backoff.reset()
            except _Stopping:
                return
            except _Superseded:
                continue  # the newer list is read at once
            except FetchError as exc:
                log.warning("cell %s: prefetch interrupted: %s; retrying", self.cell_id, exc)
                with self._pf:
                    self._pf.wait_for(
                        lambda gen=gen: self._stopping.is_set() or self._want_gen != gen,
                        timeout=backoff.next(),
                    )

    def _prefetch_one(
        self,
        stub: policy_pb2_grpc.PolicyServiceStub,
        assignment: policy_pb2.Assignment,
        gen: int,
        *,
        load: bool,
    ) -> None:
        """Verify, fetch (capped) and cache one version the cell may soon run; with `load`,
        also build and warm up its runner and keep it ready. Reports and discards a version
        that fails its checks (never run: it is remembered as failed)."""
        version, sha = assignment.version_id, assignment.sha256
        key = (sha, assignment.signature)
        if not version or not sha or self._failed.get(version) == key:
            return
        with self._lock:
            if version in (self._loaded, self._assignment) or (
                self._shadow and self._shadow.version_id == version
            ):
                return  # running, or being fetched by the watcher as its assignment
        with self._pf:
            if self._staged is not None and self._staged[:2] == (version, sha):
                return
        cached = self.cache is not None and self.cache.contains(sha)
        if not load and (cached or self.cache is None):
            return  # on disk already, or nowhere to keep it but loaded
        if self.verify_key is not None:
            try:
                verify(self.verify_key, version, sha, assignment.signature)
            except SignatureError as exc:
                self._failed[version] = key
                self._fault(f"prefetched version {version}: {exc}; discarded, never run")
                return
        started = time.monotonic()
        with self._pf:
            self._prefetching, self._hurry = (version, sha), False
        try:
            data = self.cache.get(sha) if cached and self.cache is not None else None
            if data is None:
                cached = False
                data = self._prefetch_bytes(stub, assignment, gen)
                if data is None:
                    return
                if self.cache is not None:
                    try:
                        self.cache.put(data, sha, verified=True)
                    except (OSError, ValueError) as exc:
                        log.warning(
                            "cell %s: version %s not cached: %s", self.cell_id, version, exc
                        )
            with self._pf:
                load = load or self._hurry  # the watcher waits for it: it is assigned now
            if load and not self._stage(assignment, data):
                return
        finally:
            with self._pf:
                self._prefetching, self._hurry = None, False
                self._pf.notify_all()
        self.prefetched.append(version)
        log.info(
            "cell %s: version %s prefetched (%d bytes, %s, %s) in %.2f s; %s",
            self.cell_id,
            version,
            len(data),
            "sha256 + signature" if self.verify_key is not None else "sha256 only",
            "from the local cache"
            if cached
            else f"at most {self.prefetch_bytes_per_s / 1e6:g} MB/s",
            time.monotonic() - started,
            "loaded, ready to swap" if self.staged_version == version else "cached",
        )

    def _prefetch_bytes(
        self, stub: policy_pb2_grpc.PolicyServiceStub, assignment: policy_pb2.Assignment, gen: int
    ) -> bytearray | None:
        """The version's checked bytes, fetched at the capped rate; None (reported, marked
        failed) when they never match the signed digest."""
        version = assignment.version_id
        for attempt in range(1, self.verify_attempts + 1):
            data, digest = self._fetch(stub, assignment, prefetch_gen=gen)
            if digest == assignment.sha256:
                return data
            self._fault(
                f"prefetched version {version}: fetched weights sha256 {digest[:16]}... do not "
                f"match the assignment's {assignment.sha256[:16]}... (attempt {attempt}); "
                "discarded, never run"
            )
        self._failed[version] = (assignment.sha256, assignment.signature)
        return None

    def _stage(self, assignment: policy_pb2.Assignment, data: bytearray) -> bool:
        """Build and warm up the version's runner here, and keep it ready for the swap;
        False (reported, marked failed) when it does not load."""
        version = assignment.version_id
        try:
            runner = self.runner_factory(data, assignment)
        except Exception as exc:
            self._failed[version] = (assignment.sha256, assignment.signature)
            self._fault(f"prefetched version {version} does not load: {exc}; discarded, never run")
            return False
        with self._pf:
            self._staged = (version, assignment.sha256, runner)
        return True
